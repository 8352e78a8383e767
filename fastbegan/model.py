"""The BEGAN model (Berthelot, Schumm, Metz 2017) in one short file (docs/design.md §2).

carpedm20/BEGAN-tensorflow's architecture; with ``res = 2**(L+2)`` there are L levels:

    Decoder / Generator  z (N, h) -> fc(h -> n*8*8) -> (N, n, 8, 8)
        level 0..L-1: conv3x3+ELU, conv3x3+ELU, then nearest-upsample x2 (not after the last)
        conv3x3 -> 3 channels, linear
    Encoder  x (N, 3, res, res) -> conv3x3(3 -> n)+ELU
        level i = 1..L: conv3x3+ELU to n*i, conv3x3+ELU, then (except at 8x8) a stride-2
        conv3x3+ELU keeping n*i;  fc(n*L*8*8 -> h), linear
    Discriminator = Decoder(Encoder(x)), an auto-encoder.

Every conv is :func:`fastbegan.ops.conv3x3_elu`, the upsample fused into the next conv.
Option ``mbstd_group``: the encoder's code also sees a minibatch standard deviation
(ProGAN's batch statistic), computed over groups of that many consecutive samples (§7).
Activations are NCHW tensors in channels_last memory; conv weights are kept channels_last
(the (C_out, 9*C_in) matrix the kernels read). Options ``skip``, ``vanishing_residual``: §2.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch import Tensor

from . import checkpoint as ckpt
from . import ops


def check_resolution(res: int) -> int:
    """Return the number of levels for ``res``; a clear error unless res is 2**k in 8..256."""
    if not isinstance(res, int) or res < 8 or res > 256 or res & (res - 1):
        raise ValueError(f"resolution must be a power of two between 8 and 256, got {res!r}")
    return int(math.log2(res)) - 2


class Conv3x3(nn.Module):
    """3x3, padding-1 convolution + bias + ELU (optionally: fused upsample, stride 2, skip).

    ``weight``: (c_out, c_in, 3, 3) in channels_last memory; ``bias``: (c_out,).
    Initialised like ``nn.Conv2d`` (He-uniform with a = sqrt(5)).
    """

    def __init__(self, c_in: int, c_out: int, *, upsample: bool = False, stride: int = 1,
                 activation: bool = True):
        super().__init__()
        ref = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.weight = nn.Parameter(ref.weight.detach().contiguous(memory_format=torch.channels_last))
        self.bias = nn.Parameter(ref.bias.detach().clone())
        self.upsample, self.stride, self.activation = upsample, stride, activation

    def forward(self, x: Tensor, skip: Tensor | None = None, wgrad_scale: Tensor | None = None) -> Tensor:
        return ops.conv3x3_elu(x, self.weight, self.bias, upsample=self.upsample, stride=self.stride,
                               activation=self.activation, skip=skip, wgrad_scale=wgrad_scale)

    def extra_repr(self) -> str:
        c_out, c_in = self.weight.shape[:2]
        return (f"{c_in}, {c_out}, upsample={self.upsample}, stride={self.stride}, "
                f"activation={self.activation}")


class Decoder(nn.Module):
    """(N, h) -> (N, 3, res, res). Also the Generator (same architecture, own weights)."""

    def __init__(self, res: int = 64, n: int = 64, h: int = 64, *, skip: bool = False,
                 vanishing_residual: bool = False):
        super().__init__()
        self.levels = check_resolution(res)
        self.n, self.h, self.skip, self.vanishing_residual = n, h, skip, vanishing_residual
        self.fc = nn.Linear(h, n * 8 * 8)
        self.convs = nn.ModuleList()
        for level in range(self.levels):
            c_in = n * 2 if (skip and level > 0) else n
            self.convs.append(Conv3x3(c_in, n, upsample=level > 0))
            self.convs.append(Conv3x3(n, n))
        self.to_rgb = Conv3x3(n, 3, activation=False)
        self.register_buffer("carry", torch.ones(()), persistent=False)

    def forward(self, z: Tensor, wgrad_scale: Tensor | None = None) -> Tensor:
        return self.to_rgb(self.features(z, wgrad_scale), wgrad_scale=wgrad_scale)

    def features(self, z: Tensor, wgrad_scale: Tensor | None = None) -> Tensor:
        """Everything but ``to_rgb``: (N, h) -> (N, n, res, res), the last conv's input."""
        # fc output viewed as NHWC, then permuted: a channels_last NCHW view, no copy.
        x = ops.linear(z, self.fc.weight, self.fc.bias, wgrad_scale)
        x = x.view(-1, 8, 8, self.n).permute(0, 3, 1, 2)
        h0 = x
        for level in range(self.levels):
            first, second = self.convs[2 * level], self.convs[2 * level + 1]
            skip = None
            if self.skip and level > 0:
                h0 = ops.upsample_nearest2x(h0)
                skip = h0
            y = second(first(x, skip, wgrad_scale), wgrad_scale=wgrad_scale)
            if self.vanishing_residual:
                x_in = ops.upsample_nearest2x(x) if level > 0 else x
                y = self.carry * x_in + (1 - self.carry) * y
            x = y
        return x


