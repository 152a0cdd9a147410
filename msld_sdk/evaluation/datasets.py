"""Labelled data for ``msld eval`` and training: LIDC-IDRI (4 annotators), CVC-ClinicDB,
Kvasir-SEG, and a plain folder pair ``DIR/images/*`` + ``DIR/masks/*``.

Runtime side: numpy and Pillow only (training's torch batching lives in msld_export.training.data).
Everything is decoded once with PIL, resized to the model's square ``image_size`` (aspect ratio
not kept; masks resized as 0/255 and thresholded at 127) and kept in memory as uint8 arrays.

* ``load_split(kind, root, split, image_size)`` -> ``SegData`` (kind: lidc | polyp | kvasir | cvc |
  folder, split: train | val).  ``msld eval`` and training both use it.
* ``SegData[i]`` -> ``{"image": float32 [C,H,W] in [0,1], "mask": float32 {0,1} [A,H,W], "id": str}``
  (numpy) where A = 4 for LIDC (all annotators, empty = that annotator did not mark) and 1 otherwise.

Splits are deterministic and never random: LIDC by patient, CVC-ClinicDB by blocks of whole video
sequences behind a guard band, Kvasir-SEG its published lists, a folder is one split.  Details
of each: docs/evaluation.md, "Data sets and splits".
"""
from __future__ import annotations

import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError

REPO_ROOT = Path(__file__).resolve().parents[2]             # msld_sdk/evaluation/ -> the clone
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"   # in a clone: ../shared/data
KINDS = ("lidc", "polyp", "kvasir", "cvc")                   # the data sets under a data root
FOLDER = "folder"                                            # DIR/images + DIR/masks
VAL_FRACTION = 0.15

_CACHE: dict = {}


def default_data_root() -> Path:
    return Path(os.environ.get("MSLD_DATA", str(DEFAULT_DATA_ROOT)))


# ---------------------------------------------------------------------------------------------
# decoding

def _read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """-> uint8 [C, size, size]"""
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    return a[None] if channels == 1 else np.ascontiguousarray(a.transpose(2, 0, 1))


def _read_mask(path: Path, size: int) -> np.ndarray:
    """-> uint8 {0,1} [size, size]; threshold at 127 (after resizing when needed)."""
    with Image.open(path) as im:
        return _threshold_resized(im.convert("L"), size)


def _threshold_resized(im: Image.Image, size: int) -> np.ndarray:
    """A 0/255 mask image -> uint8 {0,1} [size, size]: bilinear resize, then threshold at 127."""
    if im.size != (size, size):
        im = im.resize((size, size), Image.BILINEAR)
    return (np.asarray(im, dtype=np.uint8) > 127).astype(np.uint8)


def _read_user_mask(path: Path, size: int) -> np.ndarray:
    """A mask as users have them: 0/255 (threshold at 127), 0/1 or palette indices (non-zero is
    foreground) -> uint8 {0,1} [size, size], resized as ``_read_mask`` does."""
    with Image.open(path) as im:
        a = np.asarray(im) if im.mode == "P" else np.asarray(im.convert("L"))
        fg = a > 0 if im.mode == "P" or a.max() <= 1 else a > 127
    return _threshold_resized(Image.fromarray(fg.astype(np.uint8) * 255), size)


def _pmap(fn, items, workers: int = 2):
    items = list(items)
    if len(items) < 64:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as ex:  # PIL releases the GIL while decoding
        return list(ex.map(fn, items, chunksize=64))


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ---------------------------------------------------------------------------------------------
# splits (deterministic)

def lidc_patients(root) -> list[str]:
    return sorted(p.name for p in (Path(root) / "lidc").iterdir() if p.is_dir() and p.name.startswith("LIDC-IDRI-"))


def lidc_split(root) -> dict[str, list[str]]:
    """Patient ids per split: sorted ids, the last 15 % are validation."""
    pats = lidc_patients(root)
    n_val = int(round(len(pats) * VAL_FRACTION))
    return {"train": pats[: len(pats) - n_val], "val": pats[len(pats) - n_val:]}


def cvc_frames(root) -> list[int]:
    return sorted(int(p.stem) for p in (Path(root) / "cvc-clinicdb" / "images").glob("*.png"))


