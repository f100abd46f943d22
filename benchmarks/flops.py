"""Analytic FLOP counts of the LLaMA family (the numerator of MFU).

Only matrix multiplications are counted (2 FLOPs per multiply-add), as is usual for MFU:
the q/k/v/o projections, the SwiGLU MLP, the attention scores and weighted values over the
full ``length x length`` square (both implementations compute the whole square and mask
it), and the output projection. A training step costs three forward passes (the backward
pass computes gradients with respect to both activations and weights). gist_jax's train
step runs the output layer only on chunks holding loss tokens (``gist_jax.train.output_loss``);
``executed_train_step_flops`` counts what it really computes, ``train_step_flops`` the full
model (what ``transformers`` computes, and the usual MFU numerator).
"""

from __future__ import annotations

from gist_jax.models.llama import LlamaConfig


def forward_flops_per_token(config: LlamaConfig, context: int) -> float:
    """Matmul FLOPs of one token's forward pass when it attends to ``context`` keys."""
    d, f, dh = config.hidden_size, config.intermediate_size, config.head_dim
    h, kvh = config.num_attention_heads, config.num_key_value_heads
    projections = 2 * d * (h + 2 * kvh) * dh + 2 * h * dh * d
    mlp = 2 * 3 * d * f
    attention = 2 * 2 * h * dh * context
    head = 2 * d * config.vocab_size
    return float(config.num_hidden_layers * (projections + mlp + attention) + head)


def forward_flops(config: LlamaConfig, batch: int, length: int) -> float:
    """Matmul FLOPs of a forward pass over ``[batch, length]`` tokens."""
    return batch * length * forward_flops_per_token(config, length)


def train_step_flops(config: LlamaConfig, batch: int, length: int) -> float:
    """Matmul FLOPs of forward + backward over ``[batch, length]`` tokens."""
    return 3.0 * forward_flops(config, batch, length)


def executed_train_step_flops(
    config: LlamaConfig, batch: int, length: int, output_positions: int
) -> float:
    """``train_step_flops`` when the output layer runs at ``output_positions`` positions
    only: there it costs four products per position (forward, the backward's recomputed
    logits, and the two gradient products) instead of three everywhere."""
    head = 2.0 * config.hidden_size * config.vocab_size
    full_head = 3.0 * head * batch * length
    return train_step_flops(config, batch, length) - full_head + 4.0 * head * output_positions
