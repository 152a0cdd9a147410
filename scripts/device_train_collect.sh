#!/usr/bin/env bash
# After a device_train.sh lease: join the returned parts into runs/NAME_gpu/ (model.safetensors
# for export or evaluation, last.safetensors for the next lease), keep the logs of each lease.
#   bash scripts/device_train_collect.sh FILES_AT polyp-large
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?files_at folder of the run tool}/${2:?config name}; NAME=$2
DST=runs/${NAME}_gpu; STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$DST/leases/$STAMP"
for f in model last; do
  ls "$SRC"/$f.safetensors.part* >/dev/null 2>&1 && cat "$SRC"/$f.safetensors.part* > "$DST/$f.safetensors"
done
cp "$SRC/log.json" "$SRC/train.log" "$DST/leases/$STAMP/"
python3 -c "
from msld_export.model.checkpoint import load_checkpoint
m, info = load_checkpoint('$DST/last.safetensors'); print('collected', '$DST', info)"