CVC_GUARD_FRAMES = 25   # frames before the validation block that no split uses


def cvc_split(root, fold: str | None = None) -> dict[str, list[int]]:
    """Contiguous blocks of frame numbers: train, a guard band, validation (and guard, train).

    CVC-ClinicDB's frames come from short video sequences (about 20 frames each) whose frames
    are near-duplicates, so a validation frame must not have a sequence-mate in training.

    * ``fold=None`` (the shipped models' split): the nominal cut leaves the last 15 % of frames
      for validation.
    * ``fold="F/N"``: cross-validation over sequences. Validation is the F-th of N equal
      contiguous blocks (F = 1..N); everything else outside the guard bands is training. Over
      the N folds every frame is validated once, by a model that saw none of its sequence.

    Each inner edge of the validation block is moved to the largest change between consecutive
    frames within +-5 % of the frames, meant to land on a sequence boundary (for the default
    split it does: frames 428 | 429, whose masks do not overlap at all; it need not: the 4/5 |
    5/5 fold edge, 410 | 411, falls inside a sequence, by the data set's published ranges).
    The safeguard that holds either way: the ``CVC_GUARD_FRAMES`` frames on each side of the
    block are in neither split ("guard"), so a sequence of up to 26 frames (the longest is 26)
    cannot reach both.
    """
    frames = cvc_frames(root)
    n = len(frames)
    if fold is None:
        lo, hi = n - int(round(n * VAL_FRACTION)), n
    else:
        f, k = parse_fold(fold)
        lo, hi = round((f - 1) * n / k), round(f * n / k)
    d = Path(root) / "cvc-clinicdb" / "images"
    lo = _largest_change_near(d, frames, lo) if 0 < lo < n else lo
    hi = _largest_change_near(d, frames, hi) if 0 < hi < n else hi
    g0, g1 = max(0, lo - CVC_GUARD_FRAMES), min(n, hi + CVC_GUARD_FRAMES)
    return {"train": frames[:g0] + frames[g1:], "guard": frames[g0:lo] + frames[hi:g1], "val": frames[lo:hi]}


def parse_fold(fold: str) -> tuple[int, int]:
    """"F/N" -> (F, N), with 1 <= F <= N and N >= 2."""
    try:
        f, k = (int(v) for v in str(fold).split("/"))
    except ValueError:
        raise InputError(f"a fold is written F/N, e.g. 2/5, not {fold!r}") from None
    if not (k >= 2 and 1 <= f <= k):
        raise InputError(f"fold {fold!r}: need N >= 2 and 1 <= F <= N")
    return f, k


def _largest_change_near(image_dir: Path, frames: list[int], nominal: int) -> int:
    """The index i (first frame of a block) within +-5 % of ``nominal`` where frame i differs
    most from frame i - 1 (mean absolute difference of 32 x 24 grey thumbnails)."""
    n = len(frames)
    win = max(1, int(round(n * 0.05)))
    lo, hi = max(1, nominal - win), min(n - 1, nominal + win)

    def small(f):
        with Image.open(image_dir / f"{f}.png") as im:
            return np.asarray(im.convert("L").resize((32, 24), Image.BILINEAR), dtype=np.float32)

    thumbs = [small(f) for f in frames[lo - 1: hi + 1]]
    diffs = [np.abs(thumbs[i + 1] - thumbs[i]).mean() for i in range(len(thumbs) - 1)]
    return lo + int(np.argmax(diffs))


def kvasir_split(root) -> dict[str, list[str]]:
    d = Path(root) / "kvasir-seg"
    out = {}
    for s in ("train", "val"):
        names = [ln.strip() for ln in (d / f"{s}.txt").read_text().splitlines() if ln.strip()]
        out[s] = [n if n.endswith(".jpg") else n + ".jpg" for n in names]
    return out


# ---------------------------------------------------------------------------------------------
# datasets

