"""Images: uint8 <-> [-1, 1] conversions, and grids of tensors in [-1, 1] as PNG (no torchvision).

Layouts: uint8 images are (N, H, W, 3) (numpy arrays or tensors, as stored on disk and in
the trainer's device data set); float images are (N, 3, H, W) in [-1, 1] (what G makes).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_unit_range(images_u8: torch.Tensor | np.ndarray, flip: torch.Tensor | None = None) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 in [-1, 1], channels_last (a permuted view).

    ``flip``: optional (N,) bool; those images are mirrored left-right. Done on the uint8
    values (one byte per value to move), which gives the same result as after the conversion.
    The one conversion every reader of uint8 images uses (trainer, fused step, eval, quality).
    """
    if not torch.is_tensor(images_u8):  # a read-only array (np.asarray of a PIL image) is copied
        images_u8 = torch.from_numpy(np.require(images_u8, requirements=["C", "W"]))
    if flip is not None:
        images_u8 = torch.where(flip.view(-1, 1, 1, 1), images_u8.flip(2), images_u8)
    return images_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid_array(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8 grid."""
    imgs = to_uint8(images)
    n, h, w, _ = imgs.shape
    cols = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(imgs):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return grid


def save_png(arr: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a uint8 array as PNG atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        Image.fromarray(arr).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None) -> Path:
    return save_png(grid_array(images, nrow), path)
