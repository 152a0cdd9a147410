"""msld tune (issue #23): the seed-spread rule on numbers with known answers, the parsing of its
options, the write decision, and a real small run on the tiny plan (a synthetic images/ + masks/
folder, so no data set is needed) that writes the table, the JSON, the plot and the plan's defaults."""
import json
import logging
import shutil
import statistics as st
import sys

import numpy as np
import pytest
from PIL import Image

from msld_sdk.cli import main
from msld_sdk.errors import MsldError, UsageError
from msld_sdk.evaluation import tune
from msld_sdk.evaluation.seed_spread import compare, compare_all, holds, mean_sd


def _figs(**metric_values):
    """{metric: [v_seed0, v_seed1, ...]} -> {seed: {metric: v}}."""
    n = len(next(iter(metric_values.values())))
    return {s: {m: v[s] for m, v in metric_values.items()} for s in range(n)}


def test_the_rule_on_known_numbers():
    ref = _figs(dice=[0.50, 0.60, 0.70], ece=[0.010, 0.010, 0.010])        # dice sd 0.1, ece sd 0
    assert mean_sd([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.1))
    near = compare(_figs(dice=[0.55, 0.66, 0.68]), ref, "dice")             # mean 0.63: |0.03| <= 0.1
    assert near.diff == pytest.approx(0.03) and near.ref_sd == pytest.approx(0.1) and near.within
    assert near.paired == pytest.approx((0.05, 0.06, -0.02))
    assert not compare(_figs(dice=[0.71, 0.70, 0.81]), ref, "dice").within   # mean 0.74: 0.14 > 0.1
    assert not compare(_figs(dice=[0.39, 0.50, 0.59]), ref, "dice").within   # lower by 0.107: |diff| counts
    # every watched metric must hold; a reference with no spread holds only what equals it
    other = _figs(dice=[0.5, 0.6, 0.7], ece=[0.010, 0.010, 0.011])
    assert holds(compare_all(other, ref, ["dice"])) and not holds(compare_all(other, ref, ["dice", "ece"]))
    assert holds(compare_all(ref, ref, ["dice", "ece"]))                     # the reference against itself
    # only the seeds both have count: here two, 0.5 and 0.6 (sd 0.0707)
    c = compare({0: {"dice": 0.55}, 1: {"dice": 0.6}, 5: {"dice": 0.9}}, ref, "dice")
    assert c.seeds == (0, 1) and c.ref_sd == pytest.approx(0.0707, abs=1e-4) and c.within
    with pytest.raises(UsageError, match="at least two"):
        compare({0: {"dice": 0.5}}, ref, "dice")
    with pytest.raises(UsageError, match="at least two"):
        compare({0: {"dice": 0.5}, 7: {"dice": 0.5}}, ref, "dice")
    assert not compare(_figs(dice=[float("nan")] * 3), ref, "dice").within


@pytest.mark.parametrize("text, message", [
    ("", "is empty"), ("ddim", "not SOLVER:STEPS"), ("ddim:", "not SOLVER:STEPS"), (":5", "not SOLVER:STEPS"),
    ("euler:5", "unknown solver 'euler'"), ("ddim:5,0", "'0' in 'ddim:5,0' is not a step count"),
    ("ddim:5,x", "'x'"), ("ddim:5,,4", "'' in"), ("ddim:-3", "'-3'"), ("ddim:2.5", "'2.5'"),
    ("ddim:5,5", "ddim:5 is given twice"), ("ddim:5 ddim:4", "ddim is given twice")])
def test_settings_are_parsed_strictly(text, message):
    with pytest.raises(UsageError, match=message):
        tune.parse_settings(text)


def test_parsing_settings_reference_seeds_and_metrics():
    s = tune.parse_settings(tune.DEFAULT_SETTINGS)
    assert [str(x) for x in s] == ["ddim:50", "ddim:20", "ddim:10", "ddim:5", "dpmpp2m:10", "dpmpp2m:8",
                                   "dpmpp2m:6", "dpmpp2m:5", "dpmpp2m:4"]
    assert str(tune.parse_reference(None, s)) == "ddim:50" and str(tune.parse_reference("dpmpp2m:6", s)) == "dpmpp2m:6"
    with pytest.raises(UsageError, match="not among --settings"):
        tune.parse_reference("ddim:7", s)
    with pytest.raises(UsageError, match="no ddim setting"):
        tune.parse_reference(None, tune.parse_settings("dpmpp2m:4,2"))
    with pytest.raises(UsageError, match="at least two"):
        tune.parse_seeds([3])
    with pytest.raises(UsageError, match="each seed once"):
        tune.parse_seeds([1, 1])
    assert tune.watched_metrics(None, 4) == ["ged", "hm_iou"] and tune.watched_metrics(None, 1) == ["dice_consensus", "ece"]
    with pytest.raises(UsageError, match="several annotators"):
        tune.watched_metrics("ged", 1)
    with pytest.raises(UsageError, match="'dice'"):
        tune.watched_metrics("dice", 1)


