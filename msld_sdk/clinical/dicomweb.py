"""A CT series from a PACS over DICOMweb (dicomweb-client), its DICOM SEG stored back.

    from msld_sdk.clinical.dicomweb import connect, segment_from_pacs
    pacs = connect("https://pacs/dicom-web")            # credentials from env / netrc
    r = segment_from_pacs(seg, pacs, study, roi=(x, y, z), store=True)

* QIDO-RS finds the series (given, or the study's CT series with the most instances), WADO-RS
  reads it; it is written to a folder and read by ``load_series`` (the local path, unchanged).
* The SEG series has a deterministic SeriesInstanceUID (source series and its instances, plan,
  parameters): a rerun finds it with QIDO-RS and stores nothing; ``force`` sends it again.
* Both SEG instances go in one STOW-RS request and are checked with QIDO-RS afterwards.
* Credentials: ``$MSLD_DICOMWEB_TOKEN`` (bearer), ``$MSLD_DICOMWEB_USER`` / ``_PASSWORD``
  (basic) or a netrc entry for the host; never logged. TLS verified; ``ca_bundle`` for a CA.
* Failures end in one ``PacsError`` naming server, request and status after bounded retries.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


from ..errors import InputError, PacsError, SeriesGeometryError
from ..extras import require

log = logging.getLogger("msld_sdk")

ENV_TOKEN, ENV_USER, ENV_PASSWORD = "MSLD_DICOMWEB_TOKEN", "MSLD_DICOMWEB_USER", "MSLD_DICOMWEB_PASSWORD"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RETRY_STATUS = (408, 429, 502, 503, 504)
CRED_HINT = (f"check the credentials: ${ENV_USER} and ${ENV_PASSWORD} (basic), ${ENV_TOKEN} (bearer) or a netrc "
             "entry for the host")


def _tag(d: dict, keyword: str, default=None):
    """A value of a QIDO-RS (DICOM JSON) result by keyword."""
    from pydicom.datadict import tag_for_keyword
    v = d.get(f"{tag_for_keyword(keyword):08X}", {}).get("Value")
    return v[0] if v else default


class _Bearer:
    """requests auth: ``Authorization: Bearer ...`` (repr never shows the token)."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, r):
        r.headers["Authorization"] = "Bearer " + self._token
        return r

    def __repr__(self) -> str:
        return "<bearer token>"


