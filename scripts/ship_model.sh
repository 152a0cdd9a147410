#!/usr/bin/env bash
# Make a shipped plan from a trained checkpoint and measure it as the model card reports it:
# export (ONNX checked against PyTorch), the int8 denoiser (calibrated on training images),
# `msld eval` on the full validation split in fp32 and int8 at seeds 0-2 (scripts/eval_seeds.sh),
# and the Dice-vs-steps curve on the first validation items (60 LIDC slices; 60 Kvasir + 60 CVC).
#   bash scripts/ship_model.sh lidc  runs/lidc_v3/model.safetensors
#   bash scripts/ship_model.sh polyp runs/polyp_v3/model.safetensors
#   bash scripts/ship_model.sh lidc  export/msld_export/checkpoints/lidc.safetensors   # re-export the shipped model
# LIMIT=N evaluates the first N validation items instead of the full split.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?model name: lidc or polyp}
CKPT=${2:?checkpoint}
case "$NAME" in lidc|polyp) ;; *) echo "model name must be lidc or polyp, not $NAME" >&2; exit 2;; esac
mkdir -p export/msld_export/checkpoints benchmarks/results
[ "$CKPT" -ef "export/msld_export/checkpoints/$NAME.safetensors" ] || cp "$CKPT" "export/msld_export/checkpoints/$NAME.safetensors"
python -m msld_export.plan_writing.export_plan "export/msld_export/checkpoints/$NAME.safetensors" "msld_sdk/models/$NAME.plan"
# Default steps: the fewest of 5/10/20 that stay within the seed spread of 20 steps on the full
# validation split (rule and figures: benchmarks/README.md, "Default number of steps"). Set
# before int8 calibration, which samples at the default.
case "$NAME" in lidc) STEPS=20;; polyp) STEPS=10;; esac
python -m msld_export.plan_writing.set_defaults "msld_sdk/models/$NAME.plan" --steps "$STEPS" \
    --why "benchmarks/results/eval_seeds_$NAME/summary.txt; rule in benchmarks/README.md"
python -m msld_export.plan_writing.quantize_int8 "msld_sdk/models/$NAME.plan" --images 16
bash scripts/eval_seeds.sh "$NAME" 0 1 2      # fp32 and int8 at the default steps, three seeds
python -m msld_export.training.dice_vs_steps --plan "msld_sdk/models/$NAME.plan" --kind "$NAME" --k 4 --limit 60 \
    --steps 1 2 5 10 20 50 100 --out "benchmarks/results/dice_vs_steps_$NAME"
