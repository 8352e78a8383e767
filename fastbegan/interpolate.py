"""Latent interpolation (BEGAN paper, section 4.4 / figure 6).

Between real images: each image x is mapped to a latent z by optimising z with Adam
against the generator's output, ``min_z mean|G(z) - x|`` (L1, the loss BEGAN trains
with), z clamped to [-1, 1] (the support of U(-1, 1)) after every step, starting from
the best of a few random z ("restarts"). The straight line between the two latents is
then decoded. A smooth, plausible sequence shows the generator has learned a
continuous latent space rather than memorised images; the inversion's L1 error shows
how close the generator can get to a real image.

Between random latents: ``z_a``, ``z_b`` drawn from seeds, then the same line.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Inversion:
    z: Tensor                       # (N, z_dim) on the CPU, in [-1, 1]
    loss_init: Tensor               # (N,) L1 after choosing the best random start
    loss_final: Tensor              # (N,) L1 at the end
    history: list[float] = field(default_factory=list)  # mean L1 per step


def _device(g: torch.nn.Module) -> torch.device:
    return next(g.parameters()).device


def _per_image_l1(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).abs().flatten(1).mean(1)


def invert(g: torch.nn.Module, x: Tensor, steps: int = 300, lr: float = 0.05, restarts: int = 16,
           seed: int = 0, z_init: Tensor | None = None) -> Inversion:
    """Find z with G(z) ~ x for each image of x ((N, 3, H, W) in [-1, 1]), see the module docstring.

    ``lr`` is Adam's step in z units (z lives in [-1, 1]). G's parameters are not changed.
    """
    dev = _device(g)
    x = x.to(dev).float()
    n, z_dim = x.shape[0], g.fc.in_features
    req = [p.requires_grad for p in g.parameters()]
    for p in g.parameters():
        p.requires_grad_(False)
    try:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if z_init is not None:
                z0 = z_init.detach().float().clamp(-1, 1).to(dev)
                best = _per_image_l1(g(z0).float(), x)
            else:
                z0, best = None, None
                for _ in range(max(1, restarts)):
                    cand = (torch.rand(n, z_dim, generator=gen) * 2 - 1).to(dev)
                    err = _per_image_l1(g(cand).float(), x)
                    if z0 is None:
                        z0, best = cand, err
                    else:
                        better = err < best
                        z0 = torch.where(better[:, None], cand, z0)
                        best = torch.minimum(err, best)
        loss_init = best.cpu()
        z = z0.clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=lr)
        history = []
        for _ in range(steps):
            err = _per_image_l1(g(z).float(), x)
            history.append(float(err.detach().mean()))
            opt.zero_grad(set_to_none=True)
            err.sum().backward()  # per-image losses are independent: sum keeps each one's scale
            opt.step()
            with torch.no_grad():
                z.clamp_(-1, 1)
        with torch.no_grad():
            final = _per_image_l1(g(z).float(), x).cpu()
        return Inversion(z.detach().cpu(), loss_init, final, history)
    finally:
        for p, r in zip(g.parameters(), req):
            p.requires_grad_(r)


def lerp_latents(z_a: Tensor, z_b: Tensor, frames: int) -> Tensor:
    """(P, z_dim) x2 -> (P * frames, z_dim): the straight line z_a -> z_b per pair, row-major."""
    if frames < 2:
        raise ValueError(f"--frames must be >= 2, got {frames}")
    t = torch.linspace(0, 1, frames).view(1, frames, 1)
    return (z_a[:, None] * (1 - t) + z_b[:, None] * t).reshape(-1, z_a.shape[1])


@torch.no_grad()
def decode_line(g: torch.nn.Module, z_a: Tensor, z_b: Tensor, frames: int) -> Tensor:
    """G along each line -> (P * frames, 3, H, W) on the CPU."""
    from .sampling import generate
    return generate(g, lerp_latents(z_a, z_b, frames))


def interpolate_seeds(g: torch.nn.Module, pairs: list[tuple[int, int]], frames: int = 8,
                      truncate: float = 1.0) -> Tensor:
    """One row per (seed_a, seed_b): G on the line between z(seed_a) and z(seed_b)."""
    from .sampling import sample_z
    z_dim = g.fc.in_features
    z_a = torch.cat([sample_z(1, z_dim, a, truncate) for a, _ in pairs])
    z_b = torch.cat([sample_z(1, z_dim, b, truncate) for _, b in pairs])
    return decode_line(g, z_a, z_b, frames)


def interpolate_images(g: torch.nn.Module, x_a: Tensor, x_b: Tensor, frames: int = 8, **invert_kw
                       ) -> tuple[Tensor, Inversion]:
    """Rows [x_a, G(z_a), ..., G(z_b), x_b] for each pair of real images (float [-1, 1]).

    Returns (images (P * (frames + 2), 3, H, W), the inversion of all 2P images).
    """
    p = x_a.shape[0]
    inv = invert(g, torch.cat([x_a, x_b]), **invert_kw)
    line = decode_line(g, inv.z[:p], inv.z[p:], frames).view(p, frames, *x_a.shape[1:])
    rows = torch.cat([x_a.cpu().float()[:, None], line, x_b.cpu().float()[:, None]], 1)
    return rows.flatten(0, 1), inv
