"""Why DPM-Solver++(2M) and DDIM give other masks on an imported reference plan: two candidate
causes, each switched off in turn, from the same initial latents.

    python -m benchmarks.solver_gap_probe PLAN --limit 24 -k 8 --steps 50

1. The timestep rule: the reference's DDIM steps from t to t - T // steps but evaluates its next
   step at the next ``linspace`` timestep (999 -> 979, then 978 at 50 steps). A numpy DDIM on the
   same timesteps that steps to the next listed one ("consistent") is compared with the SDK's;
   the numpy loop is first checked against the SDK with the plan's own rule.
2. x0 clipping (the plan's ``clip_sample``): DDIM combines the clipped x0 with the model's eps,
   DPM-Solver++ (data prediction, as diffusers) uses the clipped x0 throughout. DDIM and dpmpp2m
   are compared with the plan's clipping and with clipping off (the schedule patched).
Printed: the share of equal mask pixels (the plan's threshold) and mean |probability difference|.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from msld_sdk import Segmenter
from msld_sdk.sampling import Schedule

from .solver_agreement import compare, load_images, plan_graphs


def numpy_ddim(sessions, cond, x, timesteps, prev, ac, clip):
    """eta-0 DDIM from latents x (k, C, h, w) with one image latent cond (1, C, h, w); prev[i]
    is where step i lands (< 0: alpha 1). Returns the decoder's probabilities (k, H, W)."""
    den, dec = sessions
    c = np.repeat(cond, len(x), axis=0)
    for t, tp in zip(timesteps, prev):
        a_t, a_p = np.float32(ac[t]), np.float32(ac[tp] if tp >= 0 else 1.0)
        eps = den.run(None, {"x": x, "t": np.full(len(x), t, np.float32), "cond": c})[0]
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        if clip:
            x0 = np.clip(x0, -clip, clip)
        x = (np.sqrt(a_p) * x0 + np.sqrt(1 - a_p) * eps).astype(np.float32)
    return dec.run(None, {"z": x})[0][:, 0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("plan")
    ap.add_argument("--data", default=None)
    ap.add_argument("--limit", type=int, default=24, help="first N LIDC val slices, one slice per nodule")
    ap.add_argument("-k", type=int, default=8)
    ap.add_argument("--steps", type=int, nargs="+", default=[50])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    seg = Segmenter(a.plan, backend="onnxruntime")
    plan, sched = seg.plan, seg.schedule
    if sched.spacing != "linspace_trunc":
        raise SystemExit(f"{a.plan}: rule {sched.spacing!r}; this probe is for linspace_trunc plans")
    noclip = Schedule(sched.alphas_cumprod, sched.spacing, sched.prediction, 0.0)
    encode, *sessions = plan_graphs(seg)
    images = load_images(plan, "lidc", a.data, "val", a.limit, per_nodule=True)
    thr = float(plan.defaults.get("threshold", 0.5))
    rng = np.random.default_rng(a.seed)
    out = {"plan": a.plan, "plan_graphs_sha256": plan.graphs_sha256, "images": len(images), "k": a.k, "rows": []}
    for steps in a.steps:
        ddim = sched.ddim(steps)
        nxt = np.append(ddim.timesteps[1:], -1)
        runs = {n: [] for n in ("sdk_ddim", "numpy_ddim_reference_rule", "numpy_ddim_consistent", "sdk_dpmpp2m",
                                "sdk_ddim_noclip", "sdk_dpmpp2m_noclip")}
        for img in images:
            x = rng.standard_normal((a.k, *plan.latent_shape), dtype=np.float32)
            cond = encode(img)
            runs["sdk_ddim"].append(seg.run(img, k=a.k, steps=steps, solver="ddim", initial_latents=x).probs)
            runs["sdk_dpmpp2m"].append(seg.run(img, k=a.k, steps=steps, solver="dpmpp2m", initial_latents=x).probs)
            seg.schedule = noclip
            for solver in ("ddim", "dpmpp2m"):
                runs[f"sdk_{solver}_noclip"].append(seg.run(img, k=a.k, steps=steps, solver=solver,
                                                            initial_latents=x).probs)
            seg.schedule = sched
            for name, prev in (("numpy_ddim_reference_rule", ddim.prev_timesteps), ("numpy_ddim_consistent", nxt)):
                runs[name].append(numpy_ddim(sessions, cond, x.copy(), ddim.timesteps, prev,
                                             sched.alphas_cumprod, sched.clip))
        p = {n: np.concatenate(v) for n, v in runs.items()}
        check = float(np.abs(p["numpy_ddim_reference_rule"] - p["sdk_ddim"]).max())
        print(f"{steps} steps: numpy DDIM (reference rule) vs the SDK's DDIM, max |dp| {check:.2e}")
        for x_name, y_name in (("sdk_ddim", "numpy_ddim_consistent"), ("sdk_ddim", "sdk_dpmpp2m"),
                               ("numpy_ddim_consistent", "sdk_dpmpp2m"), ("sdk_ddim_noclip", "sdk_dpmpp2m_noclip")):
            c = compare(p[y_name], p[x_name], thr)
            print(f"  {x_name:<22} vs {y_name:<22} mask pixels equal {100 * c['mask_pixels_equal']:7.3f} %, "
                  f"mean |dp| {c['mean_abs']:.2e}")
            out["rows"].append({"steps": steps, "a": x_name, "b": y_name, **c, "numpy_vs_sdk_max_abs": check})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
