"""Images in, as the metrics want them: (N, H, W, 3) uint8 numpy arrays or (N, 3, H, W)
float tensors in [-1, 1] (a generator's output) -> float32 NCHW in [-1, 1]."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..images import to_unit_range


# --------------------------------------------------------------------------- inputs

def as_float_images(images) -> Tensor:
    """uint8 NHWC array/tensor or float NCHW tensor in [-1, 1] -> contiguous float32 NCHW in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got {tuple(images.shape)}")
        return to_unit_range(images).contiguous()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    return images.detach().float().cpu().contiguous()
