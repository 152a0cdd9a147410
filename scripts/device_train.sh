#!/usr/bin/env bash
# Train one model on the lent GPU machine with the same recipe as on the CPU (export/msld_export/training/train.py),
# resumable across leases. Runs ON the GPU machine, from the repository root; prepare here with
# scripts/device_train_prepare.sh NAME SIZE, which packs the data and any earlier state, and
# prints the `run` call. After the lease: scripts/device_train_collect.sh FILES_AT NAME.
#
#   bash scripts/device_train.sh polyp-large 2 6 8.5
#     config name, stage-1 minutes, stage-2 minutes in all (the learning rate anneals over them;
#     only the repository persists between sessions, so let them end in one lease), minutes of this
#     lease (then it saves and stops, exit code 3).
#
# Data: packs in .dev/data/packed (`python -m msld_export.training.data pack`, JPEG images at 256 x 256).
# Resume: .dev/resume/NAME/last.safetensors (the weights and the stage / step reached, carried
# in <= 15 MiB parts). The optimizer state and EMA do not travel (together over the 64 MiB carry
# limit for the larger models): a resumed lease restarts Adam's moments and the EMA from the
# carried weights, and keeps the step count and learning-rate schedule.
# Returns in $OUT/NAME/: model / last weights in <= 15 MiB parts (the tool's 16 MiB a file),
# log.json, the training log.
set -x
export PYTHONUNBUFFERED=1
. scripts/source_tree_env.sh   # msld_sdk and msld_export importable without an install
NAME=${1:-polyp}; M1=${2:-2}; M2=${3:-5}; LEASE=${4:-8}
OUT=${OUT:-$PWD/device_out}/$NAME; RUN=/tmp/run_$NAME
rm -rf "$RUN"; mkdir -p "$OUT" "$RUN"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
# msld_sdk (imported by msld_export) needs its native extension; a fresh machine has none.
if ! python3 -c "import msld_sdk._native" 2>/dev/null; then
  . scripts/device_env.sh
  build_native /tmp/msld_train_build 90 -DMSLD_CUDA=OFF > "$OUT/native_build.log" 2>&1 || { echo "native build failed"; exit 1; }
fi
if ls .dev/resume/$NAME/last.safetensors.part* >/dev/null 2>&1; then
  cat .dev/resume/$NAME/last.safetensors.part* > $RUN/last.safetensors
  echo "resuming from carried weights: $(du -h $RUN/last.safetensors)"
fi
python3 -m msld_export.training.train --config export/msld_export/configs/$NAME.json --data .dev/data --out $RUN --device cuda \
    --threads 8 --nice 0 --minutes1 $M1 --minutes2 $M2 --max-minutes $LEASE --iters1 1000000 --iters2 10000000 \
    --batch1 64 --batch-vae 32 --batch2 128 --eval-images 0 --save-every-min 1 --log-every 200 ${TRAIN_ARGS:-} \
    > "$OUT/train.log" 2>&1
echo "train exit $? (3 = time budget reached, resumable)"
tail -n 25 "$OUT/train.log"
for f in model last; do
  [ -f $RUN/$f.safetensors ] && split -b 15m -d $RUN/$f.safetensors "$OUT/$f.safetensors.part"
done
cp $RUN/log.json "$OUT/log.json"
ls -la "$OUT"
