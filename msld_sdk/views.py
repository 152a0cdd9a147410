"""Test-time views: hypothesis j of an image is sampled from the image rotated (and flipped)
by view ``j % V`` and turned back before it is aggregated.

Why: the models are trained on all eight rotations and flips of every image
(``export/msld_export/training/data.py``), so a sample drawn from a turned copy and turned back is as valid a
hypothesis as one drawn from the image itself.  Spreading the k hypotheses over V views
averages out what the model has learnt about orientation by chance.  It helps on some data
and not on other, so the shipped plans keep V = 1 by default (figures: MODEL_CARD.md,
"Test-time views"; docs/input_contract.md).  The encoder then runs on V images instead of one;
the denoiser, which dominates the run, does the same work as before.

View v (0..7) rotates by 90 * (v % 4) degrees counter-clockwise, then flips left-right when
v >= 4: V = 4 is the four rotations, V = 8 all eight symmetries of the square.  Hypothesis j
depends only on j, never on k, so a seed still reproduces hypothesis j at any k.
"""
from __future__ import annotations

import numpy as np

from .errors import InputError

MAX_VIEWS = 8


def apply_view(x: np.ndarray, v: int) -> np.ndarray:
    """``x`` (..., H, W) as seen in view ``v``."""
    y = np.rot90(x, v % 4, axes=(-2, -1))
    return np.flip(y, -1) if v >= 4 else y


def undo_view(x: np.ndarray, v: int) -> np.ndarray:
    """The inverse of ``apply_view``: a plane seen in view ``v`` back in the image's frame."""
    y = np.flip(x, -1) if v >= 4 else x
    return np.rot90(y, -(v % 4), axes=(-2, -1))


def check_views(views, input_size: tuple[int, int]) -> int:
    """``views`` as an int in 1..8; more than one needs a square model input (a quarter turn of
    a non-square image does not fit the encoder)."""
    if isinstance(views, bool) or not isinstance(views, (int, np.integer)) or not 1 <= views <= MAX_VIEWS:
        raise InputError(f"views must be an integer from 1 to {MAX_VIEWS}, got {views!r}")
    h, w = input_size
    if views > 1 and h != w:
        raise InputError(f"views={views} needs a square model input; this plan's is {h} x {w}: use views=1")
    return int(views)


def view_inputs(x: np.ndarray, views: int) -> np.ndarray:
    """Encoder input (n, C, H, W) -> (n * views, C, H, W): image i's views at rows i*V .. i*V+V-1."""
    if views == 1:
        return x
    return np.ascontiguousarray(np.stack([apply_view(x, v) for v in range(views)], axis=1)
                                .reshape((-1,) + x.shape[1:]))


def hypothesis_rows(n: int, k: int, views: int) -> np.ndarray:
    """Row of ``view_inputs`` (and of the encoder output) that hypothesis j of image i uses,
    for the (n * k) hypotheses laid out [image][hypothesis]; with one view, row i for all k."""
    i, j = np.divmod(np.arange(n * k), k)
    return i * views + j % views


def undo_views(planes: np.ndarray, k: int, views: int) -> np.ndarray:
    """Decoder output (n * k, ..., H, W) in each hypothesis' view -> in the image's frame."""
    if views == 1:
        return planes
    out = np.empty_like(planes)
    view_of = (np.arange(planes.shape[0]) % k) % views
    for v in range(views):
        out[view_of == v] = undo_view(planes[view_of == v], v)
    return out
