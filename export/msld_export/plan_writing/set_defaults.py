"""Change a plan's default k, number of steps, solver or test-time views without re-exporting it.

    python -m msld_export.plan_writing.set_defaults msld_sdk/models/polyp.plan --steps 5 \\
        --why "benchmarks/results/eval_seeds_polyp/summary.txt"

The command line of ``msld_sdk.plan_defaults.set_defaults`` (re-exported here), which keeps the
graphs byte for byte and records the change in ``provenance.defaults_changed``. Used by
``scripts/ship_model.sh``, because a checkpoint's config carries the training-time defaults;
``msld tune --write`` uses the same function.
"""
from __future__ import annotations

import argparse

from msld_sdk.cli.options import timestep_list
from msld_sdk.errors import MsldError
from msld_sdk.plan import SOLVERS
from msld_sdk.plan_defaults import KEEP, set_defaults

__all__ = ["set_defaults", "main"]


def grid_or_none(text: str):
    """``--timesteps``: a grid (``timestep_list``) or ``none``."""
    return "none" if text.strip().lower() == "none" else timestep_list(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--views", type=int, help="test-time views (msld_sdk.views; 1 = off)")
    ap.add_argument("--solver", choices=SOLVERS, help="default sampler: ddim, or dpmpp2m (DPM-Solver++(2M), eta 0)")
    ap.add_argument("--timesteps", type=grid_or_none, metavar="T1,T2,...",
                    help="dpmpp2m's timestep grid of the default run, noisiest first (msld tune --grids), "
                         "or 'none' to drop it (default: kept, unless --steps or --solver change)")
    ap.add_argument("--why", default="", help="the evidence for the new defaults (kept in the manifest)")
    a = ap.parse_args(argv)
    timesteps = KEEP if a.timesteps is None else (None if a.timesteps == "none" else a.timesteps)
    try:
        m = set_defaults(a.plan, a.steps, a.k, a.why, views=a.views, solver=a.solver, timesteps=timesteps)
    except MsldError as e:   # a missing or damaged plan, or defaults it cannot take: say so, no traceback
        ap.exit(2, f"{ap.prog}: error: {e}\n")
    print(f"{a.plan}: defaults {m['defaults']}")
    return 0


if __name__ == "__main__":   # errors as one line (exit 1, or 2 for usage), as msld's own commands
    import sys

    from msld_sdk.cli.options import run_command
    raise SystemExit(run_command("python -m msld_export.plan_writing.set_defaults", main, sys.argv[1:]))
