"""`msld import` refuses what it cannot safely or faithfully import, with a typed error naming
the problem: hostile pickles (nothing from the file ever runs), damaged or truncated files,
checkpoints of other models, configs outside the supported reference family."""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest

import fuzz_targets as ft
from msld_export.reference.checkpoint_reader import read_checkpoint, state_dict_of
from msld_sdk.errors import CheckpointError

LIDC = Path(__file__).parents[1].parent / "shared" / "reference" / "lidc"


def _zip_with_pickle(tmp_path: Path, pkl: bytes, name="hostile.ckpt") -> Path:
    p = tmp_path / name
    with zipfile.ZipFile(p, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
    return p


def _call(module: str, name: str, arg: str) -> bytes:
    """A protocol-2 pickle that calls module.name(arg) when loaded by a plain unpickler."""
    return f"c{module}\n{name}\n(S'{arg}'\ntR.".encode()


@pytest.mark.parametrize("module, name", [("posix", "system"), ("os", "system"), ("builtins", "eval"),
                                          ("__builtin__", "exec"), ("subprocess", "check_output"),
                                          ("torch", "load"), ("src.models.evil", "system"),
                                          ("builtins", "getattr"), ("importlib", "import_module")])
def test_hostile_pickles_are_refused_and_never_run(tmp_path, module, name):
    canary = tmp_path / "ran"
    p = _zip_with_pickle(tmp_path, _call(module, name, f"touch {canary}"))
    with pytest.raises(CheckpointError, match=rf"refuses the global '{module}\.{name}'"):
        read_checkpoint(p)
    assert not canary.exists()


def test_inert_placeholders_never_call(tmp_path):
    """A training-library global (here a reference class) becomes an inert placeholder: calling it,
    building it and filling it do nothing; the result is then simply not a checkpoint."""
    pkl = b"csrc.models.diffusion\nConditionDiffusionModule\n(S'x'\ntR}(S'a'\nK\x01ub."
    with read_checkpoint(_zip_with_pickle(tmp_path, pkl)) as ck:
        assert "Inert" in type(ck.obj).__name__
        with pytest.raises(CheckpointError, match="no 'state_dict'"):
            state_dict_of(ck)


def test_metadata_spellings_of_real_checkpoints_stay_inert(tmp_path):
    """bytes in protocol 2 (_codecs.encode), argparse.Namespace hparams, copyreg reconstruction."""
    import collections
    import pickle
    import argparse
    meta = {"b": b"\x00\xff", "ns": argparse.Namespace(lr=0.1), "od": collections.OrderedDict(a=1)}
    pkl = pickle.dumps({"state_dict": collections.OrderedDict(), "hyper_parameters": meta}, protocol=2)
    with read_checkpoint(_zip_with_pickle(tmp_path, pkl)) as ck:
        assert state_dict_of(ck) == {}
        assert {"_codecs.encode", "argparse.Namespace"} <= set(ck.globals_seen)


def test_plain_pickle_file_is_not_a_checkpoint(tmp_path):
    p = tmp_path / "legacy.ckpt"
    p.write_bytes(_call("os", "system", "true"))
    with pytest.raises(CheckpointError, match="not a PyTorch zip checkpoint"):
        read_checkpoint(p)


def test_plan_file_is_not_a_checkpoint(tiny_plan):
    with pytest.raises(CheckpointError, match="data.pkl"):
        read_checkpoint(tiny_plan)


def test_seed_checkpoint_reads_and_views_keep_their_offsets(tmp_path):
    p = tmp_path / "seed.ckpt"
    p.write_bytes(ft.seed_checkpoint_bytes())
    with read_checkpoint(p) as ck:
        sd = state_dict_of(ck)
        assert ck.tensor(sd["net.a.bias"]).tolist() == [4.0, 5.0, 6.0, 7.0]
        assert ck.tensor(sd["net.a.weight"]).shape == (3, 4)
        assert "torch.device" in ck.globals_seen


@pytest.mark.parametrize("cut", [0.05, 0.5, 0.97])
def test_truncated_checkpoints(tmp_path, cut):
    data = ft.seed_checkpoint_bytes()
    p = tmp_path / "cut.ckpt"
    p.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError):
        with read_checkpoint(p) as ck:
            for name, t in state_dict_of(ck).items():
                ck.tensor(t, name)


def test_damaged_pickle_and_storage(tmp_path):
    data = bytearray(ft.seed_checkpoint_bytes())
    i = data.index(b"state_dict")
    data[i + 2] ^= 0xFF  # inside data.pkl: the zip's CRC check fails
    p = tmp_path / "damaged.ckpt"
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="damaged|cannot be read"):
        read_checkpoint(p)


