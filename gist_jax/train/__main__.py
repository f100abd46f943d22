"""``gist-train`` / ``python -m gist_jax.train``: flags only; the run is
``gist_jax.train.loop.train_and_evaluate``.

    python -m gist_jax.train --config=configs/default.py --workdir=DIR [--config.train.lr=3e-5]

The same command, started once per process (``launch/local.sh``, ``launch/slurm.sbatch``,
``launch/tpu_pod.sh``), trains multi-host. With ``eval.generate`` every evaluation also
decodes the config's splits under each condition (``gist_jax.evaluate.make_train_hook``):
this module is where training and evaluation meet, so that neither imports the other.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import jax
from absl import app, flags
from absl import logging as absl_logging

from gist_jax import checkpoint as ckpt_lib
from gist_jax import distributed, train_config
from gist_jax import sharding as shd
from gist_jax.cli import run_flags
from gist_jax.cli.entry import run_app
from gist_jax.convert import common
from gist_jax.train.guards import NonFiniteError
from gist_jax.train.loop import train_and_evaluate

# Exit status of a run stopped by SIGTERM before its last step, when set (launch/slurm.sbatch
# sets 75 and requeues the job on it); unset, such a run exits 0.
PREEMPTED_STATUS_ENV = "GIST_PREEMPTED_EXIT_STATUS"


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors whose message is the whole story (bad input, a stopped run)."""
    from gist_jax.data.alpaca import DataFormatError

    return (
        train_config.ConfigError,
        shd.MeshError,
        ckpt_lib.CheckpointError,
        common.ConversionError,
        DataFormatError,
        NonFiniteError,
    )


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if f.config is None or not f.workdir:
        raise app.UsageError("--config and --workdir are required")
    if not f["verbosity"].present:
        # orbax logs every save step at INFO; keep the console for the progress bar.
        absl_logging.set_verbosity(absl_logging.WARNING)
    run_flags.initialize_distributed("gist-train")
    try:
        config = f.config
        hooks = []
        if config.eval.generate:
            from gist_jax import evaluate

            hooks.append(evaluate.make_train_hook(config))
        result = train_and_evaluate(config, f.workdir, eval_hooks=hooks)
    except Exception as err:
        if jax.process_count() > 1:
            # Exit now: the other processes then fail fast too (see distributed.fail_fast).
            distributed.fail_fast(err)
        if isinstance(err, _user_errors()):
            sys.exit(f"gist-train: error: {err}")  # the message says it all; no traceback
        raise
    if jax.process_index() == 0:
        state = "preempted" if result.preempted else "done"
        print(f"{state} at step {result.step}/{result.total_steps}; workdir {result.workdir}")
    if result.preempted and result.step < result.total_steps:
        # launch/slurm.sbatch asks for a distinct status to requeue the job on; 0 otherwise,
        # so that a SIGTERM-stopped run reads as a clean stop everywhere else.
        sys.exit(int(os.environ.get(PREEMPTED_STATUS_ENV) or 0))


def run() -> None:
    """Console script entry point (``gist-train``)."""
    run_flags.define(
        "Training config file (configs/*.py)", "Directory for checkpoints, logs and the export."
    )
    run_app(main, "gist-train")


if __name__ == "__main__":
    run()
