"""Tiny random-init T5 on the synthetic suite: for tests and quick CPU smoke runs of the
encoder-decoder path. Gated-GELU feed-forward (as in T5 v1.1 / FLAN-T5) with the v1.0 tied,
``d_model ** -0.5``-scaled output layer: HF's T5 initialisation gives an untied ``lm_head``
unit-variance weights, which at d_model 64 starts the loss near 20 instead of ln(512).

Two encoder and two decoder layers, d_model 64, 4 heads, the 512-entry synthetic BPE
tokenizer, one gist token; source/target limited to 64/16 tokens.

    python -m gist_jax.train --config=configs/tiny_t5.py --workdir=/tmp/tiny_t5
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
            model_type="t5",
            vocab_size=0,  # = the tokenizer's size
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            relative_attention_num_buckets=16,
            relative_attention_max_distance=64,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=True,
        )
    )
    c.data.max_source_length = 64
    c.data.max_target_length = 16
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
