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

from msld_sdk.errors import CheckpointError, InputError, PlanError
from msld_sdk.image_input import load_image
from msld_sdk.plan import Plan

from msld_export.reference.checkpoint_reader import read_checkpoint, state_dict_of

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


def mutate(seed: bytes, data: bytes) -> bytes:
    """The fuzzer's bytes choose positions/values to overwrite in ``seed``, and a cut."""
    if not data:
        return seed
    buf = bytearray(seed)
    cut = int.from_bytes(data[:3].ljust(3, b"\0"), "little") % (len(buf) + 1)
    for i in range(3, len(data) - 3, 4):
        pos = int.from_bytes(data[i:i + 3], "little") % len(buf)
        buf[pos] = data[i + 3]
    return bytes(buf[:cut] if data[0] & 1 else buf)


def plan_mutation_target(seed_plan: bytes, data: bytes) -> None:
    """Mutate a valid plan (overwritten bytes, a cut)."""
    plan_target(mutate(seed_plan, data))


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


# ---- checkpoint reader (msld import): damaged, truncated and hostile checkpoints --------------

CHECKPOINT_ERRORS = (CheckpointError,)


def seed_checkpoint_bytes() -> bytes:
    """A small Lightning-shaped checkpoint: a state_dict of tensors (one a view with an offset),
    plus metadata holding a global the reader must only record (torch.device)."""
    import collections

    import torch
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    sd = collections.OrderedDict([("net.a.weight", w), ("net.a.bias", w[1]), ("net.b", torch.ones(2, dtype=torch.int64))])
    buf = io.BytesIO()
    torch.save({"state_dict": sd, "epoch": 3, "hyper_parameters": {"lr": 1e-3, "device": torch.device("cpu"),
                                                                      "dims": [1, 32, 32]}}, buf)
    return buf.getvalue()


def checkpoint_target(data: bytes) -> None:
    """Read a checkpoint file and every tensor of its state_dict; only CheckpointError may escape."""
    try:
        with read_checkpoint(_write(data, ".ckpt")) as ck:
            for name, t in state_dict_of(ck).items():
                ck.tensor(t, name)
    except CHECKPOINT_ERRORS:
        pass


def checkpoint_mutation_target(seed: bytes, data: bytes) -> None:
    """Overwrite bytes of a valid checkpoint (zip headers, pickle, storages) and cut it."""
    checkpoint_target(mutate(seed, data))


def pickle_target(seed: bytes, data: bytes) -> None:
    """A valid checkpoint whose data.pkl is replaced: by the fuzzer's bytes (data[0] even) or by
    the seed's pickle with bytes overwritten (odd), so that most inputs stay near-valid pickles."""
    with zipfile.ZipFile(io.BytesIO(seed)) as zin:
        items = [(i.filename, zin.read(i)) for i in zin.infolist()]
    pkl = next(b for n, b in items if n.endswith("/data.pkl"))
    if data and data[0] & 1:
        body = bytearray(pkl)
        for i in range(1, len(data) - 2, 3):
            body[int.from_bytes(data[i:i + 2], "little") % len(body)] = data[i + 2]
        pkl = bytes(body)
    else:
        pkl = data[1:]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for n, b in items:
            zout.writestr(n, pkl if n.endswith("/data.pkl") else b)
    checkpoint_target(out.getvalue())
