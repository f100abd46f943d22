#!/usr/bin/env bash
# The runs behind docs/results.md, in order. Long: run outside CI.
#
#   benchmarks/replicate.sh ALPACA_PLUS_DIR [WORKDIR]
#
# ALPACA_PLUS_DIR holds alpaca_plus_validation_{seen,unseen,human}.json (the original
# gisting repository's data/alpaca_plus/). Each step reuses finished training runs, so an
# interrupted script can simply be started again.
set -euo pipefail
DATA=${1:?usage: benchmarks/replicate.sh ALPACA_PLUS_DIR [WORKDIR]}
WORK=${2:-workdirs/replication}
OUT=docs/results

# 1. Alpaca+ with SmolLM2-135M-Instruct: k=1 with the separately trained pos/neg controls,
#    then gist models with k=2 and k=5 (the controls do not depend on k).
python -m gist_tools.quickstart --config=configs/alpaca_plus_cpu.py \
  --config.data.source="$DATA" --workdir="$WORK/alpaca_k1"
for k in 2 5; do
  python -m gist_tools.quickstart --config=configs/alpaca_plus_cpu.py \
    --config.data.source="$DATA" --config.data.num_gist_tokens=$k \
    --config.quickstart.controls=masked --config.eval.conditions="('gist',)" \
    --config.quickstart.export_hf=False --workdir="$WORK/alpaca_k$k"
done
python -m benchmarks.replication --run=k1="$WORK/alpaca_k1" --run=k2="$WORK/alpaca_k2" \
  --run=k5="$WORK/alpaca_k5" --out="$OUT/alpaca_plus"

# 2. The encoder-decoder path: a small T5 trained from scratch on the synthetic suite.
python -m gist_tools.quickstart --config=configs/synthetic_t5_cpu.py --workdir="$WORK/t5_synthetic"
python -m benchmarks.replication --run=k1="$WORK/t5_synthetic" --out="$OUT/t5_synthetic"
