"""What every console script shares: ``entry.run_app`` (one line, no traceback, for a
user's mistake) and ``run_flags`` (the flags of the run commands). The commands themselves
live with what they run: ``gist_jax.train``, ``gist_jax.evaluate``, ``gist_jax.convert`` and,
outside the library, ``gist_tools``."""
