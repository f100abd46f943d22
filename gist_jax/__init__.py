"""gist_jax: gisting (learning to compress prompts with gist tokens) in JAX/Flax."""

__version__ = "0.1.0"
