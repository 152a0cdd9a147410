#!/usr/bin/env bash
# After a device_train.sh lease: join the returned parts into runs/NAME_gpu/ (model.safetensors
# for export or evaluation, last.safetensors for the next lease), keep the logs of each lease.
#   bash scripts/device_train_collect.sh FILES_AT polyp-large
# Keep the lease's files until the next one: they are the only copy of its logs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/source_tree_env.sh   # msld_export importable without an install
SRC=${1:?files_at folder of the run tool}/${2:?config name}; NAME=$2
DST=runs/${NAME}_gpu; STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$DST/leases/$STAMP"
for f in model last; do
  ls "$SRC"/$f.safetensors.part* >/dev/null 2>&1 && cat "$SRC"/$f.safetensors.part* > "$DST/$f.safetensors"
done
# device_train.sh leaves the logs beside the weights; device_lease.sh packs them in logs.tar.gz.
if [ -f "$SRC/log.json" ]; then
  cp "$SRC/log.json" "$SRC/train.log" "$DST/leases/$STAMP/"
else
  tar xzf "${1}/logs.tar.gz" -C "$DST/leases/$STAMP" --strip-components=2 "./$NAME/log.json" "./$NAME/train.log"
fi
python3 -c "
from msld_export.model.checkpoint import load_checkpoint
m, info = load_checkpoint('$DST/last.safetensors'); print('collected', '$DST', info)"
