# Sourced (from the repository root) by the device scripts (device_check.sh, device_paper_scale.sh):
# the source tree importable without an install (source_tree_env.sh), OUT (created), PY, nvcc on
# PATH, and build_native.
export PYTHONUNBUFFERED=1
. scripts/source_tree_env.sh
OUT="${OUT:-$PWD/device_out}"
mkdir -p "$OUT"
PY="$(command -v "${PYTHON:-python3}")"
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"

# build_native BUILD_DIR SECONDS [CMAKE_ARG ...]: msld_sdk._native built from scratch in BUILD_DIR and
# placed in msld_sdk/ (CPU kernels, and the CUDA kernels when nvcc is found), configure and build
# together within SECONDS.
build_native() {
  local dir="$1" end=$((SECONDS + $2))
  shift 2
  rm -rf "$dir"
  timeout "$((end - SECONDS))" cmake -S . -B "$dir" -DPython_EXECUTABLE="$PY" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PWD/msld_sdk" "$@" || return $?
  local left=$((end - SECONDS))
  [ "$left" -gt 0 ] || return 124   # (timeout 0 would mean no limit)
  timeout "$left" cmake --build "$dir" -j "$(nproc)"
}
