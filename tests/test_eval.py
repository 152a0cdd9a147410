"""msld eval: the evaluation loop on synthetic data with known answers, and on real data."""
import numpy as np
import pytest

from conftest import DATA
from msld_sdk.evaluation import metrics
from msld_sdk.evaluation.evaluate import SEED_SCHEME, Sample, evaluate, image_seed, reference_mask
from msld_sdk.result import SegmentationResult


class FixedSegmenter:
    """Returns preset hypotheses (so the expected metrics are known)."""
    defaults = {"steps": 1, "k": 2}

    def __init__(self, masks_per_image):
        self.masks = masks_per_image
        self.i = 0

    def run(self, images, k, steps, seed):
        out = []
        for _ in images:
            m = self.masks[self.i]
            self.i += 1
            probs = m.astype(np.float32)
            votes = m.sum(0)
            out.append(SegmentationResult(masks=m, mean=probs.mean(0), confidence=np.ones(m.shape[1:], np.float32),
                                          consensus=votes * 2 > len(m), probs=probs, seed=seed, steps=steps, eta=0))
        return out


def test_known_answers():
    rng = np.random.default_rng(0)
    anns = [rng.random((4, 16, 16)) < 0.3 for _ in range(5)]
    anns[1][:] = False           # nobody marked anything
    anns[2][1:] = False          # only one annotator marked: not a majority
    hyps = [a[:2].copy() for a in anns]  # the model returns two of the annotations
    rep = evaluate(FixedSegmenter(hyps), [Sample(np.zeros((16, 16, 1), np.float32), a, f"case{i}")
                                             for i, a in enumerate(anns)], k=2, steps=1)
    ref = [reference_mask(a) for a in anns]
    want_dice = np.mean([metrics.dice((h.sum(0) * 2 > 2), r) for h, r in zip(hyps, ref)])
    assert rep["metrics"]["dice_consensus"] == pytest.approx(want_dice)
    assert rep["metrics"]["ged"] == pytest.approx(np.mean([metrics.generalized_energy_distance(h, a)
                                                           for h, a in zip(hyps, anns)]))
    assert rep["n_images"] == 5 and rep["majority_marked"]["n_images"] == 3
    assert 0 <= rep["ece"] <= 1
    # every image's figures are kept, and the split's figure is their mean
    assert [r["id"] for r in rep["per_image"]] == [f"case{i}" for i in range(5)]
    for name, v in rep["metrics"].items():
        assert v == pytest.approx(np.mean([r[name] for r in rep["per_image"]]))


def test_perfect_single_annotator_scores_one():
    rng = np.random.default_rng(1)
    gts = [rng.random((1, 12, 12)) < 0.4 for _ in range(3)]
    hyps = [np.repeat(g, 3, 0) for g in gts]
    rep = evaluate(FixedSegmenter(hyps), [Sample(np.zeros((12, 12, 3), np.float32), g) for g in gts], k=3, steps=1)
    assert rep["metrics"]["dice_consensus"] == 1.0 and rep["metrics"]["iou_per_hypothesis"] == 1.0
    assert rep["ece"] == 0.0 and "ged" not in rep["metrics"]


def test_each_image_is_sampled_with_its_own_seed(tiny_plan):
    """The same image twice in a split gets different noise, and the seeds are a fixed
    function of (seed, index): a split's mean does not hinge on one draw shared by all."""
    from msld_sdk import Segmenter

    class Recording:
        defaults = {"steps": 2, "k": 3}

        def __init__(self):
            self.seg, self.seeds, self.masks = Segmenter(tiny_plan), [], []

        def run(self, images, k, steps, seed):
            assert len(images) == 1
            self.seeds.append(seed)
            out = self.seg.run(images, k=k, steps=steps, seed=seed)
            self.masks.append(out[0].probs)
            return out

    img = np.random.default_rng(2).random((32, 32, 1)).astype(np.float32)
    ann = np.zeros((1, 32, 32), bool)
    a, b = Recording(), Recording()
    rep = evaluate(a, [Sample(img, ann)] * 3, k=3, steps=2, seed=7)
    evaluate(b, [Sample(img, ann)] * 3, k=3, steps=2, seed=7)
    assert a.seeds == b.seeds == [image_seed(7, i) for i in range(3)]
    assert len(set(a.seeds)) == 3 and image_seed(8, 0) not in a.seeds
    assert not np.array_equal(a.masks[0], a.masks[1])
    assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
    assert rep["seed"] == 7 and rep["seed_scheme"] == SEED_SCHEME


