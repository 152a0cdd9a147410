"""``Segmenter``: the SDK's front door. Image in; k masks, their mean and a confidence map out.

The image is encoded once; all k hypotheses (times the number of images in a batch) go
through the denoiser together, once per step, in the backend's sampling loop
(``backend.sample``, on the plan's ``Schedule``). A long list (a volume's slices, a folder) runs
in groups of whole images of at most ``max_batch`` hypotheses, so memory stays bounded; the
results are those of one batch (each image's noise depends only on the seed).
"""
from __future__ import annotations

import logging
import time
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _native
from .backends import select_backend
from .errors import InputError, PlanNotFoundError
from .image_input import load_image, resize_planes, to_model_input
from .input_checks import check_channels, check_image_modalities, check_scale
from .plan import Plan
from .result import SegmentationResult
from .sampling import MAX_SEED, SampleOptions, Schedule  # noqa: F401  (MAX_SEED: its former home)
from .roi import warn_if_whole_image
from .views import hypothesis_rows, undo_views, view_inputs

log = logging.getLogger("msld_sdk")

SHIPPED_MODELS = ("lidc", "polyp")
DEFAULT_MODEL = "lidc"
DEFAULT_MAX_BATCH = 32   # hypotheses per sampling batch (Segmenter's max_batch)


def shipped_plan_path(name: str) -> Path:
    return Path(str(resources.files("msld_sdk") / "models" / f"{name}.plan"))


def resolve_plan_path(plan: str | Path | None) -> Path:
    """None -> the embedded default; a shipped model's name -> its plan; else a file path."""
    if plan is None:
        plan = DEFAULT_MODEL
    if isinstance(plan, str) and plan in SHIPPED_MODELS:
        p = shipped_plan_path(plan)
        if not p.exists():
            have = [m for m in SHIPPED_MODELS if shipped_plan_path(m).exists()]
            raise PlanNotFoundError(f"model '{plan}' is not shipped in this build of msld_sdk "
                                    f"(shipped: {have}); pass a plan file path instead")
        return p
    if isinstance(plan, str) and not Path(plan).exists() and Path(plan).name == plan and "." not in plan:
        # a bare word that is no file: most likely a mistyped model name
        raise PlanNotFoundError(f"'{plan}' is neither a shipped model name ({', '.join(SHIPPED_MODELS)}) "
                                f"nor an existing plan file")
    return Path(plan)


