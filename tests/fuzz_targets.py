"""Fuzz targets shared by the CI fuzz tests (hypothesis) and scripts/fuzz.py (atheris, 100k+ inputs).

Each target takes bytes and must either succeed or raise one of the documented error types;
anything else (a crash, an IndexError, a MemoryError...) is a bug.
"""
from __future__ import annotations

import io
import os
import tempfile
import zipfile

import numpy as np

from msld_sdk.errors import InputError, PlanError
from msld_sdk.image_input import load_image
from msld_sdk.plan import Plan

PLAN_ERRORS = (PlanError,)
IMAGE_ERRORS = (InputError,)
_TMP = tempfile.mkdtemp(prefix="msld_fuzz_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
SUFFIXES = (".plan", ".png", ".jpg", ".tif", ".npy", ".dcm", ".bmp", "")


def _write(data: bytes, suffix: str) -> str:
    path = os.path.join(_TMP, "input" + suffix)
    with open(path, "wb") as f:
        f.write(data)
    return path


def plan_target(data: bytes) -> None:
    try:
        Plan.open(_write(data, ".plan"))
    except PLAN_ERRORS:
        pass


def plan_mutation_target(seed_plan: bytes, data: bytes) -> None:
    """Mutate a valid plan: the fuzzer's bytes choose positions/values to overwrite, and a cut."""
    if not data:
        return plan_target(seed_plan)
    buf = bytearray(seed_plan)
    cut = int.from_bytes(data[:3].ljust(3, b"\0"), "little") % (len(buf) + 1)
    for i in range(3, len(data) - 3, 4):
        pos = int.from_bytes(data[i:i + 3], "little") % len(buf)
        buf[pos] = data[i + 3]
    if data[0] & 1:
        buf = buf[:cut]
    plan_target(bytes(buf))


def manifest_target(seed_plan: bytes, data: bytes) -> None:
    """A valid plan whose manifest.json is replaced by the fuzzer's bytes."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(seed_plan)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, data if item.filename == "manifest.json" else zin.read(item))
    plan_target(out.getvalue())


def image_file_target(data: bytes) -> None:
    suffix = SUFFIXES[data[0] % len(SUFFIXES)] if data else ""
    try:
        load_image(_write(data[1:], suffix))
    except IMAGE_ERRORS:
        pass


_DTYPES = (np.uint8, np.uint16, np.int16, np.int32, np.float32, np.float64, np.bool_, np.complex64, np.int64)


def image_array_target(data: bytes) -> None:
    if len(data) < 4:
        return
    dtype = _DTYPES[data[0] % len(_DTYPES)]
    ndim = data[1] % 5
    dims = [1 + (b % 9) for b in data[2:2 + ndim]]
    body = data[2 + ndim:]
    n = int(np.prod(dims)) if dims else 1
    itemsize = np.dtype(dtype).itemsize
    raw = (body * (n * itemsize // max(len(body), 1) + 1))[: n * itemsize] if body else bytes(n * itemsize)
    arr = np.frombuffer(raw, dtype=dtype).reshape(dims) if dims else np.frombuffer(raw, dtype=dtype)[:1].reshape(())
    try:
        load_image(arr)
    except IMAGE_ERRORS:
        pass
