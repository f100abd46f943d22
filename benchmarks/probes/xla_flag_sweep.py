"""Time the gist_jax train step (SmolLM2-135M, batch 8 x 128, the benchmark's trainer) under
several XLA CPU flag sets, one fresh process per set (XLA reads ``XLA_FLAGS`` when its
backend starts), and print one JSON line per set.

    python -m benchmarks.probes.xla_flag_sweep                  # the sets below, 3 timed steps each
    python -m benchmarks.probes.xla_flag_sweep --reps=5 "" "--xla_cpu_use_onednn=true"
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

FLAG_SETS = (
    "",
    "--xla_cpu_experimental_xnn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_use_xnnpack=false",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_use_onednn=true",
    "",
)

CHILD = """
import json, os, statistics, sys, time
from benchmarks import common, train_bench
from benchmarks.trainers import JaxTrainer
model = common.load_model("default")
trainer = JaxTrainer(model, [train_bench.train_batch(model, 8, 128)])
trainer.step()
times = []
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    trainer.step()
    times.append(time.perf_counter() - start)
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", ""),
                  "compile_s": round(trainer.compile_s, 1),
                  "step_s_median": round(statistics.median(times), 3),
                  "step_s": [round(t, 3) for t in times]}))
"""


def main(argv: list[str]) -> None:
    reps = 3
    sets = []
    for arg in argv:
        if arg.startswith("--reps="):
            reps = int(arg.split("=", 1)[1])
        else:
            sets.append(arg)
    for flags in sets or FLAG_SETS:
        env = dict(os.environ, XLA_FLAGS=flags)
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(reps)], env=env, capture_output=True, text=True
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        print(lines[-1] if lines else json.dumps({"xla_flags": flags, "error": done.stderr[-500:]}))


if __name__ == "__main__":
    main(sys.argv[1:])
