"""DICOM Segmentation output (highdicom), referencing the source series.

A Segmentation instance holds segments of one type only (BINARY or FRACTIONAL), so a result
is written as **two instances of one new series**:

* ``OUT.dcm`` (BINARY): segment 1 = the consensus (majority of the k hypotheses), segments
  2 .. k+1 = hypothesis 1 .. k, each its own segment, so a viewer can step through them;
* ``OUT_mean.dcm`` (FRACTIONAL, PROBABILITY, 8 bits): the mean foreground probability,
  stored as round(mean x 255) / 255 (a difference of at most 1/510 from the in-memory mean).

Keeping the mean as a probability rather than thresholding it into a third binary segment is
the reason for the second instance: the mean is what carries the model's uncertainty.
Empty frames are omitted (highdicom's default); readers fill them with zeros.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import __version__
from ..errors import InputError
from ..extras import require
from ..writing import atomic_path

FRACTIONAL_SUFFIX = "_mean"


def mean_path(out: str | Path) -> Path:
    """Where the FRACTIONAL (mean probability) instance goes for binary instance ``out``."""
    out = Path(out)
    stem = out.name[:-4] if out.name.lower().endswith(".dcm") else out.name
    return out.with_name(stem + FRACTIONAL_SUFFIX + ".dcm")


def _property_type(model_name: str):
    from pydicom.sr.codedict import codes
    return codes.SCT.Nodule if model_name.lower().startswith("lidc") else codes.SCT.Lesion


def write_dicom_seg(out: str | Path, result, volume, manifest: dict, series_uid: str | None = None,
                    sop_uids=None, series_description: str | None = None) -> list[Path]:
    """Write ``result`` (a ``VolumeResult``) of DICOM series ``volume`` as two SEG instances
    (see the module docstring); returns their paths. ``series_uid`` / ``sop_uids`` (two): fixed
    UIDs (a PACS store that must not duplicate); default new ones."""
    hd = require("highdicom", "writing DICOM SEG")
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    if volume.source != "dicom" or not volume.datasets:
        raise InputError("DICOM SEG output needs a DICOM series as input (it references the source instances); "
                         "this input is " + volume.source)
    if volume.positions is None:
        raise InputError(f"{volume.path}: slices without ImagePositionPatient: a DICOM SEG needs every slice's "
                         "position; give a complete series")
    if len({tuple(np.round(p, 3)) for p in volume.positions}) < len(volume.positions):
        raise InputError(f"{volume.path}: two slices share one position (accepted with accept_irregular); a DICOM "
                         "SEG cannot hold two frames at one position: remove the duplicate slices, or use "
                         "result.npz")
    model = manifest.get("model", {}).get("name", "model")
    algo = hd.AlgorithmIdentificationSequence(
        name=f"MedSegLatDiff {model}", family=codes.cid7162.ArtificialIntelligence, version=__version__,
        parameters={"k": str(result.k), "steps": str(result.steps), "seed": str(result.seed), "eta": str(result.eta)})
    prop = _property_type(model)

    def describe(number, label):
        return hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=prop, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo)

    series_uid = series_uid or generate_uid()
    sop_uids = list(sop_uids) if sop_uids is not None else [generate_uid(), generate_uid()]
    extra = {"series_description": series_description} if series_description else {}
    common = dict(source_images=volume.datasets, series_instance_uid=series_uid, series_number=9001,
                  manufacturer="msld_sdk", manufacturer_model_name=f"MedSegLatDiff {model}",
                  software_versions=__version__, device_serial_number="none", **extra)
    binary = np.concatenate([result.consensus[..., None], np.moveaxis(result.masks, 0, -1)], axis=-1)
    segs = [describe(1, "consensus")] + [describe(i + 2, f"hypothesis {i + 1}") for i in range(result.k)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    b = hd.seg.Segmentation(pixel_array=binary.astype(np.uint8), segmentation_type="BINARY",
                            segment_descriptions=segs, sop_instance_uid=sop_uids[0], instance_number=1,
                            content_description=f"consensus and {result.k} hypotheses", **common)
    with atomic_path(out) as tmp:
        b.save_as(str(tmp))
    f = hd.seg.Segmentation(pixel_array=result.mean.astype(np.float32), segmentation_type="FRACTIONAL",
                            fractional_type="PROBABILITY", max_fractional_value=255,
                            segment_descriptions=[describe(1, "mean probability")], sop_instance_uid=sop_uids[1],
                            instance_number=2, content_description=f"mean of {result.k} hypotheses", **common)
    mp = mean_path(out)
    with atomic_path(mp) as tmp:
        f.save_as(str(tmp))
    return [out, mp]
