"""Change a plan's default k, number of steps, solver or test-time views without re-exporting it.

    python -m msld_export.plan_writing.set_defaults msld_sdk/models/polyp.plan --steps 5 \\
        --why "benchmarks/results/eval_seeds_polyp/summary.txt"

The graphs (and an int8 denoiser, with its calibration record) are kept byte for byte; the
manifest's ``defaults`` and ``model.default_*`` change, and ``provenance.defaults_changed``
records the old values, the new ones and the evidence.  Used by ``scripts/ship_model.sh``,
because a checkpoint's config carries the training-time defaults.
"""
from __future__ import annotations

import argparse
import datetime as _dt

from msld_sdk.plan import SOLVERS, Plan, add_blobs
from msld_sdk.views import check_views


def set_defaults(plan_path, steps: int | None = None, k: int | None = None, why: str = "",
                 views: int | None = None, solver: str | None = None) -> dict:
    plan = Plan.open(plan_path)
    m = plan.manifest
    defaults, model = dict(m["defaults"]), dict(m["model"])
    old = {"steps": defaults["steps"], "k": defaults["k"], "views": defaults.get("views", 1)}
    if solver is not None or "solver" in defaults:
        old["solver"] = defaults.get("solver", "ddim")
    if solver is not None:
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        defaults["solver"] = solver
    if steps is not None:
        defaults["steps"] = model["default_steps"] = int(steps)
    if k is not None:
        defaults["k"] = model["default_k"] = int(k)
    if views is not None:
        defaults["views"] = check_views(views, plan.image_size)
    new = {"steps": defaults["steps"], "k": defaults["k"], "views": defaults.get("views", 1)}
    if "solver" in old:
        new["solver"] = defaults["solver"]
    if new == old:
        return m
    prov = dict(m.get("provenance", {}))
    prov["defaults_changed"] = {"from": old, "to": new, "why": why,
                                "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    out = add_blobs(plan_path, {}, {"defaults": defaults, "model": model, "provenance": prov})
    Plan.open(plan_path)  # the rewritten plan must open and validate
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--views", type=int, help="test-time views (msld_sdk.views; 1 = off)")
    ap.add_argument("--solver", choices=SOLVERS, help="default sampler: ddim, or dpmpp2m (DPM-Solver++(2M), eta 0)")
    ap.add_argument("--why", default="", help="the evidence for the new defaults (kept in the manifest)")
    a = ap.parse_args(argv)
    m = set_defaults(a.plan, a.steps, a.k, a.why, views=a.views, solver=a.solver)
    print(f"{a.plan}: defaults {m['defaults']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