def minibatch_stddev(x: Tensor, group: int) -> Tensor:
    """ProGAN's batch statistic: x (N, C, H, W) -> (N, 1) fp32, for each sample the mean
    over C*H*W of the standard deviation across its group (``group`` consecutive samples;
    a last, shorter group when ``group`` does not divide N; a group of one gives ~0: the
    square root of the 1e-8 that keeps the gradient finite).

    Groups are consecutive so that a batch ``[real; fake]`` whose halves are multiples of
    ``group`` never mixes the two: the fused step's per-half weight-gradient scale stays
    exact (docs/design.md §1, §7)."""
    n = x.shape[0]
    full = n - n % group
    parts = []
    for start, size in ((0, full), (full, n - full)):
        if size:
            g = min(group, size)
            xs = x[start:start + size].float().reshape(size // g, g, -1)
            std = (xs.var(dim=1, unbiased=False) + 1e-8).sqrt().mean(dim=1)  # (size/g,)
            parts.append(std.repeat_interleave(g))
    return torch.cat(parts).unsqueeze(1)


class Encoder(nn.Module):
    """(N, 3, res, res) -> (N, h). ``mbstd_group`` > 0: the code adds ``fc_std`` times
    :func:`minibatch_stddev` of the last (8x8) feature map, over groups of that size."""

    def __init__(self, res: int = 64, n: int = 64, h: int = 64, *, mbstd_group: int = 0):
        super().__init__()
        self.levels = check_resolution(res)
        self.n, self.mbstd_group = n, mbstd_group
        layers = [Conv3x3(3, n)]
        c = n
        for i in range(1, self.levels + 1):
            layers += [Conv3x3(c, n * i), Conv3x3(n * i, n * i)]
            if i < self.levels:
                layers.append(Conv3x3(n * i, n * i, stride=2))
            c = n * i
        self.convs = nn.ModuleList(layers)
        self.fc = nn.Linear(c * 8 * 8, h)
        # the batch statistic enters the code through its own (h, 1) weights: a Linear, so
        # the fused step's per-sample weight-gradient scale covers it (step._check_scalable)
        self.fc_std = nn.Linear(1, h, bias=False) if mbstd_group else None

    def forward(self, x: Tensor, wgrad_scale: Tensor | None = None, x2: Tensor | None = None) -> Tensor:
        """``x2``: an optional second batch; the encoder then runs on ``[x; x2]``, its first
        conv reading the two halves without concatenating them (``ops.conv3x3_elu_pair``)."""
        first = self.convs[0]
        if x2 is None:
            x = first(x, wgrad_scale=wgrad_scale)
        else:
            x = ops.conv3x3_elu_pair(x, x2, first.weight, first.bias, wgrad_scale=wgrad_scale)
        for conv in self.convs[1:]:
            x = conv(x, wgrad_scale=wgrad_scale)
        # channels_last -> NHWC flatten is a view; fc weights use that (h, 8*8*C) order.
        code = ops.linear(x.permute(0, 2, 3, 1).flatten(1), self.fc.weight, self.fc.bias, wgrad_scale)
        if self.fc_std is None:
            return code
        std = minibatch_stddev(x, self.mbstd_group).to(code.dtype)
        return code + ops.linear(std, self.fc_std.weight, None, wgrad_scale)


class Generator(Decoder):
    """G: z ~ U(-1, 1)^z_dim -> image in roughly [-1, 1]."""

    @classmethod
    def from_checkpoint(cls, path: str, map_location: str = "cpu") -> "Generator":
        """The generator of a ``fastbegan train`` checkpoint, on ``map_location``, in eval
        mode; ``g.config`` is the run's config."""
        tensors, cfg, _ = ckpt.load_checkpoint(path, map_location)
        g = cls(cfg["res"], cfg["filters"], cfg["z_dim"], skip=cfg.get("skip", False),
                vanishing_residual=cfg.get("vanishing_residual_on", False))
        g.config = cfg
        return load_trained(g, tensors, "G.", cfg).to(map_location)


class Discriminator(nn.Module):
    """D: the auto-encoder Decoder(Encoder(x)).

    ``wgrad_scale`` (N,) weights each sample's contribution to D's weight gradients
    without changing the input gradient (the single-pass training step, docs/design.md §1).
    """

    def __init__(self, res: int = 64, n: int = 64, h: int = 64, *, skip: bool = False,
                 vanishing_residual: bool = False, mbstd_group: int = 0):
        super().__init__()
        self.encoder = Encoder(res, n, h, mbstd_group=mbstd_group)
        self.decoder = Decoder(res, n, h, skip=skip, vanishing_residual=vanishing_residual)

    @classmethod
    def from_checkpoint_tensors(cls, tensors: dict[str, Tensor], cfg: dict) -> "Discriminator":
        """D of a loaded checkpoint (:func:`fastbegan.checkpoint.load_checkpoint`), eval mode."""
        d = cls(cfg["res"], cfg["filters"], cfg["h"], skip=cfg.get("skip", False),
                vanishing_residual=cfg.get("vanishing_residual_on", False),
                mbstd_group=cfg.get("mbstd_group", 0))
        return load_trained(d, tensors, "D.", cfg)

    def forward(self, x: Tensor, wgrad_scale: Tensor | None = None) -> Tensor:
        return self.decoder(self.encoder(x, wgrad_scale), wgrad_scale)

    def features(self, x: Tensor, wgrad_scale: Tensor | None = None,
                 x2: Tensor | None = None) -> Tensor:
        """D up to the decoder's last conv (``decoder.to_rgb``), whose input this is, for
        the batch ``x`` or ``[x; x2]`` (see :meth:`Encoder.forward`). The fused step hands
        it to :func:`fastbegan.ops.conv3x3_l1_pair_began`."""
        return self.decoder.features(self.encoder(x, wgrad_scale, x2), wgrad_scale)


class BEGAN(nn.Module):
    """Generator G and discriminator D of one BEGAN run (``fastbegan.BEGAN(res=64)``)."""

    def __init__(self, res: int = 64, filters: int | None = None, z_dim: int = 64, h: int = 64, *,
                 skip: bool = False, vanishing_residual: bool = False, mbstd_group: int = 0):
        super().__init__()
        filters = filters or default_filters(res)
        self.res, self.filters, self.z_dim, self.h = res, filters, z_dim, h
        self.G = Generator(res, filters, z_dim, skip=skip, vanishing_residual=vanishing_residual)
        self.D = Discriminator(res, filters, h, skip=skip, vanishing_residual=vanishing_residual,
                               mbstd_group=mbstd_group)

    def set_carry(self, carry: float | Tensor) -> None:
        """Vanishing-residual carry in [0, 1] for every decoder (in place, no realloc)."""
        for dec in (self.G, self.D.decoder):
            dec.carry.copy_(torch.as_tensor(carry, dtype=dec.carry.dtype))


def default_filters(res: int) -> int:
    """n = 128 at res >= 128, 64 below (docs/design.md §2)."""
    return 128 if res >= 128 else 64


def load_trained(net: nn.Module, tensors: dict[str, Tensor], prefix: str, cfg: dict) -> nn.Module:
    """Load the checkpoint tensors named ``prefix``* into ``net``; eval mode. The decoders of
    a vanishing-residual run get its annealed end state, carry 0 (trained runs finish there)."""
    ckpt.load_into(net, ckpt.unprefixed(prefix, tensors))
    if cfg.get("vanishing_residual_on"):
        for m in net.modules():
            if isinstance(m, Decoder):
                m.carry.fill_(0.0)
    return net.eval()
