"""What every measurement shares: interleaved timing with medians and spread, the machine
description, thread settings, and the model under test in both frameworks.

Timing. Each timed function must block until its result exists. ``measure`` runs every
function ``warmup`` times (excluded), then ``reps`` rounds in which each function runs once,
in an order rotated every round, so that load from other processes hits all contenders
alike and ratios stay meaningful on a shared machine.

Models. ``load_model("default")`` is the bundled SmolLM2-135M-Instruct converted
checkpoint (``gist_jax.convert.default_model``); ``load_model("tiny")`` a random 2-layer
model with the synthetic-suite tokenizer (smoke tests). ``BenchModel.torch_model()`` builds
the PyTorch ``transformers`` ``LlamaForCausalLM`` from the very same weights through
``gist_jax.convert.llama.params_to_hf``, so both sides compute the same function.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from gist_jax.models import llama


@dataclasses.dataclass
class Timing:
    """Seconds per call over the timed repetitions (warm-up excluded)."""

    samples: list[float]

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    @property
    def min(self) -> float:
        return float(min(self.samples))

    @property
    def max(self) -> float:
        return float(max(self.samples))

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the repetitions disagree."""
        return (self.max - self.min) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": self.min,
            "max_s": self.max,
            "spread": self.spread,
            "samples_s": list(self.samples),
        }


def measure(fns: Mapping[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, Timing]:
    """Time each function ``reps`` times, interleaved (see the module docstring)."""
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(samples[name]) for name in names}


def median_ms(fn: Callable[..., Any], *args: Any, calls: int = 20) -> float:
    """Milliseconds of ``fn(*args)`` (blocked on), median of ``calls`` after 3 warm-ups:
    the probes' timer for one function in isolation."""
    for _ in range(3):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``(result, seconds)`` of one call (for compile times and one-off costs)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def block(tree: Any) -> Any:
    """Wait for every JAX array in ``tree``."""
    return jax.block_until_ready(tree)


def wait_for_quiet(max_load: float | None, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Wait (up to ``timeout_s``) until the 1-minute load average is at most ``max_load``:
    on a shared machine, other processes' work distorts absolute timings. Returns what
    happened, for the record; never raises."""
    start = time.time()
    if max_load is not None:
        while os.getloadavg()[0] > max_load and time.time() - start < timeout_s:
            time.sleep(10)
    load = os.getloadavg()[0]
    return {
        "loadavg_1min": load,
        "waited_s": time.time() - start,
        "max_load": max_load,
        "quiet": max_load is None or load <= max_load,
    }


# ---------------------------------------------------------------------------------------
# Machine and threads


def xla_threads() -> int:
    """CPU cores this process may run on: the size of XLA:CPU's intra-op thread pool."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_torch(threads: int | None = None) -> int:
    """Give PyTorch the same number of intra-op threads as XLA; returns it."""
    import torch

    n = threads or xla_threads()
    torch.set_num_threads(n)
    return n


def cpu_model() -> str:
    """The CPU's model name (``lscpu``, else /proc/cpuinfo, else ``platform``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where the numbers come from: CPU, cores, accelerator kind, versions, load."""
    import flax
    import jaxlib

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cores": xla_threads(),
        "jax_backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "num_devices": jax.device_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_start": list(os.getloadavg()),
    }
    try:
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["transformers"] = transformers.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        info["torch"] = None
    return info


# ---------------------------------------------------------------------------------------
# The model under test

TINY_CONFIG = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    gist_token_id=3,
)


@dataclasses.dataclass
class BenchModel:
    """A LLaMA-family model as gist_jax runs it, plus a way to get the PyTorch twin."""

    name: str
    config: llama.LlamaConfig
    params: Any
    tokenizer: Any
    _torch: Any = None

    @property
    def num_params(self) -> int:
        return int(sum(np.size(x) for x in jax.tree.leaves(self.params)))

    def with_runtime(self, **fields: Any) -> BenchModel:
        """The same weights under other runtime fields (``scan_layers``, ``remat``)."""
        config = dataclasses.replace(self.config, **fields)
        params = llama.relayout_params(self.params, self.config, config.scan_layers)
        return BenchModel(self.name, config, params, self.tokenizer, self._torch)

    def torch_model(self) -> Any:
        """``transformers.LlamaForCausalLM`` (float32, sdpa attention) with these weights."""
        if self._torch is None:
            import torch
            from transformers import LlamaConfig as HFLlamaConfig
            from transformers import LlamaForCausalLM

            from gist_jax.convert import llama as convert

            hf_config = HFLlamaConfig(**convert.config_to_hf(self.config))
            hf_config._attn_implementation = "sdpa"
            with torch.device("meta"):
                model = LlamaForCausalLM(hf_config)
            host = jax.tree.map(np.asarray, self.params)
            tensors = convert.params_to_hf(host, self.config)
            state = {k: torch.tensor(v) for k, v in tensors.items()}
            model.load_state_dict(state, strict=False, assign=True)
            if self.config.tie_word_embeddings:
                model.tie_weights()
            missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
            if missing:
                raise RuntimeError(f"torch model parameters left uninitialised: {missing[:5]}")
            # Non-persistent buffers (rotary inverse frequencies) are still on meta.
            model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config)
            model.to(torch.float32)
            self._torch = model
        return self._torch


def load_model(
    source: str = "default", scan_layers: bool = False, remat: str = "none"
) -> BenchModel:
    """``"default"`` (bundled SmolLM2-135M-Instruct), ``"tiny"`` (random, for smoke tests)
    or a converted checkpoint directory; float32 compute."""
    from gist_jax.convert import loading
    from gist_jax.models.family import LLAMA

    runtime = dict(scan_layers=scan_layers, remat=remat, dtype="float32")
    if source == "tiny":
        from gist_jax import tiny_tokenizer

        config = llama.LlamaConfig(**TINY_CONFIG, **runtime)
        params = LLAMA.init_params(config, jax.random.key(0))
        return BenchModel("tiny-random", config, params, tiny_tokenizer.synthetic_bpe(512))
    if source == "default":
        from gist_jax.convert.default_model import MODEL_NAME, ensure_default_model

        _, ckpt_dir = ensure_default_model(progress=False)
        name = MODEL_NAME
    else:
        ckpt_dir, name = source, os.path.basename(os.path.normpath(source))
    config, params, tokenizer = loading.load_checkpoint(ckpt_dir, scan_layers=scan_layers)
    config = dataclasses.replace(config, **runtime)
    params = jax.tree.map(jax.numpy.asarray, params)
    return BenchModel(name, config, params, tokenizer)
