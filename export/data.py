"""Training / evaluation data: LIDC-IDRI (4 annotators), CVC-ClinicDB and Kvasir-SEG.

Everything is decoded once with PIL, resized to the model's square ``image_size`` and kept in
memory as uint8 arrays (LIDC at 128x128 is ~0.5 GB with its four masks).

* ``load_split(kind, root, split, image_size)`` -> ``SegData`` (kind: lidc | polyp | kvasir | cvc,
  split: train | val).  Eval code reuses it.
* ``SegData[i]`` -> ``{"image": float32 [C,H,W] in [0,1], "mask": float32 {0,1} [A,H,W], "id": str}``
  where A = 4 for LIDC (all annotators, empty = that annotator did not mark) and 1 otherwise.
* ``SegData.batch(idx, rng, augment=..., annotator="random")`` -> (images [B,C,H,W], masks [B,1,H,W])
  float tensors for training, with flips / 90-degree rotations / intensity jitter.

Splits are deterministic and never random:
* LIDC: by patient.  Sorted patient ids, the last 15 % are validation.
* CVC-ClinicDB: one contiguous block of frame numbers.  The last ~15 % of the frames are
  validation; the cut is moved (within +-5 % of the frames) to the largest frame-to-frame
  image change, i.e. to a video-sequence boundary, so that no sequence spans both splits.
* Kvasir-SEG: the published ``train.txt`` / ``val.txt``.
* polyp = kvasir + cvc (train with train, val with val).

Images of other sizes are resized to a square (aspect ratio not kept), images with bilinear
filtering, masks with bilinear filtering of the 0/255 mask followed by a threshold at 127.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
KINDS = ("lidc", "polyp", "kvasir", "cvc")
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
        im = im.convert("L")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    return (a > 127).astype(np.uint8)


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


def cvc_split(root) -> dict[str, list[int]]:
    """Contiguous blocks of frame numbers: [first .. cut-1] train, [cut .. last] validation.

    The nominal cut leaves the last 15 % of frames for validation; it is then moved to the
    largest change between consecutive frames within +-5 % of the frames (a sequence boundary
    in practice), so that one video sequence never lands in both splits.
    """
    frames = cvc_frames(root)
    n = len(frames)
    nominal = n - int(round(n * VAL_FRACTION))
    win = max(1, int(round(n * 0.05)))
    lo, hi = max(1, nominal - win), min(n - 1, nominal + win)
    d = Path(root) / "cvc-clinicdb" / "images"

    def small(f):
        with Image.open(d / f"{f}.png") as im:
            return np.asarray(im.convert("L").resize((32, 24), Image.BILINEAR), dtype=np.float32)

    thumbs = [small(f) for f in frames[lo - 1: hi + 1]]
    diffs = [np.abs(thumbs[i + 1] - thumbs[i]).mean() for i in range(len(thumbs) - 1)]
    cut = lo + int(np.argmax(diffs))  # index in `frames` of the first validation frame
    return {"train": frames[:cut], "val": frames[cut:]}


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
        return {"image": torch.from_numpy(self.images[i].astype(np.float32) / 255.0),
                "mask": torch.from_numpy(self.masks[i].astype(np.float32)),
                "id": self.ids[i]}

    def subset(self, idx) -> "SegData":
        idx = np.asarray(idx)
        return SegData(self.kind, self.split, self.images[idx], self.masks[idx],
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

    def batch(self, idx, rng: np.random.Generator, augment: bool = True, annotators=None,
              jitter: bool = True, transforms=None):
        """-> (images float [B,C,H,W] in [0,1], masks float [B,1,H,W]) for the given indices.

        ``annotators``: per-sample annotator index (default: uniform random).
        ``transforms``: per-sample dihedral transform 0..7 (default: random if augment else 0).
        """
        idx = np.asarray(idx)
        if annotators is None:
            annotators = self.pick_annotators(idx, rng)
        img = torch.from_numpy(self.images[idx].astype(np.float32) / 255.0)
        msk = torch.from_numpy(self.masks[idx, annotators][:, None].astype(np.float32))
        if transforms is None:
            transforms = rng.integers(0, 8, size=len(idx)) if augment else np.zeros(len(idx), int)
        img, msk = dihedral(img, transforms), dihedral(msk, transforms)
        if augment and jitter:
            img = intensity_jitter(img, rng)
        return img, msk


def dihedral(x: torch.Tensor, tf) -> torch.Tensor:
    """Apply one of the 8 flips/90-degree rotations per sample: tf = 4*flip + k (rot90 k times)."""
    tf = np.asarray(tf)
    if not tf.any():
        return x
    out = x.clone()
    for t in np.unique(tf):
        if t == 0:
            continue
        sel = torch.from_numpy(np.nonzero(tf == t)[0])
        y = x[sel]
        if t >= 4:
            y = torch.flip(y, dims=(-1,))
        y = torch.rot90(y, int(t % 4), dims=(-2, -1))
        out[sel] = y
    return out


def intensity_jitter(img: torch.Tensor, rng: np.random.Generator, brightness=0.08, contrast=0.15,
                     color=0.05) -> torch.Tensor:
    """Small random brightness/contrast (and per-channel gain for RGB) change, clipped to [0,1]."""
    b, c = img.shape[:2]
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    con = torch.from_numpy(rng.uniform(1 - contrast, 1 + contrast, (b, 1, 1, 1)).astype(np.float32))
    bri = torch.from_numpy(rng.uniform(-brightness, brightness, (b, 1, 1, 1)).astype(np.float32))
    out = (img - mean) * con + mean + bri
    if c > 1:
        out = out * torch.from_numpy(rng.uniform(1 - color, 1 + color, (b, c, 1, 1)).astype(np.float32))
    return out.clamp_(0.0, 1.0)


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


def _load_cvc(root: Path, split: str, size: int, limit=None) -> SegData:
    frames = cvc_split(root)[split][:limit]
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


def concat(kind: str, parts: list[SegData]) -> SegData:
    return SegData(kind, parts[0].split, np.concatenate([p.images for p in parts]),
                   np.concatenate([p.masks for p in parts]),
                   sum((p.ids for p in parts), []), sum((p.groups for p in parts), []))


def load_split(kind: str, root=None, split: str = "train", image_size: int = 128,
               limit: int | None = None) -> SegData:
    """Load (and cache in memory) one split of one data set, resized to ``image_size``.

    ``limit``: keep only the first ``limit`` items of the split, in its fixed order (tests);
    for ``polyp`` the limit applies to each of kvasir and cvc.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    root = Path(root) if root is not None else default_data_root()
    if not (root / ("lidc" if kind == "lidc" else "kvasir-seg" if kind == "kvasir" else
                     "cvc-clinicdb" if kind == "cvc" else "kvasir-seg")).is_dir() \
            and not (root / "packed" / f"{kind}_{split}_{int(image_size)}.npz").exists():
        raise FileNotFoundError(f"no {kind} data under {root} (see ../shared/data/README.md)")
    key = (kind, str(root.resolve()), split, int(image_size), limit)
    packed = root / "packed" / f"{kind}_{split}_{int(image_size)}.npz"
    if key not in _CACHE and packed.exists():  # a pack written by `python -m msld_export.data pack`
        with np.load(packed, allow_pickle=False) as z:
            ds = SegData(kind, split, z["images"], z["masks"], [str(i) for i in z["ids"]],
                         [str(g) for g in z["groups"]])
        _CACHE[key] = ds.subset(np.arange(min(limit, len(ds)))) if limit is not None else ds
    if key not in _CACHE:
        if kind == "lidc":
            ds = _load_lidc(root, split, image_size, limit)
        elif kind == "cvc":
            ds = _load_cvc(root, split, image_size, limit)
        elif kind == "kvasir":
            ds = _load_kvasir(root, split, image_size, limit)
        else:
            ds = concat("polyp", [load_split("kvasir", root, split, image_size, limit),
                                  load_split("cvc", root, split, image_size, limit)])
        _CACHE[key] = ds
    return _CACHE[key]