@dataclass
class SegData:
    """In-memory data set. images uint8 [N,C,H,W]; masks uint8 {0,1} [N,A,H,W]."""

    kind: str
    split: str
    images: np.ndarray
    masks: np.ndarray
    ids: list = field(default_factory=list)
    groups: list = field(default_factory=list)   # patient id (LIDC) / source+frame (polyps)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_annotators(self) -> int:
        return self.masks.shape[1]

    @property
    def image_channels(self) -> int:
        return self.images.shape[1]

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i].astype(np.float32) / 255.0, "mask": self.masks[i].astype(np.float32),
                "id": self.ids[i]}

    def subset(self, idx) -> "SegData":
        idx = np.asarray(idx)
        return type(self)(self.kind, self.split, self.images[idx], self.masks[idx],
                       [self.ids[i] for i in idx], [self.groups[i] for i in idx])

    def nonempty(self) -> np.ndarray:
        """bool [N, A]: which annotator masks have any foreground."""
        return self.masks.reshape(len(self), self.num_annotators, -1).max(-1) > 0

    def pick_annotators(self, idx, rng: np.random.Generator, prefer_nonempty: float = 0.0) -> np.ndarray:
        """One annotator per sample, uniformly among the A masks (empty ones included).

        With ``prefer_nonempty`` = p, with probability p the choice is restricted to the
        non-empty masks of that sample (when it has any) - used for autoencoder training.
        """
        idx = np.asarray(idx)
        a = rng.integers(0, self.num_annotators, size=len(idx))
        if prefer_nonempty > 0 and self.num_annotators > 1:
            ne = self.nonempty()[idx]
            use = rng.random(len(idx)) < prefer_nonempty
            for j in np.nonzero(use & ne.any(1))[0]:
                a[j] = rng.choice(np.nonzero(ne[j])[0])
        return a


def _load_lidc(root: Path, split: str, size: int, limit=None) -> SegData:
    pats = lidc_split(root)[split]
    items = []
    for p in pats:
        if limit is not None and len(items) >= limit:
            break
        for nod in sorted((root / "lidc" / p).iterdir(), key=lambda q: _natural_key(q.name)):
            if not (nod / "image").is_dir():
                continue
            for s in sorted((nod / "image").glob("*.png"), key=lambda q: _natural_key(q.name)):
                items.append((p, nod, s.name))
    items = items[:limit] if limit is not None else items

    def load(it):
        p, nod, s = it
        img = _read_image(nod / "image" / s, size, 1)
        ms = []
        for a in range(4):
            f = nod / f"mask-{a}" / s
            ms.append(_read_mask(f, size) if f.exists() else np.zeros((size, size), np.uint8))
        return img, np.stack(ms)

    res = _pmap(load, items)
    images = np.stack([r[0] for r in res]) if res else np.zeros((0, 1, size, size), np.uint8)
    masks = np.stack([r[1] for r in res]) if res else np.zeros((0, 4, size, size), np.uint8)
    ids = [f"{p}/{nod.name}/{s[:-4]}" for p, nod, s in items]
    return SegData("lidc", split, images, masks, ids, [p for p, _, _ in items])


def _load_cvc(root: Path, split: str, size: int, limit=None, fold: str | None = None) -> SegData:
    frames = cvc_split(root, fold)[split][:limit]
    d = root / "cvc-clinicdb"
    res = _pmap(lambda f: (_read_image(d / "images" / f"{f}.png", size, 3),
                           _read_mask(d / "masks" / f"{f}.png", size)), frames)
    return SegData("cvc", split, np.stack([r[0] for r in res]), np.stack([r[1] for r in res])[:, None],
                   [f"cvc/{f}" for f in frames], [f"cvc/{f}" for f in frames])


def _load_kvasir(root: Path, split: str, size: int, limit=None) -> SegData:
    names = kvasir_split(root)[split][:limit]
    d = root / "kvasir-seg"
    res = _pmap(lambda n: (_read_image(d / "images" / n, size, 3), _read_mask(d / "masks" / n, size)), names)
    ids = [f"kvasir/{n[:-4]}" for n in names]
    return SegData("kvasir", split, np.stack([r[0] for r in res]), np.stack([r[1] for r in res])[:, None],
                   ids, ids)


IMAGE_SUFFIXES = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def _by_stem(d: Path) -> dict[str, Path]:
    """Files Pillow can read in ``d``, by file stem (two with one stem are an error)."""
    out: dict[str, Path] = {}
    for f in sorted(d.iterdir(), key=lambda q: _natural_key(q.name)):
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
            if f.stem in out:
                raise InputError(f"{d}: {out[f.stem].name} and {f.name} have the same name; keep one")
            out[f.stem] = f
    return out


