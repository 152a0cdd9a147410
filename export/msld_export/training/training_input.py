"""How each data set's training inputs were made, as recorded in a plan's ``training_input``.

``msld_sdk.roi`` reads the record: a region of interest is cut at the size and spacing the
model was trained on, padded with the right fill, and mapped to [0, 1] the way the training
images were.  ``export_plan`` writes it for new plans; for plans already shipped

    python -m msld_export.training.training_input msld_sdk/models/lidc.plan --kind lidc

adds it without re-exporting (graphs and int8 blob kept byte for byte) and records the
evidence in ``provenance.training_input_evidence``. ``reference_training_input`` makes the
record of a plan imported from the reference code (``msld import``).

How the LIDC intensity mapping was determined (per-crop min-max, not a fixed HU window):
docs/clinical_workflow.md, "LIDC intensity mapping"; the evidence is ``LIDC_EVIDENCE`` below.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import re

LIDC_EVIDENCE = (
    "../shared/data/lidc, all 6,267 image PNGs: min 0 and max 255 in every one, max reached by 1 pixel "
    "(median; 95th pct 2), so each crop was min-max scaled to 0..255 (not a fixed HU window). Lung mode "
    "(median pixel 15) and soft-tissue mode (median 124) per crop, anchored at -870 / +40 HU, put pixel 0 at "
    "-991 HU (median; quartiles -1029/-954: air) and pixel 255 at +460..+2040 HU (5th-95th pct: the crop's "
    "brightest pixel). Crop size 128x128 and centring on the nodule from ../shared/data/README.md; pixel "
    "spacing: the scanner's own (crops not resampled).")

TRAINING_INPUTS = {
    "lidc": {
        "kind": "crop", "crop_size": [128, 128], "centred_on": "nodule",
        "pixel_spacing_mm": None,
        "pixel_spacing": "native: crops cut at the scanner's own in-plane spacing, not resampled",
        "modality": "CT", "pad_value": 0.0, "pad_hu": -1000.0,
        "intensity": {"kind": "minmax", "over": "crop", "hu_clip": [-1024.0, None],
                      "description": "Hounsfield units of each crop scaled by the crop's own min and max to "
                                     "0..255 (8-bit PNG); values below -1024 HU (scanner padding) clipped first"},
    },
    "polyp": {
        "kind": "whole_image", "modality": "endoscopy", "pad_value": 0.0,
        "description": "whole colonoscopy frames (Kvasir-SEG, CVC-ClinicDB) resized to the model's input; "
                       "frames have black borders, hence the black fill",
    },
}
TRAINING_INPUTS["kvasir"] = TRAINING_INPUTS["cvc"] = TRAINING_INPUTS["polyp"]
EVIDENCE = {"lidc": LIDC_EVIDENCE}


def training_input_for(model_name: str) -> dict | None:
    """The record for a model config's data set (by name prefix), or None (unknown: whole images)."""
    n = model_name.lower()
    for kind, rec in TRAINING_INPUTS.items():
        if n.startswith(kind):
            return dict(rec)
    return None


REFERENCE_DATASETS = {"lidc": "lidc", "kvasir": "polyp", "cvc": "polyp"}   # reference data-set name -> record


def reference_dataset(cfg: dict) -> tuple[str | None, str]:
    """The data set a reference run was trained on, and where the config says so: its
    ``data.dataset_name``, else a known name in its data folder or its mask autoencoder's path."""
    data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
    net = ((cfg.get("model") or {}).get("net") or {}) if isinstance(cfg.get("model"), dict) else {}
    for where, v in (("data.dataset_name", data.get("dataset_name")), ("data.data_dir", data.get("data_dir")),
                     ("model.net.autoencoder_weight_path", net.get("autoencoder_weight_path"))):
        for token in re.split(r"[^a-z0-9]+", str(v or "").lower()):
            for name in REFERENCE_DATASETS:
                if token == name or token.startswith(name):
                    return name, where
    return None, ""


def reference_training_input(cfg: dict, size: int, channels: int, mean, std) -> dict:
    """``training_input`` of a plan imported from the reference code: size, channels and Normalize
    from its config; for LIDC the reference data set's per-slice min-max (src/data/dataset/lidc.py:
    each 128 x 128 crop scaled by its own min and max to [0, 1], then Normalize) and modality CT."""
    name, where = reference_dataset(cfg)
    base = dict(TRAINING_INPUTS[REFERENCE_DATASETS[name]]) if name else {"kind": "whole_image", "pad_value": None}
    base.update({"image_size": [size, size], "channels": channels,
                 "normalize": {"mean": list(mean), "std": list(std), "after": "[0, 1]"},
                 "dataset": name, "dataset_from": where or "not named in the config"})
    if name == "lidc":
        base["crop_size"] = [size, size]
        base["intensity"] = dict(base["intensity"], description=(
            "reference LIDC data set: each slice (a crop centred on a nodule) min-max scaled to [0, 1] by its "
            "own range, then Normalize(mean, std); Hounsfield units below -1024 (scanner padding) clipped first"))
    return base


def set_training_input(plan_path, kind: str, why: str | None = None, out_path=None, record: dict | None = None) -> dict:
    """Record ``TRAINING_INPUTS[kind]`` (or ``record``) in a plan; every blob is kept byte for byte."""
    from msld_sdk.plan import Plan, add_blobs

    plan = Plan.open(plan_path)
    prov = dict(plan.manifest.get("provenance", {}))
    prov["training_input_evidence"] = why or EVIDENCE.get(kind, "")
    prov["training_input_added"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    out = add_blobs(plan_path, {}, {"training_input": record or TRAINING_INPUTS[kind], "provenance": prov}, out_path=out_path)
    Plan.open(out_path or plan_path)  # the rewritten plan must open and validate
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan")
    ap.add_argument("--kind", required=True, choices=sorted(TRAINING_INPUTS))
    ap.add_argument("--why", default=None, help="evidence to record (default: the built-in record for --kind)")
    a = ap.parse_args(argv)
    m = set_training_input(a.plan, a.kind, a.why)
    print(f"{a.plan}: training_input {m['training_input']}")
    return 0


if __name__ == "__main__":   # errors as one line (exit 1, or 2 for usage), as msld's own commands
    import sys

    from msld_sdk.cli.options import run_command
    raise SystemExit(run_command("python -m msld_export.training.training_input", main, sys.argv[1:]))
