"""The paper's LLaMA recipe (Mu et al. 2023, section 4 / appendix): full fine-tuning of a
LLaMA-7B-class model on Alpaca+ with one gist token, on a TPU v4 / v5p slice.

Hyperparameters from the paper: learning rate 2e-5, no weight decay, 3% linear warmup then
cosine decay, global batch 128, 3 epochs (~3000 steps on the ~130k Alpaca+ training
examples), bf16 compute (params and Adam moments stay float32), 512 tokens per example.

Model: any HF LLaMA checkpoint (Llama-2-7b, or a current Llama) converted once with::

    gist-convert-from-hf --hf_dir=/path/to/Llama-2-7b-hf --out_dir=checkpoints/llama2-7b-gist --scan_layers

(``--scan_layers`` stores the layers stacked, as this config runs them, so the params
load straight onto the mesh; an unstacked checkpoint is restacked on the host first.)

Data: ``data.source`` is a directory (or URL prefix) holding ``alpaca_plus_train.json``,
``alpaca_plus_validation_seen.json`` and ``alpaca_plus_validation_unseen.json``.

Mesh: ``fsdp`` over all chips (ZeRO-3: each chip holds 1/N of params, gradients and Adam
state; 7B params need ~112 GB for f32 params + grads + moments, i.e. ~3.5 GB per chip on
a 32-chip v4-64 or v5p-64 slice), scanned layers (fast compilation) and "dots" remat
(activation memory of 128 x 512 tokens). Batch 128 must be divisible by data x fsdp, so
use up to 128 chips; for more, add ``mesh.data`` replicas across slices (multi-slice runs
put slices on the data axis automatically). Start it on every host of the slice with
``launch/tpu_pod.sh`` (the workdir must be on storage all hosts share).
"""

from __future__ import annotations

import ml_collections

from gist_jax.train_config import base_config


def get_config() -> ml_collections.ConfigDict:
    c = base_config()
    c.model.checkpoint = "checkpoints/llama2-7b-gist"
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = "dots"

    c.data.source = "data/alpaca_plus"
    c.data.num_train_examples = -1
    c.data.num_gist_tokens = 1
    c.data.condition = "gist"
    c.data.max_length = 512
    c.data.packing = False  # the paper pads; packing gives the same loss (see tests)
    c.data.bucket_multiple = 64

    c.train.steps = 0
    c.train.epochs = 3.0
    c.train.batch_size = 128
    c.train.grad_accum = 1
    c.train.lr = 2e-5
    c.train.schedule = "cosine"
    c.train.warmup = 0.03
    c.train.weight_decay = 0.0
    c.train.clip_norm = 1.0
    c.train.log_every = 10
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3

    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1

    c.eval.splits = ("validation_seen", "validation_unseen")
    c.eval.num_examples = -1
    c.eval.batch_size = 128
    return c
