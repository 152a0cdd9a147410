"""Regions of interest: crop what the plan was trained on, run, paste the outputs back.

A plan records how its training inputs were made in ``manifest["training_input"]`` (``kind``
"crop" or "whole_image", ``crop_size``, ``pixel_spacing_mm``, ``pad_value`` / ``pad_hu``,
``intensity``; the fields are described in docs/clinical_workflow.md).

``roi`` is a box ``(x0, y0, x1, y1)`` (x = column, end exclusive) or a centre ``(x, y)`` in the
input's pixels. A centre gives a plan-sized window around it; a box, a plan-sized window around
its centre (grown to cover a larger box) whose outputs are kept inside the box only. Every
output is returned at the input's full size, zero outside the region.
"""
from __future__ import annotations

import logging
import numbers
from dataclasses import replace

import numpy as np

from .errors import InputError
from .result import SegmentationResult

log = logging.getLogger("msld_sdk")

WHOLE_IMAGE_WARN_FACTOR = 2   # an image at least this many times the crop size (either side) warns


def training_input(manifest: dict) -> dict:
    """The plan's record of its training inputs; plans without one were trained on whole images."""
    info = dict(manifest.get("training_input") or {})
    info.setdefault("kind", "whole_image")
    info.setdefault("crop_size", list(manifest["input"]["size"]))
    info.setdefault("pad_value", None)     # None: replicate the image's edge
    info.setdefault("intensity", None)
    return info


def warn_if_whole_image(manifest: dict, shapes) -> None:
    """One warning naming ``roi`` when a crop-trained plan gets whole images much larger than its crops."""
    info = training_input(manifest)
    if info["kind"] != "crop":
        return
    ch, cw = info["crop_size"]
    big = [s for s in shapes if s[0] >= WHOLE_IMAGE_WARN_FACTOR * ch or s[1] >= WHOLE_IMAGE_WARN_FACTOR * cw]
    if big:
        h, w = big[0][:2]
        log.warning("msld_sdk: a %d x %d image given whole to a plan trained on %d x %d crops centred on the finding "
                    "(%s); it is shrunk to the model's input and the masks are unlikely to mean anything. Pass "
                    "roi=(x, y) or roi=(x0, y0, x1, y1) (CLI: --center X Y or --roi X0 Y0 X1 Y1) to segment a "
                    "region at the training scale", h, w, ch, cw, info.get("centred_on", "finding"))


def _numbers(v, n) -> bool:
    return (isinstance(v, (tuple, list, np.ndarray)) and len(v) == n
            and all(isinstance(x, numbers.Real) and not isinstance(x, bool) and np.isfinite(x) for x in v))


def is_single_roi(roi) -> bool:
    return _numbers(roi, 2) or _numbers(roi, 4)


