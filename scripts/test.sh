#!/usr/bin/env bash
# Installs everything the tests need (the package with its native extension, torch 2.13 CPU,
# diffusers, onnx, TensorRT-RTX, ...) and runs the test suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# -v shows CMake's lines, among them whether the CUDA kernels were compiled with nvcc.
python3 -m pip install -v -e ".[test]" > build.log 2>&1 || { tail -50 build.log; exit 1; }
grep -E "msld: |Successfully installed" build.log || true
python3 -c "import msld_sdk._native as n; print('native extension built; CUDA kernels compiled:', n.built_with_cuda)"
# The PACS tests (tests/test_pacs_*.py) start their own Orthanc with its DICOMweb plugin; installed
# here when missing and apt-get exists (they skip with the reason otherwise).
if ! command -v Orthanc >/dev/null 2>&1 && ! command -v orthanc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q orthanc orthanc-dicomweb > orthanc-install.log 2>&1 \
        || { $SUDO apt-get update -q > /dev/null 2>&1 && $SUDO env DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -q orthanc orthanc-dicomweb > orthanc-install.log 2>&1; } \
        || echo "Orthanc could not be installed (see orthanc-install.log); the PACS tests will be skipped"
fi
python3 -m pytest -q tests "$@"
