"""The whole sampling loop for k hypotheses on one device, in PyTorch, for any dtype of the networks.

``BatchedSampler`` runs what ``msld_ddim_sample`` runs, on the device that holds the networks (CUDA,
or the CPU for tests): encode once and repeat the condition k times, the SDK's Philox noise
(native CUDA kernel where available, else the native CPU generator), per step one denoiser call
for all n_images * k latents and the DDIM or DPM-Solver++(2M) update (``solver``) on the plan's
step table (``msld_sdk.sampling.Schedule.ddim`` / ``.dpmpp2m``), then decode and aggregate with ``msld_aggregate``'s
arithmetic. ``use_graph=True`` (CUDA) captures the sequence once per configuration and replays it.

``dtype`` ("fp32", "fp16", "bf16") is the networks' dtype; the latents, the update, the timesteps,
the noise and the aggregation stay float32 (why: the comment below the imports), so in fp32 the
update is bit-identical to the native kernels. ``channels_last`` stores the networks' weights and
the latents fed to them in NHWC. Lives under export/ because it needs torch.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from msld_sdk import _native
from msld_sdk.sampling import SOLVERS, DdimStep, Dpm2mStep, Schedule
from msld_sdk.timestep_grids import check_grid

from .gpu_sampler import GpuSample, native_has_cuda, seed_word

# Precision. ``dtype`` ("fp32", "fp16", "bf16") is the dtype of the three networks' weights and
# activations (``decoder_dtype`` may keep the decoder apart). What stays float32, and why:
#
# * the latents x, the DDIM update and its scalars: the update divides by sqrt(alpha_t) (down to
#   ~0.006 at t = 999), multiplying eps's rounding by up to ~160 at every step; in fp16/bf16 the
#   accumulated latent would drift by far more than the networks' own rounding. The scalars are those
#   of ``msld::ddim_scalars`` (float32 from the float64 alphas) and the update uses the same
#   operations in the same order as ``msld::ddim_update``, so in fp32 it is bit-identical to the
#   native kernels. Each step casts x to the network dtype on the way in and eps back to fp32;
# * the timesteps t: the reference's time embedding indexes a table with ``t.long()``; bf16 holds
#   integers exactly only up to 256 (999 would become 1000);
# * the noise (drawn in fp32 by the native generator, so every dtype starts from the same latents);
# * the probabilities and the aggregation (sums over k in fp32, votes counted as integers).
#
# Normalisation layers run in the network dtype; PyTorch's GroupNorm/LayerNorm/softmax kernels
# accumulate in fp32 internally for fp16/bf16 inputs.

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NOISE_SOURCES = ("auto", "native-cuda", "host")


def as_dtype(d) -> torch.dtype:
    if isinstance(d, torch.dtype):
        if d not in DTYPES.values():
            raise ValueError(f"dtype {d} is not one of {list(DTYPES)}")
        return d
    if d not in DTYPES:
        raise ValueError(f"dtype {d!r} is not one of {list(DTYPES)}")
    return DTYPES[d]


# ---- the DDIM update, as the native kernels compute it -------------------------------------------

def ddim_scalars(c: DdimStep, eta: float, clip: float) -> np.ndarray:
    """float32 [sqrt(1-a_t), sqrt(a_t), sqrt(a_prev), dir, std, clip] of ``msld::ddim_scalars``
    (csrc/ddim_scalars.h): the alphas rounded to float32, every operation in float32, except the
    DDIM variance, computed in float64 and then rounded."""
    f = np.float32
    at, ap = float(c.alpha_t), float(c.alpha_prev)
    var = (1.0 - ap) / (1.0 - at) * (1.0 - at / ap)
    at_f, ap_f = f(at), f(ap)
    std = f(f(eta) * np.sqrt(f(var)))
    d = f(f(f(1.0) - ap_f) - f(std * std))
    return np.array([np.sqrt(f(f(1.0) - at_f)), np.sqrt(at_f), np.sqrt(ap_f), np.sqrt(max(d, f(0.0))), std, f(clip)],
                    dtype=np.float32)


def ddim_update(x: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, clip: float,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_prev of ``msld::ddim_update`` for float32 tensors; ``s``: one row of ``ddim_scalars`` as a
    float32 tensor on x's device. Each operation is its own correctly rounded kernel (no fused
    multiply-add) and the scalars are device tensors (a Python-number divisor would be turned into a
    multiplication by its reciprocal on CUDA), so the result equals the native kernels bit for bit."""
    sb, sa, sap, dr, sd = s[0], s[1], s[2], s[3], s[4]
    x0 = (x - eps * sb) / sa
    if clip > 0.0:
        x0 = x0.clamp(-clip, clip)
    y = x0 * sap + eps * dr
    if noise is not None:
        y = y + noise * sd
    return y