def test_tensor_past_its_storage(tmp_path):
    with zipfile.ZipFile(io.BytesIO(ft.seed_checkpoint_bytes())) as z:
        pkl = z.read("archive/data.pkl")
    bad = pkl.replace(b"K\x03K\x04\x86", b"K\x09K\x04\x86", 1)  # net.a.weight 3x4 -> 9x4 on 12 floats
    assert bad != pkl
    p = tmp_path / "past.ckpt"
    with zipfile.ZipFile(io.BytesIO(ft.seed_checkpoint_bytes())) as zin, zipfile.ZipFile(p, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item.filename, bad if item.filename.endswith("data.pkl") else zin.read(item))
    with read_checkpoint(p) as ck:
        with pytest.raises(CheckpointError, match="storage"):
            ck.tensor(state_dict_of(ck)["net.a.weight"], "net.a.weight")


# ---- importer level (needs the reference fixture's config / checkpoint) --------------------------

def _need_fixture():
    if not (LIDC / "last.ckpt").exists():
        pytest.skip(f"reference fixture {LIDC} is absent")


def test_non_reference_checkpoint(tmp_path):
    _need_fixture()
    from msld_export.reference.importer import import_reference
    p = tmp_path / "other.ckpt"
    p.write_bytes(ft.seed_checkpoint_bytes())
    with pytest.raises(CheckpointError, match="not a MedSegLatDiff reference checkpoint"):
        import_reference(p, LIDC / "config.yaml", tmp_path / "x.plan")
    assert not (tmp_path / "x.plan").exists()


@pytest.mark.parametrize("old, new, match", [
    ("attention: SelfAttention", "attention: Transformer", r"attention='Transformer' is not supported"),
    ("block: Residual", "block: VGG", r"block='VGG' is not supported"),
    ("_target_: src.models.diffusion.sampler.DDIMSampler", "_target_: src.models.diffusion.sampler.DDPMSampler",
     "DDIMSampler"),
    ("image_size: 128", "image_size: 192", "image_size=192"),
    ("classifier_free: false", "classifier_free: true", "classifier_free=True"),
    # Hydra leaves interpolations unresolved in .hydra/config.yaml (the experiments use this one)
    ("d_cond_image: 1", "d_cond_image: ${model.net.image_embedder.d_embed}", None),
    ("in_channels: 1", "in_channels: ${model.net.img_dims[0]}", None),
    ("img_dims:\n    - 1", "img_dims:\n    - ${model.net.image_embedder.d_embed}", None),
    ("d_cond_image: 1", "d_cond_image: ${model.net.nothing.here}", "names nothing"),
    # refused by name, not silently replaced by 50 steps
    ("n_infer_steps: 50", "n_infer_steps: 0", r"n_infer_steps is 0; expected a whole number from 1 to 1000 \(DDIM steps"),
    ("n_infer_steps: 50", "n_infer_steps: 2000", r"n_infer_steps is 2000; expected a whole number from 1 to 1000"),
    ("n_infer_steps: 50", "n_infer_steps: fifty", r"n_infer_steps is 'fifty'; expected a whole number from 1 to"),
    # malformed counts: ConfigError naming the key, not a ZeroDivisionError / TypeError
    ("n_attention_heads: 4", "n_attention_heads: 0", r"n_attention_heads is 0; expected a positive whole number"),
    ("n_layer_blocks: 1", "n_layer_blocks: two", r"n_layer_blocks is 'two'"),
    # the manifest records the config's schedule beside the checkpoint's alphas_bar: they must agree
    ("beta_schedule: linear", "beta_schedule: cosine", r"alphas_bar is not the config's beta schedule \(cosine"),
])
def test_unsupported_options_are_named(tmp_path, old, new, match):
    _need_fixture()
    from msld_export.reference.importer import ImportedModel
    text = (LIDC / "config.yaml").read_text()
    assert old in text
    cfg = tmp_path / "config.yaml"
    cfg.write_text(text.replace(old, new, 1))
    if match is None:
        ImportedModel(LIDC / "last.ckpt", cfg)
        return
    with pytest.raises(CheckpointError, match=match):
        ImportedModel(LIDC / "last.ckpt", cfg)


def test_config_of_another_width_does_not_match(tmp_path):
    _need_fixture()
    from msld_export.reference.importer import ImportedModel
    cfg = tmp_path / "config.yaml"
    cfg.write_text((LIDC / "config.yaml").read_text().replace("base_channels: 32", "base_channels: 64", 1))
    with pytest.raises(CheckpointError, match="shape"):
        ImportedModel(LIDC / "last.ckpt", cfg)


