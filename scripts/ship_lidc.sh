#!/usr/bin/env bash
# Make the shipped default plan from a trained LIDC checkpoint and measure it as the model card
# reports it: export (ONNX checked against PyTorch), `msld eval` on the full validation split,
# and the Dice-vs-steps curve on the first 200 validation slices.
#   bash scripts/ship_lidc.sh runs/lidc/model.safetensors
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${1:?checkpoint}
mkdir -p export/checkpoints benchmarks/results
cp "$CKPT" export/checkpoints/lidc.safetensors
python -m export.export_plan export/checkpoints/lidc.safetensors msld_sdk/models/lidc.plan
msld eval --plan lidc --kind lidc --split val -q --json benchmarks/results/eval_lidc_val.json
python -m export.dice_vs_steps --plan msld_sdk/models/lidc.plan --kind lidc --k 4 --limit 60 \
    --steps 1 2 5 10 20 50 100 --out benchmarks/results/dice_vs_steps_lidc
