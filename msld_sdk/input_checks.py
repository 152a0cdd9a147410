"""Inputs checked against what the plan was trained on (``training_input``), before anything runs.

Three rules (docs/input_contract.md, "Checks against the plan"):
  * modality: a DICOM input whose Modality differs from the plan's (a CT plan given MR, PT,
    SEG, ...) is refused with ``InputError``, unless the caller allows it (``allow_modality``:
    True, or the modality codes to accept), and then it runs with a warning;
  * channels: a colour image (channels that differ) given to a one-channel plan, or a
    one-channel image to a colour plan, is converted (luminance / repetition) with one warning
    naming the plan's training input;
  * scale: an image many times larger than the plan's training input gets a warning.
``collect_warnings`` logs each distinct warning once over many runs (``msld eval``) and keeps
them for the report.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import numpy as np

from .errors import InputError
from .roi import training_input

log = logging.getLogger("msld_sdk")

SCALE_WARN_FACTOR = 16      # whole-image plans: a side this many times the training input's warns
# the plan's recorded modality -> the DICOM Modality codes (PS3.3 C.7.3.1.1.1) that match it
DICOM_CODES = {"CT": ("CT",), "MR": ("MR",), "endoscopy": ("ES",), "PT": ("PT",), "US": ("US",),
               "XR": ("CR", "DX", "RG")}


def plan_modality(manifest: dict) -> str | None:
    return training_input(manifest).get("modality")


def _allowed(allow, modality: str) -> bool:
    if allow is True:
        return True
    if not allow:
        return False
    codes = [allow] if isinstance(allow, str) else list(allow)
    return modality.upper() in {str(c).upper() for c in codes}


def check_modality(manifest: dict, modality: str | None, where: str, allow=False) -> None:
    """Refuse (``InputError``) or, when ``allow`` covers it, warn about a DICOM ``modality``
    that is not the one the plan was trained on. Plans without a recorded modality accept all."""
    want = plan_modality(manifest)
    if want is None:
        return
    codes = DICOM_CODES.get(want, (want.upper(),))
    if modality is None or str(modality).strip() == "":
        log.warning("msld_sdk: %s: the DICOM file records no Modality; the plan was trained on %s images and "
                    "segments it as one", where, want)
        return
    modality = str(modality).upper()
    if modality in codes:
        return
    name = manifest.get("model", {}).get("name", "this plan")
    if _allowed(allow, modality):
        log.warning("msld_sdk: %s: DICOM modality %s given to %s, trained on %s images (allowed by "
                    "allow_modality); its values are read as %s values and the masks may mean nothing",
                    where, modality, name, want, want)
        return
    raise InputError(f"{where}: DICOM modality {modality}, but {name} was trained on {want} images "
                     f"(DICOM {'/'.join(codes)}); its values would be read as {want} values. Give a {want} "
                     f"image, or pass allow_modality=True (CLI: --allow-modality) to segment it anyway")


def dicom_modality(path) -> str | None:
    """The Modality of a DICOM file (header only), or None."""
    import pydicom
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:  # damaged: the reader reports it when the pixels are read
        log.debug("msld_sdk: %s: header unreadable (%s)", path, e)
        return None
    return str(ds.get("Modality", "")) or None


def check_image_modalities(manifest: dict, images, allow=False) -> None:
    """``Segmenter.run``: every DICOM path among ``images`` against the plan's modality."""
    if plan_modality(manifest) is None:
        return
    from .image_input import _is_dicom
    for im in images:
        if isinstance(im, (str, Path)) and Path(im).is_file() and _is_dicom(Path(im)):
            try:
                import pydicom  # noqa: F401
            except ImportError:
                return          # load_image names the missing package
            check_modality(manifest, dicom_modality(im), str(im), allow)


def is_colour(a: np.ndarray) -> bool:
    """H x W x C: three channels that differ somewhere (grey saved as RGB is grey)."""
    if a.ndim < 3 or a.shape[2] < 3:
        return False
    return not (np.array_equal(a[:, :, 0], a[:, :, 1]) and np.array_equal(a[:, :, 0], a[:, :, 2]))


def check_channels(manifest: dict, arrays) -> None:
    """One warning when converting to the plan's channels loses colour (an RGB image whose
    channels differ, to a one-channel plan) or lacks it (a one-channel image to a colour plan)."""
    ch = int(manifest["input"]["channels"])
    mod = plan_modality(manifest)
    colour = [is_colour(a) for a in arrays]
    if ch == 1 and any(colour):
        want = mod or "greyscale"
        log.warning("msld_sdk: a colour image given to a plan trained on one-channel %s images; it is converted "
                    "to luminance and the masks are unlikely to mean anything. Give the plan %s images, or use a "
                    "plan trained on colour images", want, want)
    elif ch == 3 and any(a.ndim < 3 or a.shape[2] == 1 for a in arrays):
        want = f"colour {mod}" if mod else "colour"
        log.warning("msld_sdk: a greyscale image given to a plan trained on %s images; its grey is repeated over "
                    "three channels and the masks are unlikely to mean anything. Give the plan %s images, or use "
                    "a plan trained on greyscale images", want, want)


def check_scale(manifest: dict, shapes) -> None:
    """Whole-image plans: one warning for images much larger than the training input (crop
    plans warn through ``roi.warn_if_whole_image``)."""
    if training_input(manifest)["kind"] == "crop":
        return
    h0, w0 = manifest["input"]["size"]
    big = [s for s in shapes if s[0] >= SCALE_WARN_FACTOR * h0 or s[1] >= SCALE_WARN_FACTOR * w0]
    if big:
        h, w = big[0][:2]
        f = max(h / h0, w / w0)
        log.warning("msld_sdk: a %d x %d image is %.0f times the %d x %d input the plan was trained on (per side); "
                    "it is shrunk to that size, so detail under %.0f pixels is lost, and every output is made at "
                    "full size (%.1f GB of arrays at k=8). Crop or downscale it first when that is not wanted",
                    h, w, f, h0, w0, f, h * w * 49 / 1e9)


class _Once(logging.Filter):
    """Deduplicates the warnings of the thread that made it; other threads' records pass untouched
    (the logger is shared: another thread's Segmenter.run must neither lose its warnings nor have
    them counted as this block's)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.thread != self.thread:
            return True
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.append(msg)
        return True


@contextlib.contextmanager
def collect_warnings():
    """Within the block, each distinct msld_sdk warning is logged once; yields the list of them."""
    f = _Once()
    log.addFilter(f)
    try:
        yield f.seen
    finally:
        log.removeFilter(f)
