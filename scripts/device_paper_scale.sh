#!/usr/bin/env bash
# device_paper_scale.sh - every GPU figure of issue #13 (paper scale) in one command on a lent NVIDIA H200.
#
# The lease's call (the device tool's `run`, from the repository root; nothing to carry: the machine has
# PyTorch, CuPy and nvcc, the native extension is built there, nothing from ../shared is read):
#   run(command="bash scripts/device_paper_scale.sh", timeout_s=540)
#
# Phases, each under its own time limit (at worst 370 s in all, 415 s if the CUDA build fails; about 4
# minutes expected):
#   build  <= 100 s  msld_sdk._native with the CUDA kernels for sm_90 (if that fails: the CPU kernels only,
#                    <= 45 s more; the initial noise is then drawn on the host, the same values)
#   tests  <=  40 s  the GPU tests and the bit-exactness tests of tests/test_batched_sampler.py
#   lidc   <=  90 s  benchmarks/gpu_paper_scale.py --family lidc (no new section after 65 s)
#   cvc    <= 140 s  benchmarks/gpu_paper_scale.py --family cvc (no new section after 110 s)
# A phase that fails or runs out of time does not stop the next. The benchmark rewrites its JSON after
# every section, so a phase stopped by its limit still leaves its figures ("partial": true).
# Writes to $OUT (default ./device_out) 7 files: build.log (machine, versions, build), tests.log,
# lidc.json, lidc.log, cvc.json, cvc.log, summary.txt. Exit status non-zero when any phase failed.
# FAMILIES="lidc" (or "cvc") runs one family; BENCH_ARGS adds arguments to the benchmark runs (a rerun of
# one family in the lease's remaining minutes: run(command="FAMILIES=cvc bash scripts/device_paper_scale.sh",
# timeout_s=300)).
set -o pipefail
. scripts/device_env.sh   # msld_sdk and msld_export importable without an install; OUT, PY, build_native

BUILD="${MSLD_BUILD_DIR:-/tmp/msld_paper_scale_build}"
FAMILIES="${FAMILIES:-lidc cvc}"
START=$(date +%s)

# phase: build ------------------------------------------------------------------------------------------
{
  date -u; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv
  nvcc --version | tail -n 2
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'gpu', torch.cuda.is_available())"
  build_native "$BUILD" 100 -DCMAKE_CUDA_ARCHITECTURES=90
  RC=$?
  if [ $RC != 0 ]; then
    echo "CUDA build failed (rc=$RC): building the CPU kernels only"
    build_native "$BUILD" 45 -DMSLD_CUDA=OFF
  fi
  "$PY" -c "import msld_sdk._native as n; print('native', n.__file__, 'built_with_cuda', n.built_with_cuda)"
} > "$OUT/build.log" 2>&1
RC_BUILD=$?
tail -n 4 "$OUT/build.log"

# phase: tests ------------------------------------------------------------------------------------------
timeout 40 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_batched_sampler.py \
  -k "cuda or bit_for_bit or equals_the_native or equals_msld" 2>&1 | tee "$OUT/tests.log"
RC_TESTS=$?

# phase: lidc, cvc ------------------------------------------------------------------------------------------
declare -A RC_BENCH
for fam in $FAMILIES; do
  case "$fam" in
    lidc) limit=90; budget=65 ;;
    cvc) limit=140; budget=110 ;;
    *) echo "unknown family $fam"; continue ;;
  esac
  # shellcheck disable=SC2086
  timeout "$limit" "$PY" benchmarks/gpu_paper_scale.py --family "$fam" --out "$OUT/$fam.json" \
    --budget-s "$budget" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/$fam.log"
  RC_BENCH[$fam]=$?
done
rm -f "$OUT"/*.tmp

{
  echo "build=$RC_BUILD tests=$RC_TESTS $(for f in "${!RC_BENCH[@]}"; do printf '%s=%s ' "$f" "${RC_BENCH[$f]}"; done)"
  echo "elapsed_s=$(( $(date +%s) - START ))"
  grep -h "built_with_cuda" "$OUT/build.log"
  tail -n 1 "$OUT/tests.log"
  for fam in $FAMILIES; do
    [ -f "$OUT/$fam.log" ] && sed -n '/^'"$fam"' (/,$p' "$OUT/$fam.log"
  done
} | tee "$OUT/summary.txt"
ok=1
[ "$RC_BUILD" = 0 ] && [ "$RC_TESTS" = 0 ] || ok=0
for f in "${!RC_BENCH[@]}"; do [ "${RC_BENCH[$f]}" = 0 ] || ok=0; done
[ $ok = 1 ]
