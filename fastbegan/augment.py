"""Differentiable augmentation of D's inputs (``--augment-shift``): every image D sees, real
or fake, is shifted by its own random whole-pixel offset before D autoencodes it, with the
edge pixels repeated into the gap (DiffAugment's translation, Zhao et al., NeurIPS 2020,
with edge padding instead of zeros: a digit's black or a face's background continues).

Why: on a small data set D learns its training images by heart (its loss on held-out
images grows well above its loss on the training images) and G's samples follow them there
(docs/design.md §7). Shifted copies are images D has not seen,
and the fakes are shifted the same way, so G is not asked to draw shifted images: the
shift is differentiable (a gather), and G's gradient comes back through it.

Layouts: images (N, C, H, W) in channels_last memory (NHWC), any float dtype; shifts (N, 4)
int64 on the images' device: (dy, dx) of the real image, then (dy, dx) of the fake, each
in [-s, s] for s = :func:`max_shift`.
"""
from __future__ import annotations

import torch
from torch import Tensor

MAX_FRACTION = 0.5  # a shift of half the side or more would leave only repeated edges


def max_shift(res: int, fraction: float) -> int:
    """The largest shift in pixels for ``--augment-shift fraction`` at side ``res`` (>= 1
    when the fraction is > 0: a shift too small to round to a pixel is one pixel)."""
    return max(1, round(res * fraction)) if fraction > 0 else 0


def draw_shifts(n: int, shift: int, device: torch.device, generator: torch.Generator) -> Tensor:
    """(n, 4) int64 offsets uniform in [-shift, shift]: (dy, dx) for the real image and for
    the fake of each of the n rows, drawn with ``generator``."""
    return torch.randint(-shift, shift + 1, (n, 4), device=device, generator=generator)


def translate(images: Tensor, shift: Tensor) -> Tensor:
    """``out[n, :, i, j] = images[n, :, clamp(i - dy_n), clamp(j - dx_n)]``: each image moved
    by its (dy, dx) = ``shift[n]`` (N, 2) int64 (down and right for positive values), the
    rows and columns that come in filled with the nearest edge pixel. (N, C, H, W) in,
    (N, C, H, W) channels_last out, differentiable with respect to ``images``."""
    n, c, h, w = images.shape
    rows = (torch.arange(h, device=images.device) - shift[:, :1]).clamp(0, h - 1)  # (N, H)
    cols = (torch.arange(w, device=images.device) - shift[:, 1:2]).clamp(0, w - 1)  # (N, W)
    # two gathers, rows then columns (their backward: scatter-adds, edges collect the repeats)
    out = images.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w))
    out = out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))
    return out.contiguous(memory_format=torch.channels_last)


def d_view(x: Tensor, fake: Tensor, shift: Tensor | None) -> tuple[Tensor, Tensor]:
    """What D sees of the real batch ``x`` and the fakes ``fake`` (both (N, C, H, W)):
    each shifted by its half of ``shift`` (N, 4) (:func:`draw_shifts`), or both as they are
    when ``shift`` is None (augmentation off)."""
    if shift is None:
        return x, fake
    return translate(x, shift[:, :2]), translate(fake, shift[:, 2:])
