"""Turning whatever the caller has (array, PIL image, path) into the model's input, and back.

Contract (also in the README):
  * arrays: H x W (grayscale) or H x W x C with C in {1, 3, 4} (RGBA drops alpha);
    uint8 (0..255), uint16 (0..65535) or float in [0, 1]. Floats outside [0, 1] are rescaled
    by their min and max, with a logged warning.
  * an RGB image given to a grayscale model is converted to luminance (ITU-R 601, as PIL's
    "L"); a grayscale image given to an RGB model is repeated over the three channels.
  * paths: PNG, JPEG, TIFF, NPY (no pickles) and DICOM (pydicom; rescale slope/intercept,
    then the file's display window, else its value range; MONOCHROME1 inverted).
  * the image is resized (bilinear, antialiased) to the plan's size; outputs are resized back.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import InputError

log = logging.getLogger("msld_sdk")

MAX_PIXELS = 64_000_000   # ~8000 x 8000: larger inputs are refused (documented limit)
MIN_SIDE = 2
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def load_image(img) -> np.ndarray:
    """Any supported input -> float32 H x W x C (C in 1 or 3) in [0, 1]."""
    if isinstance(img, (str, os.PathLike)):
        img = _read_path(Path(img))
    if isinstance(img, Image.Image):
        img = _from_pil(img)
    if not isinstance(img, np.ndarray):
        raise InputError(f"unsupported image type {type(img).__name__}: give a numpy array, a PIL image or a path")
    return _normalise_array(img)


def _is_dicom(p: Path) -> bool:
    if p.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _read_dicom(p: Path) -> np.ndarray:
    """DICOM -> [0, 1]: stored values, then RescaleSlope/Intercept (e.g. to Hounsfield units),
    then the file's first display window (WindowCenter/Width), else the value range."""
    try:
        import pydicom
    except ImportError:
        raise InputError(f"{p}: reading DICOM needs pydicom (pip install pydicom)") from None
    try:
        ds = pydicom.dcmread(str(p))
        a = ds.pixel_array.astype(np.float64)
    except Exception as e:  # pydicom raises many types for damaged files
        raise InputError(f"{p}: cannot be read as DICOM: {type(e).__name__}: {e}") from e
    if a.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        raise InputError(f"{p}: multi-frame DICOM ({a.shape[0]} frames); pass one frame as an array")
    a = a * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    wc, ww = ds.get("WindowCenter"), ds.get("WindowWidth")
    first = lambda v: float(v[0]) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else float(v)
    if wc is not None and ww is not None and first(ww) > 0:
        lo = first(wc) - first(ww) / 2
        a = np.clip((a - lo) / first(ww), 0.0, 1.0)
    else:
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":  # bright = low values
        a = 1.0 - a
    return a.astype(np.float32)


def _read_path(p: Path):
    if not p.exists():
        raise InputError(f"image file not found: {p}")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, not an image")
    if _is_dicom(p):
        return _read_dicom(p)
    if p.suffix.lower() == ".npy":
        try:
            a = np.load(p, allow_pickle=False)
        except Exception as e:  # numpy raises ValueError, EOFError, OSError... for damaged files
            raise InputError(f"{p}: not a readable .npy array: {type(e).__name__}: {e}") from e
        if not isinstance(a, np.ndarray):
            raise InputError(f"{p}: holds several arrays; give a single-array .npy file")
        return a
    try:
        with Image.open(p) as im:
            frames = getattr(im, "n_frames", 1)
            im.load()
            image = im.copy()
    except Exception as e:  # decoders raise OSError, SyntaxError, EOFError, struct.error... on damage
        raise InputError(f"{p}: cannot be read as an image: {type(e).__name__}: {e}") from e
    if frames > 1:   # reading only the first would drop the rest without a word
        raise InputError(f"{p}: holds {frames} frames (a multi-page TIFF or an animation); give one image per "
                         "file, or a DICOM series / NIfTI volume for 3-D data")
    return image


