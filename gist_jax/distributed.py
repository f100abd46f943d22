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
   process sees all of its node's GPUs; with several tasks on its node (however they were
   launched: ``tasks_on_this_node``), task ``SLURM_LOCALID`` gets GPU ``SLURM_LOCALID``.
5. ``mode="auto"``: let JAX detect the cluster (Cloud TPU VM pods, MPI, Kubernetes);
   ``launch/tpu_pod.sh`` uses this.
6. Otherwise a single process; nothing is initialised.

Timeouts (seconds, passed to ``jax.distributed.initialize``; ``gist-train`` flags
``--initialization_timeout_s``, ``--heartbeat_timeout_s``, ``--shutdown_timeout_s``):

* ``initialization_timeout`` 300: how long processes wait for each other to start
  (covers staggered ``gcloud ... ssh --worker=all`` / ``srun`` start-up).
* ``heartbeat_timeout`` 30 (JAX's default is 100): a process not heard from for this long
  is declared dead and every other process is terminated by the runtime instead of
  hanging. It bounds how long a dead process can go unnoticed (a survivor blocked in a
  collective usually notices at once: the connection to the dead peer is reset). Heartbeats
  come from a background thread, so long compilations or checkpoint writes do not trip it;
  raise it on clusters whose hosts can stall longer (see docs/reliability.md).
* ``shutdown_timeout`` 120: at a normal exit every process waits at a barrier for the
  others (the last async checkpoint may still be writing); a crashed peer is detected by
  the heartbeat long before that.

Failing fast: ``fail_fast`` (called by ``gist-train`` for any error in a multi-process run)
prints which process stopped and why, and exits at once with status 1. Without it the
process would wait at JAX's shutdown barrier for peers that are blocked in a collective
with it, and the whole job would hang until the timeouts ran out. When the runtime itself
aborts the process from native code (it often learns of a dead peer first),
``report_native_aborts`` ends the log with the same kind of message. ``check_same`` compares
a set of values (the resolved config) across processes at start-up, so a process started
with a different config or mesh stops every process with a message naming the keys.

CPU runs use gloo for cross-process collectives (``jax_cpu_collectives_implementation``);
without it CPU computations cannot span processes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import faulthandler
import hashlib
import json
import os
import re
import signal
import sys
import traceback
from collections.abc import Mapping
from typing import NoReturn

import jax
import numpy as np

INITIALIZATION_TIMEOUT_S = 300
HEARTBEAT_TIMEOUT_S = 30
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


def tasks_on_this_node(env: Mapping[str, str]) -> int:
    """How many tasks of this SLURM step run on this node. ``SLURM_STEP_TASKS_PER_NODE`` /
    ``SLURM_TASKS_PER_NODE`` (``"2(x3),1"``: two tasks on each of three nodes, then one),
    which every launch sets, at index ``SLURM_NODEID``; ``SLURM_NTASKS_PER_NODE`` (set only
    by an explicit ``--ntasks-per-node``) when neither is there."""
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if not env.get(key):
            continue
        counts: list[int] = []
        for part in env[key].split(","):
            match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if not match:
                raise ValueError(f"cannot parse {key}={env[key]!r}")
            counts += [int(match.group(1))] * int(match.group(2) or 1)
        node = int(env.get("SLURM_NODEID", "0") or 0)
        return counts[min(node, len(counts) - 1)]
    return int(env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)


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
    local_ids = None
    if tasks_on_this_node(env) > 1 and "SLURM_LOCALID" in env:
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


BIND_ENV = "GIST_COORDINATOR_BIND_ADDRESS"


def bind_address(coordinator_address: str, env: Mapping[str, str] | None = None) -> str:
    """Where process 0's coordination service listens: the coordinator address itself
    (``127.0.0.1:PORT`` for local runs: loopback only; on a cluster the address the other
    hosts dial), or ``$GIST_COORDINATOR_BIND_ADDRESS`` when set (e.g. ``0.0.0.0:PORT``).
    JAX's default would be every interface, and the service has no authentication: anyone
    who reaches the port could join or disrupt the job."""
    env = os.environ if env is None else env
    return env.get(BIND_ENV) or coordinator_address


def _use_cpu_collectives() -> None:
    # Harmless on GPU/TPU (the option only affects the CPU client); required on CPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    mode: str = "detect",
    initialization_timeout_s: int = INITIALIZATION_TIMEOUT_S,
    heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S,
    shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S,
    program: str = "gist-train",
) -> ProcessSpec | str | None:
    """Initialise JAX's distributed runtime when this is one of several processes; must run
    before the first device query. Returns what ``resolve`` decided (``None``: single).
    The timeouts are explained in the module docstring; ``program`` names the command in
    the message printed when the runtime aborts this process (``report_native_aborts``)."""
    for name, value in (
        ("initialization_timeout_s", initialization_timeout_s),
        ("heartbeat_timeout_s", heartbeat_timeout_s),
        ("shutdown_timeout_s", shutdown_timeout_s),
    ):
        if value < 1:
            raise ValueError(f"{name}={value}: must be >= 1 second")
    spec = resolve(coordinator_address, num_processes, process_id, mode)
    if spec is None:
        return None
    if jax.distributed.is_initialized():
        return spec
    _use_cpu_collectives()
    timeouts = dict(
        initialization_timeout=int(initialization_timeout_s),
        heartbeat_timeout_seconds=int(heartbeat_timeout_s),
        shutdown_timeout_seconds=int(shutdown_timeout_s),
    )
    if spec == "auto":
        jax.distributed.initialize(**timeouts)
        report_native_aborts(program)
        return spec
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address,
        coordinator_bind_address=bind_address(spec.coordinator_address),
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        local_device_ids=list(spec.local_device_ids) if spec.local_device_ids else None,
        # We resolved everything ourselves; JAX's own SLURM detection would otherwise
        # restrict a one-task-per-node process to GPU 0.
        cluster_detection_method="deactivate",
        **timeouts,
    )
    report_native_aborts(program)
    return spec


