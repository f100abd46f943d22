"""Hugging Face <-> gist_jax checkpoint conversion, dispatched on the HF ``model_type``."""