def _load_folder(root: Path, split: str, size: int, limit=None, channels: int = 3) -> SegData:
    images, masks = _by_stem(root / "images"), _by_stem(root / "masks")
    if not images:
        raise FileNotFoundError(f"no images in {root / 'images'}")
    unpaired = [n for n in images if n not in masks]
    if unpaired:
        raise FileNotFoundError(f"{len(unpaired)} image(s) in {root / 'images'} have no mask of the same name in "
                                f"{root / 'masks'}: {', '.join(unpaired[:5])}{' ...' if len(unpaired) > 5 else ''}")
    names = list(images)[:limit]
    res = _pmap(lambda n: (_read_image(images[n], size, channels), _read_user_mask(masks[n], size)), names)
    return SegData(FOLDER, split, np.stack([r[0] for r in res]), np.stack([r[1] for r in res])[:, None],
                   names, names)


def concat(kind: str, parts: list[SegData]) -> SegData:
    return SegData(kind, parts[0].split, np.concatenate([p.images for p in parts]),
                   np.concatenate([p.masks for p in parts]),
                   sum((p.ids for p in parts), []), sum((p.groups for p in parts), []))


def load_split(kind: str, root=None, split: str = "train", image_size: int = 128,
               limit: int | None = None, channels: int = 3, cvc_fold: str | None = None) -> SegData:
    """Load (and cache in memory) one split of one data set, resized to ``image_size``.

    ``limit``: keep only the first ``limit`` items of the split, in its fixed order (tests);
    for ``polyp`` the limit applies to each of kvasir and cvc. ``channels``: of the images of
    ``folder`` (1: grayscale, 3: RGB); the data sets have their own. ``cvc_fold``: "F/N", the
    CVC-ClinicDB cross-validation fold of ``cvc_split`` (for kinds cvc and polyp).
    """
    if kind not in KINDS + (FOLDER,):
        raise InputError(f"kind must be one of {KINDS + (FOLDER,)}, not {kind!r}")
    if split not in ("train", "val"):
        raise InputError(f"split must be 'train' or 'val', not {split!r}")
    root = Path(root) if root is not None else default_data_root()
    if cvc_fold is not None:
        parse_fold(cvc_fold)
        if kind not in ("cvc", "polyp"):
            raise InputError(f"cvc_fold applies to the kinds cvc and polyp, not {kind!r}")
    if kind == FOLDER:
        if not is_folder_pair(root):
            raise FileNotFoundError(f"{root} has no images/ and masks/ folders")
        return _load_folder(root, split, image_size, limit, int(channels))   # not cached: users edit folders
    if not (root / ("lidc" if kind == "lidc" else "kvasir-seg" if kind == "kvasir" else
                     "cvc-clinicdb" if kind == "cvc" else "kvasir-seg")).is_dir() \
            and not _pack_path(root, kind, split, image_size, cvc_fold).exists():
        raise FileNotFoundError(f"no {kind} data under {root}: give the data root (msld eval --data DIR) or "
                                "set MSLD_DATA; layouts in ../shared/data/README.md")
    key = (kind, str(root.resolve()), split, int(image_size), limit, cvc_fold)
    packed = _pack_path(root, kind, split, image_size, cvc_fold)
    if key not in _CACHE and packed.exists():  # a pack written by `python -m msld_export.training.data pack`
        ds = _read_pack(packed, kind, split)
        _CACHE[key] = ds.subset(np.arange(min(limit, len(ds)))) if limit is not None else ds
    if key not in _CACHE:
        if kind == "lidc":
            ds = _load_lidc(root, split, image_size, limit)
        elif kind == "cvc":
            ds = _load_cvc(root, split, image_size, limit, cvc_fold)
        elif kind == "kvasir":
            ds = _load_kvasir(root, split, image_size, limit)
        else:
            ds = concat("polyp", [load_split("kvasir", root, split, image_size, limit),
                                  load_split("cvc", root, split, image_size, limit, cvc_fold=cvc_fold)])
        _CACHE[key] = ds
    return _CACHE[key]


