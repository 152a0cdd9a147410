#!/usr/bin/env bash
# `msld eval` of a shipped model on its full validation split, for several seeds, step counts
# and precisions, then a summary over everything evaluated so far. A split's mean moves with
# the seed (polyp consensus Dice by about 1 point), so step counts and precisions are compared
# at the same seeds, against that spread.
#   bash scripts/eval_seeds.sh lidc 0 1 2                          # fp32 and int8, default steps
#   STEPS="5 10 20" PRECISIONS=fp32 bash scripts/eval_seeds.sh polyp 0 1 2 3 4
#   LIMIT=N: first N validation items only.  Results already on disk are kept (resumable).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?model name}; shift
OUT=benchmarks/results/eval_seeds_$NAME
mkdir -p "$OUT"
STEPS=${STEPS:-$(python -c "from msld_sdk import Segmenter; print(Segmenter('$NAME').defaults['steps'])")}
for st in $STEPS; do
  for s in "$@"; do
    for p in ${PRECISIONS:-fp32 int8}; do
      f="$OUT/steps${st}_seed${s}_$p.json"
      [ -f "$f" ] && continue
      python -m msld_sdk.cli eval --plan "$NAME" --kind "$NAME" --split val -q --seed "$s" --steps "$st" \
          --precision "$p" ${LIMIT:+--limit "$LIMIT"} --json "$f" > /dev/null
    done
  done
done
python -m benchmarks.eval_summary "$OUT" | tee "$OUT/summary.txt"
