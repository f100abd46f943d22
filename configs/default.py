"""The default CPU experiment: the quickstart's gist model as one training run.

The recipe is the quickstart's (``gist_tools.quickstart.default_config``: the bundled
SmolLM2-135M-Instruct, two gist tokens with a rank-32 gist adapter, synthetic suite
version 3, 250 steps of 4 packed 96-token rows), kept in one place so the two cannot
drift apart. As a run of its own it also logs a validation loss and writes a checkpoint
every 50 steps (a step takes about 1.7 s in the quickstart's bfloat16 on an idle 2-core
machine: docs/results.md section 13).

    python -m gist_jax.train --config=configs/default.py --workdir=workdirs/default

Variants: ``--config.data.condition=pos_control`` / ``neg_control`` for the paper's upper
and lower bounds, ``--config.data.num_gist_tokens=k`` for more gist tokens. Version 1 of
the suite with its one-gist recipe: ``configs/quickstart_v1.py``.
"""

from __future__ import annotations

import ml_collections

from gist_tools.quickstart import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.train.eval_every = 50
    c.train.checkpoint_every = 50
    c.train.keep_checkpoints = 2
    return c
