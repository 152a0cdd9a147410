#!/usr/bin/env bash
# Train one model on the lent GPU machine with the same recipe as on the CPU (export/train.py).
# The data travel as packs made here with `python -m msld_export.data pack` (exactly the splits and
# resizing that load_split gives), in .dev/data (git-ignored; carried with the call).
#   bash scripts/device_train.sh polyp 2 5      # config, stage-1 minutes, stage-2 minutes
set -x
export PYTHONUNBUFFERED=1
. scripts/source_tree_env.sh   # msld_sdk and msld_export importable without an install
NAME=${1:-polyp}; M1=${2:-2}; M2=${3:-5}
OUT=${OUT:-$PWD/device_out}; RUN=/tmp/run_$NAME
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
python3 -m msld_export.train --config export/configs/$NAME.json --data .dev/data --out $RUN --device cuda \
    --threads 8 --nice 0 --minutes1 $M1 --minutes2 $M2 --max-minutes $((M1 + M2 + 1)) --iters1 1000000 --iters2 10000000 \
    --batch1 64 --batch-vae 32 --batch2 128 --eval-images 0 --save-every-min 1 --log-every 200 \
    > "$OUT/${NAME}_train.log" 2>&1
echo "train exit $?"
tail -n 25 "$OUT/${NAME}_train.log"
cp $RUN/model.safetensors "$OUT/${NAME}_model.safetensors"
cp $RUN/log.json "$OUT/${NAME}_log.json"
ls -la "$OUT"
