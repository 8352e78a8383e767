"""Triton ``conv3x3_elu`` and ``upsample_nearest2x``: custom-op registration and wrappers.

- ``torch.ops.fastbegan.conv3x3_elu(x, weight, bias, skip, wgrad_scale, upsample, stride,
  activation) -> Tensor``: the fused forward (kernels in :mod:`fastbegan.kernels.conv3x3`).
  ``wgrad_scale`` is accepted and ignored by the forward: it only scales the weight/bias
  gradients, whose autograd formula is registered by :mod:`.triton_conv_autograd`
  (imported at the bottom of this module).
- ``torch.ops.fastbegan.upsample_nearest2x(x) -> Tensor`` with its autograd (the adjoint
  of a nearest 2x upsample sums each 2x2 block).

Both have fake (meta) implementations, so they work under ``torch.compile(fullgraph=True)``
and inside CUDA graphs; outputs are channels_last. The Python wrappers
:func:`conv3x3_elu` and :func:`upsample_nearest2x` validate their inputs with clear errors
and convert activations to channels_last before calling the ops.
"""
import os
from typing import Optional

import torch
from torch import Tensor

from fastbegan.kernels import conv3x3 as _k

__all__ = ["conv3x3_elu", "upsample_nearest2x"]

_ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CL = torch.channels_last


def _conv_out_shape(x: Tensor, weight: Tensor, upsample: bool, stride: int):
    n, _, h, w = x.shape
    if upsample:
        h, w = 2 * h, 2 * w
    return (n, weight.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1)


# ----------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("fastbegan::conv3x3_elu", mutates_args=())
def _conv3x3_elu_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], skip: Optional[Tensor],
                    wgrad_scale: Optional[Tensor], upsample: bool, stride: int,
                    activation: bool) -> Tensor:
    """``elu(conv3x3(cat(up(x), skip), weight, pad=1, stride) + bias)``; see the wrapper."""
    return _k.conv3x3_fwd(x, weight, bias, skip=skip, upsample=upsample, stride=stride,
                          activation=activation)


@_conv3x3_elu_op.register_fake
def _conv3x3_elu_fake(x, weight, bias, skip, wgrad_scale, upsample, stride, activation):
    return torch.empty(_conv_out_shape(x, weight, upsample, stride), dtype=x.dtype,
                       device=x.device, memory_format=_CL)


