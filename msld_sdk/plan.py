"""The plan file: one uncompressed zip holding ``manifest.json`` and the model's blobs.

Layout::

    manifest.json              format, model config, schedule, input spec, defaults, blobs, provenance
    graphs/encoder.onnx        image -> image latent
    graphs/denoiser.onnx       (noisy latent, timestep, image latent) -> noise
    graphs/decoder.onnx        mask latent -> foreground probability
    engines/<key>/<part>.engine   TensorRT engines, added later by ``msld build``

Reading never executes code (zip + JSON only), every blob is checked against the sha256 in
the manifest before use, and every failure raises a ``PlanError`` subclass naming the file
and the problem.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .checksums import sha256_bytes  # noqa: F401  (re-exported: msld_sdk.plan.sha256_bytes)
from .errors import PlanFormatError, PlanIntegrityError, PlanNotFoundError, PlanVersionError
from .writing import atomic_path

FORMAT_NAME = "msld-plan"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 4 << 20          # a manifest is a few KB; refuse anything absurd
MAX_BLOB_BYTES = 2 << 30
GRAPH_PARTS = ("encoder", "denoiser", "decoder")
PRECISIONS = ("fp32", "int8")
INT8_KEY = "int8"   # manifest entry of the optional int8 denoiser (added by msld_export.plan_writing.quantize_int8)
# DDIM timestep spacings the native loop knows (msld.h msld_spacing): diffusers' leading and
# trailing, and linspace_trunc, the MedSegLatDiff reference sampler's rule (imported plans).
SPACINGS = ("leading", "trailing", "linspace_trunc")
# Solvers a plan's defaults.solver may name (msld_sdk.sampling runs them; "ddim" when absent).
SOLVERS = ("ddim", "dpmpp2m")
REQUIRED_KEYS = ("format", "format_version", "model", "schedule", "input", "latent", "defaults", "blobs")


@dataclass
class Plan:
    """A validated plan: its manifest and the verified bytes of its blobs."""

    path: str
    manifest: dict
    _blobs: dict = field(default_factory=dict, repr=False)

    # ---- reading -----------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, verify: bool = True) -> "Plan":
        p = Path(path)
        if not p.exists():
            raise PlanNotFoundError(f"plan file not found: {p}")
        if p.is_dir():
            raise PlanFormatError(f"{p}: is a directory, not a plan file")
        try:
            zf = zipfile.ZipFile(p)
        except zipfile.BadZipFile as e:
            raise PlanFormatError(
                f"{p}: not a plan file (not a zip container, or truncated: {e}); "
                "make plans with `msld export`") from e
        except OSError as e:
            raise PlanFormatError(f"{p}: cannot be read: {e}") from e
        with zf:
            manifest = cls._read_manifest(zf, p)
            blobs = {}
            for name, entry in manifest["blobs"].items():
                blobs[name] = cls._read_blob(zf, p, name, entry, verify)
        return cls(str(p), manifest, blobs)

    @staticmethod
    def _read_manifest(zf: zipfile.ZipFile, p: Path) -> dict:
        try:
            info = zf.getinfo(MANIFEST_NAME)
        except KeyError:
            raise PlanFormatError(f"{p}: not a plan file (zip has no {MANIFEST_NAME})") from None
        if info.file_size > MAX_MANIFEST_BYTES:
            raise PlanFormatError(f"{p}: manifest is {info.file_size} bytes, over the {MAX_MANIFEST_BYTES} limit")
        try:
            raw = zf.read(info)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise PlanFormatError(f"{p}: manifest cannot be read (truncated or damaged file?): {e}") from e
        try:
            m = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PlanFormatError(f"{p}: manifest is not valid JSON: {e}") from e
        if not isinstance(m, dict) or m.get("format") != FORMAT_NAME:
            raise PlanFormatError(f"{p}: not an msld plan (manifest 'format' is not {FORMAT_NAME!r})")
        version = m.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise PlanFormatError(f"{p}: manifest 'format_version' must be an integer")
        if version > FORMAT_VERSION:
            raise PlanVersionError(
                f"{p}: plan format version {version} is newer than this msld_sdk supports "
                f"({FORMAT_VERSION}); upgrade msld_sdk or re-export the plan")
        if version < 1:
            raise PlanFormatError(f"{p}: invalid plan format version {version}")
        missing = [k for k in REQUIRED_KEYS if k not in m]
        if missing:
            raise PlanFormatError(f"{p}: manifest lacks {missing}")
        if not isinstance(m["blobs"], dict):
            raise PlanFormatError(f"{p}: manifest 'blobs' must be an object")
        for part in GRAPH_PARTS:
            if part not in m["blobs"]:
                raise PlanFormatError(f"{p}: manifest names no '{part}' graph")
        _validate_manifest_values(m, p)
        return m

    @staticmethod
    def _read_blob(zf: zipfile.ZipFile, p: Path, name: str, entry: Any, verify: bool) -> bytes:
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) \
                or not isinstance(entry.get("sha256"), str):
            raise PlanFormatError(f"{p}: manifest entry for blob '{name}' needs 'path' and 'sha256'")
        try:
            info = zf.getinfo(entry["path"])
        except KeyError:
            raise PlanFormatError(f"{p}: blob '{name}' ({entry['path']}) is missing from the file") from None
        if info.file_size > MAX_BLOB_BYTES:
            raise PlanFormatError(f"{p}: blob '{name}' is {info.file_size} bytes, over the limit")
        try:
            data = zf.read(info)
        except zipfile.BadZipFile as e:  # zip's own CRC check: the bytes changed
            raise PlanIntegrityError(f"{p}: blob '{name}' is damaged ({e}); the file was modified or "
                                     "corrupted - re-download or re-export it") from e
        except (OSError, EOFError, ValueError, zipfile.LargeZipFile) as e:
            raise PlanFormatError(f"{p}: blob '{name}' cannot be read (truncated file?): {e}") from e
        if verify and sha256_bytes(data) != entry["sha256"]:
            raise PlanIntegrityError(
                f"{p}: blob '{name}' fails its sha256 check (expected {entry['sha256'][:12]}..., "
                f"got {sha256_bytes(data)[:12]}...); the file was modified or corrupted")
        return data

    # ---- access ------------------------------------------------------------------------------
    def blob(self, name: str) -> bytes:
        try:
            return self._blobs[name]
        except KeyError:
            raise PlanFormatError(f"{self.path}: has no blob '{name}' (it has {sorted(self._blobs)})") from None

    def blob_names(self) -> list[str]:
        return sorted(self._blobs)

    def denoiser_blob(self, precision: str = "fp32") -> str:
        """Name of the denoiser blob for ``precision`` ("fp32" or "int8")."""
        from .errors import PrecisionUnavailableError
        if precision not in PRECISIONS:
            raise PrecisionUnavailableError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if precision == "fp32":
            return "denoiser"
        name = (self.manifest.get(INT8_KEY) or {}).get("denoiser")
        if name not in self._blobs:
            raise PrecisionUnavailableError(
                f"{self.path}: has no int8 denoiser; add one with "
                f"`python -m msld_export.plan_writing.quantize_int8 {self.path}` or use precision='fp32'")
        return name

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.manifest["input"]["size"]
        return int(h), int(w)

    @property
    def channels(self) -> int:
        return int(self.manifest["input"]["channels"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        lat = self.manifest["latent"]
        return int(lat["channels"]), int(lat["size"][0]), int(lat["size"][1])

    @property
    def condition_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the encoder's output, the denoiser's ``cond`` input: the manifest's optional
        "condition" entry (imported reference plans, whose condition may have more channels than
        the latent), else the latent's shape."""
        c = self.manifest.get("condition")
        return (int(c["channels"]), int(c["size"][0]), int(c["size"][1])) if c else self.latent_shape

    @property
    def graphs_sha256(self) -> str:
        """One checksum of the fp32 graphs (encoder, denoiser, decoder): the model itself. It stays
        when only metadata, defaults or an int8 graph are added, and changes with a new model."""
        parts = [f"{n}:{self.manifest['blobs'][n]['sha256']}" for n in GRAPH_PARTS]
        return sha256_bytes("\n".join(parts).encode())

    @property
    def defaults(self) -> dict:
        return self.manifest["defaults"]

    def summary(self) -> str:
        """Human-readable manifest digest (for ``msld info``)."""
        m = self.manifest
        lines = [f"plan: {self.path}", f"format: {m['format']} v{m['format_version']}",
                 f"model: {m['model'].get('name')}  input {m['input']['size']} x{m['input']['channels']}ch "
                 f"latent {m['latent']['channels']}x{m['latent']['size']}",
                 f"schedule: T={m['schedule']['num_train_timesteps']} {m['schedule']['spacing']} spacing, "
                 f"{m['schedule']['prediction']}-prediction",
                 f"defaults: {m['defaults']}",
                 f"solver: {m['defaults'].get('solver', 'ddim')} (default; run(solver=...) / --solver: {', '.join(SOLVERS)})"]
        ddim = m["schedule"].get("ddim")
        if isinstance(ddim, dict):  # a named sampler rule (imported reference plans)
            lines.insert(4, f"ddim: rule {ddim.get('rule')}; timesteps {ddim.get('timesteps')}; previous timestep "
                            f"{ddim.get('prev_timestep')}; x0 clip {ddim.get('x0_clip')}")
        for name, e in sorted(m["blobs"].items()):
            lines.append(f"blob {name}: {e['path']} {e.get('size', '?')} bytes sha256 {e['sha256'][:16]}...")
        for k, v in sorted(m.get("provenance", {}).items()):
            lines.append(f"provenance.{k}: {v}")
        return "\n".join(lines)


