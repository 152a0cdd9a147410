"""Plan container: round trip, and a clear typed error for every kind of damage."""
import json
import zipfile

import pytest

from msld_sdk import (PlanFormatError, PlanIntegrityError, PlanNotFoundError, PlanVersionError, Segmenter)
from msld_sdk.plan import MANIFEST_NAME, Plan, add_blobs


def test_round_trip(tiny_plan):
    p = Plan.open(tiny_plan)
    assert set(p.blob_names()) == {"encoder", "denoiser", "decoder"}
    m = p.manifest
    assert m["format"] == "msld-plan" and m["format_version"] == 1
    assert len(m["schedule"]["alphas_cumprod"]) == m["schedule"]["num_train_timesteps"]
    assert m["input"]["size"] == [32, 32] and m["input"]["channels"] == 1
    errs = m["provenance"]["onnx_vs_torch_max_rel_err"]
    assert set(errs) == {"encoder", "denoiser", "decoder"} and max(errs.values()) < 1e-4
    # stored, not compressed: engines and graphs can be read without inflating
    with zipfile.ZipFile(tiny_plan) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    assert "sha256" in p.summary()


def test_add_blobs_keeps_existing(tiny_plan, tmp_path):
    out = tmp_path / "more.plan"
    add_blobs(tiny_plan, {"extra": ("engines/x/extra.bin", b"\x00\x01")}, {"engines": [{"key": "x"}]}, out)
    p = Plan.open(out)
    assert p.blob("extra") == b"\x00\x01"
    assert p.blob("denoiser") == Plan.open(tiny_plan).blob("denoiser")
    assert p.manifest["engines"] == [{"key": "x"}]


def test_missing_file(tmp_path):
    with pytest.raises(PlanNotFoundError, match="not found.*nope.plan"):
        Segmenter(tmp_path / "nope.plan")
    with pytest.raises(FileNotFoundError):  # also a FileNotFoundError for generic handlers
        Plan.open(tmp_path / "nope.plan")


def test_mistyped_model_name_lists_the_shipped_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # a bare word is looked up as a file in the working folder first
    for name in ("Polyp", "lidcx"):
        with pytest.raises(PlanNotFoundError, match=f"'{name}' is neither a shipped model name \\(lidc, polyp\\)"):
            Segmenter(name)
    (tmp_path / "mine").write_bytes(b"not a plan")   # an existing file of that name is read as a plan
    with pytest.raises(PlanFormatError):
        Segmenter("mine")


def test_not_a_plan(tmp_path):
    f = tmp_path / "image.png"
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    with pytest.raises(PlanFormatError, match="image.png.*not a plan file"):
        Plan.open(f)
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(PlanFormatError, match="no manifest.json"):
        Plan.open(z)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated(tiny_plan, tmp_path, keep):
    data = tiny_plan.read_bytes()
    f = tmp_path / "cut.plan"
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(PlanFormatError, match="cut.plan.*(truncated|not a plan)"):
        Plan.open(f)


@pytest.mark.parametrize("blob", ["encoder", "denoiser", "decoder"])
def test_flipped_byte_in_blob(tiny_plan, tmp_path, blob):
    p = Plan.open(tiny_plan)
    with zipfile.ZipFile(tiny_plan) as zf:
        info = zf.getinfo(p.manifest["blobs"][blob]["path"])
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.file_size // 2
    data = bytearray(tiny_plan.read_bytes())
    data[offset] ^= 0x01
    f = tmp_path / "flipped.plan"
    f.write_bytes(bytes(data))
    with pytest.raises(PlanIntegrityError, match=f"flipped.plan.*'{blob}'"):
        Plan.open(f)


def _rewrite_manifest(src, dst, edit):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename == MANIFEST_NAME:
                m = json.loads(data)
                edit(m)
                data = json.dumps(m).encode()
            zout.writestr(item, data)


def test_tampered_sha(tiny_plan, tmp_path):
    f = tmp_path / "sha.plan"
    _rewrite_manifest(tiny_plan, f, lambda m: m["blobs"]["decoder"].update(sha256="0" * 64))
    with pytest.raises(PlanIntegrityError, match="'decoder' fails its sha256"):
        Plan.open(f)


def test_future_version_refused(tiny_plan, tmp_path):
    f = tmp_path / "future.plan"
    _rewrite_manifest(tiny_plan, f, lambda m: m.update(format_version=99))
    with pytest.raises(PlanVersionError, match="version 99 is newer.*upgrade msld_sdk"):
        Plan.open(f)


@pytest.mark.parametrize("edit,msg", [
    (lambda m: m.update(format="something-else"), "not an msld plan"),
    (lambda m: m.pop("schedule"), "lacks"),
    (lambda m: m["blobs"].pop("denoiser"), "no 'denoiser' graph"),
    (lambda m: m["input"].update(channels=7), "invalid field"),
    (lambda m: m["schedule"].update(alphas_cumprod=[0.5]), "invalid field"),
    (lambda m: m["defaults"].update(k=0), "invalid field"),
])
def test_bad_manifest_fields(tiny_plan, tmp_path, edit, msg):
    f = tmp_path / "bad.plan"
    _rewrite_manifest(tiny_plan, f, edit)
    with pytest.raises(PlanFormatError, match=msg):
        Plan.open(f)
