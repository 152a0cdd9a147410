"""Training data on the torch side: batches as tensors, with flips / 90-degree rotations /
intensity jitter. The data sets, their splits and ``SegData`` are the runtime's
(``msld_sdk.evaluation.datasets``, numpy and Pillow only), re-exported here for training code.

* ``torch_batch(data, idx, rng, augment=..., annotators=...)`` -> (images [B,C,H,W], masks [B,1,H,W])
  float tensors for training.
"""
from __future__ import annotations

import numpy as np
import torch

from msld_sdk.evaluation.datasets import (KINDS, SegData, cvc_split, data_kind_for, default_data_root,  # noqa: F401
                               kvasir_split, lidc_split, load_split, pack_split)


def torch_batch(data: SegData, idx, rng: np.random.Generator, augment: bool = True, annotators=None,
          jitter: bool = True, transforms=None):
    """-> (images float [B,C,H,W] in [0,1], masks float [B,1,H,W]) for the given indices of ``data``.

    ``annotators``: per-sample annotator index (default: uniform random).
    ``transforms``: per-sample dihedral transform 0..7 (default: random if augment else 0).
    """
    idx = np.asarray(idx)
    if annotators is None:
        annotators = data.pick_annotators(idx, rng)
    img = torch.from_numpy(data.images[idx].astype(np.float32) / 255.0)
    msk = torch.from_numpy(data.masks[idx, annotators][:, None].astype(np.float32))
    if transforms is None:
        transforms = rng.integers(0, 8, size=len(idx)) if augment else np.zeros(len(idx), int)
    img, msk = dihedral(img, transforms), dihedral(msk, transforms)
    if augment and jitter:
        img = intensity_jitter(img, rng)
    return img, msk


def dihedral(x: torch.Tensor, tf) -> torch.Tensor:
    """Apply one of the 8 flips/90-degree rotations per sample: tf = 4*flip + k (rot90 k times)."""
    tf = np.asarray(tf)
    if not tf.any():
        return x
    out = x.clone()
    for t in np.unique(tf):
        if t == 0:
            continue
        sel = torch.from_numpy(np.nonzero(tf == t)[0])
        y = x[sel]
        if t >= 4:
            y = torch.flip(y, dims=(-1,))
        y = torch.rot90(y, int(t % 4), dims=(-2, -1))
        out[sel] = y
    return out


def intensity_jitter(img: torch.Tensor, rng: np.random.Generator, brightness=0.08, contrast=0.15,
                     color=0.05, strength: float = 1.0) -> torch.Tensor:
    """Random brightness/contrast (and per-channel gain for RGB) change, clipped to [0,1].

    ``strength`` scales all three ranges (1 = the small jitter of the first shipped models; the
    polyp recipe uses 2-3 so that a new video's lighting and white balance look familiar).
    """
    b, c = img.shape[:2]
    brightness, contrast, color = brightness * strength, contrast * strength, color * strength
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    con = torch.from_numpy(rng.uniform(1 - contrast, 1 + contrast, (b, 1, 1, 1)).astype(np.float32))
    bri = torch.from_numpy(rng.uniform(-brightness, brightness, (b, 1, 1, 1)).astype(np.float32))
    out = (img - mean) * con + mean + bri
    if c > 1:
        out = out * torch.from_numpy(rng.uniform(1 - color, 1 + color, (b, c, 1, 1)).astype(np.float32))
    return out.clamp_(0.0, 1.0)


def random_affine(img: torch.Tensor, msk: torch.Tensor, rng: np.random.Generator, scale=(0.75, 1.3),
                  max_rotation_deg: float = 45.0, max_shift: float = 0.12):
    """The same random zoom / rotation / shift for each image and its mask.

    Flips and 90-degree turns (``dihedral``) only reorder pixels; a polyp in a new video also
    appears at another size and place. Images are resampled bilinearly, masks bilinearly then
    thresholded at 0.5 (as when the data are resized); pixels from outside the frame are
    reflected, for the image and its mask alike, so labels stay consistent at the border.
    ``scale`` > 1 zooms in.
    """
    b = img.shape[0]
    s = rng.uniform(scale[0], scale[1], b)
    a = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, b))
    sh = rng.uniform(-max_shift, max_shift, (b, 2)) * 2.0          # grid units: the frame spans [-1, 1]
    theta = np.zeros((b, 2, 3), np.float32)                         # output -> input coordinates
    theta[:, 0, 0], theta[:, 0, 1] = np.cos(a) / s, -np.sin(a) / s
    theta[:, 1, 0], theta[:, 1, 1] = np.sin(a) / s, np.cos(a) / s
    theta[:, :, 2] = sh
    grid = torch.nn.functional.affine_grid(torch.from_numpy(theta), list(img.shape), align_corners=False)
    warp = lambda x: torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection",  # noqa: E731
                                                     align_corners=False)
    return warp(img).clamp_(0.0, 1.0), (warp(msk) > 0.5).to(msk.dtype)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m msld_export.training.data", description="Pack data splits for another machine.")
    ap.add_argument("command", choices=["pack"])
    ap.add_argument("--kind", required=True, choices=KINDS)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--data", default=None, help="data root (default ../shared/data)")
    ap.add_argument("--out", required=True, help="folder that receives packed/{kind}_{split}_{size}.npz")
    ap.add_argument("--jpeg-quality", type=int, default=None,
                    help="store images as JPEG at this quality (lossy; to fit the device tool's 64 MiB)")
    ap.add_argument("--cvc-fold", default=None, metavar="F/N", help="CVC-ClinicDB cross-validation fold")
    a = ap.parse_args()
    for sp in ("train", "val"):
        print(pack_split(a.kind, a.data, sp, a.size, a.out, a.jpeg_quality, cvc_fold=a.cvc_fold))

