"""A real PACS for the tests: Orthanc (Debian's orthanc + orthanc-dicomweb) on 127.0.0.1 with a
temporary configuration and storage, a CT series made from a shared LIDC crop, a 503 proxy."""
from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")
USER, PASSWORD = "msld", "s3cret-pw"
CANVAS = 512
NODULE_AT = (250, 230)           # x, y of the crop's centre in the 512 x 512 canvas


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or shutil.which("orthanc")


def dicomweb_plugin() -> str | None:
    for d in PLUGIN_DIRS:
        for p in sorted(Path(d).glob("libOrthancDicomWeb.so*")) if Path(d).is_dir() else []:
            return str(p)
    return None


class Orthanc:
    """One Orthanc process; ``stop()`` and ``start()`` again keep its storage."""

    def __init__(self, work: Path, modalities: dict | None = None):
        self.work = Path(work)
        (self.work / "db").mkdir(parents=True, exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        self.aet = "ORTHANC"
        self.url = f"http://127.0.0.1:{self.http_port}/dicom-web"
        cfg = {"Name": "msld-test", "StorageDirectory": str(self.work / "db"), "IndexDirectory": str(self.work / "db"),
               "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.aet,
               "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD},
               "OverwriteInstances": True, "DicomModalities": modalities or {},
               "Plugins": [dicomweb_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        self.config = self.work / "orthanc.json"
        self.config.write_text(json.dumps(cfg, indent=1))
        self.proc = None

    def start(self, timeout: float = 30.0) -> "Orthanc":
        import requests
        self.log = open(self.work / "orthanc.log", "ab")
        self.proc = subprocess.Popen([orthanc_binary(), str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.work / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{self.http_port}/system", auth=(USER, PASSWORD), timeout=2).ok:
                    return self
            except requests.exceptions.ConnectionError:
                pass
            time.sleep(0.2)
        raise RuntimeError("Orthanc did not answer within %.0f s" % timeout)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def client(self, url: str | None = None):
        import requests
        from dicomweb_client import DICOMwebClient
        s = requests.Session()
        s.auth = (USER, PASSWORD)
        c = DICOMwebClient(url or self.url, session=s, timeout=20)
        c.set_http_retry_params(retry=False)
        return c

    def upload(self, folder: Path) -> None:
        import pydicom
        self.client().store_instances([pydicom.dcmread(str(f)) for f in sorted(Path(folder).glob("*.dcm"))])

    def seg_series(self, study: str) -> list[dict]:
        """[{series, instances: [SOPInstanceUID]}] of every SEG series in ``study``."""
        c = self.client()
        out = []
        for s in c.search_for_series(study_instance_uid=study, search_filters={"Modality": "SEG"}):
            uid = s["0020000E"]["Value"][0]
            inst = c.search_for_instances(study_instance_uid=study, series_instance_uid=uid)
            out.append({"series": uid, "instances": sorted(i["00080018"]["Value"][0] for i in inst)})
        return out

    def retrieve(self, study: str, series: str) -> list:
        return self.client().retrieve_series(study, series)


def lidc_hu(n_crops: int = 3) -> np.ndarray:
    """Z x 512 x 512 HU: the crops of one LIDC nodule (consecutive stored slices) pasted at
    NODULE_AT in an air (-1000 HU) canvas. The plan maps HU per crop by min-max (after clipping
    at -1024), so any linear map of the 8-bit crops onto HU gives the training crops back; here
    0..255 -> -1000..+400 HU."""
    from PIL import Image

    from msld_sdk.evaluation.datasets import default_data_root    # $MSLD_DATA, else ../shared/data
    folder = sorted((default_data_root() / "lidc").glob("LIDC-IDRI-*/nodule-0/image"))[0]
    files = sorted(folder.glob("slice-*.png"), key=lambda p: int(p.stem.split("-")[1]))[:n_crops]
    hu = np.full((len(files), CANVAS, CANVAS), -1000.0, np.float32)
    x, y = NODULE_AT
    for z, f in enumerate(files):
        a = np.asarray(Image.open(f).convert("L"), np.float32)
        h, w = a.shape
        hu[z, y - h // 2:y + h - h // 2, x - w // 2:x + w - w // 2] = -1000.0 + a * (1400.0 / 255.0)
    return hu


# RFC 9110 7.6.1 hop-by-hop headers (and the length, set anew): a proxy must not forward them. Forwarding
# Orthanc's Keep-Alive on this HTTP/1.0 proxy made the client reuse a socket the proxy had closed, so a
# request now and then died before reaching it (an attempt the proxy never counted).
HOP_BY_HOP = ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "content-length")


class Flaky503:
    """An HTTP proxy to ``target`` answering 503 to the first ``fail`` requests whose method is in
    ``methods`` (fail < 0: all of them); counts what it saw. 127.0.0.1 only."""

    def __init__(self, target: str, fail: int = 1, methods=("POST",)):
        import requests
        self.target, self.fail, self.methods, self.seen = target.rstrip("/"), fail, set(methods), []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _do(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0)) \
                    if "chunked" not in self.headers.get("Transfer-Encoding", "") else self._chunked()
                outer.seen.append(self.command)
                if self.command in outer.methods and (outer.fail < 0 or outer.fail > 0):
                    outer.fail -= 1 if outer.fail > 0 else 0
                    self.send_response(503, "Service Unavailable")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                hdrs = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP + ("host",)}
                r = requests.request(self.command, outer.target + self.path, headers=hdrs, data=body, timeout=30)
                self.send_response(r.status_code, r.reason)
                for k, v in r.headers.items():
                    if k.lower() not in HOP_BY_HOP + ("content-encoding",):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

            def _chunked(self):
                data = b""
                while True:
                    n = int(self.rfile.readline().strip() or b"0", 16)
                    if n == 0:
                        self.rfile.readline()
                        return data
                    data += self.rfile.read(n)
                    self.rfile.readline()

            do_GET = do_POST = do_DELETE = _do

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), H)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = "/dicom-web") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def orthanc_or_skip(work: Path, modalities: dict | None = None) -> Orthanc:
    import pytest
    pytest.importorskip("dicomweb_client")
    pytest.importorskip("highdicom")
    if orthanc_binary() is None or dicomweb_plugin() is None:
        pytest.skip("Orthanc with its DICOMweb plugin is not installed (scripts/test.sh installs the Debian "
                    "packages orthanc and orthanc-dicomweb where apt-get exists)")
    try:
        from msld_sdk.evaluation.datasets import default_data_root
        if not (default_data_root() / "lidc").is_dir():
            pytest.skip(f"no LIDC crops under {default_data_root()} (set MSLD_DATA)")
    except ImportError:
        pass
    return Orthanc(work, modalities).start()