def middle_slice_per_nodule(ds: SegData) -> SegData:
    """One item per LIDC nodule: its middle slice (the lower middle of an even count).

    A nodule's two or three slices are near-duplicates, so a mean over all slices weights
    nodules by their slice count and counts one case several times; the literature and the
    held-out evaluation score one slice per nodule.
    """
    if ds.kind != "lidc":
        raise InputError(f"one slice per nodule applies to LIDC only, not {ds.kind!r}")
    nodules: dict[str, list[int]] = {}
    for i, item_id in enumerate(ds.ids):          # "LIDC-IDRI-NNNN/nodule-K/slice-N", slices in order
        nodules.setdefault(item_id.rsplit("/", 1)[0], []).append(i)
    return ds.subset([idx[(len(idx) - 1) // 2] for idx in nodules.values()])


def _pack_path(root: Path, kind: str, split: str, image_size: int, cvc_fold: str | None) -> Path:
    fold = "" if cvc_fold is None else "_fold{}of{}".format(*parse_fold(cvc_fold))
    return Path(root) / "packed" / f"{kind}_{split}_{int(image_size)}{fold}.npz"


def pack_split(kind: str, root, split: str, image_size: int, out_root, jpeg_quality: int | None = None,
               cvc_fold: str | None = None) -> Path:
    """Write one split, decoded and resized exactly as ``load_split`` gives it, to
    ``out_root/packed/{kind}_{split}_{size}.npz``; ``load_split(kind, out_root, ...)`` then reads
    it back. This is how a split travels to a machine without the raw data (the GPU machine).

    ``jpeg_quality``: store the images as JPEG at that quality instead of raw pixels (masks stay
    exact, bit-packed). Lossy, but it is what lets the polyp training split at 256 x 256 (217 MB
    of raw pixels) travel within the device tool's 64 MiB.
    """
    ds = load_split(kind, root, split, image_size, cvc_fold=cvc_fold)
    out = _pack_path(out_root, kind, split, image_size, cvc_fold)
    out.parent.mkdir(parents=True, exist_ok=True)
    common = dict(ids=np.array(ds.ids), groups=np.array(ds.groups))
    if jpeg_quality is None:
        np.savez_compressed(out, images=ds.images, masks=ds.masks, **common)
        return out
    blobs = []
    for im in ds.images:
        buf = io.BytesIO()
        Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0)).save(buf, "JPEG", quality=int(jpeg_quality))
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
    np.savez_compressed(out, images_jpeg=np.concatenate(blobs), images_offsets=np.cumsum([0] + [len(b) for b in blobs]),
                        images_shape=np.array(ds.images.shape), masks_bits=np.packbits(ds.masks),
                        masks_shape=np.array(ds.masks.shape), **common)
    return out


def _read_pack(path: Path, kind: str, split: str) -> SegData:
    """A split written by ``pack_split`` (raw pixels, or JPEG images with bit-packed masks)."""
    with np.load(path, allow_pickle=False) as z:
        ids, groups = [str(i) for i in z["ids"]], [str(g) for g in z["groups"]]
        if "images" in z:
            return SegData(kind, split, z["images"], z["masks"], ids, groups)
        shape, off, blob = tuple(z["images_shape"]), z["images_offsets"], z["images_jpeg"]
        images = np.empty(shape, np.uint8)
        for i in range(shape[0]):
            with Image.open(io.BytesIO(blob[off[i]:off[i + 1]].tobytes())) as im:
                a = np.asarray(im)
            images[i] = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        mshape = tuple(z["masks_shape"])
        masks = np.unpackbits(z["masks_bits"], count=int(np.prod(mshape))).reshape(mshape)
        return SegData(kind, split, images, masks, ids, groups)


def is_folder_pair(root) -> bool:
    """``root`` holds images/ and masks/ (the ``folder`` kind)."""
    return (Path(root) / "images").is_dir() and (Path(root) / "masks").is_dir()


def data_kind_for(cfg_name: str) -> str:
    """Which data set a model config trains on (by its name)."""
    n = cfg_name.lower()
    for k in KINDS:
        if n.startswith(k):
            return k
    raise InputError(f"cannot tell the data set from config name {cfg_name!r}; pass --kind")
