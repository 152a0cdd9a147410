"""The MedSegLatDiff reference architecture family, written independently from its mathematics.

The reference implementation (huynhspm/Generative-Model @ 3983e93, no licence) is not copied: this
module re-implements the computation its latent segmentation experiments use, with module
attribute names chosen so that a state dict of that code loads by name. Supported options are
exactly those of the experiments (``configs/experiment/segmentation/stable_diffusion/train/*``):

* blocks "Residual"; denoiser attention "SelfAttention" (LayerNorm + multi-head attention + GELU
  feed-forward, per level in ``attention_levels`` and always in the middle); image-embedder and
  mask-autoencoder attention "Attention" (single-head, GroupNorm+SiLU, 1x1 q/k/v/out convolutions);
* any base_channels / channel_multipliers / n_layer_blocks / n_attention_heads / n_attention_layers,
  image channels 1 or 3, image sizes 128 and 256 (any size the latent divides).

Everything else raises ``UnsupportedReferenceOption`` naming the option.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from msld_sdk.errors import CheckpointError


class UnsupportedReferenceOption(CheckpointError):
    """A reference configuration option outside the supported family (named in the message)."""


GROUPS = 32  # every normalisation of the reference uses 32 groups
EPS = 1e-5


def _gn(ch: int) -> nn.GroupNorm:
    if ch % GROUPS:
        raise UnsupportedReferenceOption(f"{ch} channels is not a multiple of the 32 normalisation groups")
    return nn.GroupNorm(GROUPS, ch, eps=EPS)


class _Silu(nn.Module):  # a placeholder slot in an index-addressed sequence (no parameters)
    def forward(self, x):
        return F.silu(x)


class _Nothing(nn.Module):  # dropout at inference
    def forward(self, x):
        return x


class ResBlock(nn.Module):
    """h = conv(silu(gn(x))) [+ W silu(temb)]; h = conv(silu(gn(h))); out = skip(x) + h."""

    def __init__(self, cin: int, cout: int | None = None, temb_dim: int | None = None):
        super().__init__()
        cout = cin if cout is None else cout
        if temb_dim is not None:
            self.emb_layers = nn.Sequential(_Silu(), nn.Linear(temb_dim, cout))
        self.has_temb = temb_dim is not None
        self.in_layers = nn.Sequential(_gn(cin), _Silu(), nn.Conv2d(cin, cout, 3, padding=1))
        self.out_layers = nn.Sequential(_gn(cout), _Silu(), _Nothing(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, temb=None):
        h = self.in_layers(x)
        if self.has_temb:
            h = h + self.emb_layers(temb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class ConvAttention(nn.Module):
    """Single-head spatial attention: x + P softmax(Q^T K / sqrt(C)) V over the h*w positions,
    Q, K, V 1x1 convolutions of silu(gn(x))."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = nn.Sequential(_gn(ch), _Silu())
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(ch, ch, 1)
        self.scale = ch ** -0.5

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, c, h * w) for m in (self.q, self.k, self.v))
        a = torch.softmax(torch.matmul(q.transpose(1, 2), k) * self.scale, dim=-1)   # b, i, j
        o = torch.matmul(v, a.transpose(1, 2)).reshape(b, c, h, w)                   # b, c, i
        return x + self.proj_out(o)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head attention over a (b, n, c) sequence with packed q/k/v projection weights."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        if ch % heads:
            raise UnsupportedReferenceOption(f"n_attention_heads={heads} does not divide {ch} channels")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * ch, ch))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * ch))
        self.out_proj = nn.Linear(ch, ch)

    def forward(self, x):
        b, n, c = x.shape
        d = c // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).reshape(b, n, 3, self.heads, d)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                 # b, heads, n, d
        a = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d), dim=-1)
        o = torch.matmul(a, v).transpose(1, 2).reshape(b, n, c)
        return self.out_proj(o)


