"""Optional dependencies, imported when first needed, with an error naming the extra to install."""
from __future__ import annotations

import importlib

from .errors import MsldError

EXTRAS = {"pydicom": "dicom", "highdicom": "dicom", "nibabel": "volume", "ray": "ray"}


class MissingExtraError(MsldError, ImportError):
    """An optional dependency is not installed."""


def require(module: str, what: str):
    """Import ``module`` or raise ``MissingExtraError`` saying which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'msld_sdk[{extra}]'" if extra else f"pip install {top}"
        raise MissingExtraError(f"{what} needs {top}, which is not installed ({e}); install it with: {hint}") from None
