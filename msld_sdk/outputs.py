"""Segment one input and write its outputs: the one place ``msld segment`` (images, series,
volumes, DICOM SEG) and the Ray workers (``clinical.batch_ray``) do it.

An image gives PNGs (``visualize.save_result_pngs``); a DICOM series folder, DICOM file or NIfTI
volume gives NIfTI (``clinical.volume.save_nifti_outputs``) and optionally DICOM SEG;
``result.npz`` holds the exact arrays; every file goes to a temporary name and is renamed
(``writing``). Each input's kind is told apart by itself (``input_kind``: a folder of PNGs is
read as images, one of DICOM files as a series). Callers choose names, seeds and what they print.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, UsageError
from .writing import atomic_path

log = logging.getLogger("msld_sdk")

NPZ_KINDS = (None, "arrays", "geometry")
NIFTI_KINDS = ("required", "if_installed")
# a file with one of these suffixes in a folder makes it a folder of images (unless it holds DICOM)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".npy")


@dataclass
class Written:
    """What ``segment_and_write`` did for one input."""
    path: str
    out_dir: Path
    result: object               # SegmentationResult (image) or VolumeResult (series, volume)
    volume: object = None        # the loaded Volume; None for an image
    files: list = field(default_factory=list)   # written, as the CLI names them

    @property
    def is_volume(self) -> bool:
        return self.volume is not None


def output_names(paths, whole_suffix=True) -> list[str]:
    """One output folder name per input, unique: its file name without everything after the first
    dot (``ct.nii.gz`` -> ``ct``), or with ``whole_suffix=False`` without the last suffix only (how
    ``msld segment`` names images; one bool per path, or one for all). When names repeat, the names of as many parent folders as
    needed go in front (``a/x.png``, ``b/x.png`` -> ``a_x``, ``b_x``); the same path twice gets
    ``_2``, ``_3``, ... after its second and later uses."""
    paths = [str(p) for p in paths]
    whole = whole_suffix if isinstance(whole_suffix, (list, tuple)) else [whole_suffix] * len(paths)
    stems = [Path(p.rstrip("/")).name.split(".")[0] if w else Path(p).stem for p, w in zip(paths, whole)]
    if len(set(stems)) == len(stems):
        return stems
    parents = [Path(os.path.abspath(p)).parent.parts[1:][::-1] for p in paths]   # nearest first
    depth = max(len(q) for q in parents)
    names = stems
    for n in range(1, depth + 1):
        names = ["_".join([*q[:n][::-1], s]) for q, s in zip(parents, stems)]
        if len(set(names)) == len(names):
            return names
    seen: dict = {}
    unique = []
    for name in names:                  # the same path more than once
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return unique


def input_kind(path) -> str:
    """What one input is, told apart per input: "volume" (a NIfTI file), "series" (a DICOM file,
    or a folder holding DICOM files or no images), "images" (a folder of image files and no DICOM:
    each is segmented as an image) or "image" (anything else: a picture or NPY file)."""
    from .clinical.volume import NIFTI_SUFFIXES
    from .image_input import _is_dicom

    p = Path(path)
    if str(p).lower().endswith(NIFTI_SUFFIXES):
        return "volume"
    if p.is_dir():
        files = [f for f in sorted(p.iterdir()) if f.is_file() and not f.name.startswith(".")]
        if any(f.suffix.lower() in IMAGE_SUFFIXES for f in files) and not any(_is_dicom(f) for f in files):
            return "images"
        return "series"
    return "series" if p.is_file() and _is_dicom(p) else "image"


def expand_inputs(paths) -> list[tuple[str, str]]:
    """``(path, kind)`` per input (``input_kind``), a folder of images replaced by its image files
    (sorted by name), each of kind "image"."""
    out = []
    for p in paths:
        kind = input_kind(p)
        if kind == "images":
            out += [(str(f), "image") for f in sorted(Path(p).iterdir())
                    if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES]
        else:
            out.append((str(p), kind))
    return out


def segment_and_write(seg, path, out_dir, *, k=None, steps=None, seed=None, eta: float | None = None, views=None,
                      solver=None, timesteps=None,
                      roi=None, slices=None, volume: bool | None = None, npz: str | None = "arrays",
                      nifti: str = "required", dicom_seg=None, threshold: float | None = None, allow_modality=False,
                      accept_irregular: bool = False) -> Written:
    """Segment ``path`` with ``seg`` (a ``Segmenter``) and write its outputs into ``out_dir``.

    volume:    True: read ``path`` as a series or volume (``clinical.volume.load_volume``); False:
               as an image; None: as ``input_kind`` tells (a folder of images is refused: give its
               files, ``expand_inputs``).
    roi, slices: as ``Segmenter.run`` / ``segment_volume`` (``slices`` for volumes only).
    npz:       ``result.npz``: None = none, "arrays" = masks, mean, confidence, consensus,
               "geometry" = those and, for a volume, slices, affine and seed.
    nifti:     a volume's NIfTI: "required" (fails without nibabel) or "if_installed".
    dicom_seg: a volume's DICOM SEG file (``clinical.dicom_seg.write_dicom_seg``), or None.
    allow_modality, accept_irregular: the input checks' overrides (docs/input_contract.md).
    """
    if npz not in NPZ_KINDS or nifti not in NIFTI_KINDS:
        raise UsageError(f"npz must be one of {NPZ_KINDS} and nifti one of {NIFTI_KINDS}, got {npz!r}, {nifti!r}")
    run_kw = dict(k=k, steps=steps, seed=seed, eta=eta, views=views, allow_modality=allow_modality, solver=solver,
                  timesteps=timesteps)
    if threshold is not None:
        run_kw["threshold"] = threshold
    d = Path(out_dir)
    if volume is None:
        kind = input_kind(path)
        if kind == "images":
            raise InputError(f"{path} is a folder of images; segment each of its files (outputs.expand_inputs)")
        volume = kind != "image"
    if not volume:
        return _image(seg, path, d, roi, run_kw, npz)
    return _volume(seg, path, d, roi, slices, run_kw, npz, nifti, dicom_seg, accept_irregular)


def _image(seg, path, d: Path, roi, run_kw: dict, npz) -> Written:
    from .image_input import load_image
    from .visualize import save_result_pngs

    r = seg.run(path, roi=roi, **run_kw)
    save_result_pngs(d, r, load_image(path))
    w = Written(str(path), d, r)
    if npz is not None:
        with atomic_path(d / "result.npz") as tmp:
            np.savez_compressed(tmp, masks=r.masks, mean=r.mean, confidence=r.confidence, consensus=r.consensus)
        w.files.append("result.npz")
    return w


def _volume(seg, path, d: Path, roi, slices, run_kw: dict, npz, nifti: str, dicom_seg,
            accept_irregular: bool = False) -> Written:
    import importlib.util

    from .clinical.volume import load_volume, save_nifti_outputs, segment_volume

    vol = load_volume(path, accept_irregular=accept_irregular)
    vr = segment_volume(seg, vol, roi=roi, slices=slices, **run_kw)
    d.mkdir(parents=True, exist_ok=True)
    w = Written(str(path), d, vr, vol)
    nii = []
    if nifti == "required" or (vol.regular and importlib.util.find_spec("nibabel") is not None):
        nii = save_nifti_outputs(d, vr, vol)      # before result.npz: no arrays without the NIfTI
    elif vol.regular:   # "if_installed" without nibabel: say so, the user may expect the NIfTI files
        log.warning("msld_sdk: %s: no NIfTI outputs: nibabel is not installed (pip install nibabel, or the "
                    "[volume] extra); the other outputs are written", path)
    if npz is not None:
        extra = {} if npz == "arrays" else dict(slices=np.array(vr.slices), seed=vr.seed)
        if npz != "arrays" and vol.regular:   # an irregular series has no one affine: `positions` below
            extra["affine"] = vol.affine
        if npz != "arrays" and vol.positions is not None:
            extra["positions"] = vol.positions      # each slice's true ImagePositionPatient (LPS mm)
        with atomic_path(d / "result.npz") as tmp:
            np.savez_compressed(tmp, masks=vr.masks, mean=vr.mean, confidence=vr.confidence,
                                consensus=vr.consensus, **extra)
        w.files.append("result.npz")
    w.files += [f.name for f in nii]
    if dicom_seg:
        from .clinical.dicom_seg import write_dicom_seg
        w.files += [str(f) for f in write_dicom_seg(dicom_seg, vr, vol, seg.plan.manifest)]
    return w
