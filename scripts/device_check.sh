#!/usr/bin/env bash
# device_check.sh - build the CUDA kernels and check them on a GPU machine, in one go.
#
# Run from the repository root:  bash scripts/device_check.sh
# Writes to $OUT (default ./device_out): build.log, cuda_tests.log, gpu_bench.json, gpu_bench.log,
# summary.txt. Every phase runs under its own time limit and a failure does not stop the later
# phases, so everything reports; the exit code is non-zero when any phase failed.
# Budget: build <= 150 s, tests <= 120 s, benchmark <= 120 s (typically far less).
# MSLD_MEMCHECK=1 adds a compute-sanitizer memcheck pass over the kernel tests (slow).
set -x
set -o pipefail
. scripts/device_env.sh   # msld_sdk and msld_export importable without an install; OUT, PY, build_native

BUILD="${MSLD_BUILD_DIR:-/tmp/msld_device_build}"
START=$(date +%s)

nvidia-smi -L
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv
nvcc --version | tail -n 2
"$PY" -c "import sys, torch, pybind11; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available(), 'pybind11', pybind11.__version__)"

# ---- 1. build msld_sdk._native in place (CPU + CUDA kernels, sm_75 and sm_90) -------------------
build_native "$BUILD" 150 -DCMAKE_CUDA_ARCHITECTURES='75;90' > "$OUT/build.log" 2>&1
RC_BUILD=$?
grep -E "msld:|[Ww]arning|[Ee]rror" "$OUT/build.log" | head -40
tail -n 5 "$OUT/build.log"
ls -la msld_sdk/_native*.so
"$PY" -c "import msld_sdk._native as n; print(n.__file__, 'built_with_cuda', n.built_with_cuda, 'devices', n.cuda_device_count() if n.built_with_cuda else None)"
RC_IMPORT=$?

# ---- 2. kernel and sampler tests --------------------------------------------------------------------
timeout 120 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_cuda_kernels.py 2>&1 | tee "$OUT/cuda_tests.log"
RC_TESTS=$?

# ---- 3. benchmark: k in {1,8,16} x steps in {10,20,50}, step by step vs graph replay ----------------
timeout 120 "$PY" benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" --max-seconds 75 2>&1 | tee "$OUT/gpu_bench.log"
RC_BENCH=$?

# ---- optional: memcheck of the kernel-level tests ------------------------------------------------
RC_MEMCHECK=skipped
if [ "${MSLD_MEMCHECK:-0}" = 1 ] && command -v compute-sanitizer >/dev/null; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" -m pytest -q -x -p no:cacheprovider \
      tests/test_cuda_kernels.py -k "gaussian or ddim_step or aggregate or fused" 2>&1 | tail -n 30
  RC_MEMCHECK=$?
fi

set +x
{
  echo "build=$RC_BUILD import=$RC_IMPORT tests=$RC_TESTS bench=$RC_BENCH memcheck=$RC_MEMCHECK"
  echo "elapsed_s=$(( $(date +%s) - START ))"
  tail -n 3 "$OUT/cuda_tests.log" 2>/dev/null
} | tee "$OUT/summary.txt"
[ "$RC_BUILD" = 0 ] && [ "$RC_IMPORT" = 0 ] && [ "$RC_TESTS" = 0 ] && [ "$RC_BENCH" = 0 ] \
  && { [ "$RC_MEMCHECK" = skipped ] || [ "$RC_MEMCHECK" = 0 ]; }
