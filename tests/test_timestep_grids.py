"""DPM-Solver++(2M) on a given timestep grid (``msld_sdk.timestep_grids``, ``msld tune --grids``):
the native coefficients and loop against diffusers' DPMSolverMultistepScheduler given the same
custom timesteps, the grid through every layer (options, plan defaults, Segmenter, torch sampler),
and the checks that refuse a bad grid."""
import re
import shutil

import numpy as np
import pytest
import torch

from msld_sdk import Segmenter, _native
from msld_sdk.errors import InputError, PlanFormatError, UsageError
from msld_sdk.plan import Plan
from msld_sdk.plan_defaults import set_defaults
from msld_sdk.sampling import SampleOptions, Schedule
from msld_sdk.timestep_grids import check_grid, power_grid
from test_dpmpp2m_vs_diffusers import T, assert_steps_match, eps_model, make_scheduler, rel

# power grids of rho 2 and 3, uneven hand-made ones ending at t=0, one step (adjacent timesteps, e.g.
# 999 then 998, make h tiny and the float32 update ill-conditioned in diffusers too: not a grid to tune)
GRIDS = [(999, 561, 249, 61), (999, 421, 124, 15), (900, 500, 100), (999, 850, 400, 120, 10, 0), (700,)]


def test_rho_one_is_the_trailing_rule():
    for steps in range(1, 201):
        assert power_grid(T, steps, 1.0) == tuple(_native.dpmpp2m_timesteps(T, steps, "trailing"))


def test_power_grids_move_toward_low_noise_with_rho():
    assert power_grid(T, 4, 2.0) == (999, 561, 249, 61)
    lo, hi = power_grid(T, 6, 1.5), power_grid(T, 6, 3.0)
    assert lo[0] == hi[0] == T - 1 and all(a >= b for a, b in zip(lo, hi))
    with pytest.raises(InputError, match="strictly decrease"):
        power_grid(T, 200, 6.0)            # the last steps coincide
    with pytest.raises(InputError, match="rho"):
        power_grid(T, 4, 0.0)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_each_step_matches_diffusers_on_a_custom_grid(grid, clip):
    sched = make_scheduler("trailing", clip)
    sched.set_timesteps(timesteps=list(grid))
    ac = sched.alphas_cumprod.numpy()
    table = Schedule(ac, "trailing", clip=clip).dpmpp2m(len(grid), grid)
    assert_steps_match(sched, table, clip, k=4, shape=(4, 8, 8), seed=3)


@pytest.mark.parametrize("grid", GRIDS[:3])
def test_native_loop_on_a_grid_matches_diffusers(grid):
    sched = make_scheduler("trailing")
    sched.set_timesteps(timesteps=list(grid))
    ac = sched.alphas_cumprod.numpy().astype(np.float32)
    k, shape = 3, (4, 8, 8)
    x = np.zeros((k, *shape), np.float32)
    eps, t = np.zeros_like(x), np.zeros((k,), np.float32)
    calls = []

    def denoise():
        calls.append(int(t[0]))
        eps[...] = eps_model(torch.from_numpy(x), float(t[0])).numpy()

    _native.ddim_sample(denoise, ac, len(grid), "leading", 0.0, 0.0, 8, k, 1, x, eps, t, solver="dpmpp2m",
                        timesteps=np.array(grid, np.int32))
    assert calls == list(grid)      # the grid, not the (leading) spacing rule
    x_ref = torch.from_numpy(_native.gaussian(8, 0, k, int(np.prod(shape)), 0).reshape(k, *shape))
    for ts in sched.timesteps:
        x_ref = sched.step(eps_model(x_ref, int(ts)), int(ts), x_ref).prev_sample
    assert rel(x, x_ref.numpy()) < 1e-5


def test_native_refuses_bad_grids():
    ac = make_scheduler("trailing").alphas_cumprod.numpy().astype(np.float32)
    x = np.zeros((2, 4), np.float32)
    args = (lambda: None, ac, 3, "trailing", 0.0, 0.0, 1, 2, 1, x, x.copy(), np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="needs solver 'dpmpp2m'"):
        _native.ddim_sample(*args, solver="ddim", timesteps=np.array([900, 500, 100], np.int32))
    with pytest.raises(ValueError, match="`steps` timesteps"):
        _native.ddim_sample(*args, solver="dpmpp2m", timesteps=np.array([900, 100], np.int32))
    for bad in ([900, 900, 100], [100, 500, 900], [1000, 500, 100]):
        with pytest.raises(ValueError):
            _native.dpmpp2m_coefficients(ac, 3, "trailing", np.array(bad, np.int32))


def test_options_take_check_and_default_a_grid():
    d = {"k": 4, "max_k": 8, "steps": 4, "solver": "dpmpp2m"}
    o = SampleOptions.resolve(d, T, (64, 64), seed=0, timesteps=[999, 561, 249, 61])
    assert o.steps == 4 and o.timesteps == (999, 561, 249, 61)
    assert SampleOptions.resolve(d, T, (64, 64), seed=0).timesteps is None
    tuned = dict(d, timesteps=[999, 561, 249, 61])
    assert SampleOptions.resolve(tuned, T, (64, 64), seed=0).timesteps == (999, 561, 249, 61)
    assert SampleOptions.resolve(tuned, T, (64, 64), seed=0, timesteps="spacing").timesteps is None
    assert SampleOptions.resolve(tuned, T, (64, 64), seed=0, steps=6).timesteps is None      # another step count
    assert SampleOptions.resolve(tuned, T, (64, 64), seed=0, solver="ddim").timesteps is None
    with pytest.raises(InputError, match="for solver 'dpmpp2m'"):
        SampleOptions.resolve(d, T, (64, 64), seed=0, solver="ddim", timesteps=[900, 100])
    with pytest.raises(InputError, match="give one or the other"):
        SampleOptions.resolve(d, T, (64, 64), seed=0, steps=3, timesteps=[900, 100])
    with pytest.raises(InputError, match="strictly decrease"):
        SampleOptions.resolve(d, T, (64, 64), seed=0, timesteps=[100, 900])
    with pytest.raises(InputError, match="from 0 to 999"):
        SampleOptions.resolve(d, T, (64, 64), seed=0, timesteps=[1000, 100])
    with pytest.raises(InputError, match="list of integers"):
        check_grid("999,500", T)