@torch.library.custom_op("fastbegan::upsample_nearest2x", mutates_args=())
def _upsample_nearest2x_op(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W) nearest, channels_last."""
    return _k.upsample_nearest2x_fwd(x)


@_upsample_nearest2x_op.register_fake
def _upsample_nearest2x_fake(x):
    n, c, h, w = x.shape
    return torch.empty((n, c, 2 * h, 2 * w), dtype=x.dtype, device=x.device, memory_format=_CL)


def _upsample_setup_context(ctx, inputs, output):
    pass


def _upsample_backward(ctx, grad):
    # Adjoint of nearest 2x: each input pixel receives the sum of its 2x2 output block.
    n, c, h2, w2 = grad.shape
    g = grad.unflatten(3, (w2 // 2, 2)).unflatten(2, (h2 // 2, 2)).sum((3, 5))
    return g.contiguous(memory_format=_CL)


torch.library.register_autograd("fastbegan::upsample_nearest2x", _upsample_backward,
                                setup_context=_upsample_setup_context)


# ----------------------------------------------------------------------------------------
# wrappers: validation and layout
# ----------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return _k.INTERPRET and os.environ.get("TRITON_INTERPRET") == "1"


def _check_device(name: str, t: Tensor, ref: Tensor, op: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {ref.device}; "
                         "all tensors must be on the same device")


def _check_backend_device(x: Tensor, op: str) -> None:
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu":
        if _interpreting():
            return
        raise RuntimeError(
            f"{op}: x is a CPU tensor; the triton backend needs a CUDA GPU (CPU only under the "
            "Triton interpreter, TRITON_INTERPRET=1 set before import). Use the torch backend "
            "for CPU tensors: fastbegan.ops.set_backend('torch').")
    raise RuntimeError(f"{op}: unsupported device {x.device} for the triton backend; "
                       "use the torch backend: fastbegan.ops.set_backend('torch').")


def _autocast_inputs(*ts: Optional[Tensor]):
    """Activations in autocast's dtype when autocast is on for their device, as F.conv2d
    would run (conv is on autocast's lower-precision list). Weights are not cast: the
    kernels cast fp32 master weights tile by tile. Without this an fp32 input (the real
    batch, or its concatenation with a bf16 fake batch) would run the whole encoder in fp32.
    """
    dev = ts[0].device.type
    if not torch.is_autocast_enabled(dev):
        return ts
    dt = torch.get_autocast_dtype(dev)
    # autocast's rule: floating tensors other than fp64 are cast
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.dtype in _ACT_DTYPES and t.dtype != dt
                 else t for t in ts)


def conv3x3_elu(x: Tensor, weight: Tensor, bias: Optional[Tensor], *, upsample: bool = False,
                stride: int = 1, activation: bool = True, skip: Optional[Tensor] = None,
                wgrad_scale: Optional[Tensor] = None) -> Tensor:
    """Fused ``[nearest-upsample 2x] -> [concat skip] -> conv3x3(pad 1, stride) + bias -> [ELU]``.

    Same contract as :func:`fastbegan.ops.conv3x3_elu` (the torch backend's reference):
    x (N, C_x, H, W); skip (N, C_s, H', W') at the conv's input resolution (H' = 2H with
    ``upsample``), concatenated after x's channels; weight (C_out, C_x + C_s, 3, 3), any
    float dtype (fp32 master weights with bf16 activations are cast tile by tile inside
    the kernel; a channels_last weight is read without a copy); bias (C_out,) or None;
    stride 1 or 2 (not with upsample); wgrad_scale (N,) or None (gradients only).
    Activations are bf16, fp16 or fp32; NCHW or non-contiguous inputs are converted to
    channels_last. Returns (N, C_out, H'_out, W'_out) channels_last in x's dtype.
    """
    op = "conv3x3_elu"
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(weight, Tensor) or weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"{op}: weight must be (C_out, C_in, 3, 3), got "
                         f"{tuple(weight.shape) if isinstance(weight, Tensor) else weight!r}")
    if stride not in (1, 2):
        raise ValueError(f"{op}: stride must be 1 or 2, got {stride}")
    if upsample and stride != 1:
        raise ValueError(f"{op}: upsample and stride 2 cannot be combined")
    x, skip = _autocast_inputs(x, skip)
    if x.dtype not in _ACT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"{op}: weight must be a floating-point tensor, got {weight.dtype}")
    _check_backend_device(x, op)
    _check_device("weight", weight, x, op)
    n, c_x, h, w = x.shape
    h_in, w_in = (2 * h, 2 * w) if upsample else (h, w)
    c_s = 0
    if skip is not None:
        if not isinstance(skip, Tensor) or skip.dim() != 4:
            raise ValueError(f"{op}: skip must be a 4-D (N, C, H, W) tensor")
        _check_device("skip", skip, x, op)
        if skip.dtype != x.dtype:
            raise TypeError(f"{op}: skip's dtype {skip.dtype} differs from x's {x.dtype}")
        if skip.shape[0] != n or tuple(skip.shape[2:]) != (h_in, w_in):
            raise ValueError(
                f"{op}: skip has shape {tuple(skip.shape)}, expected ({n}, C_s, {h_in}, {w_in}) "
                f"(the conv's input resolution{', after the 2x upsample' if upsample else ''})")
        c_s = skip.shape[1]
    if weight.shape[1] != c_x + c_s:
        raise ValueError(
            f"{op}: channel mismatch: weight expects {weight.shape[1]} input channels but x has "
            f"{c_x}" + (f" + skip {c_s} = {c_x + c_s}" if skip is not None else ""))
    if bias is not None:
        _check_device("bias", bias, x, op)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if wgrad_scale is not None:
        _check_device("wgrad_scale", wgrad_scale, x, op)
        if wgrad_scale.dim() != 1 or wgrad_scale.shape[0] != n:
            raise ValueError(f"{op}: wgrad_scale must be ({n},), got {tuple(wgrad_scale.shape)}")
    x = x.contiguous(memory_format=_CL)
    if skip is not None:
        skip = skip.contiguous(memory_format=_CL)
    return torch.ops.fastbegan.conv3x3_elu(x, weight, bias, skip, wgrad_scale, bool(upsample),
                                           int(stride), bool(activation))


def upsample_nearest2x(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W) nearest, channels_last. Prefer
    ``conv3x3_elu(upsample=True)``, which never writes the upsampled tensor."""
    op = "upsample_nearest2x"
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{op}: x must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    _check_backend_device(x, op)
    return torch.ops.fastbegan.upsample_nearest2x(x.contiguous(memory_format=_CL))


# The backward of fastbegan::conv3x3_elu is registered by another module; keep last.
try:
    from . import triton_conv_autograd  # noqa: F401,E402
except ImportError:
    pass
