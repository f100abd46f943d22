"""gist_jax: gisting (learning to compress prompts with gist tokens) in JAX/Flax."""

__version__ = "0.1.0"

import importlib.util as _importlib_util
import os as _os

# gist_jax imports transformers for tokenizers and configs only, which need no PyTorch;
# without torch installed transformers would advise at import that "PyTorch was not found"
# on the torch-free path the README promises. With torch installed nothing changes.
if _importlib_util.find_spec("torch") is None:
    _os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