def test_segmenter_grid_equals_the_rule_it_spells(tiny_plan):
    seg = Segmenter(tiny_plan)
    img = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    T_plan = seg.schedule.num_train_timesteps
    rule = tuple(int(v) for v in seg.schedule.dpmpp2m(4).timesteps)
    a = seg.run(img, k=3, steps=4, seed=2, solver="dpmpp2m")
    b = seg.run(img, k=3, seed=2, solver="dpmpp2m", timesteps=rule)
    np.testing.assert_array_equal(a.probs, b.probs)
    assert a.timesteps is None and b.timesteps == rule
    other = power_grid(T_plan, 4, 2.5)
    assert other != rule and seg.run(img, k=3, seed=2, solver="dpmpp2m", timesteps=other).timesteps == other


def test_plan_default_grid_is_used_recorded_and_dropped(tiny_plan, tmp_path):
    p = tmp_path / "g.plan"
    shutil.copy(tiny_plan, p)
    T_plan = Plan.open(p).manifest["schedule"]["num_train_timesteps"]
    grid = list(power_grid(T_plan, 3, 2.0))
    set_defaults(p, steps=3, solver="dpmpp2m", timesteps=grid, why="test")
    m = Plan.open(p).manifest
    assert m["defaults"]["timesteps"] == grid
    assert m["provenance"]["defaults_changed"]["to"]["timesteps"] == grid
    img = np.random.default_rng(1).random((32, 32)).astype(np.float32)
    seg = Segmenter(p)
    r = seg.run(img, k=2, seed=4)
    assert r.timesteps == tuple(grid) and r.steps == 3 and r.solver == "dpmpp2m"
    np.testing.assert_array_equal(r.probs, seg.run(img, k=2, seed=4, timesteps=grid).probs)
    assert seg.run(img, k=2, seed=4, timesteps="spacing").timesteps is None
    set_defaults(p, steps=5, why="test")               # another step count: the grid no longer fits
    assert "timesteps" not in Plan.open(p).manifest["defaults"]


def test_set_defaults_command_line_sets_and_drops_a_grid(tiny_plan, tmp_path, capsys):
    from msld_export.plan_writing.set_defaults import main as set_defaults_main
    p = tmp_path / "c.plan"
    shutil.copy(tiny_plan, p)
    grid = list(power_grid(Plan.open(p).manifest["schedule"]["num_train_timesteps"], 3, 0.75))
    assert set_defaults_main([str(p), "--solver", "dpmpp2m", "--steps", "3", "--timesteps",
                              ",".join(map(str, grid)), "--why", "test"]) == 0
    assert Plan.open(p).manifest["defaults"]["timesteps"] == grid
    assert set_defaults_main([str(p), "--k", "3", "--why", "test"]) == 0        # grid kept
    assert Plan.open(p).manifest["defaults"]["timesteps"] == grid
    assert set_defaults_main([str(p), "--timesteps", "none", "--why", "test"]) == 0
    assert "timesteps" not in Plan.open(p).manifest["defaults"]
    with pytest.raises(SystemExit):                                             # argparse names the format
        set_defaults_main([str(p), "--timesteps", "9,x"])
    assert "comma-separated list of integer timesteps" in capsys.readouterr().err
    # defaults the plan cannot take are refused before anything is written: the plan stays as it was
    assert set_defaults_main([str(p), "--solver", "dpmpp2m", "--steps", "3", "--timesteps",
                              ",".join(map(str, grid)), "--why", "test"]) == 0
    before = p.read_bytes()
    for args, message in ([["--steps", "4"], None],   # a new step count drops the grid: allowed
                          [["--timesteps", "900,100"], "must list defaults.steps \\(4\\) timesteps"],
                          [["--solver", "ddim", "--timesteps", "900,500,100"], "dpmpp2m grid, but defaults.solver"],
                          [["--k", "0"], "defaults.k must be from 1 to max_k"]):
        if message is None:
            assert set_defaults_main([str(p), *args]) == 0
            before = p.read_bytes()
            continue
        with pytest.raises(SystemExit) as e:
            set_defaults_main([str(p), *args])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and "was not changed" in err and "Traceback" not in err, err
        assert p.read_bytes() == before
    with pytest.raises(UsageError, match="was not changed: defaults.timesteps must list"):
        set_defaults(p, timesteps=[999, 500])
    assert p.read_bytes() == before


def test_a_plan_with_a_bad_default_grid_does_not_open(tiny_plan, tmp_path):
    from msld_sdk.plan import add_blobs
    for bad in ([900, 950, 100], [900, 500]):          # not decreasing; not defaults.steps long
        p = tmp_path / f"bad{len(bad)}.plan"
        shutil.copy(tiny_plan, p)
        m = Plan.open(p).manifest
        d = dict(m["defaults"], steps=3, solver="dpmpp2m", eta=0.0, timesteps=bad)
        with pytest.raises(PlanFormatError, match="defaults.timesteps"):
            add_blobs(p, {}, {"defaults": d})
            Plan.open(p)
