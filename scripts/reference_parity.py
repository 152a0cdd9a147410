"""Parity fixture from a TRAINED reference-format checkpoint, computed by the reference code itself.

    REF_ROOT=/tmp/ref_src REF_COMMIT=3983e93d0a95a6b858be28ab9b970cc00d032212 \
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 PYTHONPATH=$PWD:$PWD/export MSLD_DATA=../shared/data \
        /tmp/refvenv/bin/python scripts/reference_parity.py CKPT_DIR OUT_DIR [--images 4 --k 4 --seed 0]

CKPT_DIR holds last.ckpt, config.yaml and mask_vae.ckpt (as msld_export.training.train_reference
or the reference itself writes them). The reference's ConditionDiffusionModule is built from the
config with ../shared/reference/make_fixture.py's helpers (imported, or MAKE_FIXTURE=path), the
checkpoint's state_dict (EMA shadows included) is loaded strictly, and the reference's code computes
cond, a denoiser probe and whole DDIM runs (20 and 50 steps, its own ema_scope and predict) for
nodule slices of LIDC's val split, min-max scaled. OUT_DIR gets expected.npz with make_fixture.py's
array names (plus masks01_<steps>_float64: the reference run in float64, its own rounding floor),
meta.json and copies of the checkpoint files; tests/test_reference_import.py compares an imported
plan with it (MSLD_REFERENCE_FIXTURES=OUT_DIR). Setup: docs/reference_import_and_parity.md.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_make_fixture():
    """make_fixture.py as a module: it puts REF_ROOT on sys.path and stubs the training-loss
    package the reference imports; its stand-ins for the model packages are dropped again."""
    path = Path(os.environ.get("MAKE_FIXTURE", REPO.parent / "shared" / "reference" / "make_fixture.py"))
    if not path.exists():
        sys.exit(f"make_fixture.py not found at {path}: set MAKE_FIXTURE=/path/to/make_fixture.py")
    spec = importlib.util.spec_from_file_location("make_fixture", path)
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    for pkg in ["src.models.unet", "src.models.vae", "src.models.unet.net", "src.models.vae.net"]:
        sys.modules.pop(pkg, None)
    return mf


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def vae_checkpoint(mf, cfg, src: Path, work: Path) -> Path:
    """A mask-VAE checkpoint that the reference's VAEModule.load_from_checkpoint reads. One the
    reference wrote (hyper_parameters inside) is used as it is; a plain one (train_reference's) is
    loaded strictly into a VAEModule built by make_fixture.hydra_cfg with the widths its weights
    show, and saved again by Lightning."""
    import torch
    import hydra
    from omegaconf import OmegaConf
    ck = torch.load(src, map_location="cpu", weights_only=False)
    if "hyper_parameters" in ck:
        return src
    sd = ck["state_dict"]
    base = sd["net.encoder.encoder_input.weight"].shape[0]
    levels = sorted({int(k.split(".")[3]) for k in sd if k.startswith("net.encoder.encoder.")})
    mult = [sd[f"net.encoder.encoder.{i}.blocks.0.out_layers.3.weight"].shape[0] // base for i in levels]
    blocks = {int(k.split(".")[5]) for k in sd if k.startswith("net.encoder.encoder.0.blocks.")}
    latent = list(cfg.model.net.img_dims)
    c = dict(image_size=cfg.data.image_size, img_channels=cfg.model.net.image_embedder.img_channels,
             latent=latent, d_embed=cfg.model.net.image_embedder.d_embed, denoise={}, embed={},
             vae=dict(base_channels=base, channel_multipliers=mult))
    vcfg = OmegaConf.create(mf.hydra_cfg(c, src)["vae_model"])
    for part in ("encoder", "decoder"):
        vcfg.net[part].n_layer_blocks = len(blocks)
    vcfg.net.vq_layer.num_embeddings = sd["net.vq_layer.embedding.weight"].shape[0]
    vae = hydra.utils.instantiate(vcfg)
    vae.load_state_dict(sd, strict=True)
    out = work / "mask_vae_lightning.ckpt"
    mf.save_ckpt(vae, str(out))
    return out


def pick_slices(n: int):
    """n val slices with a nodule, one per patient, the largest annotated area of each of the first
    n patients (the split's fixed order); min-max scaled as the reference's LIDC dataset does."""
    import numpy as np
    from msld_sdk.evaluation.datasets import load_split
    ds = load_split("lidc", os.environ.get("MSLD_DATA"), "val", 128)
    area = ds.masks.reshape(len(ds), -1).astype(np.int64).sum(1)
    chosen, seen = [], []
    for i in np.argsort(-area, kind="stable"):
        if area[i] == 0:
            break
        if ds.groups[i] not in seen:
            seen.append(ds.groups[i]); chosen.append(int(i))
    order = sorted(chosen, key=lambda i: ds.ids[i])[:n]
    imgs = ds.images[order, :1].astype(np.float32)
    lo = imgs.min(axis=(1, 2, 3), keepdims=True); hi = imgs.max(axis=(1, 2, 3), keepdims=True)
    return (imgs - lo) / (hi - lo), [ds.ids[i] for i in order]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-float64", dest="float64", action="store_false",
                    help="skip the reference's float64 runs (masks01_<steps>_float64: its own rounding floor)")
    a = ap.parse_args()
    mf = load_make_fixture()
    import numpy as np
    import torch
    import hydra
    from omegaconf import OmegaConf

    src, out = a.ckpt_dir, a.out_dir
    out.mkdir(parents=True, exist_ok=True)
    for name in ("last.ckpt", "config.yaml", "mask_vae.ckpt"):
        shutil.copyfile(src / name, out / name)
    cfg = OmegaConf.load(out / "config.yaml")
    cfg.model.net.autoencoder_weight_path = str(vae_checkpoint(mf, cfg, out / "mask_vae.ckpt", out))
    module = hydra.utils.instantiate(cfg.model)
    ck = torch.load(out / "last.ckpt", map_location="cpu", weights_only=False)
    module.load_state_dict(ck["state_dict"], strict=True)   # what Lightning's load_from_checkpoint does
    module.eval()
    assert module.use_ema, "the config has use_ema false: the reference would predict with raw weights"

    n, k = a.images, a.k
    imgs01, ids = pick_slices(n)
    imgs = torch.from_numpy(imgs01)
    x_in = (imgs - 0.5) / 0.5
    gen = torch.Generator().manual_seed(a.seed)
    res = dict(images_01=imgs01, model_input=x_in.numpy())
    latent = list(cfg.model.net.img_dims)
    net = module.net
    with torch.no_grad():
        with module.ema_scope():     # cond and probe with the EMA weights, as predict uses
            cond = net.image_embedder(x_in)
            z0 = torch.randn([n * k] + latent, generator=gen)
            t_probe = torch.tensor([999, 500, 20, 0] * ((n * k + 3) // 4))[: n * k]
            eps = net.denoise_net(x=z0, time_steps=t_probe, cond={"image": cond.repeat_interleave(k, 0)})
            res.update(cond=cond.numpy(), probe_x=z0.numpy(), probe_t=t_probe.numpy(), probe_eps=eps.numpy(),
                       probe_decoded=net.autoencoder_decode(z0).numpy())
        for steps in (20, 50):
            net.sampler.set_timesteps(steps)      # keeps the checkpoint's schedule buffers
            xT = torch.randn([n * k] + latent, generator=gen)
            samples = module.predict(cond={"image": x_in.repeat_interleave(k, 0)}, xt=xT.clone(), num_sample=n * k)
            res[f"xT_{steps}"] = xT.numpy()
            res[f"timesteps_{steps}"] = np.asarray(net.sampler.timesteps)
            res[f"masks01_{steps}"] = (samples[-1] * 0.5 + 0.5).clamp(0, 1).numpy()
    floor = {}
    if a.float64:   # the reference's own float32 rounding: its float64 run, same weights and xT
        module.double()
        with torch.no_grad():
            for steps in (20, 50):
                net.sampler.set_timesteps(steps)
                s64 = module.predict(cond={"image": x_in.double().repeat_interleave(k, 0)},
                                     xt=torch.from_numpy(res[f"xT_{steps}"]).double(), num_sample=n * k)
                m64 = (s64[-1] * 0.5 + 0.5).clamp(0, 1).float().numpy()
                res[f"masks01_{steps}_float64"] = m64
                d = np.abs(m64 - res[f"masks01_{steps}"])
                floor[steps] = dict(max_abs=float(d.max()), mean_abs=float(d.mean()))
    np.savez_compressed(out / "expected.npz", **res)
    meta = dict(reference_repo="huynhspm/Generative-Model", reference_commit=os.environ.get("REF_COMMIT", "?"),
                config="trained checkpoint", source=str(src.resolve()), checkpoint_sha256=sha256(out / "last.ckpt"),
                global_step=ck.get("global_step"), n_images=n, k=k, seed=a.seed, image_ids=ids,
                latent=latent, image_size=int(imgs01.shape[-1]), img_channels=int(imgs01.shape[1]),
                reference_float32_vs_float64=floor, keys={kk: list(np.asarray(v).shape) for kk, v in res.items()})
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps({kk: meta[kk] for kk in ("checkpoint_sha256", "global_step", "image_ids",
                                              "reference_float32_vs_float64")}))


if __name__ == "__main__":
    main()