def test_cli_reports_a_typed_error(tmp_path, capsys):
    from msld_sdk.cli import main
    p = _zip_with_pickle(tmp_path, _call("os", "system", "true"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text((LIDC / "config.yaml").read_text() if (LIDC / "config.yaml").exists() else "model: {}\n")
    assert main(["import", str(p), "--config", str(cfg), "--out", str(tmp_path / "o.plan")]) == 1
    assert "msld: error:" in capsys.readouterr().err


def _sd_copy(tmp_path, edit) -> Path:
    """The fixture's checkpoint with its state_dict edited, saved as torch.save writes it."""
    import torch
    from msld_export.reference.checkpoint_reader import read_checkpoint as read
    with read(LIDC / "last.ckpt") as ck:
        sd = {k: torch.from_numpy(ck.tensor(v, k).copy()) for k, v in state_dict_of(ck).items()}
    edit(sd)
    p = tmp_path / "edited.ckpt"
    torch.save({"state_dict": sd}, p)
    return p


def test_a_missing_ema_shadow_is_refused_not_mixed_with_raw_weights(tmp_path):
    """The reference keeps a shadow for every trained weight; a checkpoint lacking one was imported
    with that weight raw and labelled "ema" (neither model). Frozen weights (the sinusoid time
    table) have none in the reference and stay raw; use_ema false imports every weight raw."""
    _need_fixture()
    from msld_export.reference.importer import ImportedModel
    gone = "model_ema.denoise_netconv_out2weight"
    p = _sd_copy(tmp_path, lambda sd: sd.pop(gone))
    with pytest.raises(CheckpointError, match=rf"no EMA shadow '{gone}'.*model.use_ema: false"):
        ImportedModel(p, LIDC / "config.yaml")
    cfg = tmp_path / "raw.yaml"
    cfg.write_text((LIDC / "config.yaml").read_text().replace("use_ema: true", "use_ema: false", 1))
    assert ImportedModel(p, cfg).weights["denoiser"]["ema"] == 0
    m = ImportedModel(LIDC / "last.ckpt", LIDC / "config.yaml")
    assert (m.weights["denoiser"]["raw"], m.weights["embedder"]["raw"]) == (1, 0)   # the time table only


def test_tensors_with_no_place_are_refused(tmp_path):
    _need_fixture()
    import torch
    from msld_export.reference.importer import ImportedModel
    for key in ("net.label_embedder.weight", "model_ema.foobar"):
        p = _sd_copy(tmp_path, lambda sd: sd.update({key: torch.zeros(3)}))
        with pytest.raises(CheckpointError, match=rf"no place for \(e.g. '{key}'\)"):
            ImportedModel(p, LIDC / "config.yaml")


def test_a_compiled_nets_checkpoint_imports_the_same_weights(tmp_path, caplog):
    """model.compile: true saves net._orig_mod.*: read as net.*, with a log line."""
    _need_fixture()
    import logging
    import torch
    from msld_export.reference.importer import ImportedModel

    def compiled(sd):
        for k in [k for k in sd if k.startswith("net.")]:
            sd["net._orig_mod." + k[4:]] = sd.pop(k)
    with caplog.at_level(logging.WARNING, logger="msld_sdk"):
        m = ImportedModel(_sd_copy(tmp_path, compiled), LIDC / "config.yaml")
    assert "torch.compile'd net" in caplog.text
    ref = ImportedModel(LIDC / "last.ckpt", LIDC / "config.yaml")
    for a, b in zip(m.denoiser.state_dict().values(), ref.denoiser.state_dict().values()):
        assert torch.equal(a, b)


def test_time_table_has_the_references_1000_rows_whatever_t_is():
    """The reference's TimeEmbedder keeps n_steps=1000 rows (UNetDiffusion does not pass T)."""
    _need_fixture()
    import yaml
    from msld_export.reference.importer import parse_reference_config
    cfg = yaml.safe_load((LIDC / "config.yaml").read_text())
    cfg["model"]["net"]["n_train_steps"] = cfg["model"]["net"]["sampler"]["n_train_steps"] = 500
    cfg["model"]["net"]["sampler"]["n_infer_steps"] = 20
    assert parse_reference_config(cfg)["denoiser"]["time_table_rows"] == 1000
    cfg["model"]["net"]["n_train_steps"] = cfg["model"]["net"]["sampler"]["n_train_steps"] = 1001
    with pytest.raises(CheckpointError, match=r"1 to 1000 \(the rows of the reference's time-embedding table"):
        parse_reference_config(cfg)

