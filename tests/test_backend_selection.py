"""Backend selection: auto falls back to ONNX Runtime with one log line saying why; an
explicit backend='tensorrt' that cannot run raises BackendUnavailableError naming what is
missing and the fix. GPU, driver, packages and versions are stubbed where a test needs a
situation this machine is not in; the one test that runs engines needs a real GPU."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from msld_sdk import backends

from msld_sdk.backends import trt_compat
from msld_sdk.backends import select_backend, tensorrt_check
from msld_sdk.backends.onnxruntime_backend import OnnxRuntimeBackend
from msld_sdk.errors import BackendUnavailableError
from msld_sdk.plan import GRAPH_PARTS, Plan, add_blobs

# fp32 engines: TensorRT may run fp32 convolutions and matrix products in TF32 (10-bit mantissa,
# its default on Ampere and later GPUs, ~5e-4 relative error a product), against ONNX Runtime
# in full fp32; masks may differ only where a probability is that close to the threshold.
TRT_FP32_ATOL = 2e-3

RTX_VERSION = "1.7.1.116"


def _records(caplog):
    return [r for r in caplog.records if r.name == "msld_sdk" and "msld_sdk: using" in r.getMessage()]


def fake_engine_plan(src, dst, flavour="tensorrt_rtx", version=RTX_VERSION, ccs=("8.6", "8.9"), stale=False):
    """A plan whose manifest lists an engine set (the engine bytes are placeholders)."""
    p = Plan.open(src)
    key = f"{flavour}-{version}-fp16-" + trt_compat.cc_tag(list(ccs))
    blobs = {f"engines/{key}/{part}.engine": (f"engines/{key}/{part}.engine", f"not an engine: {part}".encode())
             for part in GRAPH_PARTS}
    entry = {"key": key, "flavour": flavour, "version": version, "precision": "fp16",
             "compute_capabilities": list(ccs),
             "blobs": {part: f"engines/{key}/{part}.engine" for part in GRAPH_PARTS},
             "source_sha256": {part: ("0" * 64 if stale else p.manifest["blobs"][part]["sha256"])
                               for part in GRAPH_PARTS}}
    add_blobs(src, blobs, {"engines": [entry]}, out_path=dst)
    return Plan.open(dst)


@pytest.fixture
def situation(monkeypatch):
    """Stub what this machine has: GPU compute capabilities, TensorRT flavours, cuda-python."""
    def set_(gpu=(), flavours=None, cuda_python=False):
        monkeypatch.setattr(trt_compat, "gpu_compute_capabilities",
                            lambda: (list(gpu), None if gpu else "no GPU found (stubbed)"))
        if flavours is not None:
            monkeypatch.setattr(trt_compat, "installed_flavours", lambda: list(flavours))
            monkeypatch.setattr(backends, "_flavour_version", lambda f: flavours[f])
        monkeypatch.setattr(trt_compat, "cuda_python_installed", lambda: cuda_python)
    return set_


def test_auto_without_engines_uses_onnxruntime_and_logs_why(tiny_plan, caplog):
    with caplog.at_level(logging.INFO, logger="msld_sdk"):
        b = select_backend(Plan.open(tiny_plan), "auto")
    assert isinstance(b, OnnxRuntimeBackend)
    recs = _records(caplog)
    assert len(recs) == 1
    msg = recs[0].getMessage()
    assert msg.startswith("msld_sdk: using ONNX Runtime on the CPU (TensorRT not used: the plan holds no TensorRT engines")
    assert "msld build" in msg


def test_auto_with_engines_but_no_gpu_logs_no_gpu(tiny_plan, tmp_path, caplog, situation):
    plan = fake_engine_plan(tiny_plan, tmp_path / "e.plan")
    situation(gpu=())
    with caplog.at_level(logging.INFO, logger="msld_sdk"):
        b = select_backend(plan, "auto")
    assert isinstance(b, OnnxRuntimeBackend)
    recs = _records(caplog)
    assert [r.getMessage() for r in recs] == ["msld_sdk: using ONNX Runtime on the CPU (TensorRT not used: "
                                              "no GPU found (stubbed))"]


def test_auto_on_this_machine_logs_one_line(tiny_plan, tmp_path, caplog):
    """Unstubbed: whatever this machine lacks, auto says it in one line and runs ONNX Runtime."""
    plan = fake_engine_plan(tiny_plan, tmp_path / "e.plan")
    with caplog.at_level(logging.INFO, logger="msld_sdk"):
        b = select_backend(plan, "auto")
    recs = _records(caplog)
    assert len(recs) == 1 and isinstance(b, OnnxRuntimeBackend)
    assert "using ONNX Runtime on the CPU (TensorRT not used: " in recs[0].getMessage()


def test_explicit_tensorrt_without_engines_raises(tiny_plan):
    with pytest.raises(BackendUnavailableError, match=r"backend='tensorrt' cannot be used: the plan holds no "
                                                      r"TensorRT engines \(build them with `msld build"):
        select_backend(Plan.open(tiny_plan), "tensorrt")


def test_explicit_tensorrt_names_everything_missing(tiny_plan, tmp_path, situation):
    plan = fake_engine_plan(tiny_plan, tmp_path / "e.plan")
    situation(gpu=(), flavours={}, cuda_python=False)
    with pytest.raises(BackendUnavailableError) as ei:
        select_backend(plan, "tensorrt")
    msg = str(ei.value)
    assert "no GPU found" in msg
    assert f"pip install tensorrt-rtx-cu13=={RTX_VERSION} cuda-python" in msg
    assert "cuda-python is not installed (pip install cuda-python)" in msg
    assert "backend='onnxruntime'" in msg


def test_no_engine_for_this_compute_capability(tiny_plan, tmp_path, situation):
    plan = fake_engine_plan(tiny_plan, tmp_path / "e.plan", flavour="tensorrt", version="10.13.0",
                            ccs=("8.6",))
    situation(gpu=("9.0",), flavours={"tensorrt": "10.13.0"}, cuda_python=True)
    with pytest.raises(BackendUnavailableError, match=r"no engine for compute capability 9\.0 .*rebuild with "
                                                      r"`msld build .* --compute-capability 9\.0`"):
        select_backend(plan, "tensorrt")


def test_rtx_engines_on_a_gpu_rtx_cannot_target(tiny_plan, tmp_path, situation):
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX to know which GPUs it can target")
    plan = fake_engine_plan(tiny_plan, tmp_path / "e.plan")
    situation(gpu=("9.0",), flavours={"tensorrt_rtx": RTX_VERSION}, cuda_python=True)
    with pytest.raises(BackendUnavailableError, match=r"no engine for compute capability 9\.0.*cannot target 9\.0"
                                                      r".*install full TensorRT"):
        select_backend(plan, "tensorrt")


def test_engine_version_mismatch(tiny_plan, tmp_path, situation, caplog):
    plan = fake_engine_plan(tiny_plan, tmp_path / "e.plan", version="1.6.0.1")
    situation(gpu=("8.6",), flavours={"tensorrt_rtx": RTX_VERSION}, cuda_python=True)
    with pytest.raises(BackendUnavailableError, match=r"built with version 1\.6\.0\.1, installed is "
                                                      + RTX_VERSION.replace(".", r"\.") + r".*rebuild with `msld build"):
        select_backend(plan, "tensorrt")
    with caplog.at_level(logging.INFO, logger="msld_sdk"):
        assert isinstance(select_backend(plan, "auto"), OnnxRuntimeBackend)
    assert "built with version 1.6.0.1" in _records(caplog)[0].getMessage()


def test_engines_from_other_graphs_are_not_used(tiny_plan, tmp_path, situation):
    plan = fake_engine_plan(tiny_plan, tmp_path / "e.plan", stale=True)
    situation(gpu=("8.6",), flavours={"tensorrt_rtx": RTX_VERSION}, cuda_python=True)
    chk = tensorrt_check(plan, first_only=False)
    assert not chk.ok and "built from other graphs" in chk.problems[0]


def test_matching_set_found_then_backend_failure_handled(tiny_plan, tmp_path, situation, caplog):
    """Everything looks present (stubbed) so the set matches; constructing the backend then
    fails on this machine (no real GPU / cuda-python / engine): explicit raises, auto falls back."""
    plan = fake_engine_plan(tiny_plan, tmp_path / "e.plan")
    situation(gpu=("8.6",), flavours={"tensorrt_rtx": RTX_VERSION}, cuda_python=True)
    chk = tensorrt_check(plan, first_only=False)
    assert chk.ok and chk.entry["version"] == RTX_VERSION and chk.gpu_cc == "8.6"
    real_gpu = trt_compat._probe_gpus()[0]
    if real_gpu:
        pytest.skip("a real GPU is present: this test is about the failure path")
    with pytest.raises(BackendUnavailableError):
        select_backend(plan, "tensorrt")
    with caplog.at_level(logging.INFO, logger="msld_sdk"):
        assert isinstance(select_backend(plan, "auto"), OnnxRuntimeBackend)
    recs = _records(caplog)
    assert len(recs) == 1 and recs[0].levelno == logging.WARNING
    assert "using ONNX Runtime on the CPU (TensorRT not used: " in recs[0].getMessage()


def test_a_gpu_failure_while_starting_tensorrt_falls_back_or_names_it(tiny_plan, tmp_path, situation, caplog,
                                                                     monkeypatch):
    """Not only BackendUnavailableError: a CUDA error (cuda-python raises RuntimeError) while the
    backend starts makes auto fall back with its warning, and an explicit request name it."""
    from msld_sdk.backends import tensorrt_backend
    plan = fake_engine_plan(tiny_plan, tmp_path / "e.plan")
    situation(gpu=("8.6",), flavours={"tensorrt_rtx": RTX_VERSION}, cuda_python=True)

    def broken(*a, **k):
        raise RuntimeError("cudaMalloc failed: out of memory")
    monkeypatch.setattr(tensorrt_backend, "TensorRTBackend", broken)
    with pytest.raises(BackendUnavailableError, match="failed to start: RuntimeError: cudaMalloc failed"):
        select_backend(plan, "tensorrt")
    with caplog.at_level(logging.INFO, logger="msld_sdk"):
        assert isinstance(select_backend(plan, "auto"), OnnxRuntimeBackend)
    assert "TensorRT not used: the TensorRT backend failed to start: RuntimeError: cudaMalloc" in caplog.text


def test_malformed_engine_entries_are_ignored(tiny_plan, tmp_path):
    out = tmp_path / "m.plan"
    add_blobs(tiny_plan, {}, {"engines": [{"key": "x"}, "junk"]}, out)
    assert backends.engine_sets(Plan.open(out)) == []
    assert "holds no TensorRT engines" in backends.tensorrt_unavailable_reason(Plan.open(out))


def test_compute_capability_parsing():
    assert [trt_compat.format_cc(c) for c in ("8.6", "86", "sm_89", "SM120", "12.0")] == \
        ["8.6", "8.6", "8.9", "12.0", "12.0"]
    with pytest.raises(ValueError):
        trt_compat.format_cc("fast")
    assert trt_compat.cc_tag(["8.6", "12.0"]) == "sm86_sm120"


def test_selection_imports_no_tensorrt_or_torch():
    code = ("import sys, numpy as np; from msld_sdk import Segmenter; "
            "s = Segmenter(backend='auto'); s.run(np.zeros((16, 16), np.float32), k=1, steps=1, seed=0); "
            "bad = [m for m in ('torch', 'tensorrt', 'tensorrt_rtx', 'cuda') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_tensorrt_backend_module_imports_without_tensorrt():
    code = ("import sys; import msld_sdk.backends.tensorrt_backend as m; "
            "assert 'tensorrt_rtx' not in sys.modules and 'tensorrt' not in sys.modules; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_tensorrt_backend_runs_on_gpu(tiny_plan, tmp_path):
    """GPU only: engines built here, run by the TensorRT backend, agree with ONNX Runtime."""
    ccs, why = trt_compat.gpu_compute_capabilities()
    if not ccs:
        pytest.skip(f"needs a GPU ({why})")
    if not trt_compat.installed_flavours():  # pragma: no cover - GPU only from here
        pytest.skip("needs TensorRT (pip install tensorrt-cu13 or tensorrt-rtx-cu13)")
    if not trt_compat.cuda_python_installed():
        pytest.skip("needs cuda-python (pip install cuda-python)")
    from msld_sdk import Segmenter
    from msld_sdk.tools.engine_build import build_engines
    fl = trt_compat.load()
    if fl.supported_targets() is not None and ccs[0] not in fl.supported_targets():
        pytest.skip(f"{fl.display} cannot target this GPU (compute capability {ccs[0]})")
    path = tmp_path / "gpu.plan"
    shutil.copy(tiny_plan, path)
    build_engines(path, fp32=True, compute_capabilities=[ccs[0]], progress=False, echo=lambda s: None)
    img = np.random.default_rng(0).random((40, 50)).astype(np.float32)
    trt_seg = Segmenter(path, backend="tensorrt")
    ort_seg = Segmenter(path, backend="onnxruntime")
    a = trt_seg.run(img, k=3, steps=4, seed=5)
    b = ort_seg.run(img, k=3, steps=4, seed=5)
    assert trt_seg.backend.name == "tensorrt"
    np.testing.assert_allclose(a.probs, b.probs, atol=TRT_FP32_ATOL)
    pl = Plan.open(path)
    lat = trt_seg.backend.encode(np.zeros((17, pl.channels, *pl.image_size), np.float32))
    assert lat.shape[0] == 17  # above the encoder profile's 16: run in chunks


def test_onnxruntime_sessions_stop_spinning_between_runs(tiny_plan):
    """The three sessions run one after another on the same cores: a finished session's
    threads must not keep spinning into the next one (see session_options)."""
    from msld_sdk.backends.onnxruntime_backend import session_options
    opts = session_options(3)
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    b = OnnxRuntimeBackend(Plan.open(tiny_plan), threads=1)
    for sess in (b.encoder, b.denoiser, b.decoder):
        assert sess.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
        assert sess.get_session_options().intra_op_num_threads == 1
