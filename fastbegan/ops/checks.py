"""Input checks and autocast handling shared by the triton backend's op wrappers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastbegan.kernels import interpreting

__all__ = ["ACT_DTYPES", "check_device", "check_backend_device", "autocast_inputs"]

ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_device(name: str, t: Tensor, ref: Tensor, op: str) -> None:
    """``t`` (argument ``name`` of ``op``) must be on ``ref``'s device."""
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {ref.device}; "
                         "all tensors must be on the same device")


def check_backend_device(x: Tensor, op: str) -> None:
    """The triton backend runs CUDA tensors (CPU tensors only under the interpreter)."""
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu":
        if interpreting():
            return
        raise RuntimeError(
            f"{op}: x is a CPU tensor; the triton backend needs a CUDA GPU (CPU only under the "
            "Triton interpreter, TRITON_INTERPRET=1 set before import). Use the torch backend "
            "for CPU tensors: fastbegan.ops.set_backend('torch').")
    raise RuntimeError(f"{op}: unsupported device {x.device} for the triton backend; "
                       "use the torch backend: fastbegan.ops.set_backend('torch').")


def autocast_inputs(*ts: Optional[Tensor]):
    """Activations in autocast's dtype when autocast is on for their device, as F.conv2d
    would run (conv is on autocast's lower-precision list). Weights are not cast here: the
    launchers cast fp32 master weights once per call. Without this an fp32 input (the real
    batch, or its concatenation with a bf16 fake batch) would run the whole encoder in fp32.
    """
    dev = ts[0].device.type
    if not torch.is_autocast_enabled(dev):
        return ts
    dt = torch.get_autocast_dtype(dev)
    # autocast's rule: floating tensors other than fp64 are cast
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.dtype in ACT_DTYPES and t.dtype != dt
                 else t for t in ts)
