"""The built wheel, installed into fresh virtual environments outside the repository (no system
site packages) and run from another folder:

* without extras: ``msld segment``, ``info``, ``bench`` and ``eval`` on an images/ + masks/
  folder work, torch is not importable, and the torch-side commands say in one line which
  extra to install; with ``[eval]`` (scipy, still no torch) ``msld eval`` on LIDC's four annotators;
* with ``[export]``: ``msld export`` (a small random model), ``msld bench --baselines`` (the
  shipped checkpoints come with the package) and ``msld import`` on the shared reference fixture.

pip's own cache (and the machine's pip configuration) serve the dependencies, so repeated runs
download nothing. The native extension is built without its CUDA kernels (MSLD_CMAKE_ARGS).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "lidc"
DATA = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "msld_sdk" / "samples" / "lidc_0974_n0_s2" / "image.png"
EXTRA_HINT = "pip install 'msld_sdk[export]'"


def _env() -> dict:
    """This environment without anything that would let the repository or the test's own
    environment leak into the fresh one."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["MSLD_CMAKE_ARGS"] = "-DMSLD_CUDA=OFF"
    return env


def _run(cmd, cwd, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, cmd))} -> {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _source_copy(dest: Path) -> Path:
    """The files of this checkout that git tracks or would track (not build/ or .dev/), so that
    nothing left over from an earlier in-tree build gets into the wheel."""
    ls = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True)
    if ls.returncode != 0:
        pytest.skip("not a git checkout: cannot list the package's source files")
    for name in ls.stdout.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = _source_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, src], cwd=out)
    (whl,) = out.glob("msld_sdk-*.whl")
    return whl


@pytest.fixture
def venv_dir(tmp_path):
    """Where a test's virtual environment goes; removed afterwards (with torch it is over 1 GB)."""
    yield tmp_path / "venv"
    shutil.rmtree(tmp_path / "venv", ignore_errors=True)


def _venv(path: Path, requirement: str, cwd: Path) -> Path:
    """A fresh virtual environment (without system site packages) with ``requirement`` installed;
    returns its bin/ folder."""
    _run([sys.executable, "-m", "venv", path], cwd=cwd)
    bin_ = path / "bin"
    _run([bin_ / "python", "-m", "pip", "install", "-q", requirement], cwd=cwd)
    return bin_


def _write_folder(root: Path) -> Path:
    """Two RGB images with their 0/255 masks, as users have them: root/images, root/masks."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / "images" / f"p{i}.jpg")
        m = np.zeros((48, 40), np.uint8)
        m[10:30, 8 + i:28] = 255
        Image.fromarray(m).save(root / "masks" / f"p{i}.png")
    return root


def test_runtime_commands_without_extras(wheel, tmp_path, venv_dir):
    work = tmp_path / "work"
    work.mkdir()
    bin_ = _venv(venv_dir, str(wheel), cwd=work)
    where = _run([bin_ / "python", "-c", "import msld_sdk; print(msld_sdk.__file__)"], cwd=work).stdout
    assert str(venv_dir) in where and str(ROOT) not in where, where
    r = _run([bin_ / "python", "-c", "import torch"], cwd=work, check=False)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr

    shutil.copy(SAMPLE, work / "slice.png")
    r = _run([bin_ / "msld", "segment", "slice.png", "-o", "out", "-k", "2", "--steps", "2", "--seed", "1", "-q"],
             cwd=work)
    assert "k=2 steps=2 views=1 seed=1" in r.stdout and (work / "out" / "overlay.png").exists()

    _write_folder(work / "data")
    _run([bin_ / "msld", "eval", "--data", "data", "--kind", "folder", "--k", "2", "--steps", "2", "-q",
          "--json", "eval.json"], cwd=work)
    rep = json.loads((work / "eval.json").read_text())
    assert rep["kind"] == "folder" and rep["n_images"] == 2 and 0 <= rep["metrics"]["dice_consensus"] <= 1

    assert "format: msld-plan v1" in _run([bin_ / "msld", "info"], cwd=work).stdout
    _run([bin_ / "msld", "bench", "--k", "1", "--steps", "1", "--repeats", "1", "-q"], cwd=work)
    for cmd in (["export", "--random", "x.plan"], ["bench", "--baselines"]):
        r = _run([bin_ / "msld", *cmd], cwd=work, check=False)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and EXTRA_HINT in r.stderr, r.stderr
    r = _run([bin_ / "python", "-m", "msld_export.plan_writing.export_plan", "--help"], cwd=work, check=False)
    assert r.returncode != 0 and EXTRA_HINT in r.stderr, r.stderr

    if not (DATA / "lidc").is_dir():
        pytest.skip(f"no LIDC data at {DATA} for msld eval with [eval]; the rest passed")
    _run([bin_ / "python", "-m", "pip", "install", "-q", f"{wheel}[eval]"], cwd=work)
    _run([bin_ / "msld", "eval", "--data", DATA, "--kind", "lidc", "--limit", "2", "--k", "2", "--steps", "2", "-q",
          "--json", "lidc.json"], cwd=work)
    assert "hm_iou" in json.loads((work / "lidc.json").read_text())["metrics"]
    assert _run([bin_ / "python", "-c", "import torch"], cwd=work, check=False).returncode != 0


def test_torch_side_commands_with_the_export_extra(wheel, tmp_path, venv_dir):
    work = tmp_path / "work"
    work.mkdir()
    bin_ = _venv(venv_dir, f"{wheel}[export]", cwd=work)
    _run([bin_ / "python", "-c", "import json; from msld_export.model.config import tiny_config; "
          "open('tiny.json', 'w').write(json.dumps(tiny_config().to_dict()))"], cwd=work)
    r = _run([bin_ / "msld", "export", "--random", "--config", "tiny.json", "tiny.plan"], cwd=work)
    assert "wrote tiny.plan" in r.stdout
    assert "format: msld-plan v1" in _run([bin_ / "msld", "info", "tiny.plan"], cwd=work).stdout
    shutil.copy(SAMPLE, work / "slice.png")
    _run([bin_ / "msld", "segment", "slice.png", "--plan", "tiny.plan", "-o", "out", "-k", "2", "--steps", "2",
          "--seed", "0", "-q"], cwd=work)
    r = _run([bin_ / "msld", "bench", "--k", "1", "--steps", "1", "--repeats", "1", "--baselines",
              "--baseline-repeats", "1", "-q"], cwd=work)
    assert "(a) PyTorch eager per hypothesis" in r.stdout

    if not (REFERENCE / "last.ckpt").exists():
        pytest.skip(f"no reference fixture at {REFERENCE}")
    # msld import: the reference implementation's checkpoint -> plan, from the installed package
    _run([bin_ / "msld", "import", REFERENCE / "last.ckpt", "--config", REFERENCE / "config.yaml", "--out", "ref.plan"],
         cwd=work)
    info = _run([bin_ / "msld", "info", "ref.plan"], cwd=work).stdout
    assert "format: msld-plan v1" in info and "huynhspm/Generative-Model" in info
