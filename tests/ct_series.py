"""A synthetic CT series with known geometry, written with pydicom (for the series/SEG tests)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

SPACING = (0.7, 0.7)          # row, column spacing in mm
THICKNESS = 2.5
ORIGIN = (-150.0, -170.0, -300.0)
SLOPE, INTERCEPT = 1.0, -1024.0


def phantom(n_slices=8, rows=200, cols=220, nodule=(120, 90, 4), radius=7.0, seed=0) -> np.ndarray:
    """Z x H x W Hounsfield units: lung (-850) in soft tissue (+40), a spherical nodule (+30)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:n_slices, :rows, :cols].astype(np.float32)
    hu = np.full((n_slices, rows, cols), 40.0, np.float32)
    hu[((y - rows / 2) / (rows * 0.42)) ** 2 + ((x - cols / 2) / (cols * 0.42)) ** 2 < 1] = -850.0
    cx, cy, cz = nodule
    d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + ((z - cz) * THICKNESS / SPACING[0]) ** 2)
    hu[d < radius] = 30.0
    return hu + rng.normal(0, 15, hu.shape).astype(np.float32)


def write_series(folder: Path, hu: np.ndarray, shuffle_names: bool = True, prefix: str = "IM", modality: str = "CT",
                 study: str | None = None) -> list:
    """One CT Image Storage file per slice; file names deliberately not in position order.
    Returns the datasets in position order."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = study or generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(1).permutation(len(hu)) if shuffle_names else np.arange(len(hu))
    out = []
    for z in range(len(hu)):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "PHANTOM1", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "", modality, 1, int(order[z]) + 1
        ds.Manufacturer = "test"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [ORIGIN[0], ORIGIN[1], ORIGIN[2] + z * THICKNESS]
        ds.PixelSpacing, ds.SliceThickness = list(SPACING), THICKNESS
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = SLOPE, INTERCEPT, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        stored = np.clip(np.round((hu[z] - INTERCEPT) / SLOPE), 0, 65535).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        pydicom.dcmwrite(str(folder / f"{prefix}{order[z]:04d}.dcm"), ds, enforce_file_format=True)
        out.append(ds)
    return out
