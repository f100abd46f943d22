"""This machine's measured ceilings: float32 matmul throughput (XLA, numpy, PyTorch) and
streaming memory bandwidth, plus a nominal spec-sheet peak where the CPU can be read.

MFU and the decoding bandwidth bound are quoted against these numbers, measured in the same
run as the workloads (the machine is shared, so a number measured at another time would
not describe the conditions the workload met).

* Matmul: ``C = A @ B`` with square float32 operands of size ``n`` (default 1024 and
  2048, compute bound, and the scale of the model's own products): 2 n^3 FLOPs per call.
  The best of the three libraries at the best size is "the measured peak".
* Bandwidth: a full read of a large float32 array (default 256 MiB, far beyond the L3
  cache) by a sum reduction, the access pattern of batch-1 decoding (every weight read
  once per token); the median over repetitions, in bytes read per second.
* Nominal peak: cores x FLOPs per cycle (AVX-512 / AVX2+FMA: 2 FMA pipes of 16 / 8
  float32 lanes) x clock from /proc/cpuinfo. Only an estimate (turbo, AVX clocks and
  virtualisation move it); reported as such.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common


def nominal_peak_flops() -> dict[str, Any] | None:
    """Spec-sheet style float32 peak of the usable cores, or None when unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    flags = set(re.search(r"^flags\s*:\s*(.*)$", text, re.M).group(1).split())
    mhz = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)]
    if not mhz:
        return None
    if "avx512f" in flags:
        per_cycle, isa = 64, "AVX-512 (2 FMA x 16 lanes x 2)"
    elif "avx2" in flags and "fma" in flags:
        per_cycle, isa = 32, "AVX2+FMA (2 FMA x 8 lanes x 2)"
    else:
        return None
    cores = common.xla_threads()
    clock = max(mhz) * 1e6
    return {
        "flops": cores * per_cycle * clock,
        "cores": cores,
        "flops_per_cycle": per_cycle,
        "isa": isa,
        "clock_hz": clock,
        "note": "nominal clock from /proc/cpuinfo; turbo or AVX clocks may differ",
    }


def _matmul_calls(n: int, seed: int = 0) -> dict[str, Any]:
    """One ``[n, n] @ [n, n]`` float32 product per library (XLA, numpy, PyTorch when
    installed), as argument-less callables that return when the product is done."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul)
    fns = {
        "xla": lambda: mm(ja, jb).block_until_ready(),
        "numpy": lambda: a @ b,
    }
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        fns["torch"] = lambda: ta @ tb
    except ImportError:
        pass
    return fns


def matmul_peak(n: int = 2048, reps: int = 5) -> dict[str, Any]:
    """Measured float32 matmul FLOP/s with XLA, numpy and (if installed) PyTorch."""
    timings = common.measure(_matmul_calls(n), reps=reps, warmup=1)
    flops = 2.0 * n**3
    per_lib = {
        name: {"flops_per_s": flops / t.median, "timing": t.to_dict()}
        for name, t in timings.items()
    }
    best = max(per_lib, key=lambda k: per_lib[k]["flops_per_s"])
    return {
        "n": n,
        "flops_per_call": flops,
        "libraries": per_lib,
        "best_library": best,
        "peak_flops_per_s": per_lib[best]["flops_per_s"],
    }


def peak_call(peak: dict[str, Any]) -> tuple[Any, float]:
    """``(fn, flops_per_call)``: one call of the product that set the measured peak (same
    library, same size), to time again alongside a workload (``train_bench`` interleaves it
    with the steps, so MFU can be quoted against the peak of the same minutes)."""
    best = peak["matmul"]
    return _matmul_calls(best["n"])[best["best_library"]], best["flops_per_call"]


def memory_bandwidth(mib: int = 256, reps: int = 5) -> dict[str, Any]:
    """Measured streaming read bandwidth (bytes/s) with XLA and numpy."""
    x = np.random.default_rng(0).standard_normal(mib * (1 << 20) // 4, dtype=np.float32)
    jx = jnp.asarray(x)
    total = jax.jit(jnp.sum)
    timings = common.measure(
        {"xla": lambda: total(jx).block_until_ready(), "numpy": lambda: x.sum()},
        reps=reps,
        warmup=1,
    )
    per_lib = {
        name: {"bytes_per_s": x.nbytes / t.median, "timing": t.to_dict()}
        for name, t in timings.items()
    }
    best = max(per_lib, key=lambda k: per_lib[k]["bytes_per_s"])
    return {
        "bytes": x.nbytes,
        "libraries": per_lib,
        "best_library": best,
        "bandwidth_bytes_per_s": per_lib[best]["bytes_per_s"],
    }


def run(
    matmul_sizes: tuple[int, ...] = (1024, 2048), bandwidth_mib: int = 256, reps: int = 5
) -> dict[str, Any]:
    """All of the above, as one JSON-ready dict. ``matmul`` is the size with the highest
    throughput (``matmul_by_size`` has them all): which size runs best depends on the
    CPU's caches and the library, and a peak that is too low would overstate MFU."""
    by_size = [matmul_peak(n, reps) for n in matmul_sizes]
    return {
        "matmul": max(by_size, key=lambda r: r["peak_flops_per_s"]),
        "matmul_by_size": by_size,
        "bandwidth": memory_bandwidth(bandwidth_mib, reps),
        "nominal": nominal_peak_flops(),
    }