class Pacs:
    """One DICOMweb server: a dicomweb-client with retries, timeouts and credentials set."""

    def __init__(self, url: str, ca_bundle: str | None = None, timeout: float = 30.0, retries: int = 3,
                 backoff_s: float = 0.5, env=None):
        require("dicomweb_client", "reading from and storing to a PACS over DICOMweb")
        import requests
        from dicomweb_client import DICOMwebClient

        env = os.environ if env is None else env
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"DICOMweb URL must be http(s)://HOST[:PORT]/PATH, got {parts.scheme or 'no'} scheme")
        if parts.username or parts.password:
            raise InputError("credentials in the DICOMweb URL are refused (they would show in logs and process "
                             f"lists); {CRED_HINT}")
        self.url = urlunsplit(parts._replace(query="", fragment="")).rstrip("/")
        self.server = f"{parts.scheme}://{parts.netloc}"
        self.timeout, self.retries, self.backoff_s = float(timeout), int(retries), float(backoff_s)
        session = requests.Session()
        session.verify = str(ca_bundle) if ca_bundle else True
        if ca_bundle and not Path(ca_bundle).is_file():
            raise InputError(f"CA bundle {ca_bundle} does not exist; give a PEM file with the server's CA")
        if env.get(ENV_TOKEN):
            session.auth, self.auth = _Bearer(env[ENV_TOKEN]), f"bearer token (${ENV_TOKEN})"
        elif env.get(ENV_USER):
            session.auth, self.auth = (env[ENV_USER], env.get(ENV_PASSWORD, "")), f"basic (${ENV_USER})"
        else:
            netrc = requests.utils.get_netrc_auth(self.url)
            session.auth, self.auth = (netrc, "basic (netrc)") if netrc else (None, "none")
        session.trust_env = False          # no second netrc look-up behind our back; proxies from env off
        self.client = DICOMwebClient(self.url, session=session, timeout=(min(10.0, self.timeout), self.timeout))
        # 408/429/503/504: dicomweb-client retries with exponential back-off (bounded attempts)
        self.client.set_http_retry_params(retry=self.retries > 0, max_attempts=self.retries + 1,
                                          wait_exponential_multiplier=int(self.backoff_s * 1000),
                                          retriable_error_codes=RETRY_STATUS)
        log.info("msld_sdk: DICOMweb %s (credentials: %s, TLS verify: %s)", self.url, self.auth,
                 "CA bundle " + str(ca_bundle) if ca_bundle else "system CAs" if parts.scheme == "https" else "n/a")

    # ---- one request, bounded retries, one clear error --------------------------------------
    def call(self, what: str, fn, *args, **kw):
        import requests
        import retrying
        last = None
        for attempt in range(self.retries + 1):
            try:
                try:
                    return fn(*args, **kw)
                except retrying.RetryError as e:     # dicomweb-client's retries ran out on a 408/429/5xx
                    resp = getattr(e.last_attempt, "value", None)
                    raise requests.exceptions.HTTPError(response=resp if hasattr(resp, "status_code") else None)
            except requests.exceptions.HTTPError as e:
                r = e.response
                status = f"HTTP {r.status_code} {r.reason or ''}".strip() if r is not None else "HTTP error"
                code = r.status_code if r is not None else 0
                hint = (CRED_HINT if code in (401, 403) else
                        "check the study/series UIDs and that URL is the server's DICOMweb root" if code == 404 else
                        "the server does not support this request" if code in (405, 501) else
                        f"retried {self.retries} times; check the server's log or try later"
                        if code in RETRY_STATUS or code >= 500 else "the server refused the request")
                raise PacsError(f"{self.server}: {what} ({r.request.method if r is not None else ''} "
                                f"{self._path(r)}) failed: {status}; {hint}") from None
            except requests.exceptions.SSLError as e:
                raise PacsError(f"{self.server}: {what} failed: TLS verification failed ({type(e).__name__}); give "
                                "the server's CA certificate with --ca-bundle PEM") from None
            except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
                last = e
                if attempt < self.retries:
                    wait = self.backoff_s * 2 ** attempt
                    log.warning("msld_sdk: %s: %s: %s; retry %d/%d in %.1f s", self.server, what,
                                self._reason(e), attempt + 1, self.retries, wait)
                    time.sleep(wait)
        raise PacsError(f"{self.server}: {what} failed: {self._reason(last)} ({self.retries + 1} attempts, "
                        f"timeout {self.timeout:g} s); check that the server runs and that the URL is right") from None

    def _path(self, r) -> str:
        try:
            return urlsplit(r.request.url).path
        except Exception:
            return ""

    @staticmethod
    def _reason(e) -> str:
        import requests
        if isinstance(e, requests.exceptions.Timeout):
            return "timed out"
        s = str(e)
        return "connection refused" if "refused" in s.lower() else f"cannot connect ({type(e).__name__})"

    # ---- QIDO-RS -----------------------------------------------------------------------------
    def series_of_study(self, study: str) -> list[dict]:
        res = self.call(f"QIDO-RS series of study {study}", self.client.search_for_series, study_instance_uid=study,
                        fields=["Modality", "NumberOfSeriesRelatedInstances", "SeriesDescription"])
        return [{"series": _tag(d, "SeriesInstanceUID"), "modality": _tag(d, "Modality", ""),
                 "n": int(_tag(d, "NumberOfSeriesRelatedInstances", 0) or 0),
                 "description": _tag(d, "SeriesDescription", "")} for d in res]

    def instances(self, study: str, series: str) -> dict:
        """SOPInstanceUID -> SOPClassUID of a series ({} when it does not exist)."""
        res = self.call(f"QIDO-RS instances of series {series}", self.client.search_for_instances,
                        study_instance_uid=study, series_instance_uid=series, fields=["SOPClassUID"],
                        get_remaining=True)
        return {_tag(d, "SOPInstanceUID"): _tag(d, "SOPClassUID") for d in res}

    def find_series(self, study: str, modality: str = "CT") -> str:
        """The study's ``modality`` series with the most instances (named in the log)."""
        rows = self.series_of_study(study)
        if not rows:
            raise PacsError(f"{self.server}: QIDO-RS found no series in study {study}; check the StudyInstanceUID")
        ct = [r for r in rows if r["modality"] == modality]
        if not ct:
            raise PacsError(f"{self.server}: study {study} has no {modality} series (it has "
                            f"{sorted({r['modality'] for r in rows})}); give --series or another study")
        best = max(ct, key=lambda r: r["n"])
        log.warning("msld_sdk: study %s: %d %s series; using %s (%d instances%s)", study, len(ct), modality,
                    best["series"], best["n"], f", '{best['description']}'" if best["description"] else "")
        return best["series"]

    # ---- WADO-RS -----------------------------------------------------------------------------
    def fetch_series(self, study: str, series: str, folder, modality: str | None = "CT", attempts: int = 3):
        """Read a whole series into ``folder`` (one file per instance) and return its Volume.
        Checked: the instances read equal QIDO-RS's list before and after (else it is read again,
        at most ``attempts`` times), the modality, and no gap in the slice positions."""
        folder = Path(folder)
        for attempt in range(attempts):
            before = self.instances(study, series)
            if not before:
                raise PacsError(f"{self.server}: series {series} of study {study} not found (QIDO-RS returned no "
                                "instances); check the UIDs")
            datasets = self.call(f"WADO-RS series {series}", self.client.retrieve_series, study, series)
            after = self.instances(study, series)
            got = {str(d.SOPInstanceUID) for d in datasets}
            if set(before) == set(after) == got:
                break
            log.warning("msld_sdk: %s: series %s changed while read (%d listed before, %d read, %d after); "
                        "reading it again", self.server, series, len(before), len(got), len(after))
            time.sleep(self.backoff_s * 2 ** attempt)
        else:
            raise PacsError(f"{self.server}: series {series} kept changing while read ({attempts} attempts); the "
                            "sender may still be sending it: try again when it is complete")
        images = [d for d in datasets if "PixelData" in d]
        mods = sorted({str(d.get("Modality", "")) for d in images})
        if modality and mods != [modality]:
            raise PacsError(f"{self.server}: series {series} is {'/'.join(mods) or 'without images'}, not "
                            f"{modality}; this plan segments {modality} (give a {modality} series)")
        folder.mkdir(parents=True, exist_ok=True)
        for d in images:
            d.save_as(str(folder / f"{d.SOPInstanceUID}.dcm"), enforce_file_format=True)
        vol = load_series_complete(folder, f"{self.server}: series {series}")
        return vol

    # ---- STOW-RS -----------------------------------------------------------------------------
    def store_seg(self, study: str, seg_series: str, datasets: list, force: bool = False) -> str:
        """Store the SEG instances (one request) unless that series already holds exactly them;
        -> "stored", "exists" or "replaced". After STOW-RS, QIDO-RS must list exactly them."""
        want = {str(d.SOPInstanceUID) for d in datasets}
        have = self.instances(study, seg_series)
        if set(have) == want and not force:
            log.warning("msld_sdk: %s: SEG series %s already stored (%d instances); nothing sent (force to replace)",
                        self.server, seg_series, len(have))
            return "exists"
        outcome = "replaced" if have else "stored"
        if have and (force or set(have) - want):
            self._delete(study, seg_series)
        for attempt in range(2):    # a second STOW-RS completes a pair that arrived half
            resp = self.call(f"STOW-RS SEG series {seg_series}", self.client.store_instances, datasets, study)
            failed = resp.get("FailedSOPSequence") if resp is not None else None
            if failed:
                reasons = sorted({str(f.get("FailureReason", "?")) for f in failed})
                raise PacsError(f"{self.server}: STOW-RS SEG series {seg_series}: {len(failed)} instance(s) refused "
                                f"(failure reason {', '.join(reasons)}); see the server's log")
            now = self.instances(study, seg_series)
            if set(now) == want:
                log.warning("msld_sdk: %s: SEG series %s %s (%d instances)", self.server, seg_series, outcome,
                            len(now))
                return outcome
            log.warning("msld_sdk: %s: after STOW-RS the SEG series %s holds %d of %d instances; sending again",
                        self.server, seg_series, len(set(now) & want), len(want))
        self._delete(study, seg_series, quiet=True)
        raise PacsError(f"{self.server}: STOW-RS SEG series {seg_series}: the server kept {len(set(now) & want)} of "
                        f"{len(want)} instances; it was asked to delete them (check the series on the server)")

    def _delete(self, study: str, series: str, quiet: bool = False) -> bool:
        try:
            self.call(f"DELETE series {series}", self.client.delete_series, study, series)
            return True
        except PacsError as e:
            if not quiet:
                log.warning("msld_sdk: %s; the instances are sent again with the same UIDs (a server that "
                            "overwrites, e.g. Orthanc with OverwriteInstances, replaces them)", e)
            return False


