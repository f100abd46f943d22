"""How every console script runs: ``absl.app.run(main)``, with a user's mistake printed as
one line that names the problem and a non-zero exit, never a traceback.

A user's mistake is what the library raises as a ``ValueError`` (its own errors, e.g.
``ConfigError``, ``ConversionError``, ``CheckpointError``, ``GistCacheError``, all are) or
an ``OSError`` about a path (a missing directory, an existing output, no permission), and
an unknown key in a ``--config.a.b=...`` override, which ml_collections reports while the
flags are parsed, or such an override without ``--config``. ``GIST_JAX_TRACEBACK=1`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence


def _config_key_error(err: BaseException) -> str | None:
    """The one-line message for an unknown ``--config.*`` key, or None if ``err`` is not
    one (the flags were parsed already, or no override names the key)."""
    from absl import flags

    if flags.FLAGS.is_parsed() or not isinstance(err, (AttributeError, KeyError)):
        return None
    key = str(err).strip("\"'")
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a]
    if not overrides:
        return None
    return f"unknown config key {key!r} in {overrides[0]} (every key: gist_jax/train_config.py)"


def _override_without_config(argv: Sequence[str]) -> str | None:
    """The message for ``--config.KEY=VALUE`` given without ``--config``, which absl would
    report as an unknown flag."""
    overrides = [a for a in argv if a.startswith("--config.")]
    has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    if not overrides or has_config:
        return None
    return (
        f"{overrides[0]} overrides a key of a config file: name the file first, e.g. "
        "--config=configs/quickstart.py (the quickstart's default) or configs/default.py"
    )


def run_app(main: Callable[[Sequence[str]], None], program: str) -> None:
    """``app.run(main)`` for the console script ``program`` (``gist-train``, ...)."""
    from absl import app

    message = _override_without_config(sys.argv[1:])
    if message is not None:
        sys.exit(f"{program}: error: {message}")
    try:
        app.run(main)
    except (ValueError, OSError, AttributeError, KeyError) as err:
        if os.environ.get("GIST_JAX_TRACEBACK"):
            raise
        message = _config_key_error(err)
        if message is None and isinstance(err, (AttributeError, KeyError)):
            raise  # a bug, not a user's mistake: keep the traceback
        sys.exit(f"{program}: error: {message or err}")
