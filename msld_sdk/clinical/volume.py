"""CT series and volumes: a folder of DICOM slices or a NIfTI file -> per-slice segmentation
over a 3-D region, returned as volumes in the series' own geometry.

``load_volume`` reads a DICOM series (slices in position order, values in HU) or a NIfTI file;
``segment_volume(seg, vol, roi=..., slices=...)`` cuts every slice in range at the plan's
training crop around the region, maps HU the way the training slices were, and segments them
in one call (in groups of ``max_batch`` hypotheses); ``save_nifti_outputs`` writes the results
in the volume's geometry.

Arrays are Z x H x W (slice, row, column). ``roi``: a 2-D centre (x, y) or box (x0, y0, x1, y1)
for every slice in ``slices`` = (z0, z1) (end exclusive; default all), a 3-D centre (x, y, z)
or a 3-D box (x0, y0, z0, x1, y1, z1). Details: docs/clinical_workflow.md.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError, SeriesGeometryError
from ..extras import require
from ..input_checks import check_modality
from ..roi import crop, normalise_crop, paste, training_input, windows
from ..writing import atomic_path

log = logging.getLogger("msld_sdk")

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    hu: np.ndarray                      # Z x H x W float32 (stored values x slope + intercept)
    affine: np.ndarray                  # 4 x 4, voxel (x, y, z) -> RAS+ mm (NIfTI convention)
    source: str                         # "dicom" | "nifti" | "array"
    path: str = ""
    datasets: list = field(default_factory=list, repr=False)   # DICOM: one per slice, in slice order
    modality: str | None = None         # DICOM Modality (CT, MR, ...); None for NIfTI and arrays
    positions: np.ndarray | None = None  # DICOM: Z x 3 ImagePositionPatient (LPS mm), as read
    regular: bool = True                # False: irregular geometry accepted; the affine cannot hold it

    @property
    def shape(self) -> tuple:
        return self.hu.shape

    @property
    def spacing(self) -> tuple:
        """Voxel size (z, y, x) in mm."""
        return tuple(float(np.linalg.norm(self.affine[:3, i])) for i in (2, 1, 0))


@dataclass
class VolumeResult:
    masks: np.ndarray          # k x Z x H x W bool
    mean: np.ndarray           # Z x H x W float32
    confidence: np.ndarray     # Z x H x W float32
    consensus: np.ndarray      # Z x H x W bool
    slices: tuple              # (z0, z1) segmented, end exclusive
    roi: tuple | None          # (x0, y0, x1, y1) kept in every segmented slice; None = whole slices
    seed: int
    steps: int
    eta: float
    timings: dict = field(default_factory=dict)
    solver: str = "ddim"
    views: int = 1
    timesteps: tuple | None = None   # dpmpp2m's grid when one was given or tuned (as SegmentationResult)
    threshold: float = 0.5

    @property
    def k(self) -> int:
        return int(self.masks.shape[0])


def is_volume_input(p) -> bool:
    """A folder (DICOM series) or a NIfTI file."""
    p = Path(p)
    return p.is_dir() or str(p).lower().endswith(NIFTI_SUFFIXES)


def load_volume(p, accept_irregular: bool = False) -> Volume:
    p = Path(p)
    if p.is_dir():
        return load_series(p, accept_irregular=accept_irregular)
    if str(p).lower().endswith(NIFTI_SUFFIXES):
        return load_nifti(p)
    return load_series([p])


# ---- reading ----------------------------------------------------------------------------------
def _dicom_files(folder: Path) -> list[Path]:
    return sorted(q for q in folder.iterdir() if q.is_file() and q.name != "DICOMDIR" and not q.name.startswith("."))


SPACING_TOLERANCE = 0.01    # a slice step may differ from the series' median step by 1 % (and 0.01 mm)
ORIENTATION_TOLERANCE = 1e-4


def _name(d, z) -> str:
    f = Path(str(getattr(d, "filename", "") or "")).name
    return f"slice {z} ({f})" if f else f"slice {z} (instance {d.get('InstanceNumber', '?')})"


def geometry_problems(slices, normal) -> list[str]:
    """What makes the (position-sorted) slices an irregular grid: more than one orientation,
    two slices at one position, a missing slice, uneven steps, or a step off the slice line."""
    problems = []
    iop0 = np.asarray(slices[0].get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
    for z, d in enumerate(slices):
        iop = np.asarray(d.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
        if np.abs(iop - iop0).max() > ORIENTATION_TOLERANCE:
            problems.append(f"{_name(d, z)} has orientation {iop.round(4).tolist()}, {_name(slices[0], 0)} "
                            f"{iop0.round(4).tolist()}")
    if len(slices) < 2 or not all("ImagePositionPatient" in d for d in slices):
        return problems
    pos = np.asarray([np.asarray(d.ImagePositionPatient, float) for d in slices])
    steps = np.diff(pos, axis=0)
    along = steps @ normal
    moving = along[along > 0.01]
    m = float(np.median(moving)) if len(moving) else 0.0
    med = np.median(steps[along > 0.01], axis=0) if len(moving) else np.zeros(3)
    tol = max(0.01, SPACING_TOLERANCE * m)
    for i, (a, st) in enumerate(zip(along, steps)):
        pair = f"{_name(slices[i], i)} and {_name(slices[i + 1], i + 1)}"
        if a <= 0.01:
            problems.append(f"{pair} are at the same position {pos[i].round(3).tolist()}")
        elif abs(a - m) > tol and abs(a / m - round(a / m)) * m <= tol and round(a / m) >= 2:
            problems.append(f"{round(a / m) - 1} slice(s) missing between {pair} ({a:.3g} mm apart, spacing "
                            f"{m:.3g} mm)")
        elif abs(a - m) > tol:
            problems.append(f"{pair} are {a:.4g} mm apart, the series' spacing is {m:.4g} mm")
        elif np.linalg.norm(st - med) > tol:
            problems.append(f"{_name(slices[i + 1], i + 1)} is shifted {np.linalg.norm(st - med):.3g} mm off the "
                            "line of the other slices")
    return problems


def load_series(folder_or_files, series_uid: str | None = None, accept_irregular: bool = False) -> Volume:
    """One DICOM series from a folder (or a list of files), ordered by slice position.

    The slices must form a regular grid (``geometry_problems``): otherwise ``InputError`` names
    the offending slices, unless ``accept_irregular``: then each slice keeps its true position
    (``Volume.positions``) and ``regular`` is False (no NIfTI: an affine cannot hold them)."""
    pydicom = require("pydicom", "reading a DICOM series")
    files = _dicom_files(Path(folder_or_files)) if isinstance(folder_or_files, (str, os.PathLike)) \
        else [Path(f) for f in folder_or_files]
    where = str(folder_or_files) if isinstance(folder_or_files, (str, os.PathLike)) or len(files) != 1 \
        else str(files[0])
    by_series: dict = {}
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
        except Exception as e:  # not DICOM (or damaged): skipped, named in the log
            log.warning("msld_sdk: %s: skipped, not readable as DICOM (%s)", f, type(e).__name__)
            continue
        if "PixelData" not in ds:
            continue
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    if not by_series:
        raise InputError(f"{where}: no DICOM image slices found")
    if series_uid is None and len(by_series) > 1:
        raise InputError(f"{where}: holds {len(by_series)} series ({sorted(by_series)}); pass one series' folder "
                         "or series_uid=")
    slices = by_series[series_uid] if series_uid is not None else next(iter(by_series.values()))
    first = slices[0]
    shape = (int(first.Rows), int(first.Columns))
    if any((int(d.Rows), int(d.Columns)) != shape for d in slices):
        raise InputError(f"{where}: slices of different sizes in one series")
    iop = np.asarray(first.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    if all("ImagePositionPatient" in d for d in slices):
        slices.sort(key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, float), normal)))
    else:
        log.warning("msld_sdk: %s: slices without ImagePositionPatient; ordered by InstanceNumber", where)
        slices.sort(key=lambda d: int(d.get("InstanceNumber", 0)))
    first = slices[0]
    ps0 = np.asarray(first.get("PixelSpacing", [1.0, 1.0]), float)
    for z, d in enumerate(slices):   # one in-plane grid for the whole volume: no override can fix another
        ps = np.asarray(d.get("PixelSpacing", [1.0, 1.0]), float)
        if np.abs(ps - ps0).max() > 1e-4 * max(1.0, float(ps0.max())):
            raise InputError(f"{where}: {_name(d, z)} has PixelSpacing {ps.round(4).tolist()}, {_name(first, 0)} "
                             f"{ps0.round(4).tolist()}; one series must share one pixel grid (its masks would be "
                             "mis-scaled): give the slices of one reconstruction")
    problems = geometry_problems(slices, normal)
    if problems and not accept_irregular:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise SeriesGeometryError(f"{where}: the slices do not form a regular grid: {'; '.join(problems[:5])}{more}. Fix the "
                         "series (remove duplicates, add the missing slices), or pass accept_irregular=True (CLI: "
                         "--accept-irregular-slices) to segment every slice at its true position (result.npz "
                         "and DICOM SEG keep the positions, a SEG only if no two slices share one; no NIfTI, "
                         "whose affine cannot hold them)")
    if problems:
        log.warning("msld_sdk: %s: irregular slice geometry accepted, true positions kept: %s", where,
                    "; ".join(problems))
    modalities = sorted({str(d.get("Modality", "")) for d in slices})
    if len(modalities) > 1:
        raise InputError(f"{where}: one series with several modalities {modalities}; pass the slices of one")
    hu = np.empty((len(slices),) + shape, np.float32)
    for z, d in enumerate(slices):
        try:
            a = d.pixel_array.astype(np.float32)
        except Exception as e:
            raise InputError(f"{where}: slice {d.get('SOPInstanceUID', z)} has unreadable pixel data: "
                             f"{type(e).__name__}: {e}") from e
        hu[z] = a * float(d.get("RescaleSlope", 1) or 1) + float(d.get("RescaleIntercept", 0) or 0)
    dy, dx = (float(v) for v in first.get("PixelSpacing", [1.0, 1.0]))
    origin = np.asarray(first.get("ImagePositionPatient", [0, 0, 0]), float)
    if len(slices) > 1 and "ImagePositionPatient" in slices[-1]:
        step = (np.asarray(slices[-1].ImagePositionPatient, float) - origin) / (len(slices) - 1)
    else:
        step = normal * float(first.get("SliceThickness", 1.0) or 1.0)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * dx, col_dir * dy, step, origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps          # DICOM LPS -> NIfTI RAS
    positions = (np.asarray([np.asarray(d.ImagePositionPatient, float) for d in slices])
                 if all("ImagePositionPatient" in d for d in slices) else None)
    # without positions the grid is unknown: the affine above is made up, so no NIfTI or SEG geometry
    return Volume(hu, affine, "dicom", where, slices, modality=modalities[0] or None, positions=positions,
                  regular=not problems and positions is not None)


def load_nifti(path) -> Volume:
    nib = require("nibabel", "reading a NIfTI volume")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as e:
        raise InputError(f"{path}: cannot be read as NIfTI: {type(e).__name__}: {e}") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: NIfTI volume must be 3-D, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise InputError(f"{path}: volume contains NaN or infinite values")
    return Volume(np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(img.affine, float), "nifti", str(path))


# ---- segmenting -------------------------------------------------------------------------------
def _region(roi, slices, Z):
    """-> (2-D roi or None, (z0, z1))."""
    if roi is not None:
        roi = [float(v) for v in roi] if isinstance(roi, (list, tuple, np.ndarray)) else roi
        if isinstance(roi, list) and len(roi) == 3:
            if slices is None:
                slices = (int(round(roi[2])), int(round(roi[2])) + 1)
            roi = roi[:2]
        elif isinstance(roi, list) and len(roi) == 6:
            if slices is not None:
                raise InputError("give the slice range either in a 3-D box or in slices=, not both")
            slices = (int(round(roi[2])), int(round(roi[5])))
            roi = [roi[0], roi[1], roi[3], roi[4]]
    z0, z1 = (0, Z) if slices is None else (int(slices[0]), int(slices[1]))
    if not 0 <= z0 < z1 <= Z:
        raise InputError(f"slice range [{z0}, {z1}) is empty or outside the volume's {Z} slices (end exclusive)")
    return roi, (z0, z1)


def crop_pixels(info: dict, spacing_yx) -> tuple[int, int]:
    """The training crop in this volume's pixels: ``crop_size`` when the plan's crops were cut
    at native spacing (``pixel_spacing_mm`` null), else scaled by plan spacing / volume spacing
    (the window is then resized to the model's input like any image)."""
    ps = info.get("pixel_spacing_mm")
    if ps is None:
        return tuple(info["crop_size"])
    ps = [float(ps)] * 2 if not isinstance(ps, (list, tuple)) else [float(v) for v in ps]
    return tuple(max(2, int(round(c * p / s))) for c, p, s in zip(info["crop_size"], ps, spacing_yx))


def segment_volume(seg, vol: Volume, roi=None, slices=None, k=None, steps=None, seed=None, eta=None,
                   threshold=None, views=None, allow_modality=False, solver=None, timesteps=None) -> VolumeResult:
    """Segment slices ``slices`` of ``vol`` in the region ``roi`` (see the module docstring).
    A DICOM series of another modality than the plan's is refused unless ``allow_modality``
    (True, or the codes to accept) covers it (``msld_sdk.input_checks.check_modality``)."""
    info = training_input(seg.plan.manifest)
    options = seg.options(k=k, steps=steps, seed=seed, eta=eta, threshold=threshold, views=views, solver=solver,
                          timesteps=timesteps)
    Z, H, W = vol.hu.shape
    roi2, (z0, z1) = _region(roi, slices, Z)
    stack = vol.hu[z0:z1].transpose(1, 2, 0)                   # H x W x n: cropped in one go
    if roi2 is not None:
        win, region = windows(roi2, (H, W), crop_pixels(info, vol.spacing[1:]))
    else:
        win = region = (0, 0, H, W)
    fill = info.get("pad_hu", float(vol.hu.min()))
    cut = crop(stack, win, fill)
    crops = [normalise_crop(cut[:, :, i], info, hu=True) for i in range(z1 - z0)]
    if vol.source == "dicom":
        check_modality(seg.plan.manifest, vol.modality, vol.path, allow_modality)
    results = seg.segment(crops, options, warn_whole_image=roi2 is None)
    kk = results[0].k
    out = VolumeResult(masks=np.zeros((kk, Z, H, W), bool), mean=np.zeros((Z, H, W), np.float32),
                       confidence=np.zeros((Z, H, W), np.float32), consensus=np.zeros((Z, H, W), bool),
                       slices=(z0, z1), roi=None, seed=results[0].seed, steps=results[0].steps,
                       eta=results[0].eta, timings=results[0].timings, solver=results[0].solver,
                       views=results[0].views, timesteps=results[0].timesteps, threshold=results[0].threshold)
    for z, r in zip(range(z0, z1), results):
        r = paste(r, win, region, (H, W))
        out.masks[:, z], out.mean[z], out.confidence[z], out.consensus[z] = r.masks, r.mean, r.confidence, r.consensus
        out.roi = r.roi if roi2 is not None else None
    return out


# ---- writing ----------------------------------------------------------------------------------
def save_nifti_outputs(d, vr: VolumeResult, vol: Volume) -> list[Path]:
    """``mean``, ``confidence``, ``consensus`` and ``masks`` (4-D, last axis = hypothesis) as
    NIfTI in the volume's geometry (its affine; axes x, y, z)."""
    nib = require("nibabel", "writing NIfTI outputs")
    if vol.source == "dicom" and vol.positions is None:
        raise InputError(f"{vol.path}: slices without ImagePositionPatient: their positions, and so a NIfTI "
                         "affine, are unknown; use result.npz (masks by slice) or give a complete series")
    if not vol.regular:
        raise InputError(f"{vol.path}: irregular slice positions (accepted with accept_irregular) cannot be held by "
                         "a NIfTI affine; use result.npz (it keeps every slice's position) or DICOM SEG")
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    axes = vol.affine[:3, :3] / np.linalg.norm(vol.affine[:3, :3], axis=0)
    orthogonal = bool(np.abs(axes.T @ axes - np.eye(3)).max() < 1e-4)
    if not orthogonal:   # a gantry tilt: a qform cannot hold the shear, and some viewers read only the qform
        log.warning("msld_sdk: %s: tilted (sheared) slice geometry: the NIfTI's sform holds it, its qform is left "
                    "unset (code 0); viewers that ignore the sform misplace the masks, DICOM SEG does not",
                    vol.path)
    xyz = lambda a: np.ascontiguousarray(a.transpose(2, 1, 0))
    files = []
    for name, a in (("mean", vr.mean), ("confidence", vr.confidence), ("consensus", vr.consensus.astype(np.uint8)),
                    ("masks", np.stack([xyz(m) for m in vr.masks.astype(np.uint8)], axis=-1))):
        img = nib.Nifti1Image(a if name == "masks" else xyz(a), vol.affine)
        img.set_sform(vol.affine, code=1)                       # scanner coordinates, as the source's
        img.set_qform(vol.affine if orthogonal else None, code=1 if orthogonal else 0)
        img.header.set_xyzt_units("mm")
        files.append(d / f"{name}.nii.gz")
        with atomic_path(files[-1]) as tmp:
            nib.save(img, str(tmp))
    return files