def pack_split(kind: str, root, split: str, image_size: int, out_root) -> Path:
    """Write one split, decoded and resized exactly as ``load_split`` gives it, to
    ``out_root/packed/{kind}_{split}_{size}.npz``; ``load_split(kind, out_root, ...)`` then reads
    it back. This is how a split travels to a machine without the raw data (the GPU machine)."""
    ds = load_split(kind, root, split, image_size)
    out = Path(out_root) / "packed" / f"{kind}_{split}_{int(image_size)}.npz"
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, images=ds.images, masks=ds.masks, ids=np.array(ds.ids), groups=np.array(ds.groups))
    return out


def data_kind_for(cfg_name: str) -> str:
    """Which data set a model config trains on (by its name)."""
    n = cfg_name.lower()
    for k in KINDS:
        if n.startswith(k):
            return k
    raise ValueError(f"cannot tell the data set from config name {cfg_name!r}; pass --kind")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(prog="python -m msld_export.data", description="Pack data splits for another machine.")
    ap.add_argument("command", choices=["pack"])
    ap.add_argument("--kind", required=True, choices=KINDS)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--data", default=None, help="data root (default ../shared/data)")
    ap.add_argument("--out", required=True, help="folder that receives packed/{kind}_{split}_{size}.npz")
    a = ap.parse_args()
    for sp in ("train", "val"):
        print(pack_split(a.kind, a.data, sp, a.size, a.out))
