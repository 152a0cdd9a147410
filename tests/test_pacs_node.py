"""msld listen against a real Orthanc (127.0.0.1): a series and an SR with a point sent by C-STORE
from a pynetdicom SCU; the SEG for that point appears in Orthanc once, also after a SIGKILL."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ct_series import write_series
from pacs_support import NODULE_AT, PASSWORD, ROOT, USER, assert_seg_equals, free_port, lidc_hu, orthanc_or_skip, \
    segment_local

K, SEED = 2, 0
X, Y = NODULE_AT


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    o = orthanc_or_skip(tmp_path_factory.mktemp("orthanc_node"))
    yield o
    o.stop()


def point_sr(datasets, z, x, y):
    """A TID 1500 measurement report with one point on image z (as a viewer writes a reader's mark)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    obs = hd.sr.ObservationContext(observer_person_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name="Reader^A")))
    region = hd.sr.ImageRegion(graphic_type=hd.sr.GraphicTypeValues.POINT, graphic_data=np.array([[x, y]], float),
                               source_image=hd.sr.SourceImageForRegion.from_source_image(datasets[z]))
    grp = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="nodule 1"), referenced_region=region,
        finding_type=codes.SCT.Nodule)
    rep = hd.sr.MeasurementReport(observation_context=obs, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                  imaging_measurements=[grp])
    return hd.sr.Comprehensive3DSR(evidence=datasets, content=rep, series_instance_uid=hd.UID(), series_number=50,
                                   sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test")


def c_store(port, datasets, aet="MSLD"):
    from pynetdicom import AE
    from pynetdicom.sop_class import Comprehensive3DSRStorage, CTImageStorage
    ae = AE(ae_title="SCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Comprehensive3DSRStorage)
    t0 = time.time()
    while True:      # the node may still be starting: bounded
        assoc = ae.associate("127.0.0.1", port, ae_title=aet)
        if assoc.is_established or time.time() - t0 > 60:
            break
        time.sleep(0.5)
    assert assoc.is_established, "the node did not accept an association within 60 s"
    statuses = [int(assoc.send_c_store(d).Status) for d in datasets]
    assoc.release()
    return statuses


def start_node(work, port, orthanc, log, steps):
    env = dict(os.environ, MSLD_DICOMWEB_USER=USER, MSLD_DICOMWEB_PASSWORD=PASSWORD,
               PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'export'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.Popen([sys.executable, "-m", "msld_sdk.cli", "listen", "--ae-title", "MSLD", "--port", str(port),
                             "--dest", orthanc.url, "--work", str(work), "--settle", "1", "-k", str(K), "--steps",
                             str(steps), "--seed", str(SEED), "--threads", "2"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_for(path: Path, text: str, proc, timeout: float = 180.0, count: int = 1) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.read_text().count(text) >= count:
            return
        assert proc.poll() is None, f"node exited early:\n{path.read_text()[-3000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in the node's log within {timeout:.0f} s:\n{path.read_text()[-3000:]}")


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_node_receives_series_and_sr_point_stores_seg_and_survives_sigkill(orthanc, tmp_path):
    """Acceptance: msld listen receives a series and an SR with a point by C-STORE and the SEG for that
    point appears in Orthanc; killed (SIGKILL) during a segmentation and restarted, it finishes once."""
    steps = 20                                   # long enough to be killed in the middle
    hu = lidc_hu()
    ds = write_series(tmp_path / "CT", hu)
    study = ds[0].StudyInstanceUID
    sr = point_sr(ds, 1, X, Y)
    port, work, logf = free_port(), tmp_path / "node", tmp_path / "node.log"
    with open(logf, "ab") as log:
        p = start_node(work, port, orthanc, log, steps)
        try:
            assert c_store(port, ds + [sr]) == [0] * (len(ds) + 1)
            wait_for(logf, "segmenting region", p)
            p.send_signal(signal.SIGKILL)
            p.wait(10)
            assert orthanc.seg_series(study) == []
            p = start_node(work, port, orthanc, log, steps)
            wait_for(logf, "was running when the node stopped", p, timeout=60)
            wait_for(logf, "done, 1 SEG series sent", p)
        finally:
            stop(p)
    text = logf.read_text()
    assert text.count("segmenting region") == 2 and text.count("stored at") == 1
    segs = orthanc.seg_series(study)
    assert len(segs) == 1 and len(segs[0]["instances"]) == 2
    ref = segment_local(tmp_path / "CT", tmp_path / "local", (X, Y, 1), None, K, steps, SEED)
    assert_seg_equals(orthanc.retrieve(study, segs[0]["series"]), ref, ds)

    # restarted once more with nothing pending: nothing is segmented or stored again
    with open(logf, "ab") as log:
        p = start_node(work, port, orthanc, log, steps)
        try:
            wait_for(logf, "0 series pending from before", p, timeout=60)
        finally:
            stop(p)
    assert orthanc.seg_series(study) == segs and logf.read_text().count("segmenting region") == 2


def test_node_bad_instance_rule_and_center_fallback(orthanc, tmp_path):
    """An instance with undecodable pixels is answered C210 and left out; an edge slice missing leaves
    the series whole (segmented with --center's fallback: no SR), a missing inner slice refuses it."""
    import json

    from msld_sdk import Segmenter
    from msld_sdk.clinical.dicom_node import Node

    hu = np.concatenate([lidc_hu()] * 2)
    ds = write_series(tmp_path / "CT", hu)
    ds[-1].PixelData = ds[-1].PixelData[:100]               # last slice: bad
    inner = write_series(tmp_path / "CT2", hu, study=ds[0].StudyInstanceUID)
    inner[2].PixelData = inner[2].PixelData[:100]           # an inner slice: bad
    os.environ["MSLD_DICOMWEB_USER"], os.environ["MSLD_DICOMWEB_PASSWORD"] = USER, PASSWORD
    try:
        port = free_port()
        node = Node(Segmenter("lidc", threads=2), orthanc.url, tmp_path / "work", port=port, settle_s=0.5,
                    center=(X, Y, 1), k=K, steps=2, seed=SEED, pacs_kw={"backoff_s": 0.05}).start()
        try:
            st = c_store(port, ds + inner)
            assert st == [0] * 5 + [0xC210] + [0, 0, 0xC210, 0, 0, 0]
            t0 = time.time()
            while not node.idle() and time.time() - t0 < 120:
                time.sleep(0.2)
        finally:
            node.stop()
    finally:
        del os.environ["MSLD_DICOMWEB_USER"], os.environ["MSLD_DICOMWEB_PASSWORD"]
    j1 = json.loads((tmp_path / "work" / "jobs" / f"{ds[0].SeriesInstanceUID}.json").read_text())
    j2 = json.loads((tmp_path / "work" / "jobs" / f"{inner[0].SeriesInstanceUID}.json").read_text())
    assert j1["state"] == "done" and [b["sop"] for b in j1["bad"]] == [ds[-1].SOPInstanceUID]
    assert j2["state"] == "refused" and "partial or irregular" in j2["error"] and len(j2["bad"]) == 1
    segs = orthanc.seg_series(ds[0].StudyInstanceUID)
    assert len(segs) == 1 and segs[0]["series"] in j1["done"]


@pytest.mark.parametrize("kw,msg", [
    ({"k": 99}, "k must be"), ({"steps": 0}, "steps must be"), ({"eta": 0.7}, "eta 0 only"),
    ({"seed": -1}, "seed must be"), ({"max_pending": 0}, "max_pending"), ({"settle_s": -3}, "settle_s"),
    ({"port": 70000}, "port"), ({"center": (1, 2)}, "center"),
])
def test_node_refuses_bad_settings_before_listening(tmp_path, kw, msg):
    """A bad value would otherwise refuse (or answer A700 to) every series that arrives."""
    pytest.importorskip("pynetdicom")
    from msld_sdk import InputError, Segmenter
    from msld_sdk.clinical.dicom_node import Node
    with pytest.raises(InputError, match=msg):
        Node(Segmenter("lidc"), "http://127.0.0.1:1/dicom-web", tmp_path / "work", **kw)
    assert not (tmp_path / "work").exists()