def dpm2m_scalars(c: Dpm2mStep, clip: float) -> np.ndarray:
    """float32 [sqrt(1-a_t), sqrt(a_t), x_coef, x0_coef, x0_prev_coef, clip] of ``msld::dpm2m_scalars``
    (csrc/ddim_scalars.h): the x0 terms as ``ddim_scalars``, the native coefficients rounded."""
    f = np.float32
    at_f = f(c.alpha_t)
    return np.array([np.sqrt(f(f(1.0) - at_f)), np.sqrt(at_f), f(c.x_coef), f(c.x0_coef), f(c.x0_prev_coef),
                     f(clip)], dtype=np.float32)


def dpm2m_update(x: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, clip: float, order: int,
                 x0_prev: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_next, x0) of ``msld::dpm2m_update`` for float32 tensors; ``s``: one row of ``dpm2m_scalars``
    on x's device. Same operations in the same order as the native kernels (bit-identical in fp32)."""
    sb, sa, a, b, cp = s[0], s[1], s[2], s[3], s[4]
    x0 = (x - eps * sb) / sa
    if clip > 0.0:
        x0 = x0.clamp(-clip, clip)
    y = x * a + x0 * b
    if order == 2:
        y = y + x0_prev * cp
    return y, x0


def aggregate_constants(k: int, device) -> tuple:
    """float32(1/k) and the confidence of each vote count 0..k, as the native code computes them
    (made once, outside any CUDA graph capture: a host-to-device copy cannot be captured)."""
    f = np.float32
    p = np.arange(k + 1, dtype=np.float32) / f(k)
    table = (f(1.0) - f(2.0) * np.sqrt(p * (f(1.0) - p))).astype(np.float32)
    return (torch.tensor(f(1.0) / f(k), dtype=torch.float32, device=device), torch.from_numpy(table).to(device))


def aggregate(probs: torch.Tensor, threshold: float, constants: tuple | None = None) -> tuple:
    """(masks, mean, confidence, consensus) of k probabilities (k, ...) with ``msld_aggregate``'s
    arithmetic: the float32 sum over hypotheses in order, times float32(1/k); confidence
    1 - 2 sqrt(p (1 - p)) of the vote share p; consensus 2 votes > k."""
    k = int(probs.shape[0])
    inv_k, table = constants if constants is not None else aggregate_constants(k, probs.device)
    masks = probs > threshold
    total = probs[0].clone()
    for i in range(1, k):
        total = total + probs[i]
    votes = masks.sum(0)
    return masks, total * inv_k, table[votes], 2 * votes > k


# ---- the reference's own way: one hypothesis at a time -------------------------------------------

def per_hypothesis_eager(embedder: nn.Module, denoiser: nn.Module, decoder: nn.Module, alphas_cumprod,
                         image: torch.Tensor, *, k: int, steps: int, seed: int, spacing: str = "linspace_trunc",
                         clip: float = 1.0) -> torch.Tensor:
    """(k, H, W) float32 probabilities the research-code way: the image embedder re-run for every
    hypothesis (the reference's ui.py n_ensemble loop), the denoiser at batch 1, its DDIM rule in
    torch float32 on the image's device. ``image``: (1, C, H, W) normalised. Hypothesis i starts from
    the SDK's noise for (seed, i), so with the same weights it computes the SDK's masks."""
    table = Schedule(alphas_cumprod, spacing).ddim(steps)
    dev = image.device
    shape = None
    out = []
    with torch.no_grad():
        for i in range(k):
            cond = embedder(image)
            if shape is None:
                shape = (1, int(denoiser_latent_channels(denoiser)), cond.shape[2], cond.shape[3])
            x = torch.from_numpy(_native.gaussian(seed, i, 1, int(np.prod(shape)), 0).reshape(shape)).to(dev)
            for c in table:
                eps = denoiser(x, torch.tensor([float(c.timestep)], device=dev), cond)
                # the alphas are float32 values held as doubles: back to float32 tensors exactly
                a, ap = torch.tensor(np.float32(c.alpha_t)), torch.tensor(np.float32(c.alpha_prev))
                x0 = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
                if clip > 0:
                    x0 = x0.clamp(-clip, clip)
                x = torch.sqrt(ap) * x0 + torch.sqrt(1 - ap) * eps
            out.append(decoder(x)[0, 0].float())
    return torch.stack(out)


