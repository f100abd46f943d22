"""A small T5 trained from scratch on the synthetic suite: the encoder-decoder path of
docs/results.md end to end (gist model + separately trained pos/neg controls, compressed
decoding, report), in minutes on a CPU.

``configs/tiny_t5.py``'s architecture (gated-GELU, tied scaled output layer, the 512-entry
synthetic BPE tokenizer, one gist token) widened to d_model 128 with 3 + 3 layers and
trained for 1,200 steps (about 7 minutes per model on a 2-core CPU, 22 minutes for the
three). A model this small and untrained knows nothing beyond its training families, so
it can learn validation_seen but not the held-out families of validation_unseen::

    python -m gist_tools.quickstart --config=configs/synthetic_t5_cpu.py --workdir=workdirs/t5
"""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections


def _tiny_t5() -> ml_collections.ConfigDict:
    # Config files are not a package: load the sibling file by path.
    path = pathlib.Path(__file__).with_name("tiny_t5.py")
    spec = importlib.util.spec_from_file_location("tiny_t5_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config() -> ml_collections.ConfigDict:
    c = _tiny_t5()
    c.model.init.d_model = 128
    c.model.init.d_kv = 32
    c.model.init.d_ff = 512
    c.model.init.num_layers = 3
    c.model.init.num_decoder_layers = 3
    c.data.num_train_examples = 8000
    c.train.steps = 1200
    c.train.batch_size = 32
    c.train.lr = 2e-3
    c.train.warmup = 25
    c.train.log_every = 50
    c.train.checkpoint_every = 0
    c.eval.num_examples = 100
    c.eval.batch_size = 32
    return c
