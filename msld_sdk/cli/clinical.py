"""``msld segment`` options for regions, CT series and volumes, DICOM SEG and Ray, and the
commands they route to; every input is segmented and written by ``outputs.segment_and_write``."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..outputs import output_names  # noqa: F401  (its former home)


def add_clinical_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--roi", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), default=None,
                   help="segment this box only (pixels, x = column, end exclusive): the plan's training crop "
                        "around it is cut, segmented and pasted back; zeros outside the box")
    g.add_argument("--center", nargs="+", type=float, metavar="X Y [Z]", default=None,
                   help="segment a plan-sized window centred at X Y (e.g. on a nodule); zeros outside it. For a "
                        "series or volume, Z picks one slice unless --slices is given")
    p.add_argument("--slices", nargs=2, type=int, metavar=("Z0", "Z1"), default=None,
                   help="series/volume: segment slices Z0..Z1-1 (in position order), in one batch (default: all)")
    p.add_argument("--dicom-seg", default=None, metavar="OUT.dcm",
                   help="DICOM series input: also write DICOM SEG referencing it: OUT.dcm (BINARY: consensus + "
                        "one segment per hypothesis) and OUT_mean.dcm (FRACTIONAL: mean probability); with --ray: every "
                        "series' OUT/<name>/seg.dcm and seg_mean.dcm")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the inputs through Ray Data over a pool of Segmenter actors, each item with its own "
                        "seed from (seed, item), outputs written as items finish; a rerun skips finished items. "
                        "ADDRESS: none = a local Ray started here, 'auto' = the cluster this machine is part of, "
                        "'ray://HOST:10001' = a remote cluster")
    p.add_argument("--actors", type=int, default=2, help="--ray: number of Segmenter actors (default: 2)")
    p.add_argument("--allow-modality", nargs="?", const=True, default=False, metavar="MODALITY",
                   help="segment DICOM inputs of another modality than the plan's (e.g. MR with the CT plan), "
                        "with a warning; MODALITY: accept only that one (default: refused)")
    p.add_argument("--accept-irregular-slices", action="store_true",
                   help="series: accept uneven, missing or duplicate slice positions or mixed orientations, "
                        "segmenting every slice at its true position (no NIfTI output; default: refused)")


def _is_dicom_file(p: str) -> bool:
    from ..image_input import _is_dicom
    q = Path(p)
    return q.is_file() and _is_dicom(q)


def clinical_route(a):
    """The command for these arguments, or None for the plain 2-D image loop of cli.py."""
    if a.center is not None and len(a.center) not in (2, 3):
        raise SystemExit("msld segment: --center takes X Y, or X Y Z for a series or volume")
    if a.ray is not None:
        return cmd_segment_ray
    from ..clinical.volume import is_volume_input
    if a.dicom_seg or a.slices or any(is_volume_input(p) or _is_dicom_file(p) for p in a.images):
        return cmd_segment_volumes
    if a.center is not None and len(a.center) == 3:
        raise SystemExit("msld segment: --center X Y Z needs a series or volume input; give X Y for an image")
    return None


def cmd_segment_volumes(a) -> int:
    from ..outputs import segment_and_write
    from ..segmenter import Segmenter

    if a.dicom_seg and len(a.images) != 1:
        raise InputError("--dicom-seg writes one series' segmentation: give one series folder")
    seg = Segmenter(a.plan, backend=a.backend, threads=a.threads, progress=not a.quiet, precision=a.precision)
    out = Path(a.out)
    roi = a.roi if a.roi is not None else a.center
    for path, name in zip(a.images, output_names(a.images)):
        d = out / name if len(a.images) > 1 else out
        w = segment_and_write(seg, path, d, k=a.k, steps=a.steps, seed=a.seed, eta=a.eta, views=a.views, roi=roi,
                              slices=a.slices, volume=True, npz="geometry", nifti="if_installed",
                              dicom_seg=a.dicom_seg, allow_modality=a.allow_modality,
                              accept_irregular=a.accept_irregular_slices)
        vr, vol = w.result, w.volume
        z0, z1 = vr.slices
        print(f"{path}: {vol.shape[0]} slices {vol.shape[1]}x{vol.shape[2]}, segmented {z0}..{z1 - 1} k={vr.k} "
              f"steps={vr.steps} seed={vr.seed} roi={vr.roi} -> {d}/ ({', '.join(w.files)}; "
              f"{vr.timings['total_ms']:.0f} ms)")
    return 0


def cmd_segment_ray(a) -> int:
    seed = 0 if a.seed is None else a.seed
    roi = a.roi if a.roi is not None else a.center
    from ..clinical.batch_ray import run_items

    s = run_items(a.images, a.out, plan=a.plan, k=a.k, steps=a.steps, seed=seed, eta=a.eta, roi=roi,
                  slices=a.slices, views=a.views, ray_address=None if a.ray == "local" else a.ray, actors=a.actors,
                  threads=a.threads or 1, backend=a.backend, precision=a.precision, progress=not a.quiet,
                  dicom_seg=bool(a.dicom_seg))
    print(f"{s['items']} items: {len(s['done'])} done, {len(s['skipped'])} already done (skipped), "
          f"{len(s['failed'])} failed; seed {seed} ({s['seed_scheme']}); {s['seconds']:.1f} s -> {a.out}/")
    for name, err in s["failed"].items():
        print(f"  failed: {name}: {err}")
    return 1 if s["failed"] else 0