def denoiser_latent_channels(denoiser: nn.Module) -> int:
    """Latent channels of a denoiser: its ``out_channels`` (reference ``Denoiser``) or that of its
    last convolution."""
    for m in (denoiser, getattr(denoiser, "unet", None)):
        if m is not None and hasattr(m, "conv_out"):
            return int(m.conv_out[-1].out_channels)
    convs = [m for m in denoiser.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels)


# ---- the batched loop ----------------------------------------------------------------------------

@dataclass
class _Graph:
    graph: object
    image: torch.Tensor
    seed: torch.Tensor | None
    noise: torch.Tensor
    out: GpuSample


class BatchedSampler:
    """DDIM or DPM-Solver++(2M) (``solver``) sampling of k hypotheses per image with all steps on one
    device (see the module's doc).

    ``encoder``: normalised image (B, C, H, W) -> condition (B, Lc, h, w); ``denoiser``: (x, t, cond)
    -> eps, t float32 timesteps; ``decoder``: latent -> probability (B, 1, H, W). With
    ``copy_modules`` (default) the modules are copied before they are moved and converted, so the
    caller's stay as they are. ``latent_channels``: the latent's channels (default: the denoiser's
    output channels).
    """

    def __init__(self, encoder: nn.Module, denoiser: nn.Module, decoder: nn.Module, alphas_cumprod, *,
                 device="cuda", dtype="fp32", decoder_dtype=None, channels_last: bool = False,
                 spacing: str = "linspace_trunc", clip: float = 1.0, eta: float = 0.0, threshold: float = 0.5,
                 noise: str = "auto", latent_channels: int | None = None, copy_modules: bool = True,
                 solver: str = "ddim", timesteps=None):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype = as_dtype(dtype)
        self.decoder_dtype = as_dtype(decoder_dtype) if decoder_dtype is not None else self.dtype
        self.channels_last = bool(channels_last)
        if noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {NOISE_SOURCES}, got {noise!r}")
        if noise == "native-cuda" and not (self.device.type == "cuda" and native_has_cuda()):
            raise ValueError("noise='native-cuda' needs a CUDA device and msld_sdk._native built with CUDA")
        self.noise = ("native-cuda" if self.device.type == "cuda" and native_has_cuda() else "host") \
            if noise == "auto" else noise
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.latent_channels = int(latent_channels or denoiser_latent_channels(denoiser))

        def prep(m, dt):
            m = copy.deepcopy(m) if copy_modules else m
            return m.to(device=self.device, dtype=dt, memory_format=fmt).eval()

        self.encoder, self.denoiser = prep(encoder, self.dtype), prep(denoiser, self.dtype)
        self.decoder = prep(decoder, self.decoder_dtype)
        self.alphas = np.ascontiguousarray(np.asarray(alphas_cumprod, dtype=np.float32))
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver != "ddim" and float(eta) != 0.0:
            raise ValueError(f"solver {solver!r} runs with eta 0 only, got eta={eta}")
        self.solver = solver
        if timesteps is not None:
            if solver != "dpmpp2m":
                raise ValueError("timesteps (a grid) are for solver 'dpmpp2m'")
            timesteps = check_grid(timesteps, len(self.alphas))
        self.timesteps = timesteps   # dpmpp2m's grid (msld_sdk.timestep_grids); None: the spacing's
        self.spacing, self.clip, self.eta, self.threshold = spacing, float(clip), float(eta), float(threshold)
        self._graphs: dict[tuple, _Graph] = {}
        self._coeffs: dict[tuple, tuple] = {}
        self._agg: dict[int, tuple] = {}

    @classmethod
    def from_reference(cls, m, **kw) -> "BatchedSampler":
        """From an ``ImportedModel`` / ``bench_plan.RandomReferenceModel``: its embedder, denoiser and
        mask decoder mapped to [0, 1] (the plan's three graphs), its alphas, the reference DDIM rule
        (``linspace_trunc``) and its x0 clipping."""
        from ..reference.model import DecoderGraph
        o = m.opts
        kw.setdefault("spacing", "linspace_trunc")
        kw.setdefault("clip", 1.0 if o["sampler"]["clip_denoised"] else 0.0)
        kw.setdefault("latent_channels", o["latent"][0])
        return cls(m.embedder, m.denoiser, DecoderGraph(m.decoder, o["latent_scaling_factor"]), m.alphas, **kw)

    # -- public ------------------------------------------------------------------------------

    def sample(self, image: torch.Tensor, *, k: int, steps: int, seed: int = 0, use_graph: bool = False,
               copy: bool = True) -> GpuSample:
        """k hypotheses for each image of ``image`` ((B, C, H, W) or (C, H, W), normalised units).

        ``use_graph`` (CUDA only): the first call for a configuration captures the whole sequence as
        one CUDA graph, later calls replay it; ``copy=False`` then returns the graph's static outputs,
        which the next replay overwrites."""
        k, steps, seed = int(k), int(steps), int(seed)
        if not 1 <= k <= 65535:
            raise ValueError(f"k must be in [1, 65535], got {k}")
        if not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        if image.dim() == 3:
            image = image.unsqueeze(0)
        if image.dim() != 4:
            raise ValueError(f"image must be (B, C, H, W) or (C, H, W), got shape {tuple(image.shape)}")
        if use_graph and self.device.type != "cuda":
            raise ValueError(f"use_graph needs a CUDA device; this sampler runs on {self.device}")
        image = image.to(self.device, torch.float32).contiguous()
        with torch.no_grad():
            if not use_graph:
                bufs = self._buffers(image, k, steps)
                self._draw(bufs["noise"], seed, None, k, image.shape[0])
                return self._loop(image, k, steps, bufs)
            with torch.cuda.device(self.device):
                key = (tuple(image.shape), k, steps, self.eta, self.clip, self.threshold, self.solver, self.timesteps)
                g = self._graphs.get(key)
                if g is None:
                    g = self._graphs[key] = self._capture(image, k, steps)
                g.image.copy_(image)
                if g.seed is not None:
                    g.seed.fill_(seed_word(seed))
                else:
                    self._draw(g.noise, seed, None, k, image.shape[0])
                g.graph.replay()
                if not copy:
                    return g.out
                return GpuSample(*(getattr(g.out, f.name).clone() for f in dataclasses.fields(GpuSample)))

    def denoiser_call(self, k: int, cond_channels: int, hw: tuple) -> tuple:
        """(fn, inputs): one denoiser call at batch k in this sampler's dtype and layout, on inputs
        of the right shapes (for timing the denoiser alone)."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = torch.randn(k, self.latent_channels, *hw, device=self.device).to(self.dtype, memory_format=fmt)
        cond = torch.randn(k, cond_channels, *hw, device=self.device).to(self.dtype, memory_format=fmt)
        t = torch.full((k,), 500.0, device=self.device)
        return (lambda: self.denoiser(x, t, cond)), (x, t, cond)

    def clear_graphs(self) -> None:
        self._graphs.clear()

    # -- internals ---------------------------------------------------------------------------

    def _schedule(self, steps: int) -> tuple:
        key = (steps, self.eta, self.clip, self.solver, self.timesteps)
        hit = self._coeffs.get(key)
        if hit is None:
            if self.timesteps is not None and steps != len(self.timesteps):
                raise ValueError(f"steps={steps} but the sampler's timestep grid has {len(self.timesteps)}")
            plan = Schedule(self.alphas, self.spacing).table(self.solver, steps, self.timesteps)
            if self.solver == "dpmpp2m":
                rows = np.stack([dpm2m_scalars(c, self.clip) for c in plan])
            else:
                rows = np.stack([ddim_scalars(c, self.eta, self.clip) for c in plan])
            coef = torch.from_numpy(rows).to(self.device)
            hit = self._coeffs[key] = (plan, coef)
        return hit

    def _streams(self, steps: int) -> list[int]:
        """Philox streams of the noise the loop needs: 0 (initial latents), step + 1 (eta > 0)."""
        return [0] + (list(range(1, steps + 1)) if self.eta > 0.0 else [])

    def _buffers(self, image: torch.Tensor, k: int, steps: int) -> dict:
        n = image.shape[0] * k
        cond = self._condition(image, k)
        h, w = cond.shape[-2:]
        noise = torch.empty(len(self._streams(steps)), n, self.latent_channels, h, w, device=self.device)
        return {"cond": cond, "noise": noise,
                "t": [torch.full((n,), float(c.timestep), device=self.device) for c in self._schedule(steps)[0]]}

    def _condition(self, image: torch.Tensor, k: int) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        cond = self.encoder(image.to(self.dtype).contiguous(memory_format=fmt))
        b = cond.shape[0]
        cond = cond.unsqueeze(1).expand(b, k, *cond.shape[1:]).reshape(b * k, *cond.shape[1:])
        return cond.contiguous(memory_format=fmt)

    def _draw(self, noise: torch.Tensor, seed: int | None, seed_buf: torch.Tensor | None, k: int,
              n_images: int) -> None:
        """Fill ``noise`` (streams, n_images * k, C, h, w) with the SDK's normals: every image gets
        hypotheses 0..k-1. By value (``seed``) or, on CUDA with the native kernels, from the device
        word ``seed_buf`` (read when the kernel runs: graph replays)."""
        elems = int(noise[0, 0].numel())
        streams = list(range(noise.shape[0])) if self.eta > 0.0 else [0]
        if self.noise == "native-cuda":
            cs = torch.cuda.current_stream(self.device).cuda_stream
            for j, s in enumerate(streams):
                out = noise[j]
                if seed_buf is not None:
                    _native.cuda_gaussian_dev(seed_buf.data_ptr(), 0, k, n_images, elems, s, out.data_ptr(), cs)
                else:
                    for b in range(n_images):
                        _native.cuda_gaussian(seed, 0, k, elems, s, out[b * k:(b + 1) * k].data_ptr(), cs)
            return
        host = np.stack([_native.gaussian(seed, 0, k, elems, s) for s in streams])       # streams, k, elems
        host = np.broadcast_to(host[:, None], (len(streams), n_images, k, elems))
        noise.copy_(torch.from_numpy(host.copy()).view(noise.shape))

    def _loop(self, image: torch.Tensor, k: int, steps: int, bufs: dict) -> GpuSample:
        """Enqueue the sequence after the noise: condition, all steps, decode, aggregate."""
        n_images = image.shape[0]
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        plan, coef = self._schedule(steps)
        cond = self._condition(image, k) if bufs.get("cond") is None else bufs.pop("cond")
        noise = bufs["noise"]
        x = noise[0].clone()
        x0_prev = None
        for i in range(steps):
            eps = self.denoiser(x.to(self.dtype).contiguous(memory_format=fmt), bufs["t"][i], cond)
            eps = eps.float().contiguous()
            if eps.shape != x.shape:
                raise RuntimeError(f"denoiser returned {tuple(eps.shape)}, expected {tuple(x.shape)}")
            if self.solver == "dpmpp2m":
                x, x0_prev = dpm2m_update(x, eps, coef[i], self.clip, plan[i].order, x0_prev)
            else:
                x = ddim_update(x, eps, coef[i], self.clip, noise[i + 1] if self.eta > 0.0 else None)
        probs = self.decoder(x.to(self.decoder_dtype).contiguous(memory_format=fmt)).float().contiguous()
        hw = probs.shape[-2:]
        if probs[0].numel() != hw[0] * hw[1]:
            raise RuntimeError(f"decoder must give one channel per latent, got {tuple(probs.shape)}")
        probs = probs.view(n_images, k, *hw)
        consts = self._agg.get(k)
        if consts is None:
            consts = self._agg[k] = aggregate_constants(k, self.device)
        parts = [aggregate(probs[b], self.threshold, consts) for b in range(n_images)]
        masks, mean, conf, cons = (torch.stack(v) for v in zip(*parts))
        return GpuSample(masks=masks, mean=mean, confidence=conf, consensus=cons, probs=probs,
                         latents=x.view(n_images, k, *x.shape[1:]))

    def _capture(self, image: torch.Tensor, k: int, steps: int) -> _Graph:
        static_image = image.clone()
        n_images = image.shape[0]
        bufs = self._buffers(static_image, k, steps)
        seed_buf = torch.zeros(1, dtype=torch.int64, device=self.device) if self.noise == "native-cuda" else None
        noise, t = bufs["noise"], bufs["t"]

        def body():
            if seed_buf is not None:
                self._draw(noise, None, seed_buf, k, n_images)
            return self._loop(static_image, k, steps, {"cond": None, "noise": noise, "t": t})

        if seed_buf is None:
            self._draw(noise, 0, None, k, n_images)
        # warm-up on a side stream (cuDNN's algorithm choice, lazy module loading) before capture
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = body()
        return _Graph(graph, static_image, seed_buf, noise, out)
