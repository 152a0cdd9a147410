"""``msld segment --dicomweb URL --study S ...`` (a series from a PACS, its SEG stored back) and
``msld listen`` (a DICOM node); kept apart from main.py and clinical.py."""
from __future__ import annotations

import argparse
import logging
import signal
import threading

from .options import positive_int


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-bundle", default=None, metavar="PEM",
                   help="CA certificate(s) that sign the DICOMweb server's TLS certificate (default: the system's)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per DICOMweb request (default: 30)")
    p.add_argument("--retries", type=int, default=3,
                   help="retries after a refused connection, a timeout or HTTP 408/429/502/503/504, with "
                        "exponential back-off (default: 3)")


def add_pacs_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("PACS (DICOMweb); credentials from $MSLD_DICOMWEB_USER / $MSLD_DICOMWEB_PASSWORD, "
                             "$MSLD_DICOMWEB_TOKEN or netrc, never on the command line")
    g.add_argument("--dicomweb", default=None, metavar="URL",
                   help="read the series from this DICOMweb server (e.g. http://127.0.0.1:8042/dicom-web) instead "
                        "of files; the SEG is written into -o and, with --store, sent back (default: none, files)")
    g.add_argument("--study", default=None, metavar="UID", help="--dicomweb: StudyInstanceUID (default: none)")
    g.add_argument("--series", default=None, metavar="UID",
                   help="--dicomweb: SeriesInstanceUID (default: the study's CT series with the most instances)")
    g.add_argument("--store", action="store_true",
                   help="--dicomweb: send the two SEG instances back (STOW-RS); a rerun of the same request "
                        "stores nothing new")
    g.add_argument("--force", action="store_true", help="--store: send it again even when already stored (replace)")
    _add_server_args(g)


def pacs_route(a):
    """The command for --dicomweb, or None."""
    if getattr(a, "dicomweb", None) is None:
        if getattr(a, "study", None) or getattr(a, "store", False):
            raise SystemExit("msld segment: --study / --store need --dicomweb URL")
        return None
    if a.images:
        raise SystemExit("msld segment: give either input files or --dicomweb URL --study UID, not both")
    if not a.study:
        raise SystemExit("msld segment: --dicomweb needs --study UID")
    if a.ray is not None or a.dicom_seg:
        raise SystemExit("msld segment: --dicomweb writes its SEG into -o; --ray and --dicom-seg do not apply")
    if a.allow_modality or a.accept_irregular_slices:
        raise SystemExit("msld segment: --dicomweb segments only whole, evenly spaced series of the plan's "
                         "modality; --allow-modality and --accept-irregular-slices do not apply (fetch the "
                         "series into a folder and segment that instead)")
    return cmd_segment_dicomweb


def cmd_segment_dicomweb(a) -> int:
    from ..clinical.dicomweb import connect, segment_from_pacs
    from ..segmenter import Segmenter
    if a.center is not None and len(a.center) not in (2, 3):
        raise SystemExit("msld segment: --center takes X Y, or X Y Z for a series")
    pacs = connect(a.dicomweb, ca_bundle=a.ca_bundle, timeout=a.timeout, retries=a.retries)
    seg = Segmenter(a.plan, backend=a.backend, threads=a.threads, progress=not a.quiet, precision=a.precision)
    roi = a.roi if a.roi is not None else a.center
    r = segment_from_pacs(seg, pacs, a.study, a.series, roi=roi, slices=a.slices, k=a.k, steps=a.steps,
                          seed=a.seed, eta=a.eta, views=a.views, solver=a.solver, threshold=a.threshold,
                          timesteps=a.timesteps,
                          out=a.out, store=a.store, force=a.force)
    what = {"stored": "stored", "replaced": "stored again (--force)", "exists": "already stored: nothing sent",
            "not stored": "not stored (add --store)"}[r.outcome]
    files = ", ".join(str(f) for f in r.files) or "none written"
    print(f"{pacs.server}: study {r.study} series {r.series} -> SEG series {r.seg_series}: {what} ({files})")
    return 0


def add_listen_parser(sub, common, add_run_args) -> None:
    p = sub.add_parser("listen", parents=[common], help="a DICOM node: receive series by C-STORE, segment each when "
                       "complete, send the DICOM SEG to a DICOMweb or DICOM destination")
    p.add_argument("--ae-title", default="MSLD", help="this node's AE title (default: MSLD)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default: 11112)")
    p.add_argument("--dest", required=True, metavar="URL",
                   help="where the SEG goes: a DICOMweb root (STOW-RS) or dicom://AET@HOST:PORT (C-STORE)")
    p.add_argument("--work", default="msld_node", metavar="DIR",
                   help="received instances, job records and outputs; a restart resumes from it (default: msld_node)")
    p.add_argument("--settle", type=float, default=5.0,
                   help="a series is complete when nothing new arrived for this many seconds (default: 5)")
    p.add_argument("--max-pending", type=positive_int, default=16,
                   help="series waiting at most; more are refused (C-STORE A700) until one is done (default: 16)")
    p.add_argument("--center", nargs=3, type=float, default=None, metavar=("X", "Y", "Z"),
                   help="crop-trained plans: the region when no SR mark came with the series (default: none)")
    p.add_argument("--slices", nargs=2, type=int, default=None, metavar=("Z0", "Z1"),
                   help="segment slices Z0..Z1-1 around every mark (default: the marked slice)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    add_run_args(p)
    _add_server_args(p)


def cmd_listen(a) -> int:
    from ..clinical.dicom_node import Node
    from ..segmenter import Segmenter
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s", force=True)
    logging.getLogger("msld_sdk").setLevel(logging.DEBUG if a.verbose else logging.INFO)   # -v: every detail
    seg = Segmenter(a.plan, backend=a.backend, threads=a.threads, progress=False, precision=a.precision)
    node = Node(seg, a.dest, a.work, ae_title=a.ae_title, host=a.host, port=a.port, settle_s=a.settle,
                center=a.center, slices=a.slices, k=a.k, steps=a.steps, seed=a.seed, eta=a.eta, views=a.views,
                max_pending=a.max_pending,
                pacs_kw={"ca_bundle": a.ca_bundle, "timeout": a.timeout, "retries": a.retries}).start()
    done = threading.Event()
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda *_: done.set())
    done.wait()
    node.stop()
    return 0