class TransformerLayer(nn.Module):
    """y = x + MHA(ln(x)); out = y + W2 gelu(W1 ln'(y))."""

    def __init__(self, ch: int, heads: int):
        super().__init__()
        self.mha = MultiHeadSelfAttention(ch, heads)
        self.ln = nn.LayerNorm(ch, eps=EPS)
        self.ff_self = nn.Sequential(nn.LayerNorm(ch, eps=EPS), nn.Linear(ch, ch), nn.GELU(), nn.Linear(ch, ch))

    def forward(self, x):
        y = x + self.mha(self.ln(x))
        return y + self.ff_self(y)


class SequenceAttention(nn.Module):
    """n_layers transformer layers over the pixels of a (b, c, h, w) map."""

    def __init__(self, ch: int, heads: int, layers: int):
        super().__init__()
        if not isinstance(layers, int) or layers < 1:
            raise UnsupportedReferenceOption(f"n_attention_layers={layers!r} (needs an integer >= 1)")
        self.sa = nn.Sequential(*[TransformerLayer(ch, heads) for _ in range(layers)])

    def forward(self, x):
        b, c, h, w = x.shape
        s = self.sa(x.reshape(b, c, h * w).transpose(1, 2))
        return s.transpose(1, 2).reshape(b, c, h, w)


class _Conv(nn.Module):
    """A convolution held as ``.conv`` (the reference's down/up-sampling parameter layout)."""

    def __init__(self, ch: int, stride: int, up: bool):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=stride, padding=1)
        self.up = up

    def forward(self, x):
        if self.up:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x)


class _Stage(nn.Sequential):
    """An index-addressed sequence of layers; residual blocks also get the time embedding."""

    def forward(self, x, temb=None):
        for m in self:
            x = m(x, temb) if isinstance(m, ResBlock) else m(x)
        return x


class TimeEmbedding(nn.Module):
    def __init__(self, table_rows: int, d_model: int, dim: int):
        super().__init__()
        # rows of the sinusoid table are stored in the checkpoint (as the reference keeps them)
        self.time_embedding = nn.Sequential(nn.Embedding(table_rows, d_model), nn.Linear(d_model, dim), _Silu(),
                                            nn.Linear(dim, dim))

    def forward(self, t):
        e = self.time_embedding[0].weight[t.long()]
        return self.time_embedding[3](F.silu(self.time_embedding[1](e)))


class Denoiser(nn.Module):
    """Conditional UNet: eps = UNet(concat(x, cond), t)."""

    def __init__(self, in_channels: int, out_channels: int, base_channels: int, channel_multipliers,
                 n_layer_blocks: int, attention_levels, n_attention_heads: int, n_attention_layers: int,
                 d_cond_image: int, time_table_rows: int = 1000):
        super().__init__()
        mult = list(channel_multipliers)
        levels = len(mult)
        chs = [base_channels * m for m in mult]
        temb = base_channels * mult[-1]
        self.time_embedder = TimeEmbedding(time_table_rows, base_channels, temb)
        att = set(attention_levels or [])

        def attn(c):
            return SequenceAttention(c, n_attention_heads, n_attention_layers)

        self.down = nn.ModuleList([_Stage(nn.Conv2d(in_channels + d_cond_image, base_channels, 3, padding=1))])
        skip = [base_channels]
        c = base_channels
        for i in range(levels):
            for _ in range(n_layer_blocks):
                layers = [ResBlock(c, chs[i], temb)]
                c = chs[i]
                if i in att:
                    layers.append(attn(c))
                self.down.append(_Stage(*layers))
                skip.append(c)
            if i != levels - 1:
                self.down.append(_Stage(_Conv(c, 2, False)))
                skip.append(c)
        self.mid = _Stage(ResBlock(c, None, temb), attn(c), ResBlock(c, None, temb))
        self.up = nn.ModuleList()
        for i in reversed(range(levels)):
            for j in range(n_layer_blocks + 1):
                layers = [ResBlock(c + skip.pop(), chs[i], temb)]
                c = chs[i]
                if i in att:
                    layers.append(attn(c))
                if i != 0 and j == n_layer_blocks:
                    layers.append(_Conv(c, 1, True))
                self.up.append(_Stage(*layers))
        self.conv_out = nn.Sequential(_gn(c), _Silu(), nn.Conv2d(c, out_channels, 3, padding=1))

    def forward(self, x, t, cond):
        temb = self.time_embedder(t)
        h = torch.cat([x, cond], dim=1)
        saved = []
        for stage in self.down:
            h = stage(h, temb)
            saved.append(h)
        h = self.mid(h, temb)
        for stage in self.up:
            h = stage(torch.cat([h, saved.pop()], dim=1), temb)
        return self.conv_out(h)


