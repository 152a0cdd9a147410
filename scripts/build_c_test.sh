#!/usr/bin/env bash
# Builds and runs tests/c/test_msld.c against the native sampler's C surface (csrc/include/msld.h),
# as a C host would use it. With SANITIZE=1: AddressSanitizer + UndefinedBehaviorSanitizer.
#   bash scripts/build_c_test.sh            # plain build
#   SANITIZE=1 bash scripts/build_c_test.sh # ASan + UBSan, aborting on the first report
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${BUILD_DIR:-build/c_test}"
mkdir -p "$OUT"
FLAGS="-O1 -g"
if [ "${SANITIZE:-0}" = 1 ]; then
  FLAGS="$FLAGS -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
fi
cc -std=c11 -Wall -Wextra -Werror $FLAGS -Icsrc/include -c tests/c/test_msld.c -o "$OUT/test_msld.o"
c++ -std=c++17 -Wall -Wextra $FLAGS -ffp-contract=off -Icsrc/include -Icsrc -c csrc/sampler_cpu.cpp -o "$OUT/sampler_cpu.o"
c++ $FLAGS "$OUT/test_msld.o" "$OUT/sampler_cpu.o" -o "$OUT/test_msld" -lpthread -lm
"$OUT/test_msld"