@pytest.mark.skipif(not (DATA / "lidc").is_dir(), reason=f"no LIDC data at {DATA}")
def test_eval_command_on_real_lidc_is_reproducible(tiny_plan, tmp_path, capsys):
    from msld_sdk.cli import main
    args = ["eval", "--plan", str(tiny_plan), "--kind", "lidc", "--limit", "6", "--k", "2", "--steps", "2", "-q",
            "--data", str(DATA)]
    assert main(args + ["--json", str(tmp_path / "a.json")]) == 0
    assert main(args + ["--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "GED" in out and "HM-IoU" in out and "ECE" in out
    import json
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["metrics"] == b["metrics"] and a["ece"] == b["ece"]


@pytest.mark.skipif(not (DATA / "lidc").is_dir(), reason=f"no LIDC data at {DATA}")
def test_dice_vs_steps_writes_csv_and_plot(tiny_plan, tmp_path):
    pytest.importorskip("matplotlib")
    import csv
    from msld_export.training.dice_vs_steps import main as curve_main
    out = tmp_path / "curve"
    assert curve_main(["--plan", str(tiny_plan), "--kind", "lidc", "--steps", "1", "3", "--k", "2", "--limit", "3",
                       "--data", str(DATA), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [int(r["steps"]) for r in rows] == [1, 3]
    assert all(0 <= float(r["dice_consensus"]) <= 1 and float(r["ged"]) >= 0 for r in rows)
    assert out.with_suffix(".png").stat().st_size > 1000


def test_eval_summary_pairs_by_seed(tmp_path):
    """benchmarks/eval_summary.py: fp32 at fewer steps is compared with fp32 at the reference
    step count, int8 with fp32 at its own step count, seed by seed."""
    import json
    from benchmarks.eval_summary import load, summarise

    def write(steps, seed, prec, dice):
        rep = {"metrics": {"dice_consensus": dice, "ged": 0.3}, "ece": 0.01,
               "majority_marked": {"metrics": {"dice_consensus": dice / 2}}}
        (tmp_path / f"steps{steps}_seed{seed}_{prec}.json").write_text(json.dumps(rep))

    for seed, base in [(0, 0.50), (1, 0.60)]:
        write(20, seed, "fp32", base)
        write(10, seed, "fp32", base + 0.02)
        write(10, seed, "int8", base + 0.01)
    runs = load(tmp_path)
    assert runs[("ddim", 10, "int8")][1]["marked/dice_consensus"] == pytest.approx(0.305)
    text = "\n".join(summarise(runs))
    assert "fp32 minus fp32 at 20 steps" in text
    lines = text.splitlines()
    fp32_10 = lines[lines.index("fp32 10 steps, seeds 0 1:") + 1]
    int8_10 = lines[lines.index("int8 10 steps, seeds 0 1:") + 1]
    assert "+0.0200 +0.0200 mean +0.0200" in fp32_10      # vs fp32 at 20 steps
    assert "-0.0100 -0.0100 mean -0.0100" in int8_10      # vs fp32 at 10 steps


def test_eval_summary_compares_other_solvers_with_the_ddim_reference(tmp_path):
    """benchmarks/eval_summary.py: a dpmpp2m file is grouped under its solver, its fp32 compared
    with DDIM fp32 at the reference steps and its int8 with its own fp32, each with the verdict of
    msld_sdk.evaluation.seed_spread (|mean diff| <= the compared-with setting's seed sd)."""
    import json
    from benchmarks.eval_summary import load, summarise

    def write(name, dice):
        (tmp_path / name).write_text(json.dumps({"metrics": {"dice_consensus": dice}, "ece": 0.01}))

    for seed, base in [(0, 0.50), (1, 0.60), (2, 0.70)]:     # reference sd over seeds: 0.1
        write(f"steps20_seed{seed}_fp32.json", base)
        write(f"dpmpp2m_steps5_seed{seed}_fp32.json", base + 0.05)   # |diff| 0.05 <= 0.1: within
        write(f"dpmpp2m_steps3_seed{seed}_fp32.json", base + 0.15)   # 0.15 > 0.1: not within
        write(f"dpmpp2m_steps5_seed{seed}_int8.json", base + 0.05 + [0.0, 0.2, 0.0][seed])
    runs = load(tmp_path)
    assert sorted(runs) == [("ddim", 20, "fp32"), ("dpmpp2m", 3, "fp32"), ("dpmpp2m", 5, "fp32"),
                            ("dpmpp2m", 5, "int8")]
    lines = summarise(runs)
    dice = {l: lines[lines.index(l) + 1] for l in lines if l.endswith(":") and "steps" in l}
    assert "within" not in dice["fp32 20 steps, seeds 0 1 2:"]          # the reference itself
    assert "mean +0.0500 | within its sd 0.1000: yes" in dice["dpmpp2m fp32 5 steps, seeds 0 1 2:"]
    assert "mean +0.1500 | within its sd 0.1000: NO" in dice["dpmpp2m fp32 3 steps, seeds 0 1 2:"]
    # int8 against dpmpp2m fp32 at 5 steps (sd 0.1): mean difference 0.2 / 3 = 0.0667
    assert "+0.0000 +0.2000 +0.0000 mean +0.0667 | within its sd 0.1000: yes" in dice["dpmpp2m int8 5 steps, seeds 0 1 2:"]


def test_lidc_agreement_groups_split_the_protocol_difference():
    """benchmarks/lidc_agreement_groups.py: nodules grouped by how many annotators marked them;
    the groups' contributions add up to the mean paired difference over all nodules."""
    from benchmarks.lidc_agreement_groups import annotators_marking, group_differences
    from msld_sdk.evaluation.datasets import SegData

    masks = np.zeros((4, 4, 8, 8), np.uint8)
    masks[0, :1, 2, 2] = 1       # one annotator marked nodule a
    masks[1, :3, 3:5, 3:5] = 1   # three marked b
    masks[2] = 1                 # all four marked c; nobody marked d
    marked = annotators_marking(SegData("lidc", "val", np.zeros((4, 1, 8, 8), np.uint8), masks, ["a", "b", "c", "d"]))
    assert marked == {"a": 1, "b": 3, "c": 4, "d": 0}
    rng = np.random.default_rng(0)
    ref = [{i: {"hm_iou": float(rng.random())} for i in marked} for _ in range(3)]
    run = [{i: {"hm_iou": r[i]["hm_iou"] + d} for i, d in zip(marked, (0.1, -0.2, 0.3, 0.0))} for r in ref]
    groups = group_differences(run, ref, marked, "hm_iou")
    assert {m: (g[0], round(g[1], 12)) for m, g in groups.items()} == {0: (1, 0.0), 1: (1, 0.1), 3: (1, -0.2),
                                                                      4: (1, 0.3)}
    whole = np.mean([[r[i]["hm_iou"] - f[i]["hm_iou"] for i in marked] for r, f in zip(run, ref)])
    assert sum(g[2] for g in groups.values()) == pytest.approx(whole)
