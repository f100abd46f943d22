"""Programs built on the gist_jax library, kept out of it: the quickstart (three trainings,
evaluation, report and export in one command), the deployment commands ``gist-compress``
and ``gist-generate`` (with ``prompts``, their shared prompt readers), and
``hf_gist_cache``, which serves an exported gist model with PyTorch ``transformers``.

These modules import gist_jax; nothing in gist_jax imports them.
"""
