"""Split greedy decoding time into prefill and per-token steps: ``gist_jax.inference.decode.generate``
(and optionally ``transformers`` ``generate``) on the benchmark's 64-token prompts, timed
with 1 and with 64 new tokens; the per-step time is their difference / 63. Interleaved
repetitions (``benchmarks.common.measure``), medians printed. Run it under
different ``XLA_FLAGS`` to compare flag sets on the decode step alone.

    python -m benchmarks.probes.decode_step_time [--batch 16] [--torch] [--reps 3]
"""

from __future__ import annotations

import argparse

from benchmarks import common, decode_bench

PROMPT_TOKENS, NEW_TOKENS = 64, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--torch", action="store_true", help="Also time transformers.")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    if args.torch:
        common.configure_torch()
    model = common.load_model("default")
    prompts = decode_bench.make_prompts(model, args.batch, PROMPT_TOKENS)
    impls = {"gist_jax": decode_bench.JaxDecoder}
    if args.torch:
        impls["transformers"] = decode_bench.TorchDecoder
    fns = {
        (name, n): impl(model, prompts, n) for name, impl in impls.items() for n in (1, NEW_TOKENS)
    }
    for fn in fns.values():
        fn()  # compile / warm up
    timings = common.measure({f"{k[0]}:{k[1]}": f for k, f in fns.items()}, reps=args.reps)
    print(f"batch {args.batch}, {PROMPT_TOKENS}-token prompts")
    for name in impls:
        one = timings[f"{name}:1"].median
        full = timings[f"{name}:{NEW_TOKENS}"].median
        step_ms = 1e3 * (full - one) / (NEW_TOKENS - 1)
        print(
            f"  {name:12s} 1 token {one:6.2f} s, {NEW_TOKENS} tokens {full:6.2f} s, {step_ms:.1f} ms/step"
        )


if __name__ == "__main__":
    main()
