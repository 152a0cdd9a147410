"""Archives: segment many inputs through Ray Data over a pool of Segmenter actors, resumably.

    summary = run_items(paths, "out/", plan="lidc", k=8, seed=0, roi=(x, y), ray_address="auto")
    msld segment INPUTS... --ray [ADDRESS] [--actors N] -o out/

Item i (image, DICOM series folder or NIfTI volume, by position) is sampled with seed
``image_seed(seed, i)``, so its outputs do not depend on which actor ran it. Each actor loads
the plan once and writes an item's outputs (``outputs.segment_and_write``) into ``out/<name>/``,
``done.json`` last; a rerun skips items that have it. A failing item is recorded in its
``error.json`` and ``out/summary.json`` and does not stop the job; ``out/job.json`` refuses a
rerun with other parameters. ``use_ray=False`` runs the same items in this process (the
reference the Ray path is tested against). ``dicom_seg``: a DICOM series also gets ``seg.dcm``
and ``seg_mean.dcm``. Details: docs/clinical_workflow.md.
"""
from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..evaluation.evaluate import image_seed
from ..extras import require
from ..outputs import expand_inputs, output_names, segment_and_write
from ..writing import OutputFolder, write_text

log = logging.getLogger("msld_sdk")

DONE, ERROR, JOB, SUMMARY = "done.json", "error.json", "job.json", "summary.json"


def _write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=1))     # a reader sees the whole file or none


def make_items(inputs) -> list[dict]:
    """One item per input; a folder of images gives one item per image (``outputs.expand_inputs``)."""
    paths = [p for p, _ in expand_inputs([str(p) for p in inputs])]
    return [{"index": i, "path": p, "name": n} for i, (p, n) in enumerate(zip(paths, output_names(paths)))]


def process_item(seg, item: dict, out: Path, params: dict) -> dict:
    """Segment one item and write its outputs (``done.json`` last). Never raises for a bad item."""
    d = out / item["name"]
    if (d / DONE).exists():
        return {"index": item["index"], "name": item["name"], "status": "skipped", "error": ""}
    seed = image_seed(params["seed"], item["index"])
    t0 = time.perf_counter()
    try:
        # the item's folder is built beside its place and swapped in whole, done.json inside it:
        # no output of an earlier try (an error.json, masks of another k) survives
        with OutputFolder(d) as f:
            r = segment_and_write(seg, item["path"], f.path, k=params["k"], steps=params["steps"], seed=seed,
                                  eta=params["eta"], views=params.get("views"), roi=params["roi"],
                                  slices=params["slices"], npz="arrays", nifti="required",
                                  threshold=params.get("threshold"), solver=params.get("solver"),
                                  timesteps=params.get("timesteps"),
                                  allow_modality=params.get("allow_modality", False),
                                  accept_irregular=params.get("accept_irregular", False),
                                  dicom_seg=f.path / "seg.dcm" if params.get("dicom_seg") and Path(item["path"]).is_dir()
                                  else None).result      # a DICOM series: seg.dcm + seg_mean.dcm
            _write_json(f.path / DONE, {"index": item["index"], "path": item["path"], "seed": seed, "k": r.k,
                                        "steps": r.steps, "solver": r.solver, "seconds": round(time.perf_counter() - t0, 3),
                                        "pid": os.getpid(), "finished": time.time()})
        return {"index": item["index"], "name": item["name"], "status": "done", "error": ""}
    except Exception as e:  # a bad item is recorded and the job goes on
        err = f"{type(e).__name__}: {e}"
        log.warning("msld_sdk: item %d (%s) failed: %s", item["index"], item["path"], err)
        with OutputFolder(d) as f:
            _write_json(f.path / ERROR, {"index": item["index"], "path": item["path"], "error": err,
                                         "traceback": traceback.format_exc(limit=5)})
        return {"index": item["index"], "name": item["name"], "status": "error", "error": err}


class SegmentActor:
    """One Ray actor: loads the plan once, then segments batches of items."""

    def __init__(self, seg_kw: dict, out: str, params: dict):
        from ..segmenter import Segmenter
        self.seg = Segmenter(**seg_kw)
        self.out, self.params = Path(out), params

    def __call__(self, batch: dict) -> dict:
        rows = [dict(zip(batch, vals)) for vals in zip(*batch.values())]
        res = [process_item(self.seg, {"index": int(r["index"]), "path": str(r["path"]), "name": str(r["name"])},
                            self.out, self.params) for r in rows]
        return {key: np.array([x[key] for x in res]) for key in ("index", "name", "status", "error")}


