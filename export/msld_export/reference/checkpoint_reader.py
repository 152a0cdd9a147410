"""Read the tensors of a PyTorch / Lightning checkpoint without executing anything from it.

A Lightning ``.ckpt`` is a zip holding a pickle plus one raw storage per tensor; its
``hyper_parameters`` hold pickled objects of the training code's classes, so ``torch.load``
either refuses it or would run code. This reader needs neither torch nor the training code: a
restricted unpickler resolves only a fixed set of globals (the rest become inert placeholders
or are refused), and tensors are read lazily after bounds checks. Every failure raises
``CheckpointError`` naming the file and the problem (details: docs/reference_import_and_parity.md).
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from msld_sdk.errors import CheckpointError

MAX_PICKLE_BYTES = 256 << 20
MAX_MEMO_INDEX = 50_000_000

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
# Modules whose globals may appear (as inert placeholders) in a Lightning checkpoint's metadata.
# (argparse: Namespace hparams; _codecs/copyreg: how protocol-2 pickles spell bytes and old-style
# objects.) Inert means never called, so this list only decides what is refused outright.
_INERT_PREFIXES = ("torch", "src", "collections", "omegaconf", "pytorch_lightning", "lightning", "lightning_fabric",
                   "torchmetrics", "hydra", "typing", "numpy", "pathlib", "functools", "enum", "datetime",
                   "argparse", "_codecs", "copyreg", "copy_reg", "decimal", "uuid")
_INERT_BUILTINS = {"set", "frozenset", "list", "dict", "tuple", "long", "int", "float", "complex", "str",
                   "bytes", "bytearray", "bool", "slice", "range", "object", "type"}
# Never placeholders, whatever the prefix: names that hint at code execution.
_REFUSED_NAMES = {"eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open", "system",
                  "popen", "load", "loads", "import_module", "execfile", "input", "breakpoint", "globals",
                  "vars", "run", "call", "check_output", "spawn", "remove", "rmtree", "apply"}


class Inert:
    """Stands for an object of a class the reader does not load: takes any arguments and state,
    supports the container opcodes the pickle may apply to it, and never calls anything."""

    _msld_name = "?"

    def __init__(self, *args, **kwargs):
        pass

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass

    def add(self, value):
        pass

    def __repr__(self):
        return f"<inert {self._msld_name}>"


class LazyTensor:
    """A tensor record: storage key and dtype, offset, shape, strides (in elements)."""

    __slots__ = ("key", "dtype", "offset", "shape", "stride")

    def __init__(self, key, dtype, offset, shape, stride):
        self.key, self.dtype, self.offset, self.shape, self.stride = key, dtype, offset, shape, stride

    def __repr__(self):
        return f"LazyTensor({self.key!r}, {np.dtype(self.dtype).name}, {self.shape})"


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _StorageRef:
    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key, dtype, numel):
        self.key, self.dtype, self.numel = key, dtype, numel


def _int_tuple(v, what: str) -> tuple:
    if not isinstance(v, (tuple, list)) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise CheckpointError(f"tensor {what} is not a tuple of integers")
    return tuple(v)


def _rebuild_tensor(storage, storage_offset, size, stride, *rest):
    if not isinstance(storage, _StorageRef):
        raise CheckpointError("tensor rebuilt from something that is not a storage")
    if not isinstance(storage_offset, int) or isinstance(storage_offset, bool) or storage_offset < 0:
        raise CheckpointError("tensor storage offset is not a non-negative integer")
    size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(size) != len(stride) or len(size) > 8 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"tensor has an invalid shape {size} / stride {stride}")
    return LazyTensor(storage.key, storage.dtype, storage_offset, size, stride)


def _rebuild_parameter(data, *rest):
    if not isinstance(data, LazyTensor):
        raise CheckpointError("parameter rebuilt from something that is not a tensor")
    return data


def _ordered_dict(*args):
    if args:
        raise CheckpointError("OrderedDict called with arguments (not written by torch.save)")
    return collections.OrderedDict()


_SAFE = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str):
        super().__init__(io.BytesIO(data))
        self.path = path
        self.globals_seen: collections.Counter = collections.Counter()
        self._inert: dict = {}

    def find_class(self, module: str, name: str):
        full = f"{module}.{name}"
        self.globals_seen[full] += 1
        if (module, name) in _SAFE:
            return _SAFE[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        base = module.split(".")[0]
        builtin = module in ("builtins", "__builtin__")
        if name.split(".")[-1] in _REFUSED_NAMES or not (
                (builtin and name in _INERT_BUILTINS) or (not builtin and base in _INERT_PREFIXES)):
            raise CheckpointError(f"{self.path}: refuses the global '{full}' (this reader loads tensors only "
                                  "and never executes code from a checkpoint)")
        cls = self._inert.get(full)
        if cls is None:
            cls = self._inert[full] = type(f"Inert[{full}]", (Inert,), {"_msld_name": full})
        return cls

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.path}: unsupported persistent id in the pickle ({type(pid).__name__})")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType):
            raise CheckpointError(f"{self.path}: storage of an unsupported type")
        if not isinstance(key, str) or not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
            raise CheckpointError(f"{self.path}: malformed storage reference")
        return _StorageRef(key, stype.dtype, numel)


def _check_opcodes(data: bytes, path: str) -> None:
    """Static pass over the pickle (no object is built): refuse memo indices that would make the
    unpickler allocate absurd amounts of memory."""
    import pickletools
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET") and \
                    isinstance(arg, int) and arg > MAX_MEMO_INDEX:
                raise CheckpointError(f"{path}: pickle memo index {arg} is out of range")
    except CheckpointError:
        raise
    except Exception as e:  # pickletools raises ValueError and friends on malformed data
        raise CheckpointError(f"{path}: the checkpoint's pickle is damaged ({type(e).__name__}: {e})") from None


def _check_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: str) -> None:
    """torch.save writes uncompressed entries; refuse others and sizes beyond the file itself."""
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{path}: entry {info.filename} is encrypted (torch.save never encrypts)")
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: entry {info.filename} is compressed (torch.save never compresses)")
    total = getattr(zf.fp, "seek", None) and zf.fp.seek(0, 2)
    if total is not None and info.file_size > total:
        raise CheckpointError(f"{path}: entry {info.filename} claims {info.file_size} bytes, more than the file")


class Checkpoint:
    """The unpickled top-level object of a checkpoint, with tensors as ``LazyTensor`` records."""

    def __init__(self, path: str, zf: zipfile.ZipFile, prefix: str, obj: Any, globals_seen):
        self.path, self._zf, self._prefix, self.obj = path, zf, prefix, obj
        self.globals_seen = dict(globals_seen)
        self._storages: dict = {}

    def close(self) -> None:
        self._zf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _storage(self, key: str, dtype) -> np.ndarray:
        cached = self._storages.get(key)
        if cached is not None:
            if cached.dtype != np.dtype(dtype):
                raise CheckpointError(f"{self.path}: storage {key} is used with two dtypes")
            return cached
        name = f"{self._prefix}data/{key}"
        try:
            _check_entry(self._zf, self._zf.getinfo(name), self.path)
            raw = self._zf.read(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: storage {key} is missing from the file") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, zipfile.LargeZipFile, NotImplementedError,
                RuntimeError) as e:
            raise CheckpointError(f"{self.path}: storage {key} cannot be read (damaged file?): {e}") from None
        item = np.dtype(dtype).itemsize
        if len(raw) % item:
            raise CheckpointError(f"{self.path}: storage {key} has {len(raw)} bytes, not a multiple of {item}")
        arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
        self._storages[key] = arr
        return arr

    def tensor(self, t: LazyTensor, name: str = "tensor") -> np.ndarray:
        """A contiguous native-endian numpy copy of the tensor record ``t``."""
        if not isinstance(t, LazyTensor):
            raise CheckpointError(f"{self.path}: '{name}' is not a tensor")
        st = self._storage(t.key, t.dtype)
        n = int(np.prod(t.shape, dtype=np.int64)) if t.shape else 1
        last = t.offset + sum((s - 1) * d for s, d in zip(t.shape, t.stride)) if n else t.offset - 1
        if n > st.size or n > 1 << 31:  # a saved tensor is never larger than its storage
            raise CheckpointError(f"{self.path}: '{name}' {t.shape} has more elements than its storage ({st.size})")
        if n and (last >= st.size or t.offset >= st.size):
            raise CheckpointError(f"{self.path}: '{name}' {t.shape} reaches past its storage ({st.size} elements)")
        item = st.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(st[t.offset:] if n else st[:0], shape=t.shape,
                                               strides=tuple(d * item for d in t.stride), writeable=False)
        return np.ascontiguousarray(view, dtype=np.dtype(t.dtype).newbyteorder("="))


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Open ``path`` and unpickle its ``data.pkl`` with the restricted unpickler."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint not found: {p}")
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, RuntimeError) as e:
        raise CheckpointError(f"{p}: not a PyTorch zip checkpoint (legacy or damaged file: {e})") from None
    try:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkls) != 1:
            raise CheckpointError(f"{p}: not a PyTorch checkpoint (expected one <dir>/data.pkl, found {len(pkls)})")
        prefix = pkls[0][: -len("data.pkl")]
        try:
            bo = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
        except KeyError:
            bo = "little"
        if bo != "little":
            raise CheckpointError(f"{p}: byte order '{bo}' is not supported")
        info = zf.getinfo(pkls[0])
        _check_entry(zf, info, str(p))
        if info.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{p}: data.pkl is {info.file_size} bytes, over the {MAX_PICKLE_BYTES} limit")
        data = zf.read(info)
        _check_opcodes(data, str(p))
        up = _RestrictedUnpickler(data, str(p))
        try:
            obj = up.load()
        except CheckpointError:
            raise
        except RecursionError:
            raise CheckpointError(f"{p}: the checkpoint's pickle nests too deeply") from None
        except Exception as e:  # UnpicklingError, EOFError, TypeError from odd opcode sequences ...
            raise CheckpointError(f"{p}: the checkpoint's pickle is damaged ({type(e).__name__}: {e})") from None
        return Checkpoint(str(p), zf, prefix, obj, up.globals_seen)
    except CheckpointError:
        zf.close()
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zipfile.LargeZipFile, NotImplementedError,
            RuntimeError, MemoryError) as e:
        zf.close()
        raise CheckpointError(f"{p}: cannot be read (truncated or damaged file?): {type(e).__name__}: {e}") from None


def state_dict_of(ckpt: Checkpoint) -> dict:
    """The checkpoint's ``state_dict`` as {name: LazyTensor} (refuses anything else)."""
    obj = ckpt.obj
    if not isinstance(obj, dict) or "state_dict" not in obj:
        raise CheckpointError(f"{ckpt.path}: not a Lightning checkpoint (no 'state_dict' at the top level)")
    sd = obj["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise CheckpointError(f"{ckpt.path}: 'state_dict' is not a mapping of names to tensors")
    return {k: v for k, v in sd.items() if isinstance(v, LazyTensor)}