def _row(setting, calls, latency, holds_, reference=False, dice=0.5):
    return {"setting": setting, "solver": setting.split(":")[0], "steps": calls, "denoiser_calls": calls,
            "seconds_per_image": latency, "holds": holds_, "reference": reference,
            "figures": {"dice": {"mean": dice, "sd": 0.01, "diff": dice - 0.5, "ref_sd": 0.01, "within": holds_}}}


def test_the_choice_and_the_write_decision(tiny_plan, tmp_path):
    rows = [_row("ddim:10", 10, 1.0, True, reference=True), _row("ddim:4", 4, 0.5, True),
            _row("dpmpp2m:4", 4, 0.4, True), _row("dpmpp2m:2", 2, 0.2, False, dice=0.7)]
    assert tune.cheapest(rows)["setting"] == "dpmpp2m:4"          # fewest calls, then the lower latency
    assert tune.cheapest(rows[:1])["setting"] == "ddim:10"
    assert "no setting cheaper than the reference holds" in tune.verdict(rows[:1], rows[0])
    nothing = [_row("ddim:10", 10, 1.0, False, reference=True), rows[3]]
    assert tune.cheapest(nothing) is None and "no setting holds" in tune.verdict(nothing, None)
    p = tmp_path / "t.plan"
    shutil.copy(tiny_plan, p)
    before = p.read_bytes()
    with pytest.raises(MsldError, match="--write refused: no setting holds"):
        tune.write_choice(p, {"choice": None, "reference": "ddim:10"})
    assert p.read_bytes() == before


def test_without_matplotlib_the_table_and_json_are_still_written(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)    # import matplotlib -> ImportError
    rows = [_row("ddim:10", 10, 1.0, True, reference=True), _row("ddim:4", 4, 0.5, True)]
    report = {"plan": "x.plan", "kind": "folder", "split": "all", "n_images": 1, "k": 2, "seeds": [0, 1],
              "metrics": ["dice"], "rows": rows}
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        assert tune.write_outputs(tmp_path, report, "table") == ["tune.txt", "tune.json"]
    assert [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()] == [
        "msld tune: no plot, matplotlib is not installed (pip install matplotlib); the table and the JSON report "
        "are written"]
    assert json.loads((tmp_path / "tune.json").read_text())["plot"] is None and not (tmp_path / "tune.png").exists()


def test_command_line_errors_exit_2_before_any_work(tiny_plan, tmp_path, capsys):
    base = ["tune", "--plan", str(tiny_plan), "--data", str(tmp_path), "-o", str(tmp_path / "out"), "-q"]
    for extra, message in [(["--settings", "ddim:4,x"], "'x' in 'ddim:4,x' is not a step count"),
                           (["--settings", "ddim:4", "--reference", "ddim:2"], "not among --settings"),
                           (["--seeds", "0"], "at least two"),
                           (["--settings", "ddim:4 dpmpp2m:5000"], "--settings dpmpp2m:5000: steps must be")]:
        assert main(base + extra) == 2, extra
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _folder_data(root, n=3, size=32):
    """n grey images with a bright disc and its mask: a labelled images/ + masks/ folder."""
    rng = np.random.default_rng(5)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        disc = (yy - 10 - 4 * i) ** 2 + (xx - 16) ** 2 < (6 + i) ** 2
        img = np.clip(rng.normal(0.3, 0.1, (size, size)) + 0.5 * disc, 0, 1)
        Image.fromarray((img * 255).astype(np.uint8)).save(root / "images" / f"case{i}.png")
        Image.fromarray(disc.astype(np.uint8) * 255).save(root / "masks" / f"case{i}.png")
    return root


