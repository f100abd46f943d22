"""Tiny random-init LLaMA on the synthetic suite: for tests and quick CPU smoke runs.

Two layers, hidden 64, grouped-query attention (4 query / 2 key-value heads), the 512-entry
BPE tokenizer trained on the synthetic suite (``gist_jax.tiny_tokenizer``), one gist token.
The model is built from the ``model.init`` fields, not from a checkpoint. A few hundred
steps on one CPU core take well under a minute; the loss falls from ~6.2 (ln 512) fast.

    python -m gist_jax.train --config=configs/tiny_llama.py --workdir=/tmp/tiny
"""

from __future__ import annotations

import ml_collections

from gist_jax.train_config import RANDOM_INIT, base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.checkpoint = RANDOM_INIT
    c.model.tokenizer = "synthetic_bpe:512"
    c.model.init = ml_collections.ConfigDict(
        dict(
            model_type="llama",
            vocab_size=0,  # = the tokenizer's size
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            initializer_range=0.02,
        )
    )
    c.data.max_length = 64
    c.data.bucket_multiple = 16
    c.data.num_train_examples = 2000
    c.train.steps = 60
    c.train.batch_size = 16
    c.train.lr = 3e-3
    c.train.warmup = 5
    c.train.log_every = 10
    c.train.eval_every = 0
    c.train.checkpoint_every = 20
    c.eval.num_examples = 32
    c.eval.batch_size = 16
    return c
