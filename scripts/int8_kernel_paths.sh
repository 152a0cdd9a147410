#!/usr/bin/env bash
# int8 evaluated on this CPU's own kernel path and on the exact u8u8 path (MSLD_INT8_KERNEL=exact:
# what a CPU without VNNI runs for a plan without 7-bit int8 weights), same plan, seed and images;
# then whether the figures agree.
#   bash scripts/int8_kernel_paths.sh polyp OUT_DIR            # full validation split
#   LIMIT=300 bash scripts/int8_kernel_paths.sh lidc OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?model name}; OUT=${2:?output folder}; mkdir -p "$OUT"
for mode in auto exact; do
  MSLD_INT8_KERNEL=$mode python -m msld_sdk.cli eval --plan "$NAME" --kind "$NAME" --split val -q --seed 0 \
      --precision int8 ${LIMIT:+--limit "$LIMIT"} --json "$OUT/$NAME.$mode.json" > /dev/null
done
python - "$OUT/$NAME.auto.json" "$OUT/$NAME.exact.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:])
same = a["metrics"] == b["metrics"] and a["ece"] == b["ece"]
print(f"{a['cpu']}: {a['int8_kernel']} vs {b['int8_kernel']}: figures identical: {same}; "
      f"consensus Dice {a['metrics']['dice_consensus']:.4f} vs {b['metrics']['dice_consensus']:.4f}")
sys.exit(0 if same else 1)
PY
