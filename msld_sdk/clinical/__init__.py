"""Clinical I/O: CT series and NIfTI volumes, DICOM SEG output, and archives through Ray."""
