"""DICOMweb against a real Orthanc started here (127.0.0.1): a LIDC-crop CT series pulled, its SEG
stored once, equal to the local-folder run; failures end in one clear error, nothing half-stored."""
import logging

import numpy as np
import pytest

from ct_series import write_series
from pacs_support import NODULE_AT, PASSWORD, USER, Flaky503, assert_seg_equals, lidc_hu, orthanc_or_skip, \
    segment_local

from msld_sdk.errors import InputError, PacsError

K, STEPS, SEED = 2, 2, 7
X, Y = NODULE_AT


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    o = orthanc_or_skip(tmp_path_factory.mktemp("orthanc"))
    yield o
    o.stop()


@pytest.fixture(autouse=True)
def creds(monkeypatch):
    monkeypatch.setenv("MSLD_DICOMWEB_USER", USER)
    monkeypatch.setenv("MSLD_DICOMWEB_PASSWORD", PASSWORD)
    monkeypatch.delenv("MSLD_DICOMWEB_TOKEN", raising=False)


def upload_series(orthanc, folder, hu=None, **kw):
    ds = write_series(folder, lidc_hu() if hu is None else hu, **kw)
    orthanc.upload(folder)
    return ds


@pytest.fixture(scope="module")
def lidc_ct(orthanc, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lidc_ct") / "CT"
    return folder, upload_series(orthanc, folder)


@pytest.fixture(scope="module")
def lidc():
    from msld_sdk import Segmenter
    return Segmenter("lidc")


def pacs(url, **kw):
    from msld_sdk.clinical.dicomweb import connect
    return connect(url, backoff_s=kw.pop("backoff_s", 0.05), timeout=kw.pop("timeout", 10), **kw)


def test_cli_round_trip_stores_once_and_force_replaces(orthanc, lidc_ct, tmp_path, capsys, caplog):
    """Acceptance: msld segment --dicomweb URL --study S --center X Y Z --slices A B --store stores two
    SEG instances equal to the local-folder run; a second call stores nothing new; --force replaces."""
    from msld_sdk.cli import main
    folder, ds = lidc_ct
    study = ds[0].StudyInstanceUID
    cmd = ["segment", "--dicomweb", orthanc.url, "--study", study, "--center", str(X), str(Y), "1",
           "--slices", "0", "3", "-k", str(K), "--steps", str(STEPS), "--seed", str(SEED), "-q", "--store"]
    assert main(cmd + ["-o", str(tmp_path / "a")]) == 0
    first = capsys.readouterr()
    assert ": stored (" in first.out and ds[0].SeriesInstanceUID in first.out
    assert "using " + ds[0].SeriesInstanceUID in caplog.text      # the series QIDO-RS picked, in the log
    segs = orthanc.seg_series(study)
    assert len(segs) == 1 and len(segs[0]["instances"]) == 2
    ref = segment_local(folder, tmp_path / "local", (X, Y, 1), (0, 3), K, STEPS, SEED)
    assert_seg_equals(orthanc.retrieve(study, segs[0]["series"]), ref, ds)

    assert main(cmd + ["-o", str(tmp_path / "b")]) == 0
    assert "already stored: nothing sent" in capsys.readouterr().out
    assert orthanc.seg_series(study) == segs
    assert not (tmp_path / "b").exists()                      # nothing segmented either

    assert main(cmd + ["-o", str(tmp_path / "c"), "--force"]) == 0
    assert "stored again (--force)" in capsys.readouterr().out
    assert orthanc.seg_series(study) == segs                  # replaced in place: still one series, two instances
    assert_seg_equals(orthanc.retrieve(study, segs[0]["series"]), ref, ds)


def test_study_only_picks_the_ct_series_with_most_instances(orthanc, lidc, tmp_path):
    big = upload_series(orthanc, tmp_path / "big")
    study = big[0].StudyInstanceUID
    upload_series(orthanc, tmp_path / "small", hu=lidc_hu()[:2], study=study)
    upload_series(orthanc, tmp_path / "mr", hu=np.concatenate([lidc_hu()] * 2), study=study, modality="MR")
    assert pacs(orthanc.url).find_series(study) == big[0].SeriesInstanceUID


def test_solver_and_threshold_reach_the_run(orthanc, lidc, lidc_ct, tmp_path, capsys):
    """--solver and --threshold are applied to a series pulled over DICOMweb (they were dropped:
    the plan's defaults ran), and the options that cannot apply there are refused by name."""
    from msld_sdk.cli import main
    from msld_sdk.clinical.dicomweb import segment_from_pacs
    from msld_sdk.clinical.volume import load_volume, segment_volume
    folder, ds = lidc_ct
    study, series = ds[0].StudyInstanceUID, ds[0].SeriesInstanceUID
    kw = dict(roi=(X, Y, 1), slices=(1, 2), k=K, steps=STEPS, seed=SEED)
    r = segment_from_pacs(lidc, pacs(orthanc.url), study, series, solver="ddim", threshold=0.9,
                          out=tmp_path / "o", **kw)
    vol = load_volume(folder)
    local = segment_volume(lidc, vol, solver="ddim", threshold=0.9, **kw)
    plain = segment_volume(lidc, vol, solver="ddim", **kw)
    assert r.result.solver == "ddim" != lidc.defaults["solver"]
    np.testing.assert_array_equal(r.result.masks, local.masks)
    assert local.masks.sum() < plain.masks.sum()          # the threshold changes the masks here
    for extra in (["--allow-modality"], ["--accept-irregular-slices"]):
        assert main(["segment", "--dicomweb", orthanc.url, "--study", study, *extra, "-o", str(tmp_path / "x")]) == 2
        assert "do not apply" in capsys.readouterr().err


def test_non_ct_series_is_refused(orthanc, lidc, tmp_path):
    from msld_sdk.clinical.dicomweb import segment_from_pacs
    mr = upload_series(orthanc, tmp_path / "mr", modality="MR")
    with pytest.raises(PacsError, match="is MR, not CT"):
        segment_from_pacs(lidc, pacs(orthanc.url), mr[0].StudyInstanceUID, mr[0].SeriesInstanceUID,
                          roi=(X, Y, 1), k=K, steps=STEPS, out=tmp_path / "o", store=True)
    with pytest.raises(PacsError, match="no CT series"):
        pacs(orthanc.url).find_series(mr[0].StudyInstanceUID)
    assert orthanc.seg_series(mr[0].StudyInstanceUID) == []


def test_partial_series_is_refused(orthanc, lidc, tmp_path):
    from msld_sdk.clinical.dicomweb import segment_from_pacs
    hu = np.concatenate([lidc_hu()] * 2)                       # 6 slices, the 4th never sent
    ds = write_series(tmp_path / "all", hu)
    import pydicom
    for d in ds[:3] + ds[4:]:
        pydicom.dcmwrite(str(tmp_path / f"{d.SOPInstanceUID}.dcm"), d, enforce_file_format=True)
    orthanc.client().store_instances([pydicom.dcmread(str(f)) for f in sorted(tmp_path.glob("*.dcm"))])
    with pytest.raises(PacsError, match="partial or irregular"):
        segment_from_pacs(lidc, pacs(orthanc.url), ds[0].StudyInstanceUID, ds[0].SeriesInstanceUID,
                          roi=(X, Y, 1), k=K, steps=STEPS, out=tmp_path / "o", store=True)
    assert orthanc.seg_series(ds[0].StudyInstanceUID) == []


def test_series_changing_while_read_is_read_again(orthanc, lidc_ct, tmp_path, monkeypatch):
    from msld_sdk.clinical import dicomweb
    folder, ds = lidc_ct
    p = pacs(orthanc.url)
    real, calls = dicomweb.Pacs.instances, []

    def instances(self, study, series):      # the first listing holds an instance that then disappears
        got = real(self, study, series)
        calls.append(1)
        return dict(got, **({"1.2.3.4": "x"} if len(calls) == 1 else {}))
    monkeypatch.setattr(dicomweb.Pacs, "instances", instances)
    vol = p.fetch_series(ds[0].StudyInstanceUID, ds[0].SeriesInstanceUID, tmp_path / "s")
    assert vol.shape[0] == 3 and len(calls) == 4
    monkeypatch.setattr(dicomweb.Pacs, "instances", lambda self, st, se: dict(real(self, st, se), **{str(len(calls)): "x"})
                        if not calls.append(1) else {})
    with pytest.raises(PacsError, match="kept changing while read"):
        p.fetch_series(ds[0].StudyInstanceUID, ds[0].SeriesInstanceUID, tmp_path / "t", attempts=2)


def test_wrong_credentials_name_the_fix_and_never_the_secret(orthanc, lidc_ct, monkeypatch, caplog):
    folder, ds = lidc_ct
    monkeypatch.setenv("MSLD_DICOMWEB_PASSWORD", "wrong-pw-XYZ")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(PacsError, match=r"401.*MSLD_DICOMWEB_USER") as e:
        pacs(orthanc.url).find_series(ds[0].StudyInstanceUID)
    assert orthanc.url.split("/dicom-web")[0] in str(e.value) and "QIDO-RS" in str(e.value)
    monkeypatch.delenv("MSLD_DICOMWEB_USER")
    monkeypatch.setenv("MSLD_DICOMWEB_TOKEN", "tok-SECRET-123")
    with pytest.raises(PacsError, match="401"):
        pacs(orthanc.url).find_series(ds[0].StudyInstanceUID)
    for secret in ("wrong-pw-XYZ", "tok-SECRET-123", PASSWORD):
        assert secret not in caplog.text and secret not in str(e.value)
    with pytest.raises(InputError, match="credentials in the DICOMweb URL"):
        pacs(orthanc.url.replace("http://", f"http://{USER}:{PASSWORD}@"))


def test_503_is_retried_and_a_lasting_503_stores_nothing(orthanc, lidc, lidc_ct, tmp_path):
    from msld_sdk.clinical.dicomweb import segment_from_pacs
    folder, ds = lidc_ct
    study, series = ds[0].StudyInstanceUID, ds[0].SeriesInstanceUID
    proxy = Flaky503(f"http://127.0.0.1:{orthanc.http_port}", fail=1, methods=("POST",))
    try:     # one 503 on STOW-RS: retried, stored
        r = segment_from_pacs(lidc, pacs(proxy.url()), study, series, roi=(X + 1, Y, 1), k=K, steps=STEPS,
                              out=tmp_path / "a", store=True)
        assert r.outcome == "stored" and proxy.seen.count("POST") >= 2   # one 503, then stored
        proxy.fail, proxy.seen[:] = -1, []   # every STOW-RS answered 503: bounded retries, one clear error
        with pytest.raises(PacsError, match=r"STOW-RS SEG series .* failed: HTTP 503 .*retried 2 times"):
            segment_from_pacs(lidc, pacs(proxy.url(), retries=2), study, series, roi=(X + 2, Y, 1), k=K,
                              steps=STEPS, out=tmp_path / "b", store=True)
        assert 3 <= proxy.seen.count("POST") <= 9                            # bounded
    finally:
        proxy.close()
    segs = [s for s in orthanc.seg_series(study)]
    assert r.seg_series in [s["series"] for s in segs] and all(len(s["instances"]) == 2 for s in segs)
    from msld_sdk.clinical.dicomweb import seg_identity, seg_params
    from msld_sdk.clinical.volume import load_series
    failed, _ = seg_identity(load_series(folder), lidc.plan.manifest,
                             seg_params(lidc, (X + 2, Y, 1), None, K, STEPS, 0, 0.0, None))
    assert failed not in [s["series"] for s in segs]


def test_orthanc_stopped_mid_run_gives_one_error_and_nothing_stored(orthanc, lidc, lidc_ct, tmp_path, monkeypatch):
    from msld_sdk.clinical import volume
    from msld_sdk.clinical.dicomweb import segment_from_pacs
    folder, ds = lidc_ct
    study = ds[0].StudyInstanceUID
    before = orthanc.seg_series(study)
    real = volume.segment_volume

    def segment_then_pacs_goes_down(*a, **kw):
        orthanc.stop()
        return real(*a, **kw)
    monkeypatch.setattr(volume, "segment_volume", segment_then_pacs_goes_down)
    try:
        with pytest.raises(PacsError, match=r"127\.0\.0\.1.*connection refused \(3 attempts"):
            segment_from_pacs(lidc, pacs(orthanc.url, retries=2), study, roi=(X + 3, Y, 1), k=K, steps=STEPS,
                              out=tmp_path / "o", store=True)
    finally:
        orthanc.start()
    assert orthanc.seg_series(study) == before
