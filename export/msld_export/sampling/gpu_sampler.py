"""The GPU sampling path without TensorRT: PyTorch modules + the native CUDA kernels.

``GpuSampler`` runs the loop of ``msld_ddim_sample`` on one CUDA device: encode once, initial
latents from the native Philox kernel (stream 0), per step the denoiser on all n_images * k
latents and the native fused DDIM update (eta noise: stream step + 1, made inside the kernel),
then decode and aggregate with the native kernel. Step by step, or (``use_graph=True``) captured
once per configuration as one CUDA graph and replayed; the seed then lives in a device word the
noise kernels read when they run, so a replay with another seed draws the same noise as the CPU.
The step table is ``msld_sdk.sampling.Schedule.ddim``: the native loop's own coefficients.

Lives under export/ because it needs torch; the runtime never imports it. Importing it needs no
GPU. ``batched_sampler.BatchedSampler`` runs the same loop with the update in PyTorch.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from msld_sdk import _native
from msld_sdk.sampling import Schedule, StepTable

from ..model.config import ModelConfig
from ..model.networks import ExportDecoder, ExportDenoiser, ExportEncoder, MedSegLatDiff, alphas_cumprod


# ---- availability ------------------------------------------------------------------------------

def native_has_cuda() -> bool:
    """True when msld_sdk._native was built with the CUDA kernels."""
    return bool(getattr(_native, "built_with_cuda", False)) and hasattr(_native, "cuda_ddim_step")


def cuda_unavailable_reason() -> str | None:
    """None when the GPU path can run here, else why not (for skips and error messages)."""
    if not native_has_cuda():
        return "msld_sdk._native was built without CUDA (no nvcc when it was built, or MSLD_CUDA=OFF)"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no GPU, no driver, or a CPU-only torch)"
    if _native.cuda_device_count() < 1:
        return "the native CUDA runtime sees no device"
    return None


# ---- schedule ----------------------------------------------------------------------------------

def step_table(alphas: torch.Tensor | np.ndarray, steps: int, spacing: str = "trailing") -> StepTable:
    """The DDIM steps of ``Schedule.ddim`` for these alphas (a torch tensor or an array; float32)."""
    ac = np.asarray(alphas.cpu() if isinstance(alphas, torch.Tensor) else alphas, dtype=np.float32)
    return Schedule(ac, spacing).ddim(int(steps))


def seed_word(seed: int) -> int:
    """A uint64 seed as the int64 with the same bits (what an int64 torch tensor can hold)."""
    seed = int(seed)
    if not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed - 2 ** 64 if seed >= 2 ** 63 else seed


# ---- results -----------------------------------------------------------------------------------

@dataclass
class GpuSample:
    """Results for ``n_images`` images of k hypotheses each (CUDA tensors)."""
    masks: torch.Tensor       # (n_images, k, H, W) bool: probs > threshold
    mean: torch.Tensor        # (n_images, H, W) float32: mean probability
    confidence: torch.Tensor  # (n_images, H, W) float32: 1 - 2 sqrt(p (1 - p)) of the votes
    consensus: torch.Tensor   # (n_images, H, W) bool: majority vote
    probs: torch.Tensor       # (n_images, k, H, W) float32: each hypothesis' probability
    latents: torch.Tensor     # (n_images, k, C, h, w) float32: final latents

    def numpy(self) -> dict:
        return {f.name: getattr(self, f.name).detach().cpu().numpy() for f in dataclasses.fields(self)}


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    image: torch.Tensor
    seed: torch.Tensor
    out: GpuSample


# ---- the sampler -------------------------------------------------------------------------------

class GpuSampler:
    """DDIM sampling of k mask hypotheses on one CUDA device with the native kernels.

    ``encoder``: image (B, C, H, W) in normalised units -> image latent (B, Lc, h, w);
    ``denoiser``: (x, t, cond) -> eps; ``decoder``: latent -> probability (B, 1, H, W).
    All float32, already on ``device`` (or moved there here).
    """

    def __init__(self, encoder: nn.Module, denoiser: nn.Module, decoder: nn.Module, cfg: ModelConfig, *,
                 device: str | torch.device = "cuda", eta: float = 0.0, clip: float = 0.0,
                 spacing: str = "trailing", threshold: float = 0.5):
        why = cuda_unavailable_reason()
        if why is not None:
            raise RuntimeError(f"GpuSampler needs a CUDA build and a GPU: {why}")
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"GpuSampler runs on a CUDA device, got {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.encoder = encoder.to(self.device).eval()
        self.denoiser = denoiser.to(self.device).eval()
        self.decoder = decoder.to(self.device).eval()
        self.cfg = cfg
        self.alphas = alphas_cumprod(cfg)  # float32, CPU: read on the host only
        self.eta, self.clip, self.spacing, self.threshold = float(eta), float(clip), spacing, float(threshold)
        self._graphs: dict[tuple, _Graph] = {}
        self._shape_cache: dict[tuple, tuple] = {}

    @classmethod
    def from_model(cls, model: MedSegLatDiff, **kw) -> "GpuSampler":
        """The three exported parts of ``model`` (moved to the device in place)."""
        return cls(ExportEncoder(model), ExportDenoiser(model), ExportDecoder(model), model.cfg, **kw)

    # -- public ------------------------------------------------------------------------------

    def sample(self, image: torch.Tensor, *, k: int | None = None, steps: int | None = None, seed: int = 0,
               use_graph: bool = False, eta: float | None = None, clip: float | None = None,
               spacing: str | None = None, threshold: float | None = None, copy: bool = True) -> GpuSample:
        """Sample k hypotheses for each image of ``image`` ((B, C, H, W) or (C, H, W), normalised units).

        With ``use_graph`` the first call for a configuration captures a CUDA graph, later ones
        replay it; ``copy=False`` then returns views of the graph's static outputs, which the next
        replay of the same configuration overwrites.
        """
        k = int(k if k is not None else self.cfg.default_k)
        steps = int(steps if steps is not None else self.cfg.default_steps)
        eta = self.eta if eta is None else float(eta)
        clip = self.clip if clip is None else float(clip)
        spacing = self.spacing if spacing is None else spacing
        threshold = self.threshold if threshold is None else float(threshold)
        if k < 1 or k > 65535:
            raise ValueError(f"k must be in [1, 65535], got {k}")
        if not eta >= 0.0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        plan = step_table(self.alphas, steps, spacing)
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4:
            raise ValueError(f"image must be (B, C, H, W) or (C, H, W), got shape {tuple(image.shape)}")
        with torch.cuda.device(self.device), torch.no_grad():
            image = image.to(self.device, torch.float32).contiguous()
            if not use_graph:
                return self._run(image, plan, k, eta, clip, threshold, seed=int(seed))
            key = (tuple(image.shape), k, steps, eta, clip, spacing, threshold)
            g = self._graphs.get(key)
            if g is None:
                g = self._capture(image, plan, k, eta, clip, threshold)
                self._graphs[key] = g
            g.image.copy_(image)
            g.seed.fill_(seed_word(seed))
            g.graph.replay()
            if not copy:
                return g.out
            return GpuSample(*(getattr(g.out, f.name).clone() for f in dataclasses.fields(GpuSample)))

    def clear_graphs(self) -> None:
        """Forget the captured graphs (and free their memory pools)."""
        self._graphs.clear()

    # -- the loop ----------------------------------------------------------------------------

    def _encode(self, image: torch.Tensor, k: int) -> torch.Tensor:
        cond = self.encoder(image).float()
        b = cond.shape[0]
        # layout [image][hypothesis], as msld_ddim_sample: expand + reshape needs no host sync
        return cond.unsqueeze(1).expand(b, k, *cond.shape[1:]).reshape(b * k, *cond.shape[1:]).contiguous()

    def _loop(self, image, plan, k, eta, clip, threshold, *, x, t_steps, out, seed=None, seed_buf=None):
        """Enqueue the whole sequence on the current stream. Seed by value (``seed``) or read on the
        device from ``seed_buf`` (graph mode). Writes x (final latents) and the aggregated outputs."""
        n_images = image.shape[0]
        stream = torch.cuda.current_stream().cuda_stream
        cond_k = self._encode(image, k)
        elems = x[0].numel()
        n = x.numel()
        # initial latents: stream 0, hypotheses 0..k-1 for every image
        if seed_buf is not None:
            _native.cuda_gaussian_dev(seed_buf.data_ptr(), 0, k, n_images, elems, 0, x.data_ptr(), stream)
        else:
            _native.cuda_gaussian(seed, 0, k, elems, 0, x.data_ptr(), stream)
            if n_images > 1:
                x.view(n_images, k, -1)[1:].copy_(x.view(n_images, k, -1)[:1].expand(n_images - 1, k, elems))
        for c in plan:
            eps = self.denoiser(x, t_steps[c.index], cond_k)
            if eps.dtype != torch.float32 or not eps.is_contiguous():
                eps = eps.float().contiguous()
            if eps.shape != x.shape:
                raise RuntimeError(f"denoiser returned {tuple(eps.shape)}, expected {tuple(x.shape)}")
            if eta > 0.0:
                if seed_buf is not None:
                    _native.cuda_ddim_step_noise_dev(x.data_ptr(), eps.data_ptr(), c.alpha_t, c.alpha_prev, eta, clip,
                                                     seed_buf.data_ptr(), k, n_images, elems, c.noise_stream, stream)
                else:
                    _native.cuda_ddim_step_noise(x.data_ptr(), eps.data_ptr(), c.alpha_t, c.alpha_prev, eta, clip,
                                                 seed, k, n_images, elems, c.noise_stream, stream)
            else:
                _native.cuda_ddim_step(x.data_ptr(), eps.data_ptr(), 0, n, c.alpha_t, c.alpha_prev, 0.0, clip, stream)
            del eps
        probs = self.decoder(x)
        if probs.dtype != torch.float32 or not probs.is_contiguous():
            probs = probs.float().contiguous()
        hw = probs.shape[-2:]
        n_pix = hw[0] * hw[1]
        if probs[0].numel() != n_pix:
            raise RuntimeError(f"decoder must give one channel per latent, got {tuple(probs.shape)}")
        probs = probs.view(n_images, k, *hw)
        for b in range(n_images):
            _native.cuda_aggregate(probs[b].data_ptr(), k, n_pix, threshold, out["masks"][b].data_ptr(),
                                   out["mean"][b].data_ptr(), out["confidence"][b].data_ptr(),
                                   out["consensus"][b].data_ptr(), stream)
        return probs

    def _shapes(self, image) -> tuple:
        """(latent channels, h, w, H, W) for this image size, found once by running the encoder and
        decoder on one probe (cached, so the step-by-step mode pays it only on first use)."""
        key = tuple(image.shape[1:])
        hit = self._shape_cache.get(key)
        if hit is None:
            cond = self.encoder(image[:1])
            c, h, w = int(self.cfg.latent_channels), int(cond.shape[2]), int(cond.shape[3])
            probe = self.decoder(torch.zeros(1, c, h, w, device=self.device))
            hit = (c, h, w, int(probe.shape[-2]), int(probe.shape[-1]))
            self._shape_cache[key] = hit
        return hit

    def _buffers(self, image, plan, k):
        """Latent buffer, per-step timestep tensors and aggregated outputs for this image size."""
        n_images = image.shape[0]
        c, h, w, H, W = self._shapes(image)
        x = torch.empty(n_images * k, c, h, w, device=self.device, dtype=torch.float32)
        t_steps = [torch.full((n_images * k,), float(s.timestep), device=self.device, dtype=torch.float32)
                   for s in plan]
        out = {
            "masks": torch.empty(n_images, k, H, W, device=self.device, dtype=torch.bool),
            "mean": torch.empty(n_images, H, W, device=self.device, dtype=torch.float32),
            "confidence": torch.empty(n_images, H, W, device=self.device, dtype=torch.float32),
            "consensus": torch.empty(n_images, H, W, device=self.device, dtype=torch.bool),
        }
        return x, t_steps, out

    def _run(self, image, plan, k, eta, clip, threshold, *, seed: int) -> GpuSample:
        if not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        x, t_steps, out = self._buffers(image, plan, k)
        probs = self._loop(image, plan, k, eta, clip, threshold, x=x, t_steps=t_steps, out=out, seed=seed)
        return self._result(image.shape[0], k, x, probs, out)

    @staticmethod
    def _result(n_images, k, x, probs, out) -> GpuSample:
        return GpuSample(masks=out["masks"], mean=out["mean"], confidence=out["confidence"],
                         consensus=out["consensus"], probs=probs, latents=x.view(n_images, k, *x.shape[1:]))

    def _capture(self, image, plan, k, eta, clip, threshold) -> _Graph:
        static_image = image.clone()
        seed_buf = torch.zeros(1, dtype=torch.int64, device=self.device)
        x, t_steps, out = self._buffers(image, plan, k)
        args = dict(x=x, t_steps=t_steps, out=out, seed_buf=seed_buf)
        # Warm-up on a side stream (torch's advice before capture; it also loads every native kernel
        # the graph uses, so no module loading happens while capturing).
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._loop(static_image, plan, k, eta, clip, threshold, **args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            probs = self._loop(static_image, plan, k, eta, clip, threshold, **args)
        return _Graph(graph, static_image, seed_buf, self._result(image.shape[0], k, x, probs, out))


# ---- the same loop on the CPU, through the native sampler ---------------------------------------

def sample_cpu(model: MedSegLatDiff, image: torch.Tensor, *, k: int, steps: int, seed: int, eta: float = 0.0,
               clip: float = 0.0, spacing: str = "trailing", threshold: float = 0.5) -> dict:
    """Reference: ``_native.ddim_sample`` with a torch CPU denoiser callback, then the CPU decoder
    and ``_native.aggregate``. Returns numpy arrays named as ``GpuSample``'s fields."""
    model = copy.deepcopy(model).cpu().eval()  # never move the caller's (maybe GPU) model
    enc, den, dec = ExportEncoder(model), ExportDenoiser(model), ExportDecoder(model)
    if image.dim() == 3:
        image = image.unsqueeze(0)
    image = image.detach().cpu().float().contiguous()
    n_images = image.shape[0]
    with torch.no_grad():
        cond = enc(image)
        cond_k = cond.unsqueeze(1).expand(n_images, k, *cond.shape[1:]).reshape(n_images * k, *cond.shape[1:])
        cond_k = cond_k.contiguous()
    c, h, w = int(model.cfg.latent_channels), cond.shape[2], cond.shape[3]
    x = np.zeros((n_images * k, c, h, w), dtype=np.float32)
    eps = np.zeros_like(x)
    t = np.zeros((n_images * k,), dtype=np.float32)
    xt, tt = torch.from_numpy(x), torch.from_numpy(t)

    def denoise():
        with torch.no_grad():
            eps[...] = den(xt, tt, cond_k).numpy()

    ac = alphas_cumprod(model.cfg).numpy()
    _native.ddim_sample(denoise, ac, steps, spacing, eta, clip, seed, k, n_images, x, eps, t)
    with torch.no_grad():
        probs = dec(torch.from_numpy(x)).numpy().astype(np.float32)
    H, W = probs.shape[-2:]
    probs = probs.reshape(n_images, k, H, W)
    res = {"masks": [], "mean": [], "confidence": [], "consensus": []}
    for b in range(n_images):
        masks, mean, conf, cons = _native.aggregate(np.ascontiguousarray(probs[b]), threshold)
        for name, v in zip(res, (masks, mean, conf, cons)):
            res[name].append(v)
    out = {name: np.stack(v) for name, v in res.items()}
    out["probs"] = probs
    out["latents"] = x.reshape(n_images, k, c, h, w)
    return out
