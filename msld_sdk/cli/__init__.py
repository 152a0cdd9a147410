"""The ``msld`` command line: ``main`` parses and dispatches (``main.py``); the clinical options
(series, volumes, DICOM SEG, Ray) live in ``clinical.py``."""
from .main import main

__all__ = ["main"]