# ---------------------------------------------------------------------------------------
# Consistency and failure


class ProcessMismatchError(ValueError):
    """The processes of one run were started with different settings."""


def _hash32(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


def _allgather(values: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(values))


def check_same(values: Mapping[str, str], what: str = "configs") -> None:
    """Raise ``ProcessMismatchError`` on every process unless all processes passed equal
    ``values`` (``key -> text``); the message names each differing key with every
    process's value. Collective: all processes must call it. A no-op in one process."""
    count = jax.process_count()
    if count == 1:
        return
    me = f"process {jax.process_index()} of {count}"
    keys = sorted(values)
    heads = _allgather(np.asarray([_hash32("\n".join(keys)), len(keys)], np.int32))
    if not (heads == heads[0]).all():
        raise ProcessMismatchError(
            f"{me}: the processes of this run have different sets of {what} keys (different "
            "gist_jax versions?); start every process from the same code"
        )
    hashes = _allgather(np.asarray([_hash32(values[k]) for k in keys], np.int32))
    differ = [k for j, k in enumerate(keys) if not (hashes[:, j] == hashes[0, j]).all()]
    if not differ:
        return
    # Gather the differing values themselves (as UTF-8 bytes) to name them.
    blob = np.frombuffer(json.dumps([values[k] for k in differ]).encode(), np.uint8)
    sizes = _allgather(np.asarray([blob.size], np.int32))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    blobs = _allgather(padded)
    per_process = [json.loads(bytes(blobs[p, : sizes[p]]).decode()) for p in range(count)]
    details = "; ".join(
        f"{key}: " + ", ".join(f"process {p}: {per_process[p][i]}" for p in range(count))
        for i, key in enumerate(differ)
    )
    raise ProcessMismatchError(
        f"{me}: the processes of this run were started with different {what}: {details}. "
        "Start every process with the same --config file and overrides."
    )


# Substrings of runtime errors that mean "a peer process is gone" (collectives over gloo,
# NCCL or ICI, or JAX's coordination service).
_PEER_LOST = (
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "gloo",
    "nccl",
    "heartbeat",
    "unhealthy",
    "coordination service",
    "deadline_exceeded",
    "unavailable",
)


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` looks like the loss of another process of the run."""
    text = f"{type(err).__name__}: {err}".lower()
    return any(marker in text for marker in _PEER_LOST)


def failure_message(err: BaseException, program: str = "gist-train") -> str:
    """One paragraph saying which process stops and why."""
    me = f"process {jax.process_index()} of {jax.process_count()}"
    first = (str(err).strip().splitlines() or [""])[0][:500]
    if is_peer_failure(err):
        return (
            f"{program}: {me}: lost contact with another process of this run (it crashed, "
            f"was killed or preempted; its log has the cause): {type(err).__name__}: {first}. "
            "Exiting now with status 1 instead of waiting for it."
        )
    return f"{program}: {me}: stopping: {type(err).__name__}: {first}. Exiting with status 1."


def fail_fast(err: BaseException, program: str = "gist-train") -> NoReturn:
    """Report ``err`` and end this process at once with status 1, skipping JAX's shutdown
    barrier (peers stuck in a collective with this process would otherwise keep it, and
    themselves, waiting until the distributed runtime's timeouts expire)."""
    if not is_peer_failure(err):
        traceback.print_exception(err, file=sys.stderr)
    print(failure_message(err, program), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


# The C handler must outlive the call that installs it.
_abort_handler: ctypes._CFuncPtr | None = None


def report_native_aborts(program: str = "gist-train") -> None:
    """Make a native abort of this process end with our one-line message and status 1.

    When another process dies, JAX's distributed runtime learns of it on a background
    thread (a failed RPC to the coordinator, or the coordinator's error broadcast) and calls
    abort() from C++; that often happens before the failed collective reaches Python and
    ``fail_fast``, so the log would end in a native stack dump with nothing of ours. Python
    signal handlers cannot run there (abort() kills the process once a handler returns), so
    the handler is installed through libc: it dumps the Python stacks, prints which process
    stopped and why, and exits with status 1. The runtime's own line ("Terminating process
    because the JAX distributed service detected fatal errors ...") stays above it. Other
    native aborts (a failed XLA check) end the same way, and the message says so."""
    global _abort_handler
    if _abort_handler is not None or sys.platform == "win32":
        return
    me = f"process {jax.process_index()} of {jax.process_count()}"
    message = (
        f"\n{program}: {me}: lost contact with another process of this run, or another fatal "
        "error in native code: the runtime aborted this process (its reason is above; "
        "'Terminating process because the JAX distributed service detected fatal errors' "
        "means another process crashed, was killed or preempted, and that process's log has "
        "the cause). Exiting with status 1.\n"
    ).encode()

    def on_abort(signum: int) -> None:
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os.write(2, message)
        os._exit(1)

    handler = ctypes.CFUNCTYPE(None, ctypes.c_int)(on_abort)
    libc = ctypes.CDLL(None)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal(signal.SIGABRT, ctypes.cast(handler, ctypes.c_void_p))
    _abort_handler = handler
