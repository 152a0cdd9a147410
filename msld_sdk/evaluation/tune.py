"""``msld tune``: the cheapest sampler setting whose figures stay within a reference's seed spread.

Runs a plan over solvers x steps (``"ddim:50,20,10,5 dpmpp2m:10,8,6,5,4"``) at several seeds
on a labelled split (``evaluate``), compares every setting with the reference by the rule of
``seed_spread`` and names the cheapest that holds: fewest denoiser calls per image, ties -> the
one closest to the reference (largest |difference| / reference sd over the watched metrics),
then lower latency here. ``grids`` (``--grids 1.5,2``) adds, for every dpmpp2m step count, the
power timestep grids of those rho (``msld_sdk.timestep_grids``): the search for the fewest steps. The k hypotheses of an image go through the denoiser as one batch whatever
the test-time views, so an image costs one call per step: calls = steps. Outputs: the table
(``tune.txt``), a JSON report with every figure (``tune.json``) and each watched metric against
denoiser calls per solver (``tune.png``, needs matplotlib). ``write_choice`` records the choice in
the plan's defaults with the evidence. docs/evaluation.md, "Tuning the sampler".
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import re
import statistics as st
from dataclasses import dataclass
from pathlib import Path

from ..errors import MsldError, UsageError
from ..errors import InputError
from ..plan import SOLVERS
from ..timestep_grids import describe, power_grid
from .evaluate import evaluate
from .seed_spread import RULE, compare_all, holds

log = logging.getLogger("msld_sdk")

DEFAULT_SETTINGS = "ddim:50,20,10,5 dpmpp2m:10,8,6,5,4"
DEFAULT_SEEDS = (0, 1, 2)
EXAMPLE = '"ddim:20,10 dpmpp2m:6,4"'
# what evaluate() reports per image (means over the split), and ECE over the split's pixels
SINGLE_ANNOTATOR_METRICS = ("dice_consensus", "iou_consensus", "dice_mean_mask", "iou_mean_mask",
                            "dice_per_hypothesis", "iou_per_hypothesis", "ece")
MULTI_ANNOTATOR_METRICS = SINGLE_ANNOTATOR_METRICS + ("ged", "hm_iou")
CALLS = "denoiser calls per image = steps (the k hypotheses are batched: one call per step, whatever the views)"
FILES = {"table": "tune.txt", "report": "tune.json", "plot": "tune.png"}


@dataclass(frozen=True)
class Setting:
    solver: str
    steps: int
    rho: float | None = None   # dpmpp2m on the power grid of this rho; None: the plan's spacing rule

    def __str__(self) -> str:
        return f"{self.solver}:{self.steps}" + ("" if self.rho is None else f"@rho{self.rho:g}")

    @property
    def denoiser_calls(self) -> int:
        return self.steps

    def timesteps(self, num_train_timesteps: int):
        """What ``evaluate`` gets: the power grid, or "spacing" (the plan's rule, not a grid the
        plan may carry)."""
        return "spacing" if self.rho is None else power_grid(num_train_timesteps, self.steps, self.rho)


# ---- parsing ---------------------------------------------------------------------------------
def parse_settings(text: str) -> list[Setting]:
    """``"ddim:50,20 dpmpp2m:6,4"`` -> settings in the order given; ``UsageError`` naming the bad part."""
    groups = str(text).split()
    if not groups:
        raise UsageError(f"--settings is empty: give SOLVER:STEPS[,STEPS...] groups, e.g. {EXAMPLE}")
    out, solvers = [], set()
    for g in groups:
        solver, sep, steps = g.partition(":")
        if not sep or not solver or not steps:
            raise UsageError(f"--settings: {g!r} is not SOLVER:STEPS[,STEPS...] (e.g. {EXAMPLE})")
        if solver not in SOLVERS:
            raise UsageError(f"--settings: unknown solver {solver!r} in {g!r}; the solvers are {', '.join(SOLVERS)}")
        if solver in solvers:
            raise UsageError(f"--settings: {solver} is given twice; list its step counts in one group, "
                             f"e.g. {solver}:20,10")
        solvers.add(solver)
        for s in steps.split(","):
            if not re.fullmatch(r"[0-9]+", s) or int(s) < 1:
                raise UsageError(f"--settings: {s!r} in {g!r} is not a step count (a positive integer)")
            if Setting(solver, int(s)) in out:
                raise UsageError(f"--settings: {solver}:{int(s)} is given twice")
            out.append(Setting(solver, int(s)))
    return out


def parse_grids(text: str | None, settings: list[Setting], num_train_timesteps: int) -> list[Setting]:
    """``--grids 1.5,2``: ``settings`` with, after each dpmpp2m setting, its power-grid variants;
    ``UsageError`` naming a bad rho or a grid whose steps coincide."""
    if text is None:
        return list(settings)
    rhos = []
    for part in str(text).split(","):
        try:
            rho = float(part)
        except ValueError:
            raise UsageError(f"--grids: {part!r} is not a number (give rho values, e.g. --grids 1.5,2)") from None
        if rho in rhos:
            raise UsageError(f"--grids: rho {part} is given twice")
        rhos.append(rho)
    if not any(s.solver == "dpmpp2m" for s in settings):
        raise UsageError("--grids: timestep grids are for dpmpp2m, and --settings has no dpmpp2m setting")
    out = []
    for s in settings:
        out.append(s)
        if s.solver == "dpmpp2m":
            for rho in rhos:
                try:
                    power_grid(num_train_timesteps, s.steps, rho)
                except InputError as e:
                    raise UsageError(f"--grids: {e}") from None
                out.append(Setting(s.solver, s.steps, rho))
    return out


def parse_reference(text: str | None, settings: list[Setting]) -> Setting:
    """``--reference SOLVER:STEPS`` (one of ``settings``); default: ddim at its largest step count."""
    if text is None:
        ddim = [s for s in settings if s.solver == "ddim"]
        if not ddim:
            raise UsageError("--settings has no ddim setting to take as the reference: name one of the settings, "
                             f"e.g. --reference {settings[0]}")
        return max(ddim, key=lambda s: s.steps)
    ref = parse_settings(text)
    if len(ref) != 1:
        raise UsageError(f"--reference: give one setting SOLVER:STEPS, e.g. ddim:50, not {text!r}")
    if ref[0] not in settings:
        raise UsageError(f"--reference {ref[0]} is not among --settings ({' '.join(map(str, settings))}): add it")
    return ref[0]


def parse_seeds(seeds) -> list[int]:
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds: each seed once, not {' '.join(map(str, seeds))}")
    if len(seeds) < 2:
        raise UsageError("--seeds: the rule compares with the reference's spread over seeds: give at least two "
                         "(e.g. --seeds 0 1 2)")
    return seeds


def watched_metrics(text: str | None, annotators: int) -> list[str]:
    """``--metrics a,b``; default ged,hm_iou with several annotators, else dice_consensus,ece."""
    known = MULTI_ANNOTATOR_METRICS if annotators > 1 else SINGLE_ANNOTATOR_METRICS
    if text is None:
        return ["ged", "hm_iou"] if annotators > 1 else ["dice_consensus", "ece"]
    names = str(text).split(",")
    for n in names:
        if n not in known:
            extra = " (ged and hm_iou need data with several annotators)" if n in MULTI_ANNOTATOR_METRICS else ""
            raise UsageError(f"--metrics: {n!r} is not one of {', '.join(known)}{extra}")
    if len(set(names)) != len(names):
        raise UsageError(f"--metrics: each metric once, not {text!r}")
    return names


# ---- running ---------------------------------------------------------------------------------
def run_grid(seg, samples, settings: list[Setting], seeds: list[int], k: int, progress=None) -> list[dict]:
    """``evaluate`` at every setting x seed; ``samples()`` gives a fresh iterable of ``Sample``s;
    ``progress(n)`` gets the images done so far over the whole grid."""
    runs, done = [], 0
    T = seg.schedule.num_train_timesteps
    for s in settings:
        for seed in seeds:
            rep = evaluate(seg, samples(), k=k, steps=s.steps, seed=seed, solver=s.solver, timesteps=s.timesteps(T),
                           progress=(lambda n, d=done: progress(d + n)) if progress else None)
            n = rep["n_images"]
            done += n
            runs.append({"solver": s.solver, "steps": s.steps, "rho": s.rho, "timesteps": rep.get("timesteps"),
                         "seed": seed, "n_images": n, "views": rep["views"],
                         "seconds": rep["seconds"], "seconds_per_image": rep["seconds"] / max(n, 1),
                         "figures": {**rep["metrics"], "ece": rep["ece"]}})
    return runs


def _by_seed(runs: list[dict]) -> dict:
    return {r["seed"]: r["figures"] for r in runs}


def table_rows(runs: list[dict], reference: Setting, metrics: list[str]) -> list[dict]:
    """One row per setting, in the order run: calls, latency here (mean over seeds), each watched
    metric against the reference (``seed_spread.compare``) and whether the setting holds."""
    grouped: dict = {}
    for r in runs:
        grouped.setdefault(Setting(r["solver"], r["steps"], r.get("rho")), []).append(r)
    if reference not in grouped:
        raise UsageError(f"the reference {reference} was not run")
    ref = _by_seed(grouped[reference])
    rows = []
    for s, rs in grouped.items():
        cmp = compare_all(_by_seed(rs), ref, metrics)
        rows.append({"setting": str(s), "solver": s.solver, "steps": s.steps, "rho": s.rho,
                     "timesteps": rs[0].get("timesteps"), "denoiser_calls": s.denoiser_calls,
                     "seconds_per_image": st.mean(r["seconds_per_image"] for r in rs), "reference": s == reference,
                     "figures": {m: {"mean": c.mean, "sd": c.sd, "diff": c.diff, "paired": list(c.paired),
                                     "ref_sd": c.ref_sd, "within": c.within} for m, c in cmp.items()},
                     "holds": holds(cmp)})
    return rows


def distance(row: dict) -> float:
    """How far a row is from the reference: the largest |difference| / reference sd over its
    watched metrics (inf where a reference sd is 0 and the difference is not)."""
    out = 0.0
    for f in row["figures"].values():
        d = abs(f["diff"])
        out = max(out, d / f["ref_sd"] if f["ref_sd"] > 0 else (0.0 if d == 0 else float("inf")))
    return out


def cheapest(rows: list[dict]) -> dict | None:
    """The row that holds with the fewest denoiser calls (ties: the closest to the reference,
    then lower latency), or None."""
    return min((r for r in rows if r["holds"]),
               key=lambda r: (r["denoiser_calls"], distance(r), r["seconds_per_image"]), default=None)


def verdict(rows: list[dict], choice: dict | None) -> str:
    ref = next(r for r in rows if r["reference"])
    if choice is None:
        return (f"no setting holds, not even the reference {ref['setting']} (a figure is not finite): "
                "nothing to choose")
    if choice["reference"]:
        return (f"no setting cheaper than the reference holds: the cheapest that holds is the reference "
                f"{ref['setting']} itself ({ref['denoiser_calls']} denoiser calls per image)")
    return (f"cheapest setting that holds: {choice['setting']} ({choice['denoiser_calls']} denoiser calls per image, "
            f"{choice['seconds_per_image']:.3f} s per image here; the reference {ref['setting']}: "
            f"{ref['denoiser_calls']} calls, {ref['seconds_per_image']:.3f} s)")


def format_table(rows: list[dict], metrics: list[str], head: str) -> str:
    """The table ``msld tune`` prints: ``head``, the rule, one line per setting, the verdict."""
    ref = next(r for r in rows if r["reference"])
    cols = "".join(f"  {m + ' mean±sd (-ref)':>26}" for m in metrics)
    w = max([16] + [len(r["setting"]) for r in rows])
    header = f"{'setting':<{w}} {'calls':>5} {'s/img':>8}{cols}  holds"
    lines = [head, f"reference {ref['setting']}; rule: {RULE}", CALLS, "s/img: seconds per image here, mean over seeds",
             header, "-" * len(header)]
    for r in rows:
        figs = "".join(f"  {f['mean']:>8.4f}±{f['sd']:.4f} ({f['diff']:+.4f})"
                       for f in (r["figures"][m] for m in metrics))
        outside = [m for m in metrics if not r["figures"][m]["within"]]
        ok = "reference" if r["reference"] else "yes" if r["holds"] else f"no ({', '.join(outside)})"
        lines.append(f"{r['setting']:<{w}} {r['denoiser_calls']:>5} {r['seconds_per_image']:>8.3f}{figs}  {ok}")
    lines.append(verdict(rows, cheapest(rows)))
    grids = [r for r in rows if r.get("rho") is not None]
    if grids:
        lines.append("grids (@rhoR: t_i = round(T ((steps - i) / steps) ** R) - 1): " +
                     "; ".join(f"{r['setting']} = {describe(r['timesteps'])}" for r in grids))
    return "\n".join(lines)


# ---- outputs ---------------------------------------------------------------------------------
def plot(rows: list[dict], metrics: list[str], path, title: str) -> bool:
    """PNG: one panel per watched metric, one line per solver (x: denoiser calls, error bars: seed
    sd), the reference's mean +- seed sd shaded, the choice starred. False (one log line) without
    matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log.warning("msld tune: no plot, matplotlib is not installed (pip install matplotlib); "
                    "the table and the JSON report are written")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..writing import atomic_path

    ref, choice = next(r for r in rows if r["reference"]), cheapest(rows)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.4 * len(metrics), 3.6), dpi=120, squeeze=False)
    for ax, m in zip(axes[0], metrics):
        f = ref["figures"][m]
        ax.axhspan(f["mean"] - f["ref_sd"], f["mean"] + f["ref_sd"], color="0.85",
                   label=f"reference {ref['setting']} ± seed sd")
        def line(r):
            return r["solver"] if r.get("rho") is None else f"{r['solver']} grid rho {r['rho']:g}"
        for name in dict.fromkeys(line(r) for r in rows):
            rs = sorted((r for r in rows if line(r) == name), key=lambda r: r["denoiser_calls"])
            ax.errorbar([r["denoiser_calls"] for r in rs], [r["figures"][m]["mean"] for r in rs],
                        yerr=[r["figures"][m]["sd"] for r in rs], marker="o", capsize=3, label=name)
        if choice is not None:
            ax.plot([choice["denoiser_calls"]], [choice["figures"][m]["mean"]], marker="*", ms=14, ls="none",
                    color="k", label=f"chosen {choice['setting']}")
        ax.set_xscale("log")
        calls = sorted({r["denoiser_calls"] for r in rows})
        ax.set_xticks(calls, [str(c) for c in calls], minor=False)
        ax.set_xticks([], minor=True)
        ax.set_xlabel("denoiser calls per image")
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def summary(rows: list[dict], metrics: list[str]) -> list[dict]:
    """The table in short, for the plan's provenance."""
    return [{"setting": r["setting"], "denoiser_calls": r["denoiser_calls"],
             "seconds_per_image": round(r["seconds_per_image"], 4), "holds": r["holds"],
             **{m: {k: round(v, 5) for k, v in r["figures"][m].items() if k in ("mean", "sd", "diff")}
                for m in metrics}} for r in rows]


