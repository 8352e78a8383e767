"""k-NN precision (fidelity) and recall (variety) of two feature sets (Kynkaenniemi et al.
2019), and :class:`RandomFeatures`, a fixed random CNN as a feature space needing no weights."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .inputs import as_float_images


# --------------------------------------------------------------------------- fidelity: k-NN precision / recall

def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of two feature sets (rows).

    Each point's k-NN ball has the radius of the distance to its k-th nearest other point of
    its own set. Precision: the share of ``fake`` points inside at least one ``real`` ball
    (fidelity); recall: the share of ``real`` points inside at least one ``fake`` ball
    (variety). Both sets should have the same size (the radii shrink as a set grows).
    """
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"k-NN precision/recall with k={k} needs more than {k} points per set, "
                         f"got {len(real)} real and {len(fake)} generated")
    r, f = real.double(), fake.double()

    def radii(x: Tensor) -> Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # +1: the point itself

    d = torch.cdist(f, r)                                         # (n_fake, n_real)
    precision = (d <= radii(r)[None, :]).any(1).double().mean().item()
    recall = (d.T <= radii(f)[None, :]).any(1).double().mean().item()
    return precision, recall


class RandomFeatures:
    """A fixed, randomly initialised CNN as a feature space that needs no weights and that no
    GAN trains against: three 3x3 conv + ReLU stages (widths w, 2w, 4w; 2x2 average pooling
    after the first two), then 4x4 adaptive average pooling -> 64 w features (2,048 at w 32).
    Weights are He-normal draws from a seeded CPU generator and biases are 0, so the space is
    the same on every machine. Blur, noise and in-between images leave it, unlike pixel space
    (docs/evaluation.md has the checks)."""

    def __init__(self, width: int = 32, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        chans = [3, width, 2 * width, 4 * width]
        self.weights = [torch.randn(co, ci, 3, 3, generator=gen) * math.sqrt(2.0 / (9 * ci))
                        for ci, co in zip(chans[:-1], chans[1:])]

    @torch.no_grad()
    def __call__(self, images, batch: int = 256) -> Tensor:
        """Images (uint8 NHWC or float NCHW in [-1, 1]) -> (N, 64 w) float32 features."""
        x = as_float_images(images)
        out = []
        for i in range(0, len(x), batch):
            h = x[i:i + batch]
            for j, w in enumerate(self.weights):
                h = F.relu(F.conv2d(h, w, padding=1))
                if j < len(self.weights) - 1:
                    h = F.avg_pool2d(h, 2) if h.shape[-1] >= 2 else h
            out.append(F.adaptive_avg_pool2d(h, 4).flatten(1))
        return torch.cat(out)