def _validate_manifest_values(m: dict, p: Path) -> None:
    """Types and ranges of the fields the runtime relies on (a hand-edited manifest fails here)."""
    problem = manifest_values_problem(m)
    if problem is not None:
        raise PlanFormatError(f"{p}: manifest has a missing or invalid field ({problem})")


def manifest_values_problem(m: dict) -> str | None:
    """What is wrong with the values of manifest ``m`` (``_validate_manifest_values``), or None;
    also how a writer checks a manifest before it writes it."""
    try:
        size = m["input"]["size"]
        ch = m["input"]["channels"]
        assert isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and 1 <= s <= 8192 for s in size)
        assert ch in (1, 3)
        assert len(m["input"]["mean"]) == ch and len(m["input"]["std"]) == ch
        assert all(float(s) > 0 for s in m["input"]["std"])
        lat = m["latent"]
        assert isinstance(lat["channels"], int) and lat["channels"] > 0
        assert isinstance(lat["size"], list) and len(lat["size"]) == 2
        for shape in (lat, m.get("condition") or lat):  # the optional condition shape, as the latent's
            assert isinstance(shape["channels"], int) and shape["channels"] > 0
            assert isinstance(shape["size"], list) and len(shape["size"]) == 2
            assert all(isinstance(v, int) and 1 <= v <= 8192 for v in shape["size"])
        sch = m["schedule"]
        T = sch["num_train_timesteps"]
        ac = sch["alphas_cumprod"]
        assert isinstance(T, int) and T >= 1 and isinstance(ac, list) and len(ac) == T
        assert all(isinstance(a, (int, float)) and 0.0 < a < 1.0 for a in ac)
        assert sch["spacing"] in SPACINGS and sch["prediction"] == "epsilon"
        d = m["defaults"]
        assert 1 <= d["k"] <= d["max_k"], f"defaults.k must be from 1 to max_k ({d['max_k']}), got {d['k']!r}"
        assert 1 <= d["steps"] <= T, f"defaults.steps must be from 1 to {T}, got {d['steps']!r}"
        assert type(d.get("views", 1)) is int and 1 <= d.get("views", 1) <= 8, \
            "defaults.views must be an integer from 1 to 8 (msld_sdk.views)"
        solver = d.get("solver", "ddim")
        assert solver in SOLVERS, f"defaults.solver must be one of {SOLVERS}, got {solver!r}"
        assert solver == "ddim" or float(d.get("eta", 0.0)) == 0.0, \
            f"defaults.solver {solver!r} runs with eta 0 only, but defaults.eta is {d.get('eta')!r}"
        assert not (solver == "dpmpp2m" and sch["spacing"] == "leading" and d["steps"] >= T), \
            "defaults.steps must be below num_train_timesteps for dpmpp2m with leading spacing"
        if d.get("timesteps") is not None:   # a tuned grid (msld_sdk.timestep_grids) of the default run
            grid = d["timesteps"]
            assert solver == "dpmpp2m", f"defaults.timesteps is a dpmpp2m grid, but defaults.solver is {solver!r}"
            assert isinstance(grid, list) and len(grid) == d["steps"], \
                f"defaults.timesteps must list defaults.steps ({d['steps']}) timesteps, got {grid!r}"
            assert all(type(t) is int and 0 <= t < T for t in grid) and \
                all(a > b for a, b in zip(grid, grid[1:])), \
                f"defaults.timesteps must be integers in [0, {T}) that strictly decrease, got {grid!r}"
    except AssertionError as e:
        return str(e) or "AssertionError"
    except (KeyError, TypeError, ValueError) as e:
        return f"{type(e).__name__}: {e}"
    return None


