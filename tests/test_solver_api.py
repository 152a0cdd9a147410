"""The solver choice through the API, the plan's defaults, the CLI and Ray's item runner."""
import json
import shutil

import numpy as np
import pytest

from msld_sdk import Segmenter
from msld_sdk.cli.main import main as msld
from msld_sdk.errors import InputError, PlanFormatError
from msld_sdk.plan import Plan



def test_run_records_the_solver_and_refuses_eta(tiny_plan):
    seg = Segmenter(tiny_plan)
    img = np.random.default_rng(0).random((32, 32), dtype=np.float32)
    a = seg.run(img, k=2, steps=3, seed=1, solver="dpmpp2m")
    b = seg.run(img, k=2, steps=3, seed=1)
    assert (a.solver, b.solver) == ("dpmpp2m", "ddim")
    assert not np.array_equal(a.probs, b.probs)
    np.testing.assert_array_equal(a.probs, seg.run(img, k=2, steps=3, seed=1, solver="dpmpp2m").probs)
    np.testing.assert_array_equal(a.probs[:1], seg.run(img, k=1, steps=3, seed=1, solver="dpmpp2m").probs)
    with pytest.raises(InputError, match="eta 0 only"):
        seg.run(img, k=2, steps=3, eta=0.5, solver="dpmpp2m")
    with pytest.raises(InputError, match="solver must be one of"):
        seg.run(img, k=2, steps=3, solver="euler")


def test_plan_default_solver_set_validated_and_shown(tiny_plan, tmp_path, capsys):
    from msld_export.plan_writing.set_defaults import main as set_defaults_main
    p = tmp_path / "p.plan"
    shutil.copy(tiny_plan, p)
    assert set_defaults_main([str(p), "--solver", "dpmpp2m", "--why", "test"]) == 0
    m = Plan.open(p).manifest
    assert m["defaults"]["solver"] == "dpmpp2m"
    assert m["provenance"]["defaults_changed"]["to"]["solver"] == "dpmpp2m"
    assert Segmenter(p).run(np.zeros((32, 32), np.float32), k=1, steps=2, seed=0).solver == "dpmpp2m"
    # eta > 0 on such a plan: refused, naming the plan's default and the way to DDIM; DDIM asked for runs
    with pytest.raises(InputError, match="this plan's default solver is 'dpmpp2m'.*solver='ddim'"):
        Segmenter(p).run(np.zeros((32, 32), np.float32), k=1, steps=2, seed=0, eta=0.5)
    assert Segmenter(p).run(np.zeros((32, 32), np.float32), k=1, steps=2, seed=0, eta=0.5, solver="ddim").solver == "ddim"
    assert msld(["info", str(p)]) == 0
    assert "solver: dpmpp2m" in capsys.readouterr().out
    bad = json.loads(json.dumps(m))
    bad["defaults"]["solver"] = "euler"
    from msld_sdk.plan import _validate_manifest_values
    with pytest.raises(PlanFormatError, match="defaults.solver"):
        _validate_manifest_values(bad, p)
    bad["defaults"].update(solver="dpmpp2m", eta=0.5)
    with pytest.raises(PlanFormatError, match="eta 0 only"):
        _validate_manifest_values(bad, p)


def test_cli_segment_and_eval_take_solver(tiny_plan, tmp_path):
    img = tmp_path / "in.png"
    from PIL import Image
    Image.fromarray((np.random.default_rng(1).random((32, 32)) * 255).astype(np.uint8)).save(img)
    assert msld(["segment", str(img), "--plan", str(tiny_plan), "-k", "2", "--steps", "3", "--seed", "0",
                 "--solver", "dpmpp2m", "--out", str(tmp_path / "o")]) == 0
    assert msld(["segment", str(img), "--plan", str(tiny_plan), "--solver", "dpmpp2m", "--eta", "0.5",
                 "--out", str(tmp_path / "o2")]) != 0


