"""Typed errors: every failure the SDK reports names the problem and, where there is one, the fix."""


class MsldError(Exception):
    """Base class of every error msld_sdk raises on purpose."""


class PlanError(MsldError):
    """A plan file cannot be used."""


class PlanNotFoundError(PlanError, FileNotFoundError):
    """The plan path does not exist (or names no shipped model)."""


class PlanFormatError(PlanError):
    """The file is not a plan, or is truncated or malformed."""


class PlanIntegrityError(PlanError):
    """A blob inside the plan does not match the sha256 recorded in its manifest."""


class PlanVersionError(PlanError):
    """The plan was written by a newer, incompatible format version."""


class InputError(MsldError, ValueError):
    """An image or an argument given to ``Segmenter.run`` cannot be used."""


class PrecisionUnavailableError(MsldError, ValueError):
    """The requested precision (e.g. int8) is not in this plan or not supported by the backend."""


class BackendUnavailableError(MsldError, RuntimeError):
    """An explicitly requested backend cannot run here (missing package, GPU or engine)."""


class MissingExtraError(MsldError, ImportError):
    """A command or metric needs an optional part of msld_sdk that is not installed; the message
    names the extra, e.g. ``pip install 'msld_sdk[export]'``."""


class CheckpointError(MsldError, ValueError):
    """A training checkpoint cannot be imported: not a checkpoint, damaged, of another model,
    or holding something the restricted reader refuses (it never executes code from the file)."""


class PacsError(MsldError, RuntimeError):
    """A PACS (DICOMweb server or DICOM node) request failed or returned something unusable; the
    message names the server, the request and the status, and never a credential."""