def connect(url: str, ca_bundle: str | None = None, timeout: float = 30.0, retries: int = 3,
            backoff_s: float = 0.5) -> Pacs:
    return Pacs(url, ca_bundle=ca_bundle, timeout=timeout, retries=retries, backoff_s=backoff_s)


def load_series_complete(folder, where: str):
    """``load_series`` of a received series; one whose slices miss, repeat or break the grid
    (the series geometry check) is refused as partial or irregular (PacsError)."""
    from .volume import load_series
    try:
        return load_series(folder)
    except SeriesGeometryError as e:
        raise PacsError(f"{where} is partial or irregular: {e}") from None


# ---- deterministic SEG identity ---------------------------------------------------------------
def seg_identity(vol, manifest: dict, params: dict) -> tuple[str, list[str]]:
    """(SeriesInstanceUID, [binary SOPInstanceUID, mean SOPInstanceUID]) from the source series
    and its instances, the plan and the parameters: the same request gives the same UIDs."""
    src = [str(vol.datasets[0].SeriesInstanceUID)] + sorted(str(d.SOPInstanceUID) for d in vol.datasets)
    key = ["msld-seg", *src, json.dumps(manifest, sort_keys=True, default=str), json.dumps(params, sort_keys=True)]
    series = hashed_uid(*key)
    return series, [hashed_uid(series, str(i)) for i in (1, 2)]


