"""Segment one input and write its outputs: the one place ``msld segment`` (images, series,
volumes, DICOM SEG) and the Ray workers (``clinical.batch_ray``) do it.

An image gives PNGs (``visualize.save_result_pngs``); a DICOM series folder, DICOM file or NIfTI
volume gives NIfTI (``clinical.volume.save_nifti_outputs``) and optionally DICOM SEG;
``result.npz`` holds the exact arrays. Callers choose names, seeds and what they print.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NPZ_KINDS = (None, "arrays", "geometry")
NIFTI_KINDS = ("required", "if_installed")


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


def output_names(paths, whole_suffix: bool = True) -> list[str]:
    """One output folder name per input: its file name without everything after the first dot
    (``ct.nii.gz`` -> ``ct``), or with ``whole_suffix=False`` without the last suffix only (how
    ``msld segment`` names images); the parent folder's name goes in front when names repeat."""
    if whole_suffix:
        stems = [Path(str(p).rstrip("/")).name.split(".")[0] for p in paths]
    else:
        stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{Path(p).parent.name}_{s}" for p, s in zip(paths, stems)]


def segment_and_write(seg, path, out_dir, *, k=None, steps=None, seed=None, eta: float = 0.0, views=None,
                      roi=None, slices=None, volume: bool | None = None, npz: str | None = "arrays",
                      nifti: str = "required", dicom_seg=None, allow_modality=False,
                      accept_irregular: bool = False) -> Written:
    """Segment ``path`` with ``seg`` (a ``Segmenter``) and write its outputs into ``out_dir``.

    volume:    True: read ``path`` as a series or volume (``clinical.volume.load_volume``); False:
               as an image; None: a folder or NIfTI file is a volume, anything else an image.
    roi, slices: as ``Segmenter.run`` / ``segment_volume`` (``slices`` for volumes only).
    npz:       ``result.npz``: None = none, "arrays" = masks, mean, confidence, consensus,
               "geometry" = those and, for a volume, slices, affine and seed.
    nifti:     a volume's NIfTI: "required" (fails without nibabel) or "if_installed".
    dicom_seg: a volume's DICOM SEG file (``clinical.dicom_seg.write_dicom_seg``), or None.
    allow_modality, accept_irregular: the input checks' overrides (docs/input_contract.md).
    """
    from .clinical.volume import is_volume_input

    if npz not in NPZ_KINDS or nifti not in NIFTI_KINDS:
        raise ValueError(f"npz must be one of {NPZ_KINDS} and nifti one of {NIFTI_KINDS}, got {npz!r}, {nifti!r}")
    run_kw = dict(k=k, steps=steps, seed=seed, eta=eta, views=views, allow_modality=allow_modality)
    d = Path(out_dir)
    if volume is None:
        volume = is_volume_input(path)
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
        np.savez_compressed(d / "result.npz", masks=r.masks, mean=r.mean, confidence=r.confidence,
                            consensus=r.consensus)
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
    if npz is not None:
        extra = {} if npz == "arrays" else dict(slices=np.array(vr.slices), affine=vol.affine, seed=vr.seed)
        if npz != "arrays" and vol.positions is not None:
            extra["positions"] = vol.positions      # each slice's true ImagePositionPatient (LPS mm)
        np.savez_compressed(d / "result.npz", masks=vr.masks, mean=vr.mean, confidence=vr.confidence,
                            consensus=vr.consensus, **extra)
        w.files.append("result.npz")
    w.files += [f.name for f in nii]
    if dicom_seg:
        from .clinical.dicom_seg import write_dicom_seg
        w.files += [str(f) for f in write_dicom_seg(dicom_seg, vr, vol, seg.plan.manifest)]
    return w
