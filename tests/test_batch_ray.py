"""Archives on Ray: a local Ray cluster started inside the test (no external service).

One scenario, 20 images plus one damaged file:
  1. the local loop (``use_ray=False``) segments every item;
  2. a Ray job in a subprocess is killed with SIGKILL once some items are finished;
  3. the job is rerun on Ray: finished items are skipped (their files untouched), the rest are
     done, the damaged file is recorded with its error and does not stop the job;
  4. every item's arrays equal the local loop's.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT

ray = pytest.importorskip("ray")
from msld_sdk.clinical.batch_ray import DONE, ERROR, run_items  # noqa: E402

RUN = dict(plan="lidc", k=4, steps=6, seed=3, threads=1)
N_GOOD, BAD_AT = 20, 10


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("archive")
    base = np.asarray(Image.open(ROOT / "msld_sdk" / "samples" / "lidc_0974_n0_s2" / "image.png"), np.float32)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(N_GOOD):
        img = np.clip(np.roll(base, (i % 5) - 2, axis=i % 2) + rng.normal(0, 8, base.shape), 0, 255)
        paths.append(d / f"slice{i:02d}.png")
        Image.fromarray(img.astype(np.uint8)).save(paths[-1])
    bad = d / "damaged.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))   # a PNG signature, then garbage
    paths.insert(BAD_AT, bad)
    return [str(p) for p in paths]


def _done(out):
    return sorted(p.parent.name for p in out.glob(f"*/{DONE}"))


def _session_pids(sid):
    pids = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:          # field 6 of stat: session id
                pids.append(int(p))
    return pids


def _kill_job_after(out, inputs, n_done, timeout=120):
    """Start a Ray job in its own session; SIGKILL it once ``n_done`` items are finished."""
    code = ("import sys; from msld_sdk.clinical.batch_ray import run_items; "
            f"run_items(sys.argv[2:], sys.argv[1], ray_address='local', actors=2, **{RUN!r})")
    p = subprocess.Popen([sys.executable, "-c", code, str(out), *inputs], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    try:
        while len(_done(out)) < n_done and p.poll() is None and time.time() - t0 < timeout:
            time.sleep(0.02)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        # Ray's workers leave the process group; they exit a while after their raylet is gone.
        # Give them a moment, then end any left in this session (all started by this test), by pid.
        deadline = time.time() + 3
        while _session_pids(p.pid) and time.time() < deadline:
            time.sleep(0.2)
        for pid in _session_pids(p.pid):
            os.kill(pid, signal.SIGKILL)
    return time.time() - t0


@pytest.fixture(scope="module")
def local_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    t = time.perf_counter()
    s = run_items(inputs, out, use_ray=False, **RUN)
    return out, s, time.perf_counter() - t


def test_ray_resumes_after_kill_equals_local_and_reports_bad_items(inputs, local_run, tmp_path):
    local_out, local_summary, local_s = local_run
    assert len(local_summary["done"]) == N_GOOD and list(local_summary["failed"]) == ["damaged"]

    out = tmp_path / "ray"
    kill_s = _kill_job_after(out, inputs, n_done=3)
    before = _done(out)
    assert 3 <= len(before) < N_GOOD, f"kill should land half-way, {len(before)} items were finished"
    stamps = {n: ((out / n / DONE).read_text(), (out / n / "result.npz").stat().st_mtime_ns) for n in before}

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        t = time.perf_counter()
        s = run_items(inputs, out, actors=2, **RUN)
        resume_s = time.perf_counter() - t
    finally:
        ray.shutdown()

    assert s["ray"] and sorted(s["skipped"]) == before
    assert sorted(s["done"] + s["skipped"]) == sorted(local_summary["done"])
    assert list(s["failed"]) == ["damaged"] and "cannot be read as an image" in s["failed"]["damaged"]
    err = json.loads((out / "damaged" / ERROR).read_text())
    assert err["index"] == BAD_AT and err["path"].endswith("damaged.png")
    for n, (marker, mtime) in stamps.items():     # finished before the kill: not redone
        assert (out / n / DONE).read_text() == marker and (out / n / "result.npz").stat().st_mtime_ns == mtime
    for n in local_summary["done"]:                # item for item, the local loop's outputs
        a, b = np.load(local_out / n / "result.npz"), np.load(out / n / "result.npz")
        for key in ("masks", "mean", "confidence", "consensus"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{n} {key}")
        assert json.loads((out / n / DONE).read_text())["seed"] == json.loads((local_out / n / DONE).read_text())["seed"]
    seeds = {json.loads((out / n / DONE).read_text())["seed"] for n in s["done"] + s["skipped"]}
    assert len(seeds) == N_GOOD                    # every item its own seed
    print(f"Ray: local loop {local_s:.1f} s; killed after {len(before)} items at {kill_s:.1f} s; "
          f"resume on Ray {resume_s:.1f} s ({len(s['done'])} done, {len(s['skipped'])} skipped, 1 failed)")


def test_rerun_with_other_parameters_is_refused(inputs, local_run):
    from msld_sdk import InputError
    local_out = local_run[0]
    with pytest.raises(InputError, match="other parameters"):
        run_items(inputs, local_out, use_ray=False, **dict(RUN, seed=4))
    s = run_items(inputs, local_out, use_ray=False, **RUN)      # same parameters: everything skipped
    assert len(s["skipped"]) == N_GOOD and list(s["failed"]) == ["damaged"]
