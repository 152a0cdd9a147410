"""`msld build`: TensorRT engines built from a plan's graphs and stored back into the plan.

Building needs TensorRT-RTX (``tensorrt_rtx``, builds ahead of time without a GPU); those
tests skip with the reason where it is missing. Running or even deserializing an engine
needs a GPU and a CUDA driver; that test skips without one (nothing is faked here).
"""
from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from msld_sdk.backends import trt_compat
from msld_sdk.cli import main
from msld_sdk.tools.engine_build import (EngineBuildError, build_engines, convert_to_fp16, default_timing_cache_path,
                                   engine_blob_name)
from msld_sdk.plan import GRAPH_PARTS, Plan
from msld_sdk.segmenter import shipped_plan_path

PARTS = GRAPH_PARTS


@pytest.fixture(scope="module")
def rtx():
    return pytest.importorskip("tensorrt_rtx", reason="TensorRT-RTX is not installed (pip install tensorrt-rtx-cu13); "
                                                      "it is what builds engines without a GPU")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_round_trip(path: Path, before: Plan, entry: dict) -> Plan:
    after = Plan.open(path)  # verify=True: every blob, engines included, is checked against its sha256
    for part in PARTS:
        assert after.blob(part) == before.blob(part), f"{part} graph changed"
        name = entry["blobs"][part]
        assert name == engine_blob_name(entry["key"], part)
        data = after.blob(name)
        assert len(data) > 1000
        assert hashlib.sha256(data).hexdigest() == entry["sha256"][part] == after.manifest["blobs"][name]["sha256"]
        assert entry["source_sha256"][part] == after.manifest["blobs"][part]["sha256"]
    listed = [e for e in after.manifest["engines"] if e["key"] == entry["key"]]
    assert listed == [entry]
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert len(names) == len(set(names)), "duplicate zip entries"
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        assert {f"engines/{entry['key']}/{p}.engine" for p in PARTS} <= set(names)
    return after


def test_tiny_plan_engines_round_trip_and_rebuild(rtx, tiny_plan, tmp_path):
    path = tmp_path / "tiny.plan"
    shutil.copy(tiny_plan, path)
    before = Plan.open(path)
    lines = []
    entry = build_engines(path, progress=False, echo=lines.append)

    assert entry["flavour"] == "tensorrt_rtx" and entry["version"] == rtx.__version__
    assert entry["precision"] == "fp16"
    assert entry["compute_capabilities"] == [c for c in trt_compat.load("tensorrt_rtx").supported_targets()
                                             if trt_compat.cc_tuple(c) >= (8, 0)]
    prof = entry["profiles"]
    assert prof["encoder"]["image"]["min"][0] == 1 and prof["encoder"]["image"]["opt"][0] == 1 \
        and prof["encoder"]["image"]["max"][0] == 16
    for part, name in (("denoiser", "x"), ("denoiser", "t"), ("denoiser", "cond"), ("decoder", "z")):
        s = prof[part][name]
        assert (s["min"][0], s["opt"][0], s["max"][0]) == (1, 8, 32)
        assert s["min"][1:] == s["opt"][1:] == s["max"][1:]
    assert any(ln.strip().startswith("denoiser:") and "engine" in ln and " s," in ln for ln in lines), lines
    after = _check_round_trip(path, before, entry)
    n_blobs = len(after.blob_names())
    assert n_blobs == len(before.blob_names()) + 3

    # same key again: replaced, not duplicated
    entry2 = build_engines(path, progress=False, echo=lambda s: None)
    assert entry2["key"] == entry["key"]
    again = _check_round_trip(path, before, entry2)
    assert len(again.blob_names()) == n_blobs
    assert [e["key"] for e in again.manifest["engines"]] == [entry["key"]]

    # another key (fp32, one target) coexists with the first, into a separate output file
    out = tmp_path / "tiny_more.plan"
    entry3 = build_engines(path, out, fp32=True, compute_capabilities=["86"], k_max=12, opt_k=4,
                           progress=False, echo=lambda s: None)
    assert entry3["precision"] == "fp32" and entry3["compute_capabilities"] == ["8.6"]
    assert entry3["profiles"]["decoder"]["z"]["max"][0] == 12 and entry3["profiles"]["decoder"]["z"]["opt"][0] == 4
    both = _check_round_trip(out, before, entry3)
    assert sorted(e["key"] for e in both.manifest["engines"]) == sorted([entry["key"], entry3["key"]])
    assert len(both.blob_names()) == n_blobs + 3
    assert Plan.open(path).blob_names() == again.blob_names()  # --out leaves the source alone


