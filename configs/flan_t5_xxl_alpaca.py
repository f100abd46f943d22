"""The paper's FLAN-T5 recipe (Mu et al. 2023): full fine-tuning of FLAN-T5-XXL (11B) on
Alpaca+ with one gist token, on a TPU v4 / v5p slice.

Hyperparameters from the paper: learning rate 5e-5, constant (no warmup, no decay), no
weight decay, global batch 16, 16k steps, bf16 compute (float32 params and Adam moments),
source / target lengths 128 / 256 tokens.

Model: convert ``google/flan-t5-xxl`` (HF directory) once with::

    gist-convert-from-hf --hf_dir=/path/to/flan-t5-xxl --out_dir=checkpoints/flan-t5-xxl-gist --scan_layers

(``--scan_layers`` stores the layers stacked, as this config runs them, so the params
load straight onto the mesh; an unstacked checkpoint is restacked on the host first.)

Data: ``data.source`` is a directory (or URL prefix) with the ``alpaca_plus_*.json`` files.

Mesh: batch 16 caps data x fsdp at 16, so a 32-chip slice (v4-64, v5p-64) runs
``fsdp=16 x tensor=2`` (tensor = the rest): params, gradients and moments (~180 GB in
float32) are split 32 ways, heads (64) and the feed-forward (10240) over ``tensor``; the
odd vocabulary (32128 + ``<GIST>``) stays unsplit on that axis. Scanned layers and "dots"
remat. Start on every host with ``launch/tpu_pod.sh``.
"""

from __future__ import annotations

import ml_collections

from gist_jax.train_config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.checkpoint = "checkpoints/flan-t5-xxl-gist"
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = "dots"

    c.data.source = "data/alpaca_plus"
    c.data.num_train_examples = -1
    c.data.num_gist_tokens = 1
    c.data.condition = "gist"
    c.data.max_source_length = 128
    c.data.max_target_length = 256
    c.data.packing = False
    c.data.bucket_multiple = 64

    c.train.steps = 16000
    c.train.batch_size = 16
    c.train.grad_accum = 1
    c.train.lr = 5e-5
    c.train.schedule = "constant"
    c.train.warmup = 0
    c.train.weight_decay = 0.0
    c.train.clip_norm = 1.0
    c.train.log_every = 50
    c.train.eval_every = 2000
    c.train.checkpoint_every = 1000
    c.train.keep_checkpoints = 3

    c.mesh.data = 1
    c.mesh.fsdp = 16
    c.mesh.tensor = -1

    c.eval.splits = ("validation_seen", "validation_unseen")
    c.eval.num_examples = -1
    c.eval.batch_size = 16
    return c
