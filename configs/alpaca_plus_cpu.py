"""Alpaca+ at CPU scale: the paper's protocol (a gist model and separately trained
pos_control / neg_control models, evaluated on unseen and human-written instructions)
with the bundled SmolLM2-135M-Instruct, trained on the 1000-example Alpaca+
``validation_seen`` file instead of the ~130k-example training set (which the paper's
authors did not release as a file; see docs/results.md).

Run through the quickstart runner (three trainings, evaluation, report, HF export); the
data directory is a required flag, there is no default::

    python -m gist_tools.quickstart --config=configs/alpaca_plus_cpu.py \\
        --config.data.source=/path/to/alpaca_plus --workdir=workdirs/alpaca_k1 \\
        [--config.data.num_gist_tokens=2]

``data.source`` holds ``alpaca_plus_validation_{seen,unseen,human}.json`` (the original
gisting repository's ``data/alpaca_plus/``).

Choices, sized for a 2-core CPU (about 10 minutes per model): packed 256-token rows, 4
rows per step (examples longer than 256 tokens are truncated or dropped, and counted);
one epoch of the 1000 examples (~70 steps); lr 1e-4 (the paper's 2e-5 is for 7B; a 135M
model needs more); evaluation on the first 50 examples of each split with up to 96 new
tokens (greedy), which cuts some of the longer human-split answers short. Raise
``train.epochs``, ``eval.num_examples`` and ``eval.max_new_tokens`` where time allows.
"""

from __future__ import annotations

import ml_collections

from gist_tools.quickstart import default_config


def get_config() -> ml_collections.ConfigDict:
    c = default_config()
    c.data.num_gist_tokens = 1  # the recipe the docs cite
    c.model.gist_adapter_rank = 0  # and without the quickstart's gist adapter
    c.train.lr_scales = ""
    c.model.dtype = "float32"  # and in float32, as it was measured
    c.data.source = ""  # required: --config.data.source=DIR
    c.data.train_split = "validation_seen"
    c.data.num_train_examples = -1
    c.data.max_length = 256
    c.data.packing = True
    c.data.bucket_multiple = 256
    c.train.steps = 0
    c.train.epochs = 1.0
    c.train.batch_size = 4
    c.train.lr = 1e-4
    c.train.warmup = 0.05
    c.train.log_every = 2
    c.train.checkpoint_every = 20
    c.eval.splits = ("validation_unseen", "validation_human")
    c.eval.num_examples = 50
    c.eval.batch_size = 16
    c.eval.max_new_tokens = 96
    return c
