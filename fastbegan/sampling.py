"""Latent sampling and batched generation, shared by sample / interpolate / eval."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor


def sample_z(n: int, z_dim: int, seed: int = 0, truncate: float = 1.0) -> Tensor:
    """n latent vectors z ~ U(-t, t)^z_dim on the CPU (t = ``truncate`` in (0, 1]; 1 = the training law).

    Deterministic per seed and independent of the device, so the same seed gives the
    same images on CPU and GPU.
    """
    if not 0 < truncate <= 1:
        raise ValueError(f"--truncate must be in (0, 1], got {truncate}")
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, z_dim, generator=gen) * 2 - 1) * truncate


@torch.no_grad()
def generate(g: torch.nn.Module, z: Tensor, batch: int = 256) -> Tensor:
    """G(z) in batches on G's device -> (N, 3, H, W) float32 on the CPU."""
    dev = next(g.parameters()).device
    out = [g(z[i:i + batch].to(dev)).float().cpu() for i in range(0, len(z), batch)]
    return torch.cat(out) if out else torch.empty(0)


def parse_grid(spec: str) -> tuple[int, int]:
    """"8x4" -> (cols, rows)."""
    try:
        cols, rows = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"--grid must look like COLSxROWS, e.g. 8x4, got {spec!r}") from None
    if cols < 1 or rows < 1:
        raise ValueError(f"--grid needs positive sizes, got {spec!r}")
    return cols, rows


def save_each(images: Tensor, folder: str | os.PathLike, prefix: str = "sample", start: int = 0) -> list[Path]:
    """One PNG per image: FOLDER/sample_000000.png, ... (numbered from ``start``)."""
    from .images import save_png, to_uint8
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arr = to_uint8(images)
    return [save_png(a, folder / f"{prefix}_{start + i:06d}.png") for i, a in enumerate(arr)]


def load_generator(checkpoint: str | os.PathLike, map_location: str = "cpu", raw: bool = False):
    """The generator of a ``fastbegan train`` checkpoint, in eval mode, with the EMA of its
    weights (``G_ema.*``, ``--ema-decay``) when the checkpoint holds one and ``raw`` is
    False, else the trained weights; ``g.weights`` says which ("ema" or "raw")."""
    from .checkpoint import load_checkpoint, load_into, unprefixed
    from .model import Generator
    g = Generator.from_checkpoint(str(checkpoint), map_location=map_location)
    g.weights = "raw"
    if not raw:
        ema = unprefixed("G_ema.", load_checkpoint(checkpoint, map_location)[0])
        if ema:
            with torch.no_grad():
                load_into(g, {**{k: v for k, v in g.state_dict().items() if k not in ema}, **ema})
            g.weights = "ema"
    return g
