#!/usr/bin/env python3
"""Coverage-guided fuzzing (atheris/libFuzzer) of the plan reader and the image loader.

    python scripts/fuzz.py --target plan_mutation --runs 100000
    python scripts/fuzz.py --all --runs 100000          # every target, one after another

A target passes when every generated input either loads or raises a documented error type
(PlanError subclasses for plans, InputError for images, CheckpointError for checkpoints read by
``msld import``); anything else stops the run with the
input that caused it. The last line per target reports the count of inputs executed.
"""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("plan_bytes", "plan_mutation", "manifest", "image_file", "image_array",
           "checkpoint_bytes", "checkpoint_mutation", "pickle")


def seed_plan_bytes() -> bytes:
    """A small valid plan to mutate (the tiny test model, exported once and cached)."""
    cache = ROOT / "build" / "fuzz_seed.plan"
    if not cache.exists():
        from msld_export.model.checkpoint import random_model
        from msld_export.model.config import tiny_config
        from msld_export.plan_writing.export_plan import export_plan
        cache.parent.mkdir(parents=True, exist_ok=True)
        export_plan(random_model(tiny_config(), 0), cache, {"trained": False, "note": "fuzz seed"})
    return cache.read_bytes()


def run_one(target: str, runs: int) -> None:
    import atheris

    sys.path.insert(0, str(ROOT / "tests"))
    with atheris.instrument_imports():
        import fuzz_targets as ft
        import msld_sdk.image_input  # noqa: F401
        import msld_sdk.plan  # noqa: F401
        import msld_export.reference.checkpoint_reader  # noqa: F401
    seed = seed_plan_bytes() if target in ("plan_mutation", "manifest") else \
        ft.seed_checkpoint_bytes() if target in ("checkpoint_mutation", "pickle") else b""
    fn = {
        "plan_bytes": ft.plan_target,
        "plan_mutation": lambda d: ft.plan_mutation_target(seed, d),
        "manifest": lambda d: ft.manifest_target(seed, d),
        "image_file": ft.image_file_target,
        "image_array": ft.image_array_target,
        "checkpoint_bytes": ft.checkpoint_target,
        "checkpoint_mutation": lambda d: ft.checkpoint_mutation_target(seed, d),
        "pickle": lambda d: ft.pickle_target(seed, d),
    }[target]
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-max_len=4096", "-print_final_stats=1"], fn)
    atheris.Fuzz()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=TARGETS)
    ap.add_argument("--all", action="store_true")
    ap.add_argument("--runs", type=int, default=100_000)
    a = ap.parse_args()
    if a.target:
        run_one(a.target, a.runs)  # libFuzzer exits the process itself
        return 0
    if not a.all:
        ap.error("give --target or --all")
    failed = 0
    for t in TARGETS:  # each target in its own process: libFuzzer exits when done
        t0 = time.time()
        r = subprocess.run([sys.executable, __file__, "--target", t, "--runs", str(a.runs)], capture_output=True,
                           text=True)
        execs = [ln for ln in r.stderr.splitlines() if "stat::number_of_executed_units" in ln]
        n = execs[-1].split(":")[-1].strip() if execs else "?"
        status = "ok" if r.returncode == 0 else f"FAILED (exit {r.returncode})"
        print(f"{t:14s} {n:>8} inputs  {time.time() - t0:6.0f} s  {status}", flush=True)
        if r.returncode:
            failed += 1
            print(r.stderr[-3000:])
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