def test_timing_cache_beside_plan(rtx, tiny_plan, tmp_path):
    """The cache file appears beside the plan where the flavour has a timing cache (full
    TensorRT). TensorRT-RTX has none that works: its API is a deprecated no-op that forces a
    GPU query, so the build skips it, says so, and writes no file."""
    path = tmp_path / "t.plan"
    shutil.copy(tiny_plan, path)
    entry = build_engines(path, compute_capabilities=["8.6"], progress=False, echo=lambda s: None)
    cache = default_timing_cache_path(path)
    assert cache == Path(str(path) + ".timing.cache")
    fl = trt_compat.load("tensorrt_rtx")
    if fl.timing_cache_supported:  # pragma: no cover - full TensorRT, on a GPU machine
        assert cache.exists() and cache.stat().st_size > 0
        build_engines(path, compute_capabilities=["8.6"], progress=False, echo=lambda s: None)
        assert cache.exists()
    else:
        assert not cache.exists()
        assert entry["timing_cache"].startswith("not used: TensorRT-RTX")


def test_timing_cache_file_handling_with_a_stub_flavour(tmp_path):
    """Load/save of the cache file (the part that is ours), on a stub of TensorRT's API."""

    class Cache:
        def __init__(self, data):
            self.data = bytes(data) + b"+"

        def serialize(self):
            return self.data

    class Config:
        cache = None

        def create_timing_cache(self, data):
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class StubTrt:
        IBuilderConfig = Config
        __version__ = "10.0.0"

    fl = trt_compat.Flavour("tensorrt", StubTrt)
    assert fl.timing_cache_supported
    path = tmp_path / "x.plan.timing.cache"
    cfg = Config()
    fl.load_timing_cache(cfg, path)
    assert fl.save_timing_cache(cfg, path) and path.read_bytes() == b"+"
    cfg2 = Config()
    fl.load_timing_cache(cfg2, path)  # reused next time
    assert fl.save_timing_cache(cfg2, path) and path.read_bytes() == b"++"


def test_default_plan_builds_and_round_trips(rtx, tmp_path):
    shipped = shipped_plan_path("lidc")
    sha_before = _sha(shipped)
    path = tmp_path / "lidc.plan"
    shutil.copy(shipped, path)
    before = Plan.open(path)
    entry = build_engines(path, progress=False, echo=lambda s: None)
    _check_round_trip(path, before, entry)
    assert _sha(shipped) == sha_before, "the shipped plan was modified"
    sizes = {p: Plan.open(path).manifest["blobs"][entry["blobs"][p]]["size"] for p in PARTS}
    print(f"default plan build: {entry['build_seconds']} s, engine bytes {sizes}")


def test_cli_build(rtx, tiny_plan, tmp_path, capsys):
    path = tmp_path / "c.plan"
    shutil.copy(tiny_plan, path)
    assert main(["build", str(path), "-q", "--compute-capability", "8.6", "8.9", "--k-max", "16"]) == 0
    out = capsys.readouterr().out
    assert "encoder:" in out and "denoiser:" in out and "decoder:" in out and "MB" in out
    e = Plan.open(path).manifest["engines"]
    assert len(e) == 1 and e[0]["compute_capabilities"] == ["8.6", "8.9"]
    assert main(["info", str(path)]) == 0
    assert "engines/" in capsys.readouterr().out

    assert main(["build", str(path), "-q", "--compute-capability", "9.0"]) == 1
    assert "cannot target compute capability 9.0" in capsys.readouterr().err
    assert main(["build", str(path), "-q", "--opt-k", "40"]) == 1
    assert "opt_k <= k_max" in capsys.readouterr().err
    assert main(["build", str(path), "-q", "--compute-capability", "fast"]) == 1
    assert "not a compute capability" in capsys.readouterr().err


