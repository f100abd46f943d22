#!/usr/bin/env bash
# The plot of docs/results.md sections 9, 13 and 14: the never-trained gap share of every
# committed quickstart-recipe run against the minutes of the README's line, one series per
# recipe and seed. Run from the repository root: bash docs/results/synthetic_v3/plot_budget.sh
set -euo pipefail
R=docs/results/synthetic_v3
# LABEL|SERIES|MINUTES|GIST predictions|CONTROLS predictions (pos_control and neg_control)
r() { echo "$1|$2|$3|$R/$4/predictions.jsonl|$R/$5/predictions.jsonl"; }
python -m benchmarks.probes.lever_table --controls=$R/k2_seed0/predictions.jsonl \
  --row="$(r 'seed 0, 150 steps' 'seed 0' 20 k2_seed0 k2_seed0)" \
  --row="$(r 'seed 0, 250 steps' 'seed 0' 30.2 steps250_seed0 steps250_seed0)" \
  --row="$(r 'seed 0, 540 steps' 'seed 0' 61 steps540_seed0 steps540_seed0)" \
  --row="$(r 'seed 1, 150 steps' 'seed 1' 20 k2_seed1 k2_seed1)" \
  --row="$(r 'seed 1, 250 steps' 'seed 1' 30.2 steps250_seed1 steps250_seed1)" \
  --row="$(r 'seed 2, 250 steps' 'seed 2' 30.2 steps250_seed2 steps250_seed2)" \
  --row="$(r 'seed 2, 540 steps' 'seed 2' 61 steps540_seed2 steps540_seed2)" \
  --row="$(r 'adapter, seed 0, 150 steps' 'adapter, seed 0' 20 adapter150_seed0 k2_seed0)" \
  --row="$(r 'adapter, seed 0, 250 steps' 'adapter, seed 0' 30.2 adapter_seed0 steps250_seed0)" \
  --row="$(r 'adapter, seed 0, 540 steps' 'adapter, seed 0' 61 adapter540_seed0 steps540_seed0)" \
  --row="$(r 'adapter, seed 1, 150 steps' 'adapter, seed 1' 20 adapter150_seed1 k2_seed1)" \
  --row="$(r 'adapter, seed 1, 250 steps' 'adapter, seed 1' 30.2 adapter_seed1 steps250_seed1)" \
  --row="$(r 'adapter, seed 2, 250 steps' 'adapter, seed 2' 30.2 adapter_seed2 steps250_seed2)" \
  --row="$(r 'adapter, seed 2, 540 steps' 'adapter, seed 2' 61 adapter540_seed2 steps540_seed2)" \
  --row="$(r 'adapter, bfloat16, seed 0, 250 steps' 'adapter, bfloat16, seed 0' 26.9 quickstart_bf16_seed0 quickstart_bf16_seed0)" \
  --row="$(r 'adapter, bfloat16, seed 1, 250 steps' 'adapter, bfloat16, seed 1' 26.9 quickstart_bf16_seed1 quickstart_bf16_seed1)" \
  --row="$(r 'adapter, bfloat16, seed 0, 150 steps' 'adapter, bfloat16, seed 0' 17.6 quickstart_bf16_150_seed0 quickstart_bf16_150_seed0)" \
  --row="$(r 'adapter, bfloat16, seed 0, 540 steps' 'adapter, bfloat16, seed 0' 51 quickstart_bf16_540_seed0 quickstart_bf16_540_seed0)" \
  --row="$(r 'adapter, bfloat16, seed 1, 150 steps' 'adapter, bfloat16, seed 1' 17.5 quickstart_bf16_150_seed1 quickstart_bf16_150_seed1)" \
  --row="$(r 'adapter, bfloat16, seed 2, 150 steps' 'adapter, bfloat16, seed 2' 17.9 quickstart_bf16_150_seed2 quickstart_bf16_150_seed2)" \
  --row="$(r 'adapter, bfloat16, seed 1, 540 steps' 'adapter, bfloat16, seed 1' 49 quickstart_bf16_540_seed1 quickstart_bf16_540_seed1)" \
  --row="$(r 'adapter, bfloat16, 2 rows, seed 0, 360 steps' 'adapter, bfloat16, 2 rows a step, seed 0' 27.3 quickstart_bf16_rows2_seed0 quickstart_bf16_rows2_seed0)" \
  --plot=$R/unseen_share_vs_budget.png --xlabel="minutes of the README's line (2-core CPU)" \
  "$@"