def _check_job(out: Path, params: dict) -> None:
    job = out / JOB
    if job.exists():
        old = json.loads(job.read_text())
        if old != params:
            diff = {key: (old.get(key), params.get(key)) for key in set(old) | set(params) if old.get(key) != params.get(key)}
            raise InputError(f"{out} holds a job run with other parameters {diff} (before, now); use another "
                             "output folder or the same parameters to resume it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(job, params)


def run_items(inputs, out, plan=None, k=None, steps=None, seed: int = 0, eta: float | None = None, roi=None, slices=None,
              views: int | None = None, threshold: float | None = None, ray_address: str | None = None, actors: int = 2,
              threads: int | None = 1, backend: str = "auto", precision: str = "fp32", use_ray: bool = True, on_item=None,
              progress: bool = False, dicom_seg: bool = False, solver: str | None = None, allow_modality=False,
              accept_irregular: bool = False, timesteps=None) -> dict:
    """Segment ``inputs`` into ``out`` (see the module docstring); returns the summary."""
    from ..segmenter import resolve_plan_path
    out = Path(out)
    plan_path = str(resolve_plan_path(plan).resolve())
    if eta is None:         # resolved here, so that the job record (and a resume) names the value used
        from ..plan import Plan
        from ..sampling import default_eta
        eta = default_eta(Plan.open(plan_path).manifest["defaults"], solver)
    params = {"plan": plan_path, "k": k, "steps": steps, "seed": int(seed), "eta": float(eta),
              "roi": [float(v) for v in roi] if roi is not None else None,
              "slices": [int(v) for v in slices] if slices is not None else None, "precision": precision}
    if dicom_seg:           # only when asked, so that earlier jobs still resume
        params["dicom_seg"] = True
    if views is not None:   # only when given, so that jobs written before views existed still resume
        params["views"] = int(views)
    if threshold is not None:
        params["threshold"] = float(threshold)
    if solver is not None:  # only when given, so that jobs written before solvers existed still resume
        params["solver"] = str(solver)
    if timesteps is not None:   # a grid, or "spacing" (the plan's rule)
        params["timesteps"] = timesteps if isinstance(timesteps, str) else [int(t) for t in timesteps]
    if allow_modality:      # the input checks' overrides, likewise only when given
        params["allow_modality"] = allow_modality if isinstance(allow_modality, str) else True
    if accept_irregular:
        params["accept_irregular"] = True
    _check_job(out, params)
    items = make_items(inputs)
    pending = [it for it in items if not (out / it["name"] / DONE).exists()]
    statuses = [{"index": it["index"], "name": it["name"], "status": "skipped", "error": ""}
                for it in items if it not in pending]
    seg_kw = {"plan": plan_path, "backend": backend, "threads": threads, "precision": precision}
    t0 = time.perf_counter()

    def record(s):
        statuses.append(s)
        if on_item is not None:
            on_item(s)

    if pending and not use_ray:
        actor = SegmentActor(seg_kw, str(out), params)
        for it in pending:
            record(process_item(actor.seg, it, out, params))
    elif pending:
        ray = require("ray", "msld segment --ray")
        started = not ray.is_initialized()
        if started:
            local = ray_address in (None, "local")
            ray.init(address=None if local else ray_address, include_dashboard=False,
                     num_cpus=max(os.cpu_count() or 2, actors * (threads or 1)) if local else None,
                     log_to_driver=progress)   # never fewer CPUs than the actors ask for (they would wait)
        elif ray_address not in (None, "local"):
            log.warning("msld_sdk: Ray is already initialised in this process; using it, not %s", ray_address)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = progress
            ds = ray.data.from_items(pending).map_batches(
                SegmentActor, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=threads or 1,
                fn_constructor_kwargs={"seg_kw": seg_kw, "out": str(out), "params": params})
            for row in ds.iter_rows():
                record({key: (int(v) if key == "index" else str(v)) for key, v in row.items()})
        finally:
            if started:
                ray.shutdown()
    statuses.sort(key=lambda s: s["index"])
    summary = {"items": len(items), "done": [s["name"] for s in statuses if s["status"] == "done"],
               "skipped": [s["name"] for s in statuses if s["status"] == "skipped"],
               "failed": {s["name"]: s["error"] for s in statuses if s["status"] == "error"},
               "seconds": round(time.perf_counter() - t0, 2), "ray": bool(use_ray and pending),
               "seed_scheme": "item i: numpy SeedSequence([seed, i]).generate_state(1, uint64)"}
    _write_json(out / SUMMARY, summary)
    return summary