def test_a_mistyped_flavour_is_a_usage_error_naming_the_choices(monkeypatch):
    from msld_sdk.errors import UsageError
    monkeypatch.setenv("MSLD_TRT_FLAVOUR", "tensorrt-rtx")
    with pytest.raises(UsageError, match=r"MSLD_TRT_FLAVOUR.*\('tensorrt', 'tensorrt_rtx'\), got 'tensorrt-rtx'"):
        trt_compat.load()


def test_build_without_tensorrt_says_what_to_install(tiny_plan, tmp_path, monkeypatch):
    monkeypatch.setattr(trt_compat, "installed_flavours", lambda: [])
    monkeypatch.delenv("MSLD_TRT_FLAVOUR", raising=False)
    with pytest.raises(EngineBuildError, match="pip install tensorrt"):
        build_engines(tiny_plan, tmp_path / "x.plan", progress=False, echo=lambda s: None)
    assert not (tmp_path / "x.plan").exists()


def test_fp16_graph_conversion_matches_fp32_in_onnxruntime(tiny_plan, rng):
    """What the fp16 engines are built from, checked on the CPU: same I/O, fp16 convolutions,
    fp32 timestep embedding and normalisation, outputs within fp16 error of the fp32 graph."""
    onnx = pytest.importorskip("onnx")
    import onnxruntime as ort
    from onnx import TensorProto

    p = Plan.open(tiny_plan)
    lat = p.manifest["latent"]
    c, h, w = lat["channels"], *lat["size"]
    H, W = p.image_size
    feeds = {
        "encoder": {"image": rng.standard_normal((2, p.channels, H, W)).astype(np.float32)},
        "denoiser": {"x": rng.standard_normal((3, c, h, w)).astype(np.float32),
                     "t": np.array([999.0, 500.0, 1.0], np.float32),
                     "cond": rng.standard_normal((3, c, h, w)).astype(np.float32)},
        "decoder": {"z": rng.standard_normal((2, c, h, w)).astype(np.float32)},
    }
    for part in PARTS:
        src = p.blob(part)
        lp = convert_to_fp16(src)
        m32, m16 = onnx.load_from_string(src), onnx.load_from_string(lp)
        io = lambda m: [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]
        assert io(m16) == io(m32)
        inits = {t.name: t.data_type for t in m16.graph.initializer}
        for node in m16.graph.node:
            if node.op_type == "Conv":
                assert inits[node.input[1]] == TensorProto.FLOAT16
            if node.op_type in ("Sin", "Cos", "InstanceNormalization", "Softmax"):
                assert all(inits.get(i, TensorProto.FLOAT) == TensorProto.FLOAT for i in node.input if i)
        assert len(lp) < len(src)
        ref = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(None, feeds[part])[0]
        got = ort.InferenceSession(lp, providers=["CPUExecutionProvider"]).run(None, feeds[part])[0]
        assert got.dtype == np.float32
        err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6))
        assert err < 1e-2, f"{part}: fp16 graph differs from fp32 by {err:.2e} (relative to max)"


def test_engine_deserializes_on_this_gpu(rtx, tiny_plan, tmp_path):
    ccs, why = trt_compat.gpu_compute_capabilities()
    if not ccs:
        pytest.skip(f"deserializing an engine needs a GPU and a CUDA driver ({why}); TensorRT-RTX's "
                    "get_engine_validity and deserialize_cuda_engine both fail without one")
    fl = trt_compat.load("tensorrt_rtx")  # pragma: no cover - GPU only from here
    if ccs[0] not in fl.supported_targets():
        pytest.skip(f"TensorRT-RTX {fl.version} cannot target this GPU (compute capability {ccs[0]})")
    path = tmp_path / "g.plan"
    shutil.copy(tiny_plan, path)
    entry = build_engines(path, compute_capabilities=[ccs[0]], progress=False, echo=lambda s: None)
    plan = Plan.open(path)
    runtime = rtx.Runtime(fl.logger())
    for part in PARTS:
        data = plan.blob(entry["blobs"][part])
        ok, detail = fl.engine_validity(runtime, data)
        assert ok is not False, detail
        engine = runtime.deserialize_cuda_engine(data)
        assert engine is not None
        names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
        assert set(entry["profiles"][part]) <= names
        for name, s in entry["profiles"][part].items():
            mn, opt, mx = engine.get_tensor_profile_shape(name, 0)
            assert [list(mn), list(opt), list(mx)] == [s["min"], s["opt"], s["max"]]