def hashed_uid(*parts: str) -> str:
    """A UID under 2.25 (a 128-bit number, as UUID-derived UIDs) from the hash of ``parts``;
    pydicom's generate_uid ignores its entropy sources under the 2.25 root."""
    import hashlib
    h = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return "2.25." + str(int(h[:32], 16))


def seg_params(seg, roi, slices, k, steps, seed, eta, views, solver=None, threshold=None, timesteps=None) -> dict:
    """Everything that changes the SEG's content (the plan aside). ``solver``, ``threshold`` and
    ``timesteps`` enter only when given, so that a request made before they could be given keeps
    its UIDs."""
    o = seg.options(k=k, steps=steps, seed=seed, eta=eta, views=views, solver=solver, threshold=threshold,
                    timesteps=timesteps)
    params = {"roi": [float(v) for v in roi] if roi is not None else None,
              "slices": [int(v) for v in slices] if slices is not None else None, "k": o.k, "steps": o.steps,
              "seed": o.seed, "eta": float(o.eta), "views": getattr(o, "views", None),
              "precision": getattr(seg, "precision", None)}
    if solver is not None:
        params["solver"] = o.solver
    if threshold is not None:
        params["threshold"] = o.threshold
    if timesteps is not None and o.timesteps is not None:   # a grid ("spacing": the plan's rule, as before)
        params["timesteps"] = [int(t) for t in o.timesteps]
    return params


@dataclass
class PacsResult:
    study: str
    series: str                # source series
    seg_series: str            # the SEG series (deterministic)
    files: list                # the two SEG files written
    outcome: str               # "stored" | "exists" | "replaced" | "not stored"
    volume: object = field(repr=False, default=None)
    result: object = field(repr=False, default=None)


def segment_from_pacs(seg, pacs: Pacs, study: str, series: str | None = None, roi=None, slices=None, k=None,
                      steps=None, seed: int | None = 0, eta: float | None = None, views=None, out="msld_out",
                      store: bool = False, force: bool = False, solver: str | None = None,
                      threshold: float | None = None, timesteps=None) -> PacsResult:
    """Pull a CT series, segment it as ``msld segment SERIES_DIR`` does, write the two SEG
    instances into ``out``, and with ``store`` send them back (see the module docstring)."""
    import pydicom

    from .dicom_seg import write_dicom_seg
    from .volume import segment_volume
    from ..roi import training_input

    modality = training_input(seg.plan.manifest).get("modality") or "CT"
    seed = 0 if seed is None else int(seed)       # a stored result must be reproducible
    series = series or pacs.find_series(study, modality)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="msld_pacs_") as tmp:
        vol = pacs.fetch_series(study, series, Path(tmp) / "series", modality=modality)
        params = seg_params(seg, roi, slices, k, steps, seed, eta, views, solver, threshold, timesteps)
        seg_series, sop_uids = seg_identity(vol, seg.plan.manifest, params)
        if store and not force:
            have = pacs.instances(study, seg_series)
            if set(have) == set(sop_uids):
                log.warning("msld_sdk: %s: SEG series %s for this request is already stored; nothing segmented "
                            "or sent (force to replace)", pacs.server, seg_series)
                return PacsResult(study, series, seg_series, [], "exists", vol, None)
        vr = segment_volume(seg, vol, roi=roi, slices=slices, k=k, steps=steps, seed=seed, eta=eta, views=views,
                            solver=solver, threshold=threshold, timesteps=timesteps)
        files = write_dicom_seg(out / "seg.dcm", vr, vol, seg.plan.manifest, series_uid=seg_series,
                                sop_uids=sop_uids, series_description="MSLD segmentation")
    outcome = "not stored"
    if store:
        outcome = pacs.store_seg(study, seg_series, [pydicom.dcmread(str(f)) for f in files], force=force)
    return PacsResult(study, series, seg_series, files, outcome, vol, vr)
