"""The quickstart's config (``gist_tools.quickstart.default_config``): fine-tune the bundled
SmolLM2-135M-Instruct with two gist tokens on the synthetic suite, plus the paper's two
control models, then evaluate all three with generation. ``python -m gist_tools.quickstart``
uses it when no ``--config`` is given; pass it explicitly to override keys::

    python -m gist_tools.quickstart --workdir=workdirs/quickstart \\
        --config=configs/quickstart.py --config.train.steps=120 --config.quickstart.controls=masked
"""

from __future__ import annotations

import ml_collections

from gist_tools.quickstart import default_config


def get_config() -> ml_collections.ConfigDict:
    return default_config()