def test_tune_on_the_tiny_plan_writes_table_json_plot_and_defaults(tiny_plan, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from msld_sdk import Segmenter
    from msld_sdk.plan import Plan

    plan = tmp_path / "tiny.plan"
    shutil.copy(tiny_plan, plan)
    graphs = Plan.open(plan).graphs_sha256
    data, out = _folder_data(tmp_path / "data"), tmp_path / "tuned"
    assert main(["tune", "--plan", str(plan), "--data", str(data), "--limit", "3", "-k", "2", "--seeds", "0", "1",
                 "--settings", "ddim:4,2 dpmpp2m:2", "--threads", "1", "-q", "-o", str(out), "--write"]) == 0
    text = capsys.readouterr().out
    rep = json.loads((out / "tune.json").read_text())
    assert (out / "tune.txt").read_text().strip() in text
    lines = text.splitlines()
    assert "denoiser calls per image = steps" in text and "reference ddim:4" in text
    rows = {r["setting"]: r for r in rep["rows"]}
    assert list(rows) == ["ddim:4", "ddim:2", "dpmpp2m:2"]
    for name, r in rows.items():
        line = next(l for l in lines if l.startswith(name + " "))
        assert line.split()[1] == str(r["steps"]) == str(r["denoiser_calls"])
        assert line.endswith("reference" if name == "ddim:4" else "yes" if r["holds"] else ")")
    assert (rep["kind"], rep["split"], rep["n_images"], rep["k"], rep["seeds"]) == ("folder", "all", 3, 2, [0, 1])
    assert rep["metrics"] == ["dice_consensus", "ece"] and rep["plan_graphs_sha256"] == graphs
    assert rep["machine"]["cpu_summary"] and rep["machine"]["threads"] == 1
    assert len(rep["runs"]) == 6 and all(r["n_images"] == 3 for r in rep["runs"])
    # every verdict follows from the per-seed figures: |mean - reference mean| <= reference sd over seeds
    ref = {r["seed"]: r["figures"] for r in rep["runs"] if (r["solver"], r["steps"]) == ("ddim", 4)}
    for name, r in rows.items():
        mine = {x["seed"]: x["figures"] for x in rep["runs"] if f"{x['solver']}:{x['steps']}" == name}
        for m in rep["metrics"]:
            assert 0.0 <= mine[0][m] <= 1.0
            mean, ref_mean, ref_sd = (st.mean(mine[s][m] for s in (0, 1)), st.mean(ref[s][m] for s in (0, 1)),
                                      st.stdev([ref[0][m], ref[1][m]]))
            assert r["figures"][m]["mean"] == pytest.approx(mean) and r["figures"][m]["ref_sd"] == pytest.approx(ref_sd)
            assert r["figures"][m]["within"] == (abs(mean - ref_mean) <= ref_sd)
        assert r["holds"] == all(r["figures"][m]["within"] for m in rep["metrics"])
    assert rows["ddim:4"]["holds"]                                  # the reference holds against itself
    held = [r for r in rows.values() if r["holds"]]
    choice = rep["choice"]
    assert rows[choice["setting"]]["denoiser_calls"] == min(r["denoiser_calls"] for r in held)
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and rep["plot"] == "tune.png"
    # --write: the plan's defaults are now the choice, with the evidence; a Segmenter uses them
    m = Plan.open(plan).manifest
    assert (m["defaults"]["solver"], m["defaults"]["steps"]) == (choice["solver"], choice["steps"])
    assert Plan.open(plan).graphs_sha256 == graphs
    changed = m["provenance"]["defaults_changed"]
    assert changed["to"]["steps"] == choice["steps"] and "msld tune" in changed["why"]
    ev = changed["evidence"]
    assert (ev["tool"], ev["reference"], ev["seeds"], ev["n_images"], ev["kind"]) == ("msld tune", "ddim:4", [0, 1], 3,
                                                                                      "folder")
    assert [r["setting"] for r in ev["settings"]] == list(rows) and ev["cpu"] and ev["date"]
    r = Segmenter(plan, backend="onnxruntime", threads=1).run(np.zeros((32, 32, 1), np.float32), k=2, seed=0)
    assert (r.solver, r.steps) == (choice["solver"], choice["steps"])


def test_grids_are_parsed_and_expanded_strictly():
    settings = tune.parse_settings("ddim:10 dpmpp2m:4,3")
    out = tune.parse_grids("2,1.5", settings, 1000)
    assert [str(s) for s in out] == ["ddim:10", "dpmpp2m:4", "dpmpp2m:4@rho2", "dpmpp2m:4@rho1.5", "dpmpp2m:3",
                                     "dpmpp2m:3@rho2", "dpmpp2m:3@rho1.5"]
    assert out[2].timesteps(1000) == (999, 561, 249, 61) and out[1].timesteps(1000) == "spacing"
    assert tune.parse_grids(None, settings, 1000) == settings
    for text, settings_text, message in [("x", "dpmpp2m:4", "'x' is not a number"), ("2,2", "dpmpp2m:4", "twice"),
                                         ("2", "ddim:10", "no dpmpp2m setting"), ("0", "dpmpp2m:4", "rho"),
                                         ("9", "dpmpp2m:200", "strictly decrease")]:
        with pytest.raises(UsageError, match=message):
            tune.parse_grids(text, tune.parse_settings(settings_text), 1000)


def test_equal_calls_go_to_the_setting_closest_to_the_reference():
    rows = [_row("ddim:10", 10, 1.0, True, reference=True), _row("dpmpp2m:4", 4, 0.4, True, dice=0.508),
            _row("dpmpp2m:4@rho2", 4, 0.45, True, dice=0.503)]
    assert tune.cheapest(rows)["setting"] == "dpmpp2m:4@rho2"      # same calls: 0.3 sd from the reference, not 0.8


def test_table_columns_stay_aligned_with_long_setting_names():
    rows = [_row("ddim:50", 50, 2.7, True, reference=True), _row("dpmpp2m:4@rho0.75", 4, 0.34, True, dice=0.507)]
    lines = tune.format_table(rows, ["dice"], "head").splitlines()
    header = next(line for line in lines if line.startswith("setting"))
    body = [line for line in lines if line.startswith(("ddim:50 ", "dpmpp2m:4@rho0.75 "))]
    assert len(body) == 2
    # the calls column ends at the same character on the header and on every row
    end = header.index("calls") + len("calls")
    assert [line[end - 2:end] for line in body] == ["50", " 4"]


def test_tune_searches_grids_and_writes_the_chosen_grid(tiny_plan, tmp_path, capsys):
    from msld_sdk import Segmenter
    from msld_sdk.plan import Plan

    plan = tmp_path / "tiny.plan"
    shutil.copy(tiny_plan, plan)
    data, out = _folder_data(tmp_path / "data"), tmp_path / "tuned"
    assert main(["tune", "--plan", str(plan), "--data", str(data), "--limit", "2", "-k", "2", "--seeds", "0", "1",
                 "--settings", "dpmpp2m:4,2", "--reference", "dpmpp2m:4", "--grids", "2", "--threads", "1",
                 "-o", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    # without -q it first says what it will run: 4 settings x 2 seeds x 2 images, (4+4+2+2) x 2 x 2 calls
    assert ("4 settings (dpmpp2m:4 dpmpp2m:4@rho2 dpmpp2m:2 dpmpp2m:2@rho2) x 2 seeds on folder/all (2 images, k=2): "
            "16 image runs, 48 batched denoiser calls; reference dpmpp2m:4") in captured.err
    rep = json.loads((out / "tune.json").read_text())
    rows = {r["setting"]: r for r in rep["rows"]}
    assert list(rows) == ["dpmpp2m:4", "dpmpp2m:4@rho2", "dpmpp2m:2", "dpmpp2m:2@rho2"]
    T = Plan.open(plan).manifest["schedule"]["num_train_timesteps"]
    from msld_sdk.timestep_grids import power_grid
    assert rows["dpmpp2m:2@rho2"]["timesteps"] == list(power_grid(T, 2, 2.0)) and rows["dpmpp2m:2"]["timesteps"] is None
    assert f"dpmpp2m:2@rho2 = {','.join(map(str, power_grid(T, 2, 2.0)))}" in text
    # the grid rows differ from the spacing rows: the runs really used the grid
    fig = {name: [x["figures"] for x in rep["runs"] if (x["steps"], x["rho"]) == (r["steps"], r["rho"])]
           for name, r in rows.items()}
    assert fig["dpmpp2m:4"] != fig["dpmpp2m:4@rho2"]
    # --write with a grid chosen: forced by making the grid setting the only cheap one that holds
    report = dict(rep, choice={"setting": "dpmpp2m:2@rho2", "solver": "dpmpp2m", "steps": 2, "rho": 2.0,
                               "timesteps": rows["dpmpp2m:2@rho2"]["timesteps"]})
    tune.write_choice(plan, report)
    d = Plan.open(plan).manifest["defaults"]
    assert (d["solver"], d["steps"], d["timesteps"]) == ("dpmpp2m", 2, list(power_grid(T, 2, 2.0)))
    r = Segmenter(plan, threads=1).run(np.zeros((32, 32, 1), np.float32), k=2, seed=0)
    assert r.timesteps == tuple(power_grid(T, 2, 2.0))
