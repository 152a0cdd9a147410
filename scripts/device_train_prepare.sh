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
# One lease: runs/ persists only while this machine does, so the schedule must end inside the lease.
# Resuming in stage 2, the schedule is re-declared as the minutes already trained plus this lease's.
ARGS="2 6 8.5"; WHAT="stage 1 2 min, stage 2 6 min annealed to its end"; STAGE2_RESUME=0
if [ -f runs/${NAME}_gpu/last.safetensors ]; then
  M2=$(python3 -c "
import json; from safetensors import safe_open
i = json.loads(safe_open('runs/${NAME}_gpu/last.safetensors', 'np').metadata()['info'])
print('' if i['stage'] != 2 else 'DONE' if i.get('complete') else f\"{i['stage_elapsed_s'] / 60 + 7.3:.1f}\")")
  [ "$M2" = DONE ] && { echo "runs/${NAME}_gpu/last.safetensors is a finished run: nothing to resume (move runs/${NAME}_gpu aside to train again from scratch)" >&2; exit 1; }
  if [ -n "$M2" ]; then
    ARGS="2 $M2 7.8"; STAGE2_RESUME=1
    WHAT="resumes from .dev/resume; stage 2 annealed to its end inside this lease"
  fi
fi
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
  MODELS="msld_sdk/models/*.plan export/msld_export/checkpoints/*.safetensors"   # training reads none
  MODELS_B=$(du -cb $MODELS | tail -1 | cut -f1)
  if [ $((TOTAL + TREE - MODELS_B)) -ge $((63 * 1048576)) ]; then
    echo "too large to carry even without the shipped models: lower JPEG_QUALITY or the size" >&2
    exit 1
  fi
  echo "too large to carry with the shipped models ($((MODELS_B / 1048576)) MiB); training reads none, so move them" >&2
  echo "out of the tree for the call and back after it:" >&2
  echo "  mkdir -p /tmp/shipped_aside && mv $MODELS /tmp/shipped_aside/    # before the run call" >&2
  echo "  mv /tmp/shipped_aside/*.plan msld_sdk/models/ && mv /tmp/shipped_aside/*.safetensors export/msld_export/checkpoints/" >&2
  echo "  git status --short   # after it: must print nothing" >&2
fi
echo "run tool: command='TRAIN_ARGS=\"--tune-encoder true --affine-prob 0.5 --jitter-strength 2${CVC_FOLD:+ --cvc-fold $CVC_FOLD}\" bash scripts/device_train.sh $NAME $ARGS'," \
     "carry=['.dev/data', '.dev/resume'], timeout_s=600  ($WHAT)"
# device_lease.sh sizes a schedule from scratch, so it is offered only when there is nothing to resume.
if [ "$STAGE2_RESUME" = 0 ]; then
  echo "or a whole lease (paper-scale figures, kernel tests, then training):" \
       "command='bash scripts/device_lease.sh $NAME 560', carry=['.dev/data', '.dev/resume'], timeout_s=595"
fi
