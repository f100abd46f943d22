"""The flags every run command shares (``gist-train``, ``gist-eval``, ``gist-quickstart``):
``--config`` (a config file, keys overridable as ``--config.KEY=VALUE``), ``--workdir`` and
the multi-process start-up flags, defined once here so that the commands agree on them.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from gist_jax import distributed


def define(config_help: str, workdir_help: str) -> None:
    """Define the shared flags on ``absl.flags.FLAGS`` (once; later calls do nothing)."""
    if "config" in flags.FLAGS:
        return
    config_flags.DEFINE_config_file(
        "config", None, f"{config_help}; override keys with --config.KEY=VALUE."
    )
    flags.DEFINE_string("workdir", None, workdir_help)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
    flags.DEFINE_integer("num_processes", None, "Number of processes.")
    flags.DEFINE_integer("process_id", None, "This process's index.")
    flags.DEFINE_integer(
        "initialization_timeout_s",
        distributed.INITIALIZATION_TIMEOUT_S,
        "Multi-process: seconds to wait for every process to join.",
    )
    flags.DEFINE_integer(
        "heartbeat_timeout_s",
        distributed.HEARTBEAT_TIMEOUT_S,
        "Multi-process: a process not heard from for this long is declared dead and the "
        "others stop (docs/reliability.md).",
    )
    flags.DEFINE_integer(
        "shutdown_timeout_s",
        distributed.SHUTDOWN_TIMEOUT_S,
        "Multi-process: seconds to wait for the others at a normal exit.",
    )
    flags.DEFINE_enum(
        "distributed",
        "detect",
        list(distributed.MODES),
        "detect: flags, JAX_* env or SLURM; auto: let JAX detect the cluster (TPU pods); "
        "none: single process.",
    )


def initialize_distributed(program: str) -> None:
    """Start JAX's multi-process runtime from the shared flags (a no-op for one process)."""
    f = flags.FLAGS
    distributed.initialize(
        f.coordinator_address,
        f.num_processes,
        f.process_id,
        f.distributed,
        initialization_timeout_s=f.initialization_timeout_s,
        heartbeat_timeout_s=f.heartbeat_timeout_s,
        shutdown_timeout_s=f.shutdown_timeout_s,
        program=program,
    )