def windows(roi, shape_hw, crop_hw) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """(window, region), each (y0, x0, y1, x1). The window may extend past the image (it is
    padded there); the region is where outputs are kept, always inside the image."""
    H, W = shape_hw
    ch, cw = int(crop_hw[0]), int(crop_hw[1])
    if _numbers(roi, 2):
        x, y = (int(round(float(v))) for v in roi)
        if not (0 <= x < W and 0 <= y < H):
            raise InputError(f"roi centre (x={x}, y={y}) is outside the {H} x {W} image")
        win = (y - ch // 2, x - cw // 2, y - ch // 2 + ch, x - cw // 2 + cw)
        region = (max(win[0], 0), max(win[1], 0), min(win[2], H), min(win[3], W))
        return win, region
    if _numbers(roi, 4):
        x0, y0, x1, y1 = (int(round(float(v))) for v in roi)
        region = (max(y0, 0), max(x0, 0), min(y1, H), min(x1, W))
        if x1 <= x0 or y1 <= y0 or region[2] <= region[0] or region[3] <= region[1]:
            raise InputError(f"roi box (x0={x0}, y0={y0}, x1={x1}, y1={y1}) is empty or outside the {H} x {W} image "
                             "(x1 > x0, y1 > y0, end exclusive)")
        h, w = max(ch, y1 - y0), max(cw, x1 - x0)
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        if (h, w) != (ch, cw):
            log.warning("msld_sdk: roi box %d x %d is larger than the plan's %d x %d crop; the window is resized "
                        "to the model's input, so the scale differs from training", y1 - y0, x1 - x0, ch, cw)
        win = (cy - h // 2, cx - w // 2, cy - h // 2 + h, cx - w // 2 + w)
        return win, region
    raise InputError(f"roi must be a centre (x, y) or a box (x0, y0, x1, y1) of finite numbers, got {roi!r}")


def crop(a: np.ndarray, win, fill) -> np.ndarray:
    """The window ``win`` (y0, x0, y1, x1) of ``a`` (H x W x ...), padded with ``fill`` (None: edge)."""
    H, W = a.shape[:2]
    y0, x0, y1, x1 = win
    pads = ((max(-y0, 0), max(y1 - H, 0)), (max(-x0, 0), max(x1 - W, 0))) + ((0, 0),) * (a.ndim - 2)
    inner = a[max(y0, 0):min(y1, H), max(x0, 0):min(x1, W)]
    if not any(p for pp in pads for p in pp):
        return np.ascontiguousarray(inner)
    if fill is None:
        return np.pad(inner, pads, mode="edge")
    return np.pad(inner, pads, mode="constant", constant_values=fill)


def normalise_crop(c: np.ndarray, info: dict, hu: bool = False) -> np.ndarray:
    """Map a crop to [0, 1] the way the plan's training crops were mapped.

    ``hu``: the crop holds Hounsfield units (CT series and volumes); then the plan must say
    how HU became pixel values. Images already in [0, 1] keep their values unless the plan
    normalised each crop (``intensity.kind == "minmax"``)."""
    spec = info.get("intensity") or {}
    kind = spec.get("kind")
    c = c.astype(np.float32, copy=False)
    if hu:
        lo, hi = spec.get("hu_clip") or (None, None)
        if lo is not None or hi is not None:
            c = np.clip(c, -np.inf if lo is None else lo, np.inf if hi is None else hi)
        if kind == "window":
            wlo, whi = spec["hu_window"]
            return np.clip((c - wlo) / (whi - wlo), 0.0, 1.0).astype(np.float32)
        if kind != "minmax":
            raise InputError("this plan does not record how Hounsfield units were mapped to its training "
                             "images (manifest training_input.intensity), so it cannot segment CT series or "
                             "volumes. Re-import it with a current `msld import` (it records LIDC's), or add the "
                             "record: python -m msld_export.training.training_input PLAN --kind lidc; "
                             "or give images already in [0, 1]")
    if kind == "minmax":
        lo, hi = float(c.min()), float(c.max())
        return ((c - lo) / (hi - lo) if hi > lo else np.zeros_like(c)).astype(np.float32)
    return c


def paste(r: SegmentationResult, win, region, shape_hw) -> SegmentationResult:
    """A result computed on window ``win`` -> the same result at full size, zero outside ``region``."""
    H, W = shape_hw
    y0, x0, y1, x1 = region
    sy, sx = slice(y0 - win[0], y1 - win[0]), slice(x0 - win[1], x1 - win[1])

    def full(p):
        out = np.zeros(p.shape[:-2] + (H, W), p.dtype)
        out[..., y0:y1, x0:x1] = p[..., sy, sx]
        return out

    return replace(r, masks=full(r.masks), mean=full(r.mean), confidence=full(r.confidence),
                   consensus=full(r.consensus), probs=full(r.probs), roi=(x0, y0, x1, y1))


def per_image_rois(roi, n: int) -> list:
    """One roi for every image, or a list with one per image."""
    if is_single_roi(roi):
        return [roi] * n
    if isinstance(roi, (list, tuple)) and len(roi) == n and all(is_single_roi(r) for r in roi):
        return list(roi)
    raise InputError(f"roi must be a centre (x, y), a box (x0, y0, x1, y1), or a list of {n} of them "
                     f"(one per image), got {roi!r}")


def run_with_roi(seg, images: list, roi, options, initial_latents=None) -> list[SegmentationResult]:
    """``Segmenter.run(images, roi=...)``: crop each image, run the crops in one call
    (``Segmenter.segment``) with the checked ``options`` (``Segmenter.options``), paste back."""
    from .image_input import load_image

    info = training_input(seg.plan.manifest)
    rois = per_image_rois(roi, len(images))
    arrays = [load_image(im) for im in images]
    wins = [windows(r, a.shape[:2], info["crop_size"]) for r, a in zip(rois, arrays)]
    crops = [normalise_crop(crop(a, w, info["pad_value"]), info) for a, (w, _) in zip(arrays, wins)]
    results = seg.segment(crops, options, initial_latents)
    return [paste(res, w, reg, a.shape[:2]) for res, a, (w, reg) in zip(results, arrays, wins)]

