#!/usr/bin/env bash
# device_lease.sh - a whole 15-minute GPU lease in one call (one machine start, no idle gaps):
# the paper-scale figures (device_paper_scale.sh), the CUDA kernel tests, then a training lease of
# NAME (device_train.sh) for the seconds that are left.
#
# Prepare here:  bash scripts/device_train_prepare.sh polyp-large 256
# The call:      run(command="bash scripts/device_lease.sh polyp-large 560",
#                    carry=['.dev/data', '.dev/resume'], timeout_s=595)
# After it:      bash scripts/device_train_collect.sh FILES_AT polyp-large   (weights parts)
#                tar xzf FILES_AT/logs.tar.gz -C SOMEWHERE                   (all logs)
# The device tool returns at most 8 files, so everything but the weights' parts travels back in one
# logs.tar.gz: paper/ (device_paper_scale.sh's 7 files), cuda_kernels.log, NAME/train.log, NAME/log.json.
set -o pipefail
NAME=${1:-polyp-large}; TOTAL_S=${2:-560}
T0=$SECONDS
FINAL="${OUT:-$PWD/device_out}"; LOGS=/tmp/lease_logs
rm -rf "$LOGS"; mkdir -p "$LOGS" "$FINAL"

OUT="$LOGS/paper" bash scripts/device_paper_scale.sh
echo "device_paper_scale rc=$? at $((SECONDS - T0)) s"

# The native extension device_paper_scale.sh built in msld_sdk/ is the one these tests load.
OUT="$LOGS" bash -c '. scripts/device_env.sh; timeout 60 "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/test_cuda_kernels.py 2>&1 | tee "$OUT/cuda_kernels.log"'
echo "cuda kernel tests rc=$? at $((SECONDS - T0)) s"

LEFT=$((TOTAL_S - (SECONDS - T0) - 45))   # 45 s for the last save, the split and the tar
if [ "$LEFT" -ge 90 ]; then
  MIN=$(python3 -c "print(round($LEFT / 60, 2))")
  M2=$(python3 -c "print(max(0.5, round($LEFT / 60 - 2.3, 2)))")   # stage 2 ends inside this lease
  echo "training $NAME for $MIN minutes (stage 2: $M2)"
  OUT="$LOGS" TRAIN_ARGS="${TRAIN_ARGS:---tune-encoder true --affine-prob 0.5 --jitter-strength 2}" \
    bash scripts/device_train.sh "$NAME" 2 "$M2" "$MIN"
  mkdir -p "$FINAL/$NAME"
  mv "$LOGS/$NAME"/*.safetensors.part* "$FINAL/$NAME/" 2>/dev/null
else
  echo "no time left to train ($LEFT s)"
fi
tar czf "$FINAL/logs.tar.gz" -C "$LOGS" .
echo "lease done at $((SECONDS - T0)) s"
ls -laR "$FINAL"
