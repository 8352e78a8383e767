"""The fusable patterns in module form, shared by both drop-in paths: a 2x nearest
upsample and an ELU(alpha 1) that can join a Conv2d (``None``: yes; else why not). The conv's
own check is :func:`fastbegan.nn.conv2d_support`."""
from __future__ import annotations

from typing import Any

import torch.nn as _nn

from ..nn import _has_hooks


def _is_two(sf: Any) -> bool:
    if isinstance(sf, (tuple, list)):
        return len(sf) == 2 and all(_is_two(v) for v in sf)
    return isinstance(sf, (int, float)) and not isinstance(sf, bool) and float(sf) == 2.0


def upsample_support(m: _nn.Module) -> str | None:
    """``None`` if ``m`` is a 2x nearest upsample that can be fused, else why not."""
    if type(m) not in (_nn.Upsample, _nn.UpsamplingNearest2d):
        return f"{type(m).__name__} is not nn.Upsample / nn.UpsamplingNearest2d"
    if m.size is not None:
        return f"size={m.size!r} (only scale_factor=2 is fused)"
    if not _is_two(m.scale_factor):
        return f"scale_factor={m.scale_factor!r} is not 2"
    # nearest-exact is the same map as nearest at an integer scale of 2.
    if m.mode not in ("nearest", "nearest-exact"):
        return f"mode={m.mode!r} is not 'nearest'"
    if _has_hooks(m):
        return "has hooks"
    return None


def elu_support(m: _nn.Module) -> str | None:
    if type(m) is not _nn.ELU:
        return f"{type(m).__name__} is not nn.ELU"
    if float(m.alpha) != 1.0:
        return f"ELU alpha={m.alpha} (only 1.0 is fused)"
    if _has_hooks(m):
        return "ELU has hooks"
    return None
