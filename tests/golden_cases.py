"""Runs that guard the SDK's outputs against unintended change (``tests/test_golden_outputs.py``).

Each case is one ``Segmenter.run`` call on a shipped plan with a fixed seed. ``make`` stores the
results of this machine in ``tests/data/golden_outputs/<machine kind>.npz``: boolean arrays
bit-packed, float arrays as the sha256 of their bytes and their sum (a few kB instead of
megabytes), with the machine facts that decide the floating point arithmetic (ONNX Runtime version,
the CPU's model and instruction sets); one file per kind of machine, since CI runs on several. The
test recomputes every case and asks for bit-identical arrays on a machine whose facts match a file.
Make a file for a new kind of machine from code whose outputs are known good (before a refactor,
not after it), and regenerate only on purpose: ``python tests/golden_cases.py`` (every case) or
``python tests/golden_cases.py NAME ...`` (those cases only; every other stored array is kept).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

GOLDEN_DIR = Path(__file__).parent / "data" / "golden_outputs"
FLOATS = ("probs", "mean", "confidence")
BOOLS = ("masks", "consensus")


def _sample(name: str = "lidc_0974_n0_s2") -> np.ndarray:
    from PIL import Image
    from msld_sdk.segmenter import shipped_plan_path
    return np.asarray(Image.open(shipped_plan_path("lidc").parent.parent / "samples" / name / "image.png"))


def _photo() -> np.ndarray:
    """A smooth synthetic RGB picture (no data set needed), 150 x 170."""
    y, x = np.mgrid[0:150, 0:170].astype(np.float32)
    r = 128 + 100 * np.sin(x / 17.0) * np.cos(y / 23.0)
    g = 90 + 80 * np.exp(-((x - 90) ** 2 + (y - 70) ** 2) / 900.0)
    b = 60 + 0.5 * x
    return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def _canvas() -> np.ndarray:
    c = np.zeros((200, 220), np.uint8)
    c[40:168, 60:188] = _sample()
    return c


def cases():
    """(name, plan, Segmenter kwargs, image(s), run kwargs) of every guarded run."""
    lidc, lidc2 = _sample(), _sample("lidc_0997_n2_s2")
    rng = np.random.default_rng(5)
    latents = rng.standard_normal((3, 4, 32, 32)).astype(np.float32)
    return [
        ("lidc_eta0", "lidc", {}, lidc, dict(k=4, steps=5, seed=7)),
        ("lidc_eta05", "lidc", {}, lidc, dict(k=3, steps=4, seed=11, eta=0.5)),
        ("lidc_views4", "lidc", {}, lidc, dict(k=5, steps=3, seed=2, views=4)),
        ("lidc_latents", "lidc", {}, lidc, dict(k=3, steps=4, seed=0, initial_latents=latents)),
        ("lidc_batch", "lidc", {}, [lidc, lidc2], dict(k=2, steps=3, seed=9, eta=1.0)),
        ("lidc_roi", "lidc", {}, _canvas(), dict(k=2, steps=3, seed=4, roi=(124, 104))),
        ("lidc_int8", "lidc", {"precision": "int8"}, lidc, dict(k=2, steps=3, seed=3)),
        ("polyp", "polyp", {}, _photo(), dict(k=3, steps=4, seed=21)),
        ("polyp_int8_eta", "polyp", {"precision": "int8"}, _photo(), dict(k=2, steps=3, seed=8, eta=0.3)),
        ("lidc_dpmpp2m", "lidc", {}, lidc, dict(k=3, steps=5, seed=13, solver="dpmpp2m")),
    ]


def machine_facts() -> dict:
    """What decides the arithmetic: ONNX Runtime's version and the CPU's instruction sets."""
    import onnxruntime
    from msld_sdk.tools.cpu_features import cpu_info
    return {"onnxruntime": onnxruntime.__version__, "model": cpu_info()["model"], "isa": cpu_info()["isa"]}


def golden_path(facts: dict) -> Path:
    """The file of one machine kind, e.g. ``amd-epyc_avx2+fma_ort1.32.0.npz``."""
    model = re.sub(r"[^a-z0-9]+", "-", facts["model"].lower()).strip("-")
    isa = "+".join(k for k, v in facts["isa"].items() if v) or "baseline"
    return GOLDEN_DIR / f"{model}_{isa}_ort{facts['onnxruntime']}.npz"


def run_case(plan, seg_kwargs, images, run_kwargs) -> list:
    from msld_sdk import Segmenter
    run_kwargs = {"solver": "ddim", **run_kwargs}   # pinned: a plan's default solver may change
    out = Segmenter(plan, backend="onnxruntime", threads=2, **seg_kwargs).run(images, **run_kwargs)
    return out if isinstance(out, list) else [out]


def digest(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def record(r) -> dict:
    """What is stored of one result: {key: array}."""
    out = {}
    for a in FLOATS:
        v = getattr(r, a)
        out[f"{a}.sha256"] = np.array(digest(v))
        out[f"{a}.sum"] = np.array(float(v.astype(np.float64).sum()))
    for a in BOOLS:
        v = getattr(r, a)
        out[f"{a}.bits"] = np.packbits(v.reshape(-1))
        out[f"{a}.shape"] = np.array(v.shape)
    return out


def make(only: list[str] | None = None) -> None:
    arrays = {}
    golden = golden_path(machine_facts())
    if only:
        known = {c[0] for c in cases()}
        if set(only) - known:
            raise SystemExit(f"unknown cases {sorted(set(only) - known)}; known: {sorted(known)}")
        if not golden.exists():
            raise SystemExit(f"no golden file for this machine ({golden.name}): regenerate every case")
        with np.load(golden) as old:
            if json.loads(str(old["facts"])) != machine_facts():
                raise SystemExit(f"stored arrays were made on {old['facts']}, this machine is {machine_facts()}: "
                                 "regenerate every case or none")
            arrays = {k: old[k] for k in old.files if k.split("/")[0] not in only}
    for name, plan, sk, images, rk in cases():
        if only and name not in only:
            continue
        for i, r in enumerate(run_case(plan, sk, images, rk)):
            for key, v in record(r).items():
                arrays[f"{name}/{i}/{key}"] = v
    arrays["facts"] = np.array(json.dumps(machine_facts()))
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(golden, **arrays)
    print(f"wrote {golden} ({golden.stat().st_size} bytes, {len(arrays) - 1} arrays)")


if __name__ == "__main__":
    import sys
    make(sys.argv[1:] or None)