def _from_pil(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(im, dtype=np.uint16)
    if im.mode in ("I", "F"):
        return np.asarray(im, dtype=np.float32 if im.mode == "F" else np.int64)
    if im.mode not in ("L", "RGB", "RGBA", "LA"):
        im = im.convert("RGBA" if "A" in im.mode else "RGB")
    return np.asarray(im)


def _normalise_array(a: np.ndarray) -> np.ndarray:
    if a.ndim not in (2, 3):
        raise InputError(f"image must be H x W or H x W x C, got an array of rank {a.ndim} with shape {a.shape}")
    if a.ndim == 3 and a.shape[2] not in (1, 2, 3, 4):
        raise InputError(f"image has {a.shape[2]} channels (shape {a.shape}); expected 1, 3 or 4 "
                         "(channels last: H x W x C). A 3-D volume is several images: pass a list of its "
                         "slices, or segment it as a volume (msld segment VOLUME.nii.gz or a DICOM series "
                         "folder; msld_sdk.clinical.volume.segment_volume)")
    h, w = a.shape[:2]
    if h < MIN_SIDE or w < MIN_SIDE:
        raise InputError(f"image is {h} x {w} pixels; each side must be at least {MIN_SIDE}")
    if h * w > MAX_PIXELS:
        raise InputError(f"image is {h} x {w} = {h * w} pixels, over the {MAX_PIXELS} pixel limit")
    if a.dtype == np.bool_:
        a = a.astype(np.float32)
    elif np.issubdtype(a.dtype, np.integer):
        a = _integers_to_unit(a)
    elif np.issubdtype(a.dtype, np.floating):
        if a.dtype.itemsize < 4:       # float16: to float32 first, as before (float64 keeps its range below)
            a = a.astype(np.float32)
        if not np.isfinite(a).all():   # checked in the input's own precision (float64 beyond float32's range is finite)
            bad = int((~np.isfinite(a)).sum())
            raise InputError(f"image contains {bad} NaN or infinite value(s); clean or mask them first")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            a = _rescale(a, f"float range [{lo:.4g}, {hi:.4g}]")   # in the input's precision, then float32
        else:
            a = a.astype(np.float32, copy=False)
    else:
        raise InputError(f"unsupported image dtype {a.dtype}; use uint8, uint16 or float")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] == 4:       # RGBA -> RGB
        a = a[:, :, :3]
    elif a.shape[2] == 2:     # gray + alpha -> gray
        a = a[:, :, :1]
    return np.ascontiguousarray(a, dtype=np.float32)


def integer_scale(lo: int, hi: int) -> int | None:
    """The one rule for integer images, whatever their dtype: values within 0..255 are 8-bit
    intensities (divided by 255), else values within 0..65535 are 16-bit ones (divided by 65535);
    None: outside 0..65535 (then rescaled by min/max, with a warning). Equal values therefore
    give equal inputs, and equal masks, as uint8, uint16, int32 or int64."""
    if lo >= 0 and hi <= 255:
        return 255
    if lo >= 0 and hi <= 65535:
        return 65535
    return None


def _integers_to_unit(a: np.ndarray) -> np.ndarray:
    lo, hi = (0, 255) if a.dtype == np.uint8 else (int(a.min()), int(a.max()))
    scale = integer_scale(lo, hi)
    if scale is None:
        return _rescale(a.astype(np.float64), f"integer values {lo}..{hi}, outside 0..65535")
    out = a.astype(np.float32)      # exact: every value <= 65535
    out /= np.float32(scale)        # in place: no second full-size copy
    return out


def _rescale(a: np.ndarray, what: str) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    log.warning("msld_sdk: image values are outside [0, 1] (%s); rescaling by min/max to [0, 1]", what)
    if hi - lo <= 0:
        return np.zeros(a.shape, np.float32)
    return ((a - lo) / (hi - lo)).astype(np.float32)


def convert_channels(a: np.ndarray, channels: int) -> np.ndarray:
    """H x W x C float -> H x W x channels (luminance or repetition)."""
    c = a.shape[2]
    if c == channels:
        return a
    if channels == 1 and c == 3:
        return (a @ _LUMA)[:, :, None].astype(np.float32)
    if channels == 3 and c == 1:
        return np.repeat(a, 3, axis=2)
    raise InputError(f"cannot convert a {c}-channel image to the model's {channels} channels")


STRIP_PIXELS = 1 << 22   # planes larger than this are resized in column strips (see resize_planes)


def resize_planes(planes: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """Bilinear (antialiased) resize of N x H x W float32 planes to N x size[0] x size[1]
    (into ``out`` when given). A large upscaled output is made without a full-size temporary:
    PIL's horizontal pass, then its vertical pass on strips of columns. When both sides grow PIL
    runs exactly these two passes on the whole plane (their coefficients depend only on the
    sizes), so the values are bit-identical to one ``Image.resize``."""
    h, w = size
    if planes.shape[1:] == (h, w) and out is None:
        return planes
    if out is None:
        out = np.empty((planes.shape[0], h, w), np.float32)
    for i, pl in enumerate(planes):
        if h * w <= STRIP_PIXELS or h < pl.shape[0] or w < pl.shape[1]:
            out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(pl), mode="F").resize((w, h), Image.BILINEAR))
            continue
        hin = pl.shape[0]
        tmp = pl if pl.shape[1] == w else np.asarray(Image.fromarray(np.ascontiguousarray(pl), mode="F")
                                                     .resize((w, hin), Image.BILINEAR))
        step = max(1, STRIP_PIXELS // (4 * h))
        for c0 in range(0, w, step):
            c1 = min(w, c0 + step)
            strip = np.ascontiguousarray(tmp[:, c0:c1])
            if hin != h:
                strip = np.asarray(Image.fromarray(strip, mode="F").resize((c1 - c0, h), Image.BILINEAR))
            out[i, :, c0:c1] = strip
    return out


def to_model_input(a: np.ndarray, size: tuple[int, int], channels: int, mean, std) -> np.ndarray:
    """H x W x C [0,1] -> 1 x C x h x w normalised float32, as the encoder graph expects."""
    a = convert_channels(a, channels)
    planes = resize_planes(np.ascontiguousarray(a.transpose(2, 0, 1)), size)
    m = np.asarray(mean, np.float32)[:, None, None]
    s = np.asarray(std, np.float32)[:, None, None]
    return ((planes - m) / s)[None].astype(np.float32)
