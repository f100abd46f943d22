"""How fast can a batch-16 decode step's products be on this CPU? Thirty [576, 1536]
float32 weights (106 MB, one per layer, so they stream from memory) times a [16, 576]
activation, timed under several XLA CPU flag sets (one fresh process each: XLA reads
``XLA_FLAGS`` when its backend starts), then with numpy (OpenBLAS) and PyTorch
(``F.linear``) in this process. Median of 30 calls; prints GFLOP/s per contender.

    python -m benchmarks.probes.bench_small_gemm_flags [--rows 16] ["--xla_cpu_use_onednn=true" ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

LAYERS, D_IN, D_OUT, CALLS = 30, 576, 1536, 30
FLAG_SETS = (
    "",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_experimental_xnn_fusion_type=dot",
    "--xla_cpu_experimental_ynn_fusion_type=dot",
    "--xla_cpu_experimental_onednn_fusion_type=dot",
    "--xla_cpu_multi_thread_eigen=false",
)

CHILD = f"""
import json, os, statistics, sys, time
import jax, jax.numpy as jnp
rows = int(sys.argv[1])
ws = [jax.random.normal(jax.random.key(i), ({D_IN}, {D_OUT})) for i in range({LAYERS})]
x = jax.random.normal(jax.random.key(99), (rows, {D_IN}))

@jax.jit
def products(x, ws):
    acc = jnp.zeros((rows, {D_OUT}))
    for w in ws:
        acc = acc + x @ w
    return acc

jax.block_until_ready(products(x, ws))
times = []
for _ in range({CALLS}):
    start = time.perf_counter()
    jax.block_until_ready(products(x, ws))
    times.append(time.perf_counter() - start)
print(json.dumps(statistics.median(times)))
"""


def _gflops(rows: int, seconds: float) -> float:
    return LAYERS * 2 * rows * D_IN * D_OUT / seconds / 1e9


def _median_s(fn) -> float:
    fn()
    times = []
    for _ in range(CALLS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("flag_sets", nargs="*", default=list(FLAG_SETS))
    args = parser.parse_args()
    print(f"{LAYERS} x [{args.rows}, {D_IN}] @ [{D_IN}, {D_OUT}] float32, median of {CALLS}")
    for flags in args.flag_sets:
        env = dict(os.environ, XLA_FLAGS=flags)
        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(args.rows)], env=env, capture_output=True, text=True
        )
        if child.returncode != 0:
            print(f"  XLA {flags or '(default flags)'}: failed: {child.stderr.strip()[-200:]}")
            continue
        seconds = json.loads(child.stdout.strip().splitlines()[-1])
        name = f"XLA {flags or '(default flags)'}"
        print(f"  {name:52s} {_gflops(args.rows, seconds):6.1f} GFLOP/s")
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((D_IN, D_OUT), np.float32) for _ in range(LAYERS)]
    x = rng.standard_normal((args.rows, D_IN), np.float32)
    seconds = _median_s(lambda: sum(x @ w for w in weights))
    print(f"  {'numpy (OpenBLAS)':52s} {_gflops(args.rows, seconds):6.1f} GFLOP/s")
    try:
        import torch
    except ImportError:
        return
    torch_weights = [torch.from_numpy(np.ascontiguousarray(w.T)) for w in weights]
    tx = torch.from_numpy(x)
    seconds = _median_s(lambda: sum(torch.nn.functional.linear(tx, w) for w in torch_weights))
    name = f"torch F.linear ({torch.get_num_threads()} threads)"
    print(f"  {name:52s} {_gflops(args.rows, seconds):6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
