"""Triton ``conv3x3_elu`` and ``upsample_nearest2x``: custom-op registration and wrappers.

- ``torch.ops.fastbegan.conv3x3_elu(x, weight, bias, skip, wgrad_scale, upsample, stride,
  activation) -> Tensor``: the fused forward (kernels in :mod:`fastbegan.kernels.conv3x3`),
  behind the fallback chain tma -> ptr -> torch (:mod:`.fallback`, :func:`forward_paths`).
  ``wgrad_scale`` is accepted and ignored by the forward: it only scales the weight/bias
  gradients; the backward ops and the autograd formula are in :mod:`.triton_conv_bwd`,
  registered here.
- ``torch.ops.fastbegan.upsample_nearest2x(x) -> Tensor`` with its autograd (the adjoint
  of a nearest 2x upsample sums each 2x2 block).

Both have fake (meta) implementations, so they work under ``torch.compile(fullgraph=True)``
and inside CUDA graphs; outputs are channels_last. Launches run on the inputs' device
(:func:`fastbegan.kernels.common.device_guard`). The Python wrappers
:func:`conv3x3_elu` and :func:`upsample_nearest2x` validate their inputs with clear errors
and convert activations to channels_last before calling the ops.
"""
from typing import Optional

import torch
from torch import Tensor

from fastbegan.kernels import conv3x3
from fastbegan.kernels.common import device_guard

from . import fallback, reference
from .checks import ACT_DTYPES, autocast_inputs, check_backend_device, check_device
from .triton_conv_bwd import register_conv3x3_elu_autograd

__all__ = ["conv3x3_elu", "upsample_nearest2x", "forward_paths"]

_CL = torch.channels_last


def _conv_out_shape(x: Tensor, weight: Tensor, upsample: bool, stride: int):
    n, _, h, w = x.shape
    if upsample:
        h, w = 2 * h, 2 * w
    return (n, weight.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1)


def _reference_forward(x, weight, bias, skip, upsample, stride, activation, out=None):
    y = reference.conv3x3_elu_ref(x, weight, bias, upsample=upsample, stride=stride,
                                  activation=activation, skip=skip)
    if out is not None:
        return out.copy_(y)
    return y.contiguous(memory_format=_CL)


def forward_paths(x, weight, bias, skip, upsample, stride, activation, out=None, w_kernel=None):
    """The forward conv's paths, fastest first: ``[(name, thunk), ...]`` with "tma" (where
    :func:`fastbegan.kernels.conv3x3.tma_eligible` and not FASTBEGAN_CONV_KERNEL=ptr), "ptr"
    and "torch" (the reference). ``out``: write the result there (see ``conv3x3_fwd``).
    ``w_kernel``: the weight as the kernels read it (``conv3x3.kernel_weight``), when the
    caller made it already (the pair op casts once for its two launches)."""
    kw = dict(skip=skip, upsample=upsample, stride=stride, activation=activation, out=out)
    wk = weight if w_kernel is None else w_kernel
    paths = []
    if conv3x3.DEFAULT_KERNEL != "ptr" and conv3x3.tma_eligible(
            x, conv3x3.weight_matrix(wk), skip, upsample, stride):
        paths.append(("tma", lambda: conv3x3.conv3x3_fwd(x, wk, bias, kernel="tma", **kw)))
    paths.append(("ptr", lambda: conv3x3.conv3x3_fwd(x, wk, bias, kernel="ptr", **kw)))
    paths.append(("torch", lambda: _reference_forward(x, weight, bias, skip, upsample, stride,
                                                      activation, out)))
    return paths


def run_forward(x, weight, bias, skip, upsample, stride, activation, out=None, w_kernel=None,
                op="conv3x3_elu"):
    """The forward conv through the fallback chain (on x's device); arguments as
    :func:`forward_paths`, ``op`` names it in decisions and warnings."""
    key = fallback.shape_key(x=x, skip=skip, weight=weight, bias=bias is not None,
                             upsample=upsample, stride=stride, elu=activation, device=x.device)
    with device_guard(x.device):
        return fallback.run(op, key, forward_paths(x, weight, bias, skip, upsample, stride,
                                                   activation, out, w_kernel), x.device,
                            race=conv3x3.DEFAULT_KERNEL == "auto",
                            reference=lambda: _reference_forward(x, weight, bias, skip, upsample,
                                                                 stride, activation))


# ----------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("fastbegan::conv3x3_elu", mutates_args=())
def _conv3x3_elu_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], skip: Optional[Tensor],
                    wgrad_scale: Optional[Tensor], upsample: bool, stride: int,
                    activation: bool) -> Tensor:
    """``elu(conv3x3(cat(up(x), skip), weight, pad=1, stride) + bias)``; see the wrapper."""
    return run_forward(x, weight, bias, skip, upsample, stride, activation)


@_conv3x3_elu_op.register_fake
def _conv3x3_elu_fake(x, weight, bias, skip, wgrad_scale, upsample, stride, activation):
    return torch.empty(_conv_out_shape(x, weight, upsample, stride), dtype=x.dtype,
                       device=x.device, memory_format=_CL)


@torch.library.custom_op("fastbegan::upsample_nearest2x", mutates_args=())
def _upsample_nearest2x_op(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W) nearest, channels_last."""
    with device_guard(x.device):
        return fallback.run("upsample_nearest2x", fallback.shape_key(x=x, device=x.device), [
            ("triton", lambda: conv3x3.upsample_nearest2x_fwd(x)),
            ("torch", lambda: reference.upsample_nearest2x_ref(x).contiguous(memory_format=_CL)),
        ], x.device)


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
def conv3x3_elu(x: Tensor, weight: Tensor, bias: Optional[Tensor], *, upsample: bool = False,
                stride: int = 1, activation: bool = True, skip: Optional[Tensor] = None,
                wgrad_scale: Optional[Tensor] = None) -> Tensor:
    """Fused ``[nearest-upsample 2x] -> [concat skip] -> conv3x3(pad 1, stride) + bias -> [ELU]``.

    Same contract as :func:`fastbegan.ops.conv3x3_elu` (the torch backend's reference):
    x (N, C_x, H, W); skip (N, C_s, H', W') at the conv's input resolution (H' = 2H with
    ``upsample``), concatenated after x's channels; weight (C_out, C_x + C_s, 3, 3), any
    float dtype (fp32 master weights with bf16 activations are cast once per call, outside
    the kernel's K loop; a channels_last weight of x's dtype is read without a copy); bias (C_out,) or None;
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
    x, skip = autocast_inputs(x, skip)
    if x.dtype not in ACT_DTYPES:
        raise TypeError(f"{op}: x must be float16, bfloat16 or float32, got {x.dtype}")
    if not weight.is_floating_point():
        raise TypeError(f"{op}: weight must be a floating-point tensor, got {weight.dtype}")
    check_backend_device(x, op)
    check_device("weight", weight, x, op)
    n, c_x, h, w = x.shape
    h_in, w_in = (2 * h, 2 * w) if upsample else (h, w)
    c_s = 0
    if skip is not None:
        if not isinstance(skip, Tensor) or skip.dim() != 4:
            raise ValueError(f"{op}: skip must be a 4-D (N, C, H, W) tensor")
        check_device("skip", skip, x, op)
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
        check_device("bias", bias, x, op)
        if bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{op}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if wgrad_scale is not None:
        check_device("wgrad_scale", wgrad_scale, x, op)
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
    check_backend_device(x, op)
    return torch.ops.fastbegan.upsample_nearest2x(x.contiguous(memory_format=_CL))


register_conv3x3_elu_autograd("fastbegan::conv3x3_elu")