def test_ray_items_carry_the_solver(tiny_plan, tmp_path):
    from msld_sdk.clinical.batch_ray import run_items
    from PIL import Image
    img = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(2).random((32, 32)) * 255).astype(np.uint8)).save(img)
    s = run_items([str(img)], tmp_path / "out", plan=tiny_plan, k=2, steps=3, solver="dpmpp2m", use_ray=False)
    assert len(s["done"]) == 1
    (done,) = (tmp_path / "out").rglob("done.json")
    assert json.loads(done.read_text())["solver"] == "dpmpp2m"
    assert json.loads((tmp_path / "out" / "job.json").read_text())["solver"] == "dpmpp2m"


def test_x0_predicting_plan_runs_dpmpp2m(tiny_x0_model_and_plan):
    """An x0-predicting model's plan (its denoiser graph gives the eps that recovers its x0) runs the
    solver like any other; x0 = the model's prediction, so the data-prediction form applies directly."""
    _, plan = tiny_x0_model_and_plan
    r = Segmenter(plan).run(np.zeros((32, 32), np.float32), k=2, steps=4, seed=0, solver="dpmpp2m")
    assert r.solver == "dpmpp2m" and np.isfinite(r.probs).all()


def test_the_plans_ddim_eta_is_the_default(tiny_plan, tmp_path):
    """defaults.eta of a DDIM plan applies when run() gets no eta (it was ignored: eta defaulted to
    0); dpmpp2m asked for on such a plan runs at eta 0, as it must."""
    import zipfile
    from msld_sdk.plan import MANIFEST_NAME
    p = tmp_path / "eta.plan"
    with zipfile.ZipFile(tiny_plan) as zin, zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == MANIFEST_NAME:
                m = json.loads(data)
                m["defaults"].update(eta=0.5, solver="ddim")
                data = json.dumps(m).encode()
            zout.writestr(item, data)
    seg = Segmenter(p)
    img = np.random.default_rng(3).random((32, 32), dtype=np.float32)
    r = seg.run(img, k=2, steps=3, seed=7)
    assert r.eta == 0.5
    np.testing.assert_array_equal(r.probs, seg.run(img, k=2, steps=3, seed=7, eta=0.5).probs)
    assert not np.array_equal(r.probs, seg.run(img, k=2, steps=3, seed=7, eta=0.0).probs)
    assert seg.run(img, k=2, steps=3, seed=7, solver="dpmpp2m").eta == 0.0



def test_segment_ray_and_the_result_take_a_timestep_grid(tiny_plan, tmp_path):
    """--timesteps on msld segment (as on eval) reaches the run: the masks written equal run()'s
    with that grid and differ from the plan's spacing; a Ray job records the grid."""
    from PIL import Image
    from msld_sdk.clinical.batch_ray import run_items
    seg = Segmenter(tiny_plan)
    T = seg.schedule.num_train_timesteps
    grid = [T - 1, T // 2, T // 10]
    img = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(5).random((32, 32)) * 255).astype(np.uint8)).save(img)
    base = ["segment", str(img), "--plan", str(tiny_plan), "-k", "3", "--seed", "4", "--solver", "dpmpp2m", "-q"]
    assert msld(base + ["--timesteps", ",".join(map(str, grid)), "-o", str(tmp_path / "g")]) == 0
    want = seg.run(str(img), k=3, seed=4, solver="dpmpp2m", timesteps=grid)
    plain = seg.run(str(img), k=3, seed=4, solver="dpmpp2m", steps=3)
    assert want.timesteps == tuple(grid) and not np.array_equal(want.probs, plain.probs)
    for i in range(3):
        got = np.asarray(Image.open(tmp_path / "g" / f"mask_{i:02d}.png")) > 0
        np.testing.assert_array_equal(got, want.masks[i])
    s = run_items([str(img)], tmp_path / "ray", plan=tiny_plan, k=3, solver="dpmpp2m", timesteps=grid, use_ray=False)
    assert len(s["done"]) == 1
    assert json.loads((tmp_path / "ray" / "job.json").read_text())["timesteps"] == grid
    s = run_items([str(img)], tmp_path / "ray2", plan=tiny_plan, k=3, steps=3, solver="dpmpp2m", timesteps="spacing",
                  use_ray=False)   # the plan's rule, spelled out
    assert len(s["done"]) == 1 and json.loads((tmp_path / "ray2" / "job.json").read_text())["timesteps"] == "spacing"
