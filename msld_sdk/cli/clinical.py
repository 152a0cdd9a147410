"""``msld segment`` options for regions, CT series and volumes, DICOM SEG and Ray, their checks
against the kinds of the inputs, and the Ray route; every input is segmented and written by
``outputs.segment_and_write``."""
from __future__ import annotations

import argparse

from ..errors import UsageError
from ..outputs import output_names  # noqa: F401  (its former home)
from .options import positive_int


class _Center(argparse.Action):
    """--center: one centre, X Y or X Y Z; anything else is refused when parsing."""
    display = "X Y [Z]"

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) not in (2, 3):
            parser.error(f"{option_string} takes one centre: X Y, or X Y Z for a series or volume "
                         f"(got {len(values)} numbers)")
        setattr(namespace, self.dest, values)


def add_clinical_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--roi", nargs=4, type=float, metavar=("X0", "Y0", "X1", "Y1"), default=None,
                   help="segment this box only (pixels, x = column, end exclusive): the plan's training crop "
                        "around it is cut, segmented and pasted back; zeros outside the box; default: the whole image")
    g.add_argument("--center", nargs="+", type=float, action=_Center, default=None,
                   help="segment a plan-sized window centred at X Y (e.g. on a nodule); zeros outside it. One "
                        "centre: X Y, or X Y Z for a series or volume (Z picks one slice unless --slices is given); "
                        "default: the whole image")
    p.add_argument("--slices", nargs=2, type=int, metavar=("Z0", "Z1"), default=None,
                   help="series/volume: segment slices Z0..Z1-1 (in position order), in one batch (default: all)")
    p.add_argument("--dicom-seg", default=None, metavar="OUT.dcm",
                   help="DICOM series input: also write DICOM SEG referencing it: OUT.dcm (BINARY: consensus + "
                        "one segment per hypothesis) and OUT_mean.dcm (FRACTIONAL: mean probability); with --ray: every "
                        "series' OUT/<name>/seg.dcm and seg_mean.dcm; default: none")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the inputs through Ray Data over a pool of Segmenter actors, each item with its own "
                        "seed from (seed, item), outputs written as items finish; a rerun skips finished items. "
                        "ADDRESS: none = a local Ray started here, 'auto' = the cluster this machine is part of, "
                        "'ray://HOST:10001' = a remote cluster; default: no Ray, inputs one after another here")
    p.add_argument("--actors", type=positive_int, default=2, help="--ray: number of Segmenter actors (default: 2)")
    p.add_argument("--allow-modality", nargs="?", const=True, default=False, metavar="MODALITY",
                   help="segment DICOM inputs of another modality than the plan's (e.g. MR with the CT plan), "
                        "with a warning; MODALITY: accept only that one (default: refused)")
    p.add_argument("--accept-irregular-slices", action="store_true",
                   help="series: accept uneven, missing or duplicate slice positions or mixed orientations, "
                        "segmenting every slice at its true position (no NIfTI output; default: refused)")


def check_segment_options(a, items) -> None:
    """Refuse, before any work, options that do not fit the kinds of the inputs (``items``:
    ``outputs.expand_inputs``)."""
    images = [p for p, kind in items if kind == "image"]
    if not items:
        raise UsageError(f"no image found in {', '.join(a.images)}; give image files (PNG, JPEG, TIFF, NPY), "
                         "folders of images, DICOM series folders or NIfTI volumes")
    if a.center is not None and len(a.center) == 3 and images:
        raise UsageError(f"--center X Y Z picks a slice of a series or volume, and {images[0]} is an image; "
                         "give X Y for an image")
    if a.slices is not None and images:
        raise UsageError(f"--slices applies to series and volumes, and {images[0]} is an image; leave it out "
                         "for images")
    if a.dicom_seg and (len(items) != 1 or items[0][1] != "series"):
        raise UsageError("--dicom-seg writes one DICOM series' segmentation: give one DICOM series folder")


def clinical_route(a):
    """The command for these arguments (Ray), or None for the loop over inputs of cli/main.py."""
    return cmd_segment_ray if a.ray is not None else None


def cmd_segment_ray(a) -> int:
    from ..clinical.batch_ray import JOB, run_items
    from ..outputs import expand_inputs
    from ..writing import OutputFolder, check_output_folder

    check_segment_options(a, expand_inputs(a.images))
    seed = 0 if a.seed is None else a.seed
    roi = a.roi if a.roi is not None else a.center
    out = check_output_folder(a.out, a.images, a.overwrite)
    if out.is_dir() and any(out.iterdir()) and (a.overwrite or not (out / JOB).exists()):
        OutputFolder(out).commit()      # not a Ray job (or --overwrite): replaced whole by a new job

    s = run_items(a.images, a.out, plan=a.plan, k=a.k, steps=a.steps, seed=seed, eta=a.eta, roi=roi,
                  slices=a.slices, views=a.views, threshold=a.threshold, ray_address=None if a.ray == "local" else a.ray,
                  actors=a.actors, threads=a.threads or 1, backend=a.backend, precision=a.precision,
                  progress=not a.quiet, dicom_seg=bool(a.dicom_seg), solver=a.solver, timesteps=a.timesteps,
                  allow_modality=a.allow_modality, accept_irregular=a.accept_irregular_slices)
    print(f"{s['items']} items: {len(s['done'])} done, {len(s['skipped'])} already done (skipped), "
          f"{len(s['failed'])} failed; seed {seed} ({s['seed_scheme']}); {s['seconds']:.1f} s -> {a.out}/")
    for name, err in s["failed"].items():
        print(f"  failed: {name}: {err}")
    return 1 if s["failed"] else 0
