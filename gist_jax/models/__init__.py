"""Flax Linen model families (LLaMA decoder-only, T5 encoder-decoder) and shared attention."""
