"""Writing outputs without destroying anything: the output rule of docs/outputs.md.

A file is written to a temporary name in its final folder and renamed into place
(``atomic_path``); an output folder is built beside its final place and swapped in whole
(``OutputFolder``), so no stale file of an earlier run survives. Before any work,
``check_output_file`` and ``check_output_folder`` apply the one rule: an output never replaces
an input, a folder never replaces a file nor a file a folder, and an existing output is replaced
whole when msld wrote it (``is_msld_file``, ``is_msld_folder``), otherwise refused unless
``overwrite``. Missing parent folders are created; a place that cannot be created or written is
refused then, with an ``OutputError``. Temporary names start with ``TMP_PREFIX`` and are
removed on every failure that Python sees.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

TMP_PREFIX = ".msld-tmp-"

# what msld writes into an output folder (msld segment, its series route, Ray items and jobs)
OUTPUT_FILE_NAMES = re.compile(r"mask_\d+\.png|mean\.png|consensus\.png|confidence\.png|overlay\.png|result\.npz|"
                               r"(mean|confidence|consensus|masks)\.nii\.gz|seg\.dcm|seg_mean\.dcm|(done|error|job|summary)\.json|"
                               r"tune\.(txt|json|png)|"   # msld tune
                               + re.escape(TMP_PREFIX) + r".*")


def tmp_path_for(final: Path) -> Path:
    """A fresh temporary name beside ``final`` that keeps its suffixes (writers pick formats by them)."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{final.name}")


def remove(p: Path) -> None:
    """Remove a file or folder if it is there (temporaries on failure)."""
    p = Path(p)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        try:
            p.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def atomic_path(final):
    """Yield a temporary path beside ``final``; when the block ends without an error it is renamed
    to ``final`` (a reader sees the old file or the whole new one), otherwise removed."""
    final = Path(final)
    tmp = tmp_path_for(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        remove(tmp)
        raise


def write_bytes(final, data: bytes) -> None:
    with atomic_path(final) as tmp:
        Path(tmp).write_bytes(data)


def write_text(final, text: str) -> None:
    write_bytes(final, text.encode())


class OutputFolder:
    """An output folder built at ``self.path`` beside ``final`` and swapped in whole by ``commit``
    (the old folder, if any, moved aside, the new one renamed in, the old one removed); ``discard``
    removes it and leaves ``final`` as it was. As a context manager: commit unless the block raises."""

    def __init__(self, final):
        self.final = Path(final)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.path = tmp_path_for(self.final)
        self.path.mkdir()

    def commit(self) -> Path:
        old = None
        if self.final.exists() or self.final.is_symlink():
            old = tmp_path_for(self.final)
            os.rename(self.final, old)
        try:
            os.rename(self.path, self.final)
        except BaseException:
            if old is not None:
                os.rename(old, self.final)
            self.discard()
            raise
        if old is not None:
            remove(old)
        return self.final

    def discard(self) -> None:
        remove(self.path)

    def __enter__(self) -> "OutputFolder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


# ---- what msld wrote -------------------------------------------------------------------------
def is_msld_file(p) -> bool:
    """Whether file ``p`` is one msld writes: a plan, a JSON report of ``msld eval``/``bench`` (an
    object with a ``plan`` key), or a DICOM SEG whose manufacturer is msld_sdk."""
    p = Path(p)
    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as zf:
                return json.loads(zf.read("manifest.json")).get("format") == "msld-plan"
        if p.suffix.lower() == ".json":
            obj = json.loads(p.read_text())
            return isinstance(obj, dict) and "plan" in obj
        if p.suffix.lower() in (".dcm", ".dicom"):
            import pydicom
            ds = pydicom.dcmread(str(p), stop_before_pixels=True)
            return ds.get("Modality") == "SEG" and ds.get("Manufacturer") == "msld_sdk"
    except Exception:   # unreadable, not ours, or pydicom missing: not msld's
        return False
    return False


def _foreign(d: Path, depth: int = 0):
    """The first entry of folder ``d`` that msld does not write, or None."""
    for q in sorted(d.iterdir()):
        if q.is_symlink():
            return q
        if q.is_dir():
            bad = q if depth >= 2 else _foreign(q, depth + 1)
            if bad is not None:
                return bad
        elif not OUTPUT_FILE_NAMES.fullmatch(q.name):
            return q
    return None


def is_msld_folder(d) -> bool:
    """Whether folder ``d`` holds only what msld writes (its PNGs, ``result.npz``, NIfTI, JSON
    records, and folders of those); an empty folder counts."""
    return Path(d).is_dir() and _foreign(Path(d)) is None


# ---- the rule, applied before any work -------------------------------------------------------
def _same(a: Path, b) -> bool:
    b = Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def _writable_folder(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the folder {folder} for {what}: {e.strerror or e}; "
                          "choose a place you can write") from None
    probe = tmp_path_for(folder / "probe")
    try:
        probe.write_bytes(b"")
    except OSError as e:
        raise OutputError(f"cannot write in {folder} for {what}: {e.strerror or e}; "
                          "choose a place you can write") from None
    finally:
        remove(probe)


def check_output_file(out, inputs=(), overwrite: bool = False, what: str = "--out") -> Path:
    """Apply the output rule to file ``out`` before any work; returns it as a Path."""
    p = Path(out)
    for i in inputs:
        if i is not None and _same(p, i):
            raise OutputError(f"{what} {out} is an input ({i}); msld never writes over an input: "
                              f"choose another {what}")
    if p.is_dir():
        raise OutputError(f"{what} {out} is a folder; {what} names a file, e.g. {p / ('out' + (p.suffix or '.plan'))}")
    if p.exists() and not overwrite and not is_msld_file(p):
        raise OutputError(f"{what} {out} exists and msld did not write it; pass --overwrite to replace it, "
                          f"or choose another {what}")
    _writable_folder(p.parent, f"{what} {out}")
    return p


def check_output_folder(out, inputs=(), overwrite: bool = False, what: str = "-o/--out") -> Path:
    """Apply the output rule to folder ``out`` before any work; returns it as a Path."""
    p = Path(out)
    r = p.resolve()
    if p.exists() and not p.is_dir():
        raise OutputError(f"{what} {out} is a file; {what} names a folder (msld writes one folder of outputs): "
                          f"choose another {what}")
    for i in inputs:
        ri = Path(i).resolve()
        if ri == r or r in ri.parents:
            raise OutputError(f"{what} {out} holds the input {i}; replacing it would delete the input: "
                              f"choose another {what}")
    cwd = Path.cwd().resolve()
    if r == cwd or r in cwd.parents:
        raise OutputError(f"{what} {out} is the current folder or holds it; choose a new folder, e.g. {p / 'msld_out'}")
    if p.is_dir() and not overwrite:
        bad = _foreign(p)
        if bad is not None:
            raise OutputError(f"{what} {out} holds files msld did not write (e.g. {bad.name}); msld replaces an "
                              f"output folder whole: pass --overwrite to replace it, or choose another {what}")
    _writable_folder(p.parent, f"{what} {out}")
    return p
