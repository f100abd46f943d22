"""Multi-process start-up: decide whether this run is one of several processes and, if so,
call ``jax.distributed.initialize`` before anything touches a device.

Where the coordinates come from, first match wins:

1. ``mode="none"``: a single process, whatever the environment says.
2. Explicit values (the CLI flags ``--coordinator_address --num_processes --process_id``,
   as ``launch/local.sh`` passes them).
3. ``JAX_COORDINATOR_ADDRESS`` + ``JAX_NUM_PROCESSES`` + ``JAX_PROCESS_ID`` in the env.
4. SLURM (``SLURM_NTASKS > 1``): process id ``SLURM_PROCID``, coordinator = first host of
   ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``) on port ``GIST_COORDINATOR_PORT``
   or one derived from the job id. With one task per node (``launch/slurm.sbatch``) each
   process sees all of its node's GPUs; with several tasks per node, task
   ``SLURM_LOCALID`` gets GPU ``SLURM_LOCALID``.
5. ``mode="auto"``: let JAX detect the cluster (Cloud TPU VM pods, MPI, Kubernetes);
   ``launch/tpu_pod.sh`` uses this.
6. Otherwise a single process; nothing is initialised.

Timeouts (seconds, passed to ``jax.distributed.initialize``):

* ``initialization_timeout`` 300: how long processes wait for each other to start
  (covers staggered ``gcloud ... ssh --worker=all`` / ``srun`` start-up).
* ``heartbeat_timeout`` 100: a process that has not been heard from for this long is
  declared dead and the others fail instead of hanging in a collective forever. Heartbeats
  come from a background thread, so long compilations or checkpoint writes do not trip it.
* ``shutdown_timeout`` 120: at exit every process waits at a barrier for the others
  (the last async checkpoint may still be writing); a crashed peer then costs at most
  two minutes rather than JAX's default five.

CPU runs use gloo for cross-process collectives (``jax_cpu_collectives_implementation``);
without it CPU computations cannot span processes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import jax

INITIALIZATION_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_S = 100
SHUTDOWN_TIMEOUT_S = 120
MODES = ("detect", "auto", "none")


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """Where this process sits in a multi-process run."""

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None = None
    source: str = "flags"


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist: ``node[003-007,9],gpu1`` -> ``node003``."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = re.split(r"[,-]", ranges)[0]
    return prefix + first


def _slurm_spec(env: Mapping[str, str]) -> ProcessSpec | None:
    ntasks = int(env.get("SLURM_NTASKS", "1") or 1)
    if ntasks <= 1 or "SLURM_PROCID" not in env:
        return None
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise ValueError(
            "SLURM_NTASKS > 1 but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set"
        )
    port = env.get("GIST_COORDINATOR_PORT")
    if not port:
        # A port in the upper ephemeral range, the same on every task of the job.
        port = str(61440 + int(env.get("SLURM_JOB_ID", "0")) % 4096)
    tasks_per_node = int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)
    local_ids = None
    if tasks_per_node > 1 and "SLURM_LOCALID" in env:
        local_ids = (int(env["SLURM_LOCALID"]),)
    return ProcessSpec(
        coordinator_address=f"{first_slurm_host(nodelist)}:{port}",
        num_processes=ntasks,
        process_id=int(env["SLURM_PROCID"]),
        local_device_ids=local_ids,
        source="slurm",
    )


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str = "detect",
    env: Mapping[str, str] | None = None,
) -> ProcessSpec | str | None:
    """How to start: a ``ProcessSpec``, the string ``"auto"`` (JAX detects the cluster),
    or ``None`` for a single process. Raises ``ValueError`` on incomplete flags."""
    if mode not in MODES:
        raise ValueError(f"distributed mode {mode!r}; expected one of {MODES}")
    env = os.environ if env is None else env
    if mode == "none":
        return None
    given = [coordinator_address, num_processes, process_id]
    if any(v not in (None, "", -1) for v in given):
        if (
            coordinator_address in (None, "")
            or num_processes in (None, -1)
            or process_id
            in (
                None,
                -1,
            )
        ):
            raise ValueError(
                "--coordinator_address, --num_processes and --process_id must be given together "
                f"(got {coordinator_address!r}, {num_processes!r}, {process_id!r})"
            )
        if not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id={process_id} is not in [0, {num_processes})")
        if num_processes == 1:
            return None
        return ProcessSpec(coordinator_address, num_processes, process_id)
    if "JAX_COORDINATOR_ADDRESS" in env and "JAX_NUM_PROCESSES" in env:
        count = int(env["JAX_NUM_PROCESSES"])
        if count > 1:
            return ProcessSpec(
                env["JAX_COORDINATOR_ADDRESS"], count, int(env["JAX_PROCESS_ID"]), source="env"
            )
    slurm = _slurm_spec(env)
    if slurm is not None:
        return slurm
    if mode == "auto":
        return "auto"
    return None


def _use_cpu_collectives() -> None:
    # Harmless on GPU/TPU (the option only affects the CPU client); required on CPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str = "detect",
) -> ProcessSpec | str | None:
    """Initialise JAX's distributed runtime when this is one of several processes; must run
    before the first device query. Returns what ``resolve`` decided (``None``: single)."""
    spec = resolve(coordinator_address, num_processes, process_id, mode)
    if spec is None:
        return None
    if jax.distributed.is_initialized():
        return spec
    _use_cpu_collectives()
    timeouts = dict(
        initialization_timeout=INITIALIZATION_TIMEOUT_S,
        heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
        shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
    )
    if spec == "auto":
        jax.distributed.initialize(**timeouts)
        return spec
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
        # We resolved everything ourselves; JAX's own SLURM detection would otherwise
        # restrict a one-task-per-node process to GPU 0.
        cluster_detection_method="deactivate",
        **timeouts,
    )
    return spec