class _Level(nn.Module):
    def __init__(self, blocks, resample):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        setattr(self, resample[0], resample[1])
        self._resample = resample[0]

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return getattr(self, self._resample)(x)


class ImageEncoder(nn.Module):
    """Image -> condition at latent resolution (len(multipliers)-1 stride-2 halvings)."""

    def __init__(self, in_channels: int, z_channels: int, base_channels: int, channel_multipliers,
                 n_layer_blocks: int):
        super().__init__()
        chs = [base_channels * m for m in channel_multipliers]
        self.encoder_input = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.encoder = nn.ModuleList()
        c = base_channels
        for i, ch in enumerate(chs):
            blocks = []
            for _ in range(n_layer_blocks):
                blocks.append(ResBlock(c, ch))
                c = ch
            last = i == len(chs) - 1
            self.encoder.append(_Level(blocks, ("downSample", nn.Identity() if last else _Conv(c, 2, False))))
        self.mid = nn.Sequential(ResBlock(c), ConvAttention(c), ResBlock(c))
        self.encoder_output = nn.Sequential(_gn(c), _Silu(), nn.Conv2d(c, z_channels, 3, padding=1))

    def forward(self, x):
        h = self.encoder_input(x)
        for level in self.encoder:
            h = level(h)
        return self.encoder_output(self.mid(h))


class MaskDecoder(nn.Module):
    """Mask latent -> mask in [-1, 1] units (len(multipliers)-1 nearest-neighbour doublings)."""

    def __init__(self, out_channels: int, z_channels: int, channels, n_layer_blocks: int):
        super().__init__()
        chs = list(channels)  # base_channels * channel_multipliers
        c = chs[-1]
        self.decoder_input = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = nn.Sequential(ResBlock(c, c), ConvAttention(c), ResBlock(c, c))
        levels = [None] * len(chs)
        for i in reversed(range(len(chs))):
            blocks = []
            for _ in range(n_layer_blocks + 1):
                blocks.append(ResBlock(c, chs[i]))
                c = chs[i]
            levels[i] = _Level(blocks, ("upSample", _Conv(c, 1, True) if i != 0 else nn.Identity()))
        self.decoder = nn.ModuleList(levels)
        self.decoder_output = nn.Sequential(_gn(c), _Silu(), nn.Conv2d(c, out_channels, 3, padding=1))

    def forward(self, z):
        h = self.mid(self.decoder_input(z))
        for level in reversed(self.decoder):
            h = level(h)
        return self.decoder_output(h)


# ---- the three graphs of an imported plan ------------------------------------------------------

class EncoderGraph(nn.Module):
    def __init__(self, embedder: ImageEncoder):
        super().__init__()
        self.embedder = embedder

    def forward(self, image):
        return self.embedder(image)


class DenoiserGraph(nn.Module):
    def __init__(self, unet: Denoiser):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, cond):
        return self.unet(x, t, cond)


class DecoderGraph(nn.Module):
    """z -> clamp(decoder(z / scale) * 0.5 + 0.5, 0, 1), the reference's mapping of masks to [0, 1]."""

    def __init__(self, decoder: MaskDecoder, latent_scaling_factor: float):
        super().__init__()
        self.decoder = decoder
        self.scale = float(latent_scaling_factor)

    def forward(self, z):
        return torch.clamp(self.decoder(z / self.scale) * 0.5 + 0.5, 0.0, 1.0)
