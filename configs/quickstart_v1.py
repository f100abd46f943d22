"""The quickstart on synthetic suite version 1 (``gist_jax.data.synthetic``: 57 task
families x 3 paraphrases) with the recipe docs/results.md section 1 measured (packed 8 x 96
rows, 70 steps, 100 examples on ``validation_seen`` / ``validation_unseen``). At this
budget the gist model learns the training families as labels, not to compress new
instructions; the default quickstart (suite version 3) replaced it::

    python -m gist_tools.quickstart --workdir=workdirs/quickstart_v1 --config=configs/quickstart_v1.py
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
    c.train.steps = 70
    c.train.batch_size = 8
    c.eval.max_new_tokens = 40  # version 1 answers are at most ~30 tokens
    c.data.source = "synthetic"
    c.eval.splits = ("validation_seen", "validation_unseen")
    c.eval.num_examples = 100
    return c
