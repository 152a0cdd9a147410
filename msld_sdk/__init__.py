"""msld_sdk: MedSegLatDiff inference. ``Segmenter(plan).run(img, k=8)`` -> k masks, mean, confidence."""
__version__ = "0.1.0"

from . import _moved  # noqa: E402  (old module paths, with a deprecation warning)

_moved.install()

from .errors import (BackendUnavailableError, InputError, MsldError, PlanError, PlanFormatError,  # noqa: E402
                     PlanIntegrityError, PlanNotFoundError, PlanVersionError, PrecisionUnavailableError)
from .result import SegmentationResult  # noqa: E402
from .segmenter import Segmenter  # noqa: E402

__all__ = ["Segmenter", "SegmentationResult", "MsldError", "PlanError", "PlanFormatError", "PlanIntegrityError",
           "PlanNotFoundError", "PlanVersionError", "InputError", "BackendUnavailableError", "PrecisionUnavailableError",
           "__version__"]
