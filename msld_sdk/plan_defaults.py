"""Change a plan's default k, number of steps, solver, timestep grid or test-time views without
re-exporting it.

The graphs (and an int8 denoiser, with its calibration record) are kept byte for byte; the
manifest's ``defaults`` and ``model.default_*`` change, and ``provenance.defaults_changed``
records the old values, the new ones and the evidence (``why``, and ``evidence``: e.g. the
table of ``msld tune``); earlier records move to ``provenance.defaults_history``. The new manifest is checked first (a refused change writes nothing), then the plan is rewritten atomically (``plan.write_plan``). Command line:
``python -m msld_export.plan_writing.set_defaults`` (``scripts/ship_model.sh``) or ``msld tune --write``.
"""
from __future__ import annotations

import datetime as _dt

from .errors import UsageError
from .plan import SOLVERS, Plan, add_blobs, manifest_values_problem
from .timestep_grids import check_grid
from .views import check_views

KEEP = object()   # set_defaults(timesteps=KEEP): leave the grid as it is (unless steps or solver change)


def set_defaults(plan_path, steps: int | None = None, k: int | None = None, why: str = "",
                 views: int | None = None, solver: str | None = None, evidence: dict | None = None,
                 timesteps=KEEP) -> dict:
    """Rewrite ``plan_path`` with the given defaults (None: kept); returns the new manifest (the old
    one, untouched, when nothing changes). ``timesteps``: dpmpp2m's grid of the default run (a
    list), or None to drop it; a grid is dropped too when steps or solver are given without one."""
    plan = Plan.open(plan_path)
    m = plan.manifest
    defaults, model = dict(m["defaults"]), dict(m["model"])
    old = {"steps": defaults["steps"], "k": defaults["k"], "views": defaults.get("views", 1)}
    if solver is not None or "solver" in defaults:
        old["solver"] = defaults.get("solver", "ddim")
    if defaults.get("timesteps") is not None or (timesteps is not KEEP and timesteps is not None):
        old["timesteps"] = defaults.get("timesteps")
    if timesteps is not KEEP and timesteps is not None:
        timesteps = list(check_grid(timesteps, int(m["schedule"]["num_train_timesteps"])))
    if timesteps is KEEP and (steps is not None or solver is not None):
        timesteps = None if defaults.get("timesteps") is not None else KEEP
    if timesteps is None:
        defaults.pop("timesteps", None)
    elif timesteps is not KEEP:
        defaults["timesteps"] = timesteps
    if solver is not None:
        if solver not in SOLVERS:
            raise UsageError(f"solver must be one of {SOLVERS}, got {solver!r}")
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
    if "timesteps" in old:
        new["timesteps"] = defaults.get("timesteps")
    if new == old:
        return m
    prov = dict(m.get("provenance", {}))
    if "defaults_changed" in prov:   # the earlier change is kept, newest last
        prov["defaults_history"] = [*prov.get("defaults_history", []), prov["defaults_changed"]]
    prov["defaults_changed"] = {"from": old, "to": new, "why": why,
                                "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                                **({"evidence": evidence} if evidence is not None else {})}
    update = {"defaults": defaults, "model": model, "provenance": prov}
    problem = manifest_values_problem({**m, **update})   # checked first: a refused change writes nothing
    if problem is not None:
        raise UsageError(f"these defaults would make an invalid plan, so {plan_path} was not changed: {problem}")
    out = add_blobs(plan_path, {}, update)
    Plan.open(plan_path)  # the rewritten plan must open and validate
    return out