def segment_local(folder: Path, out: Path, center, slices, k, steps, seed) -> list:
    """``msld segment SERIES_DIR --dicom-seg``: the local reference the PACS results must equal."""
    from msld_sdk.cli import main
    args = ["segment", str(folder), "--center", *map(str, center), "--dicom-seg", str(out / "ref.dcm"),
            "-k", str(k), "--steps", str(steps), "--seed", str(seed), "-o", str(out / "o"), "-q"]
    if slices is not None:
        args += ["--slices", *map(str, slices)]
    assert main(args) == 0
    return [out / "ref.dcm", out / "ref_mean.dcm"]


def assert_seg_equals(pacs_datasets: list, ref_files: list, source_datasets: list) -> None:
    """The SEG read back from the PACS: readable by highdicom, referencing the source instances,
    its frames equal to the local run's (binary and mean instance)."""
    import highdicom as hd
    uids = [str(d.SOPInstanceUID) for d in source_datasets]
    got = {str(d.SegmentationType): hd.seg.Segmentation.from_dataset(d) for d in pacs_datasets}
    assert sorted(got) == ["BINARY", "FRACTIONAL"]
    for ref_file in ref_files:
        ref = hd.seg.segread(str(ref_file))
        s = got[str(ref.SegmentationType)]
        n = len(ref.SegmentSequence)
        assert len(s.SegmentSequence) == n
        a = s.get_pixels_by_source_instance(uids, segment_numbers=list(range(1, n + 1)),
                                            assert_missing_frames_are_empty=True)
        b = ref.get_pixels_by_source_instance(uids, segment_numbers=list(range(1, n + 1)),
                                              assert_missing_frames_are_empty=True)
        np.testing.assert_array_equal(a, b)
        assert a.any()
        r = s.ReferencedSeriesSequence[0]
        assert r.SeriesInstanceUID == source_datasets[0].SeriesInstanceUID
        assert sorted(x.ReferencedSOPInstanceUID for x in r.ReferencedInstanceSequence) == sorted(uids)
