"""FLOP counts of the BEGAN model for the benchmarks (docs/design.md §2, §8).

One multiply-add is 2 FLOPs; a 3x3, padding-1 conv costs ``2 * C_in * 9 * C_out * H_out *
W_out`` per image (bias and ELU not counted). These are the *logical* 3x3 FLOPs: the
sub-pixel decomposition the Triton backend uses after an upsample (docs/design.md §3.1:
2.25x fewer multiply-adds) is not credited, so every backend is measured against the same
count. The fc layers (well under 1%) are counted only with ``include_linear=True``.
Backward = 2 x forward, so a same-z training step (docs/design.md §1) is
``3 * (G(B) + D(2B))``: the algorithmic work of a single-pass step, for every variant
(the reference step does more arithmetic), which keeps TFLOP/s proportional to speed.
"""
from __future__ import annotations

from dataclasses import dataclass

from .model import check_resolution, default_filters


def conv3x3_flops(c_in: int, c_out: int, h_out: int, w_out: int, batch: int = 1) -> int:
    """FLOPs (2 * MACs) of one 3x3 conv forward producing (batch, c_out, h_out, w_out)."""
    return 2 * c_in * 9 * c_out * h_out * w_out * batch


def linear_flops(f_in: int, f_out: int, batch: int = 1) -> int:
    return 2 * f_in * f_out * batch


@dataclass(frozen=True)
class ConvLayer:
    """One 3x3 conv of the model: name, channels and output size (per image)."""
    name: str
    c_in: int
    c_out: int
    h_out: int
    w_out: int

    @property
    def flops(self) -> int:
        return conv3x3_flops(self.c_in, self.c_out, self.h_out, self.w_out)


def decoder_layers(res: int, n: int, *, skip: bool = False, prefix: str = "dec") -> list[ConvLayer]:
    """The decoder's / generator's convs (docs/design.md §2): per level two n->n convs, then to_rgb."""
    levels = check_resolution(res)
    out = []
    for level in range(levels):
        r = 8 * 2 ** level
        c_in = 2 * n if (skip and level > 0) else n
        out.append(ConvLayer(f"{prefix}.L{level}.conv1{'+up' if level else ''}", c_in, n, r, r))
        out.append(ConvLayer(f"{prefix}.L{level}.conv2", n, n, r, r))
    out.append(ConvLayer(f"{prefix}.to_rgb", n, 3, res, res))
    return out


def encoder_layers(res: int, n: int, prefix: str = "enc") -> list[ConvLayer]:
    """The encoder's convs: 3->n, then per level i: c->n*i, n*i->n*i, [stride-2 n*i->n*i]."""
    levels = check_resolution(res)
    out = [ConvLayer(f"{prefix}.conv0", 3, n, res, res)]
    c, r = n, res
    for i in range(1, levels + 1):
        out.append(ConvLayer(f"{prefix}.L{i}.conv1", c, n * i, r, r))
        out.append(ConvLayer(f"{prefix}.L{i}.conv2", n * i, n * i, r, r))
        if i < levels:
            r //= 2
            out.append(ConvLayer(f"{prefix}.L{i}.down", n * i, n * i, r, r))
        c = n * i
    return out


def generator_forward_flops(res: int, filters: int | None = None, batch: int = 1, *, z_dim: int = 64,
                            skip: bool = False, include_linear: bool = False) -> int:
    """FLOPs of one G forward over ``batch`` latent vectors."""
    n = filters or default_filters(res)
    total = sum(l.flops for l in decoder_layers(res, n, skip=skip))
    if include_linear:
        total += linear_flops(z_dim, n * 64)
    return total * batch


def discriminator_forward_flops(res: int, filters: int | None = None, batch: int = 1, *, h: int = 64,
                                skip: bool = False, include_linear: bool = False) -> int:
    """FLOPs of one D (encoder + decoder) forward over ``batch`` images."""
    n = filters or default_filters(res)
    total = sum(l.flops for l in encoder_layers(res, n)) + sum(
        l.flops for l in decoder_layers(res, n, skip=skip))
    if include_linear:
        levels = check_resolution(res)
        total += linear_flops(n * levels * 64, h) + linear_flops(h, n * 64)
    return total * batch


def forward_backward_flops(forward: int) -> int:
    """Forward + backward = 3 x forward (backward = input grad + weight grad = 2 x forward)."""
    return 3 * forward


def train_step_flops(res: int, filters: int | None = None, batch: int = 16, *, z_dim: int = 64,
                     h: int = 64, skip: bool = False, include_linear: bool = False) -> int:
    """FLOPs of one same-z training step with ``batch`` real images: 3 * (G(B) + D(2B))."""
    g = generator_forward_flops(res, filters, batch, z_dim=z_dim, skip=skip, include_linear=include_linear)
    d = discriminator_forward_flops(res, filters, 2 * batch, h=h, skip=skip, include_linear=include_linear)
    return forward_backward_flops(g + d)


def flops_table(res: int, filters: int | None = None, batch: int = 1) -> dict[str, int]:
    """The counts the benchmarks use, for one shape (all conv-only, logical 3x3 FLOPs)."""
    return {
        "G_forward": generator_forward_flops(res, filters, batch),
        "D_forward": discriminator_forward_flops(res, filters, batch),
        "D_forward_backward": forward_backward_flops(discriminator_forward_flops(res, filters, batch)),
        "train_step": train_step_flops(res, filters, batch),
    }


__all__ = ["conv3x3_flops", "linear_flops", "ConvLayer", "decoder_layers", "encoder_layers",
           "generator_forward_flops", "discriminator_forward_flops", "forward_backward_flops",
           "train_step_flops", "flops_table"]
