"""Does a DPM-Solver++(2M) update that clips x0 as DDIM does hold DDIM 50 on a clipping plan?

    python -m benchmarks.solver_clip_variant PLAN --limit 10 -k 8 --steps 50 10 6

On an imported (clipping) plan the data-prediction 2M update uses the clipped x0 throughout,
while DDIM pairs the clipped x0 with the model's own eps (solver_gap_probe). The variant keeps
the raw x0 in the multistep update and adds DDIM's correction at the current step:

    x' = x_coef x + x0_coef D + x0_prev_coef D_prev + alpha' (clip(D) - D)        (D raw)

which is DDIM exactly at order 1 and the stock 2M update when nothing is clipped. Both updates
run in numpy on the plan's own graphs from the same initial latents; the stock one is first
checked against the SDK's dpmpp2m. Printed: agreement of each with the SDK's DDIM 50.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from msld_sdk import Segmenter

from .solver_agreement import compare, load_images, plan_graphs


def numpy_dpmpp2m(sessions, cond, x, table, ac, clip, ddim_clip: bool):
    """eta-0 DPM-Solver++(2M) on the SDK's step table; ``ddim_clip`` selects the variant."""
    den, dec = sessions
    c = np.repeat(cond, len(x), axis=0)
    x = x.astype(np.float64)
    d_prev = None
    for s in table:
        eps = den.run(None, {"x": x.astype(np.float32), "t": np.full(len(x), s.timestep, np.float32),
                             "cond": c})[0].astype(np.float64)
        d = (x - np.sqrt(1 - s.alpha_t) * eps) / np.sqrt(s.alpha_t)
        dc = np.clip(d, -clip, clip) if clip else d
        a_next = np.sqrt(ac[s.next_timestep]) if s.next_timestep >= 0 else 1.0
        used = d if ddim_clip else dc          # the x0 the multistep update works with
        new = s.x_coef * x + s.x0_coef * used
        if s.order == 2:
            new += s.x0_prev_coef * d_prev
        if ddim_clip:
            new += a_next * (dc - d)
        d_prev, x = used, new
    return dec.run(None, {"z": x.astype(np.float32)})[0][:, 0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan")
    ap.add_argument("--data", default=None)
    ap.add_argument("--limit", type=int, default=10, help="first N LIDC val slices, one slice per nodule")
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 10, 6])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    seg = Segmenter(a.plan, backend="onnxruntime")
    plan, sched = seg.plan, seg.schedule
    encode, *sessions = plan_graphs(seg)
    images = load_images(plan, "lidc", a.data, "val", a.limit, per_nodule=True)
    thr = float(plan.defaults.get("threshold", 0.5))
    rng = np.random.default_rng(a.seed)
    runs: dict[str, list] = {"ddim50": []}
    for img in images:
        x = rng.standard_normal((a.k, *plan.latent_shape), dtype=np.float32)
        cond = encode(img)
        runs["ddim50"].append(seg.run(img, k=a.k, steps=50, solver="ddim", initial_latents=x).probs)
        for steps in a.steps:
            table = sched.dpmpp2m(steps)
            got = {f"sdk_{solver}{steps}": seg.run(img, k=a.k, steps=steps, solver=solver, initial_latents=x).probs
                   for solver in ("ddim", "dpmpp2m")}
            for variant, ddim_clip in (("numpy_dpmpp2m", False), ("numpy_dpmpp2m_ddimclip", True)):
                got[f"{variant}{steps}"] = numpy_dpmpp2m(sessions, cond, x, table, sched.alphas_cumprod, sched.clip,
                                                         ddim_clip)
            for name, probs in got.items():
                runs.setdefault(name, []).append(probs)
    p = {n: np.concatenate(v) for n, v in runs.items()}
    out = {"plan": a.plan, "plan_graphs_sha256": plan.graphs_sha256, "clip": sched.clip, "images": len(images),
           "k": a.k, "seed": a.seed, "rows": []}
    for steps in a.steps:
        check = float(np.abs(p[f"numpy_dpmpp2m{steps}"] - p[f"sdk_dpmpp2m{steps}"]).max())
        print(f"{steps} steps: numpy 2M vs the SDK's dpmpp2m, max |dp| {check:.2e}")
        for name in (f"sdk_ddim{steps}", f"sdk_dpmpp2m{steps}", f"numpy_dpmpp2m_ddimclip{steps}"):
            c = compare(p[name], p["ddim50"], thr)
            print(f"  {name:<26} vs DDIM 50: mask pixels equal {100 * c['mask_pixels_equal']:7.3f} %, "
                  f"mean |dp| {c['mean_abs']:.2e}")
            out["rows"].append({"steps": steps, "setting": name, **c, "numpy_vs_sdk_max_abs": check})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
