#!/usr/bin/env bash
# Prepare a GPU training lease for scripts/device_train.sh: pack the model's training and
# validation splits (JPEG images, exact masks) into .dev/data, and the last weights of earlier
# leases (runs/NAME_gpu/last.safetensors, see device_train_collect.sh) into .dev/resume/NAME in
# 15 MiB parts; check that everything fits the device tool's 64 MiB with the tree; print the call.
# JPEG_QUALITY (default 85) trades image fidelity for size: at 95 polyp's splits are 25 MB.
#   bash scripts/device_train_prepare.sh polyp-large 256
#   CVC_FOLD=2/5 bash scripts/device_train_prepare.sh polyp-large 256   # a cross-validation fold
#     (one fold at a time: the resume state is kept per config name)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/source_tree_env.sh   # msld_export importable without an install
NAME=${1:?config name under export/msld_export/configs}; SIZE=${2:?image size}
KIND=$(python3 -c "from msld_sdk.evaluation.datasets import data_kind_for; print(data_kind_for('$NAME'))")
rm -rf .dev/data .dev/resume/$NAME
python3 -m msld_export.training.data pack --kind "$KIND" --size "$SIZE" --out .dev/data --jpeg-quality "${JPEG_QUALITY:-85}" \
    ${CVC_FOLD:+--cvc-fold "$CVC_FOLD"}
if [ -f runs/${NAME}_gpu/last.safetensors ]; then
  mkdir -p .dev/resume/$NAME
  split -b 15m -d runs/${NAME}_gpu/last.safetensors .dev/resume/$NAME/last.safetensors.part
fi
TOTAL=$(du -cb .dev/data $(ls -d .dev/resume 2>/dev/null) | tail -1 | cut -f1)
# The tracked tree travels too (the shipped plans and checkpoints alone are about 38 MB).
TREE=$(git ls-files -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
echo "to carry: $((TOTAL / 1048576)) MiB + the tree's $((TREE / 1048576)) MiB, of 64"
if [ $((TOTAL + TREE)) -ge $((63 * 1048576)) ]; then
  echo "too large to carry: lower JPEG_QUALITY or the size, or move the shipped models (msld_sdk/models/*.plan," >&2
  echo "export/msld_export/checkpoints/*.safetensors; training reads none) out of the tree for the call" >&2
  exit 1
fi
# One lease: nothing but the repository persists between sessions, so the schedule must end inside it.
echo "run tool: command='TRAIN_ARGS=\"--tune-encoder true --affine-prob 0.5 --jitter-strength 2${CVC_FOLD:+ --cvc-fold $CVC_FOLD}\" bash scripts/device_train.sh $NAME 2 6 8.5'," \
     "carry=['.dev/data', '.dev/resume'], timeout_s=600  (stage 1 2 min, stage 2 6 min annealed to its end; resumes from .dev/resume)"
echo "or a whole lease (paper-scale figures, kernel tests, then training): command='bash scripts/device_lease.sh $NAME 560'," \
     "carry=['.dev/data', '.dev/resume'], timeout_s=595"