# ---- writing ----------------------------------------------------------------------------------
def write_plan(path: str | os.PathLike, manifest: Mapping, blobs: Mapping[str, tuple[str, bytes]]) -> dict:
    """Write a plan. ``blobs`` maps a blob name to (path inside the zip, bytes).

    Fills ``manifest['blobs']`` with each blob's path, size and sha256 and returns the final
    manifest. Written to a temporary file beside ``path`` and renamed (``writing.atomic_path``),
    so a reader never sees half a plan and a failure leaves no temporary file.
    """
    m = json.loads(json.dumps(manifest))  # deep copy, and proves it is plain JSON
    m["format"] = FORMAT_NAME
    m["format_version"] = FORMAT_VERSION
    m["blobs"] = {name: {"path": arc, "size": len(data), "sha256": sha256_bytes(data)}
                  for name, (arc, data) in blobs.items()}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(MANIFEST_NAME, json.dumps(m, indent=1, sort_keys=True))
        for name, (arc, data) in blobs.items():
            zf.writestr(arc, data)
    return m


def add_blobs(plan_path: str | os.PathLike, new_blobs: Mapping[str, tuple[str, bytes]],
              manifest_update: Mapping | None = None, out_path: str | os.PathLike | None = None) -> dict:
    """Rewrite a plan with extra (or replaced) blobs, keeping every existing one."""
    plan = Plan.open(plan_path)
    blobs = {name: (plan.manifest["blobs"][name]["path"], plan.blob(name)) for name in plan.blob_names()}
    blobs.update(new_blobs)
    manifest = dict(plan.manifest)
    if manifest_update:
        manifest.update(manifest_update)
    return write_plan(out_path or plan_path, manifest, blobs)
