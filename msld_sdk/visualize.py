"""Pictures of a result: a confidence heat map and an overlay of the segmentation on the image."""
from __future__ import annotations

import numpy as np

# Anchor colours of a perceptually ordered dark-to-bright map (inferno-like), interpolated.
_ANCHORS = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                     [245, 125, 21], [250, 193, 39], [252, 255, 164]], np.float32)
_LUT = np.stack([np.interp(np.linspace(0, len(_ANCHORS) - 1, 256), np.arange(len(_ANCHORS)), _ANCHORS[:, c])
                 for c in range(3)], axis=1).astype(np.uint8)


def heatmap(values: np.ndarray) -> np.ndarray:
    """H x W values in [0, 1] -> H x W x 3 uint8 (dark = 0, bright = 1)."""
    idx = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
    return _LUT[idx]


def overlay(image01: np.ndarray, mean: np.ndarray, consensus: np.ndarray) -> np.ndarray:
    """Image (H x W x C in [0,1]) tinted red by the mean probability, consensus outline in yellow."""
    rgb = image01 if image01.shape[2] == 3 else np.repeat(image01[:, :, :1], 3, axis=2)
    out = rgb * (1 - 0.5 * mean[:, :, None]) + np.array([1.0, 0.0, 0.0]) * 0.5 * mean[:, :, None]
    m = consensus
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    out[edge] = (1.0, 1.0, 0.0)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_result_pngs(d, r, image01: np.ndarray) -> None:
    """``mask_00.png ...``, ``mean.png``, ``consensus.png``, ``confidence.png`` (heat map) and
    ``overlay.png`` of one 2-D result into folder ``d`` (what ``msld segment`` writes)."""
    from pathlib import Path

    from PIL import Image

    from .writing import atomic_path

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    pictures = [(f"mask_{i:02d}.png", lambda m=m: m.astype(np.uint8) * 255) for i, m in enumerate(r.masks)]
    pictures += [("mean.png", lambda: (r.mean * 255 + 0.5).astype(np.uint8)),
                 ("consensus.png", lambda: r.consensus.astype(np.uint8) * 255),
                 ("confidence.png", lambda: heatmap(r.confidence)),
                 ("overlay.png", lambda: overlay(image01, r.mean, r.consensus))]
    for name, picture in pictures:     # each to a temporary name, renamed when whole
        with atomic_path(d / name) as tmp:
            Image.fromarray(picture()).save(tmp, format="PNG")