class Segmenter:
    """Load a plan once, then call ``run`` as often as needed (thread-safe).

    plan:     path of a plan file, a shipped model name ("lidc", "polyp") or None (default).
    backend:  "auto" (TensorRT when an engine for this GPU exists, else ONNX Runtime),
              "onnxruntime" or "tensorrt".
    threads:  CPU threads for ONNX Runtime (default: all cores available to this process).
    progress: show a progress bar over the DDIM steps.
    precision: "fp32" (default) or "int8" (the plan's quantized denoiser, ONNX Runtime only;
              its measured speed and Dice are in benchmarks/README.md and MODEL_CARD.md).
    max_batch: most hypotheses (images x k) sampled at once; a longer list runs in groups of
              whole images (one image's k hypotheses always go together). Peak memory grows with
              it (benchmarks/README.md, "Memory of long lists"); the results do not change.
    """

    def __init__(self, plan: str | Path | None = None, backend: str = "auto", threads: int | None = None,
                 progress: bool = False, precision: str = "fp32", max_batch: int = DEFAULT_MAX_BATCH):
        if isinstance(max_batch, bool) or not isinstance(max_batch, (int, np.integer)) or max_batch < 1:
            raise InputError(f"max_batch must be a positive whole number of hypotheses, got {max_batch!r}")
        self.max_batch = int(max_batch)
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer))
                                    or threads < 1):
            raise InputError(f"threads must be a positive whole number of CPU threads, or None for all cores "
                             f"available to this process, got {threads!r}")
        self.plan = Plan.open(resolve_plan_path(plan))
        m = self.plan.manifest
        self.precision = precision
        self.backend = select_backend(self.plan, backend, threads=threads, precision=precision)
        self.progress = progress
        self.schedule = Schedule.from_manifest(m)
        self._in = m["input"]
        self.defaults = dict(m["defaults"])

    # ---- public API ------------------------------------------------------------------------
    def run(self, img, k: int | None = None, steps: int | None = None, seed: int | None = None,
            eta: float | None = None, threshold: float | None = None, roi=None, initial_latents=None,
            views: int | None = None, allow_modality=False, solver: str | None = None, timesteps=None):
        """Segment one image (array, PIL image or path) or a list of them.

        Returns a ``SegmentationResult`` (a list of them for a list input). ``seed`` makes
        the result reproducible; hypothesis i is the same whatever ``k`` is. ``roi``: a centre
        (x, y) or a box (x0, y0, x1, y1) in the input's pixels (or a list, one per image): the
        plan's training crop is cut there, segmented and pasted back (see ``msld_sdk.roi``).

        ``initial_latents`` replaces the drawn initial noise: for one image an array of shape
        (k, C, h, w) (C, h, w: the plan's latent shape); for a list of n images either one
        array (n*k, C, h, w), hypotheses of image i at rows i*k .. i*k+k-1, or a list of n
        arrays (k, C, h, w). Values are used as float32. With eta=0 the run is then fully
        deterministic (``seed`` only matters for eta > 0 noise).

        ``views``: hypothesis j is sampled from the image turned by view ``j % views`` (the four
        quarter turns, then their mirror images; ``msld_sdk.views``) and turned back; 1 turns
        this off. Default: the plan's (``defaults["views"]``, 1 when it has none).

        ``solver``: "ddim" or "dpmpp2m" (DPM-Solver++(2M), eta 0 only); default: the plan's
        (``defaults["solver"]``, "ddim" when it has none). ``timesteps``: dpmpp2m's timestep grid,
        noisiest first (its length is the step count; ``msld_sdk.timestep_grids``); default: the
        plan's tuned grid (``defaults["timesteps"]``) at its step count, else (or with
        ``"spacing"``) the plan's spacing rule.

        ``allow_modality``: a DICOM path whose Modality is not the plan's is refused unless this
        is True or names it (e.g. "MR"); it then runs with a warning (``msld_sdk.input_checks``).
        """
        batch = isinstance(img, (list, tuple))
        images = list(img) if batch else [img]
        if batch and not images:
            raise InputError("empty list of images")
        options = self.options(k=k, steps=steps, seed=seed, eta=eta, threshold=threshold, views=views,
                               solver=solver, timesteps=timesteps)
        check_image_modalities(self.plan.manifest, images, allow_modality)
        if roi is not None:
            from .roi import run_with_roi
            results = run_with_roi(self, images, roi, options, initial_latents=initial_latents)
        else:
            results = self.segment(images, options, initial_latents, warn_whole_image=True)
        return results if batch else results[0]

    __call__ = run

    def options(self, k: int | None = None, steps: int | None = None, seed: int | None = None, eta: float | None = None,
                threshold: float | None = None, views: int | None = None, solver: str | None = None,
                timesteps=None) -> SampleOptions:
        """``run``'s sampling keywords checked against this plan: what is None comes from the plan's
        defaults, and a random seed is drawn when none is given."""
        return SampleOptions.resolve(self.defaults, self.schedule.num_train_timesteps, tuple(self._in["size"]), k=k,
                                     steps=steps, seed=seed, eta=eta, threshold=threshold, views=views,
                                     solver=solver, timesteps=timesteps)

    def preprocess(self, img) -> np.ndarray:
        """One image (anything ``run`` accepts) -> the encoder's 1 x C x H x W input."""
        return self._model_input(load_image(img))

    def _model_input(self, array: np.ndarray) -> np.ndarray:
        return to_model_input(array, tuple(self._in["size"]), self._in["channels"], self._in["mean"], self._in["std"])

    def _initial_latents(self, x0, n: int, k: int) -> np.ndarray | None:
        """Validate ``initial_latents`` -> a C-contiguous float32 (n*k, C, h, w) array, or None."""
        if x0 is None:
            return None
        if isinstance(x0, (list, tuple)):
            if len(x0) != n:
                raise InputError(f"initial_latents is a list of {len(x0)} arrays; expected one per image ({n})")
            x0 = np.concatenate([np.asarray(a) for a in x0]) if n else np.empty(0)
        x0 = np.asarray(x0)
        shape = (n * k, *self.plan.latent_shape)
        if x0.shape != shape:
            raise InputError(f"initial_latents has shape {x0.shape}; expected {shape} "
                             f"(images x k = {n} x {k}, then the plan's latent shape)")
        if not np.issubdtype(x0.dtype, np.floating):
            raise InputError(f"initial_latents must be floating point, got {x0.dtype}")
        x0 = np.ascontiguousarray(x0, dtype=np.float32)
        if not np.isfinite(x0).all():
            raise InputError("initial_latents contains NaN or Inf")
        return x0

    def segment(self, images: Sequence, options: SampleOptions, initial_latents=None,
                warn_whole_image: bool = False) -> list[SegmentationResult]:
        """Segment whole images (anything ``run`` accepts, in a list) with checked ``options``
        (``Segmenter.options``): the step under ``run``, ROI and volumes. ``warn_whole_image``:
        log when the images are larger than a crop-trained plan's training crops."""
        k, steps = options.k, options.steps
        x_init = self._initial_latents(initial_latents, len(images), k)
        t0 = time.perf_counter()
        arrays = [load_image(im) for im in images]
        if warn_whole_image:
            warn_if_whole_image(self.plan.manifest, [a.shape for a in arrays])
            check_scale(self.plan.manifest, [a.shape for a in arrays])
        check_channels(self.plan.manifest, arrays)
        x_in = np.concatenate([self._model_input(a) for a in arrays])
        shapes = [a.shape[:2] for a in arrays]
        del arrays   # full-size images are not needed past here: peak memory ~ the outputs (input_contract.md)
        n = len(shapes)
        per_group = max(1, self.max_batch // k)   # whole images: one image's hypotheses go together
        groups = [range(b, min(n, b + per_group)) for b in range(0, n, per_group)]
        if len(groups) > 1:
            log.debug("msld_sdk: %d images x k=%d run in %d groups of at most %d images (max_batch=%d)",
                      n, k, len(groups), per_group, self.max_batch)
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=steps * len(groups), desc="DDIM" if options.solver == "ddim" else "DPM++2M",
                       unit="step", leave=False)
        timings = {"preprocess_ms": (time.perf_counter() - t0) * 1e3}
        results = []
        for g in groups:
            x_g = None if x_init is None else x_init[g.start * k:g.stop * k]
            results += self._segment_group(x_in[g.start:g.stop], [shapes[i] for i in g], options, x_g, bar,
                                           timings)
        if bar is not None:
            bar.close()
        timings["total_ms"] = (time.perf_counter() - t0) * 1e3
        timings["images"] = n
        for r in results:
            r.timings = dict(timings)
        return results

    def _segment_group(self, x_in: np.ndarray, shapes: list, options: SampleOptions, x_init, bar,
                       timings: dict) -> list[SegmentationResult]:
        """Encode, sample, decode and aggregate one group of model inputs (n x C x H x W); adds
        its stage times to ``timings``."""
        k, steps, seed, eta, threshold, views = (options.k, options.steps, options.seed, options.eta,
                                                 options.threshold, options.views)
        t1 = time.perf_counter()
        n = len(shapes)
        cond = self.backend.encode(view_inputs(x_in, views))   # (n * views) rows
        rows = hypothesis_rows(n, k, views)   # cond row of each hypothesis: image i, view j % views
        t2 = time.perf_counter()
        done_before = bar.n if bar is not None else 0

        def progress(done, total):
            bar.update(done_before + done - bar.n)

        per_hypothesis = views > 1   # else one cond row per image, repeated k times by the backend
        if per_hypothesis:
            cond = np.ascontiguousarray(cond[rows])
        loop = {}   # a CPU-driven loop reports denoise_s, the time inside denoiser calls
        latents = self.backend.sample(cond, n, options, self.schedule, initial_latents=x_init,
                                      cond_per_hypothesis=per_hypothesis,
                                      progress=progress if bar is not None else None, timings=loop)
        t3 = time.perf_counter()
        # a device-resident loop (TensorRT) cannot be timed apart: all of it is denoise_ms
        denoise_s = loop.get("denoise_s", t3 - t2)
        probs = undo_views(self.backend.decode(latents)[:, 0], k, views)   # (n*k) x h x w
        del latents
        t4 = time.perf_counter()

        results = []
        agg_s = post_s = 0.0
        for i, shape in enumerate(shapes):
            s = time.perf_counter()
            p = resize_planes(np.ascontiguousarray(probs[i * k:(i + 1) * k]), shape)
            np.clip(p, 0.0, 1.0, out=p)  # bilinear resize stays in range; guard against rounding
            s2 = time.perf_counter()
            masks, mean, conf, cons = _native.aggregate(p, threshold)
            s3 = time.perf_counter()
            post_s += s2 - s
            agg_s += s3 - s2
            results.append(SegmentationResult(masks=masks, mean=mean, confidence=conf, consensus=cons, probs=p,
                                              seed=seed, steps=steps, eta=eta, views=views,
                                              solver=options.solver, timesteps=options.timesteps,
                                              threshold=float(threshold)))
        add = {
            "encode_ms": (t2 - t1) * 1e3,
            "denoise_ms": denoise_s * 1e3,
            "loop_overhead_ms": (t3 - t2 - denoise_s) * 1e3,  # solver update, noise, callbacks
            "decode_ms": (t4 - t3) * 1e3,
            "postprocess_ms": post_s * 1e3,
            "aggregate_ms": agg_s * 1e3,
        }
        for key, v in add.items():
            timings[key] = timings.get(key, 0.0) + v
        return results

    def __repr__(self) -> str:
        p = f", precision={self.precision!r}" if self.precision != "fp32" else ""
        return f"Segmenter({self.plan.path!r}, backend={self.backend.name!r}{p})"
