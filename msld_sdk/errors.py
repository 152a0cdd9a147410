"""Typed errors: every failure the SDK reports names the problem and, where there is one, the fix.

The CLI maps them to exit codes (docs/outputs.md#errors-and-exit-codes): ``UsageError`` and
``MissingExtraError`` exit 2, every other ``MsldError`` exits 1."""


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


class SeriesGeometryError(InputError):
    """A DICOM series whose slices do not form a regular grid (missing, duplicate or uneven
    positions, mixed orientations): a partial or irregular series."""


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


class UsageError(MsldError, ValueError):
    """An argument of a call or of a command cannot be used as given (e.g. an unknown backend
    name); the CLI exits 2."""


class OutputError(UsageError):
    """An output cannot be written where asked: it would replace an input, a folder where a file
    goes (or the reverse), something msld did not write (without ``--overwrite``), or a place
    that cannot be created or written. Raised before any work starts."""


class BatchError(MsldError):
    """Some inputs of a batch failed; the others were written. The message lists the failures."""
