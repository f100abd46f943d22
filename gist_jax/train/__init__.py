"""Training: the loop (``loop.train_and_evaluate``), what any loop needs from a config
(``program.make_train_step``), the step function (``step``), the train state and optimizer
(``state``, ``optim``, ``freezing``), losses (``output_loss``, ``teacher`` for
distillation), the data on the mesh (``pipeline``), what stops a run (``guards``), the
metrics log (``metrics_log``) and the command line (``__main__``).

Public names: ``train_and_evaluate``, ``TrainResult``, ``EvalContext``, ``EvalHook`` and
``NonFiniteError`` for the loop; ``make_train_step(config, mesh)`` and ``TrainProgram`` to
drive training from your own loop. They are imported on first use, so that importing one
submodule (the step, the optimizer) does not import the loop and all it needs.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "train_and_evaluate": "gist_jax.train.loop",
    "TrainResult": "gist_jax.train.loop",
    "EvalContext": "gist_jax.train.loop",
    "EvalHook": "gist_jax.train.loop",
    "NonFiniteError": "gist_jax.train.guards",
    "make_train_step": "gist_jax.train.program",
    "TrainProgram": "gist_jax.train.program",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'gist_jax.train' has no attribute {name!r}")