def evidence(report: dict) -> dict:
    """What ``--write`` records in ``provenance.defaults_changed.evidence``."""
    keys = ("data", "kind", "split", "n_images", "k", "seeds", "reference", "metrics", "rule", "precision")
    return {"tool": "msld tune", **{k: report[k] for k in keys}, "cpu": report["machine"]["cpu_summary"],
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "settings": summary(report["rows"], report["metrics"])}


def write_choice(plan_path, report: dict) -> dict:
    """Record the report's choice (solver and steps) in the plan's defaults with the evidence;
    refused (``MsldError``, the plan untouched) when no setting holds. Returns the new manifest."""
    from ..plan_defaults import set_defaults

    choice = report.get("choice")
    if choice is None:
        raise MsldError(f"--write refused: no setting holds against the reference {report['reference']}; "
                        f"{plan_path} is unchanged")
    why = (f"msld tune: cheapest setting within the seed spread of {report['reference']} on {report['kind']}/"
           f"{report['split']} ({report['n_images']} images, k={report['k']}, seeds "
           f"{' '.join(map(str, report['seeds']))}; metrics {', '.join(report['metrics'])})")
    grid = choice.get("timesteps")
    return set_defaults(plan_path, steps=choice["steps"], solver=choice["solver"], why=why, evidence=evidence(report),
                        timesteps=list(grid) if grid is not None else None)


def write_outputs(folder, report: dict, table: str) -> list[str]:
    """``tune.txt``, ``tune.json`` and (with matplotlib) ``tune.png`` in ``folder``; the names written."""
    from ..writing import write_text

    folder = Path(folder)
    title = (f"{Path(report['plan']).name}: {report['kind']}/{report['split']} ({report['n_images']} images), "
             f"k={report['k']}, seeds {' '.join(map(str, report['seeds']))}")
    made = plot(report["rows"], report["metrics"], folder / FILES["plot"], title)
    report["plot"] = FILES["plot"] if made else None
    write_text(folder / FILES["table"], table + "\n")
    write_text(folder / FILES["report"], json.dumps(report, indent=1))
    return [FILES["table"], FILES["report"]] + ([FILES["plot"]] if made else [])
