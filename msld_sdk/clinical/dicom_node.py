"""A DICOM node (``msld listen``): receive series by C-STORE, segment each when complete, send
the SEG to a DICOMweb URL (STOW-RS) or a DICOM destination (C-STORE).

A series is complete when nothing new arrived for ``settle_s`` seconds; the queue is bounded.
The region comes from TID 1500 SR marks for the series, else ``center``. Received instances and
a job record per series live under ``work``, so a restarted node finishes pending series and
nothing is sent twice. The rules (queue, bad instances, restart) are in docs/pacs.md.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import InputError, MsldError, PacsError
from ..extras import require

log = logging.getLogger("msld_sdk.node")

SR_MODALITY = "SR"
OK, CANNOT_UNDERSTAND, OUT_OF_RESOURCES = 0x0000, 0xC210, 0xA700
PENDING_STATES = ("receiving", "queued", "running")


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def sr_marks(sr_files, vol) -> list[tuple]:
    """(x, y, z) for every planar ROI of the TID 1500 SRs that lies on an image of ``vol``
    (z = that image's index in position order): a point, or the centre of a region's points."""
    hd = require("highdicom", "reading DICOM SR measurement reports")
    index = {str(d.SOPInstanceUID): z for z, d in enumerate(vol.datasets)}
    marks = []
    for f in sr_files:
        try:
            sr = hd.sr.srread(str(f))
            groups = sr.content.get_planar_roi_measurement_groups()
        except Exception as e:
            log.warning("msld node: SR %s: not a readable TID 1500 measurement report (%s); ignored",
                        Path(f).name, type(e).__name__)
            continue
        for g in groups:
            roi = g.roi
            if roi is None or not hasattr(roi, "ContentSequence"):
                continue
            try:
                sop = str(roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            except (AttributeError, IndexError):
                continue
            if sop not in index:
                continue
            pts = np.asarray(roi.value, float).reshape(-1, 2)
            x, y = (pts.min(0) + pts.max(0)) / 2 if len(pts) > 1 else pts[0]
            marks.append((float(x), float(y), float(index[sop])))
    return sorted(set(marks))


def sr_referenced_series(ds) -> list[str]:
    out = []
    for ev in ds.get("CurrentRequestedProcedureEvidenceSequence", []) or []:
        for s in ev.get("ReferencedSeriesSequence", []) or []:
            out.append(str(s.SeriesInstanceUID))
    return out


class DicomDest:
    """``dicom://AET@HOST:PORT``: C-STORE SCU."""

    def __init__(self, url: str, calling_aet: str = "MSLD", timeout: float = 30.0):
        from urllib.parse import urlsplit
        u = urlsplit(url)
        if not (u.username and u.hostname and u.port):
            raise InputError(f"DICOM destination must be dicom://AET@HOST:PORT, got {url}")
        self.aet, self.host, self.port, self.calling, self.timeout = u.username, u.hostname, u.port, calling_aet, timeout
        self.server = f"dicom://{self.aet}@{self.host}:{self.port}"

    def send(self, datasets) -> str:
        from pynetdicom import AE
        from pynetdicom.sop_class import SegmentationStorage
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.add_requested_context(SegmentationStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
        assoc = ae.associate(self.host, self.port, ae_title=self.aet)
        if not assoc.is_established:
            raise PacsError(f"{self.server}: association for C-STORE refused or not answered; check the AE title, "
                            "host and port, and that the destination knows this node's AE title")
        try:
            for d in datasets:
                st = assoc.send_c_store(d)
                code = int(st.Status) if st is not None and "Status" in st else None
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise PacsError(f"{self.server}: C-STORE of SEG {d.SOPInstanceUID} failed: status "
                                    f"{'none (timeout)' if code is None else hex(code)}")
        finally:
            assoc.release()
        return "stored"


class Node:
    """The C-STORE SCP, its job records and one segmentation worker (see the module docstring)."""

    def __init__(self, seg, dest: str, work, ae_title: str = "MSLD", host: str = "127.0.0.1", port: int = 11112,
                 settle_s: float = 5.0, center=None, slices=None, k=None, steps=None, seed: int = 0, eta: float | None = None,
                 views=None, max_pending: int = 16, pacs_kw: dict | None = None):
        require("pynetdicom", "msld listen (a DICOM node)")
        from ..roi import training_input
        # checked before listening: a bad value would otherwise refuse every series that arrives
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise InputError(f"max_pending (--max-pending) must be a positive number of series, got {max_pending!r}")
        if not float(settle_s) >= 0:
            raise InputError(f"settle_s (--settle) must be >= 0 seconds, got {settle_s!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise InputError(f"port (--port) must be from 0 to 65535, got {port!r}")
        if center is not None and len(center) != 3:
            raise InputError(f"center (--center) is X Y Z of a series, got {center!r}")
        seg.options(k=k, steps=steps, seed=0 if seed is None else seed, eta=eta, views=views)
        self.seg, self.dest_url = seg, dest
        self.work = Path(work)
        for d in ("incoming", "sr", "jobs", "out", "bad"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        self.ae_title, self.host, self.port, self.settle_s = ae_title, host, int(port), float(settle_s)
        self.center, self.slices = center, slices
        self.run_kw = dict(k=k, steps=steps, seed=0 if seed is None else int(seed), eta=eta, views=views)
        self.info = training_input(seg.plan.manifest)
        self.max_pending = int(max_pending)
        if dest.startswith(("http://", "https://")):
            from .dicomweb import Pacs
            self.dest = Pacs(dest, **(pacs_kw or {}))
        elif dest.startswith("dicom://"):
            self.dest = DicomDest(dest, calling_aet=ae_title)
        else:
            raise InputError(f"--dest must be a DICOMweb URL (http[s]://...) or dicom://AET@HOST:PORT, got {dest!r}")
        self.lock = threading.RLock()
        self.last: dict = {}                    # series -> monotonic time of its last arrival
        self.queue: queue.Queue = queue.Queue(maxsize=self.max_pending)
        self.stop_event = threading.Event()
        self.server = None
        self._threads: list = []
        self._recover()

    # ---- job records -------------------------------------------------------------------------
    def job_path(self, series: str) -> Path:
        return self.work / "jobs" / f"{series}.json"

    def job(self, series: str) -> dict:
        p = self.job_path(series)
        if p.exists():
            return json.loads(p.read_text())
        return {"series": series, "state": "receiving", "done": {}, "bad": [], "error": "", "attempts": 0}

    def save_job(self, j: dict) -> None:
        with self.lock:
            _write_json(self.job_path(j["series"]), j)

    def _recover(self) -> None:
        now = time.monotonic()
        for d in sorted((self.work / "incoming").iterdir()):
            j = self.job(d.name)
            if j["state"] in PENDING_STATES:
                if j["state"] != "receiving":
                    log.warning("msld node: series %s was %s when the node stopped; it is done again", d.name,
                                j["state"])
                j["state"] = "receiving"
                self.save_job(j)
                self.last[d.name] = now

    # ---- C-STORE ------------------------------------------------------------------------------
    def handle_store(self, event) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            series, sop = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
        except Exception as e:
            name = f"unparsed-{time.time_ns()}.json"
            _write_json(self.work / "bad" / name, {"reason": f"cannot be decoded: {type(e).__name__}: {e}"})
            log.warning("msld node: an instance that cannot be decoded was refused (C210), recorded in bad/%s", name)
            return CANNOT_UNDERSTAND
        if str(ds.get("Modality", "")) == SR_MODALITY:
            ds.save_as(str(self.work / "sr" / f"{sop}.dcm"), enforce_file_format=True)
            refs = sr_referenced_series(ds)
            with self.lock:
                for s in refs:
                    if s in self.last or (self.work / "incoming" / s).is_dir():
                        self._touch(s)
            log.info("msld node: SR %s received (references series %s)", sop, ", ".join(refs) or "none")
            return OK
        if "PixelData" not in ds:
            log.warning("msld node: instance %s of series %s has neither pixel data nor SR content; ignored", sop, series)
            return OK
        with self.lock:
            new = series not in self.last
            if new and len(self.last) >= self.max_pending:
                log.warning("msld node: series %s refused (A700): %d series already pending", series, len(self.last))
                return OUT_OF_RESOURCES
            try:
                ds.pixel_array          # the bad-instance rule: undecodable pixels are left out
            except Exception as e:
                j = self.job(series)
                j["bad"].append({"sop": sop, "reason": f"{type(e).__name__}: {e}"[:300]})
                self.save_job(j)
                log.warning("msld node: series %s: instance %s has undecodable pixel data; left out (C210)", series, sop)
                return CANNOT_UNDERSTAND
            d = self.work / "incoming" / series
            d.mkdir(exist_ok=True)
            tmp = d / f".{sop}.tmp"
            ds.save_as(str(tmp), enforce_file_format=True)
            os.replace(tmp, d / f"{sop}.dcm")
            if new:
                log.info("msld node: series %s: receiving", series)
            self._touch(series)
        return OK

    def _touch(self, series: str) -> None:
        j = self.job(series)
        if j["state"] != "receiving":
            j["state"] = "receiving"      # more data for a series already handled: handled again (new marks)
            self.save_job(j)
        self.last[series] = time.monotonic()

    # ---- completion and the worker -----------------------------------------------------------
    def _monitor(self) -> None:
        while not self.stop_event.wait(0.2):
            now = time.monotonic()
            with self.lock:
                ready = [s for s, t in self.last.items() if now - t >= self.settle_s]
                for s in ready:
                    try:
                        self.queue.put_nowait(s)
                    except queue.Full:
                        break
                    del self.last[s]
                    j = self.job(s)
                    j["state"] = "queued"
                    self.save_job(j)
                    log.info("msld node: series %s: complete (%d instances, no new one for %.0f s); queued", s,
                             len(list((self.work / "incoming" / s).glob("*.dcm"))), self.settle_s)

    def _worker(self) -> None:
        while not self.stop_event.is_set():
            try:
                s = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.process(s)
            finally:
                self.queue.task_done()

    def regions(self, vol) -> list:
        if self.info["kind"] != "crop":
            return [None]
        srs = [f for f in sorted((self.work / "sr").glob("*.dcm"))]
        pydicom = require("pydicom", "reading DICOM")
        mine = [f for f in srs if str(vol.datasets[0].SeriesInstanceUID) in
                sr_referenced_series(pydicom.dcmread(str(f), stop_before_pixels=True))]
        marks = sr_marks(mine, vol)
        if marks:
            return marks
        if self.center is not None:
            return [tuple(float(v) for v in self.center)]
        raise InputError("this plan was trained on crops around a finding: send a DICOM SR measurement report "
                         "(TID 1500) with a point or region on the series, or start the node with --center X Y Z")

    def process(self, series: str) -> dict:
        from .dicom_seg import write_dicom_seg
        from .dicomweb import Pacs, load_series_complete, seg_identity, seg_params
        from .volume import segment_volume

        j = self.job(series)
        j["state"] = "running"
        self.save_job(j)
        t0 = time.perf_counter()
        try:
            try:                            # the series as received: refused, not retried
                vol = load_series_complete(self.work / "incoming" / series, f"series {series}")
            except PacsError as e:
                raise InputError(str(e)) from None
            mod = sorted({str(d.get("Modality", "")) for d in vol.datasets})
            want = self.info.get("modality")
            if want and mod != [want]:
                raise InputError(f"series is {'/'.join(mod)}, not {want}; this plan segments {want}")
            study = str(vol.datasets[0].StudyInstanceUID)
            sent = []
            for region in self.regions(vol):
                params = seg_params(self.seg, region, self.slices, **self.run_kw)
                seg_series, sop_uids = seg_identity(vol, self.seg.plan.manifest, params)
                if seg_series in j["done"]:
                    continue
                if isinstance(self.dest, Pacs) and set(self.dest.instances(study, seg_series)) == set(sop_uids):
                    log.info("msld node: series %s region %s: SEG %s already at %s; not segmented again", series,
                             region, seg_series, self.dest.server)
                else:
                    log.info("msld node: series %s: segmenting region %s (%d slices)", series, region, vol.shape[0])
                    vr = segment_volume(self.seg, vol, roi=region, slices=self.slices, **self.run_kw)
                    out = self.work / "out" / series / seg_series / "seg.dcm"
                    files = write_dicom_seg(out, vr, vol, self.seg.plan.manifest, series_uid=seg_series,
                                            sop_uids=sop_uids, series_description="MSLD segmentation")
                    import pydicom
                    dss = [pydicom.dcmread(str(f)) for f in files]
                    if isinstance(self.dest, Pacs):
                        self.dest.store_seg(study, seg_series, dss)
                    else:
                        self.dest.send(dss)
                j["done"][seg_series] = {"region": list(region) if region is not None else None,
                                         "finished": time.time()}
                self.save_job(j)
                sent.append(seg_series)
                log.info("msld node: series %s: SEG series %s stored at %s", series, seg_series, self.dest.server)
            j.update(state="done", error="")
            log.info("msld node: series %s: done, %d SEG series sent (%.1f s)", series, len(sent),
                     time.perf_counter() - t0)
        except PacsError as e:
            j["attempts"] = j.get("attempts", 0) + 1
            j.update(state="failed", error=str(e))
            log.error("msld node: series %s: sending failed (attempt %d): %s", series, j["attempts"], e)
            if j["attempts"] < 3:
                j["state"] = "receiving"
                with self.lock:
                    self.last[series] = time.monotonic() + 5 * j["attempts"]   # tried again after a pause
        except (MsldError, OSError) as e:
            j.update(state="refused", error=str(e))
            log.error("msld node: series %s: refused: %s", series, e)
        self.save_job(j)
        return j

    # ---- running ------------------------------------------------------------------------------
    def start(self) -> "Node":
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self.server = ae.start_server((self.host, self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self.handle_store)])
        for fn in (self._monitor, self._worker):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self._threads.append(t)
        log.info("msld node: %s listening on %s:%d; SEG to %s; %d series pending from before", self.ae_title,
                 self.host, self.port, getattr(self.dest, "server", self.dest_url), len(self.last))
        return self

    def idle(self) -> bool:
        with self.lock:
            return not self.last and self.queue.unfinished_tasks == 0

    def stop(self) -> None:
        self.stop_event.set()
        if self.server is not None:
            self.server.shutdown()
        for t in self._threads:
            t.join(5)
