#!/usr/bin/env bash
# int8 vs fp32 Dice over several seeds on a shipped model's validation split. A whole split
# moves with the seed (polyp consensus Dice sd 0.6 points, LIDC marked slices 9), so an
# int8 "drop" is read against that spread, per seed (same noise for both precisions).
#   bash scripts/int8_dice_seeds.sh polyp 0 1 2 3 4       # LIMIT=N: first N validation items
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?model name}; shift
OUT=benchmarks/results/int8_seeds_$NAME
mkdir -p "$OUT"
for s in "$@"; do
  for p in fp32 int8; do
    [ -f "$OUT/seed${s}_$p.json" ] && continue   # kept from an earlier run of the same command
    python -m msld_sdk.cli eval --plan "$NAME" --kind "$NAME" --split val -q --seed "$s" --precision $p \
        ${LIMIT:+--limit "$LIMIT"} --json "$OUT/seed${s}_$p.json" > /dev/null
  done
done
python - "$OUT" "$@" <<'PY'
import json, sys, statistics as st
out, seeds = sys.argv[1], sys.argv[2:]
keys = ["dice_consensus", "iou_consensus"]
rows = {p: [json.load(open(f"{out}/seed{s}_{p}.json")) for s in seeds] for p in ("fp32", "int8")}
def get(r, sub):
    return r[sub]["metrics"] if sub else r["metrics"]
for sub in ([None, "majority_marked"] if "majority_marked" in rows["fp32"][0] else [None]):
    for k in keys:
        f = [get(r, sub)[k] for r in rows["fp32"]]; q = [get(r, sub)[k] for r in rows["int8"]]
        d = [b - a for a, b in zip(f, q)]
        sd = st.stdev(f) if len(f) > 1 else float("nan")
        print(f"{sub or 'all'} {k}: fp32 {st.mean(f):.4f} (sd over seeds {sd:.4f}) int8 {st.mean(q):.4f} "
              f"int8-fp32 per seed {' '.join(f'{x:+.4f}' for x in d)} mean {st.mean(d):+.4f}")
PY
