"""``conv3x3_elu`` of a batch given as two halves: ``fastbegan::conv3x3_elu_pair``.

D's first conv in the fused step reads ``[x_real; G(z)]``. As one concatenated tensor,
that costs a copy of both halves, and autograd asks the conv for the input gradient of
all 2B samples, although only the fake half's is used (it flows to G; x_real is data).
This op takes the halves as they are::

    forward   y[:Na] = conv3x3_elu(xa),  y[Na:] = conv3x3_elu(xb)     two launches of the
                                                                       forward kernel into
                                                                       one output
    backward  dxa, dxb = dgrad of the halves that need a gradient     (none for x_real)
              dW, db   = wgrad(half a) + wgrad(half b)                (per-sample scale)

The dgrad skipped for the real half is the largest one of the model's first layer: it
reads dy and y, the two (B, n, res, res) tensors of the layer's output side (67 MB each
at res 128, n 128, batch 16, bf16). Stride 1, no upsample, no skip (what the encoder's
first conv is). Outputs channels_last; fake implementations for torch.compile and CUDA
graphs; the backward calls the ``fastbegan::conv3x3_dgrad`` / ``_wgrad`` custom ops
on the halves (views: a batch slice of a channels_last tensor is channels_last-dense).

Reference: ``conv3x3_elu(torch.cat([xa, xb]))`` (:func:`fastbegan.ops.conv3x3_elu_pair`
on the torch backend); the tests compare values and gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastbegan.kernels import conv3x3

from .checks import autocast_inputs, check_backend_device, check_device
from .triton_conv import run_forward

__all__ = ["conv3x3_elu_pair"]

_CL = torch.channels_last


def _out_shape(xa: Tensor, xb: Tensor, weight: Tensor):
    return (xa.shape[0] + xb.shape[0], weight.shape[0], xa.shape[2], xa.shape[3])


@torch.library.custom_op("fastbegan::conv3x3_elu_pair", mutates_args=())
def _pair_op(xa: Tensor, xb: Tensor, weight: Tensor, bias: Optional[Tensor],
             wgrad_scale: Optional[Tensor], activation: bool) -> Tensor:
    """``conv3x3_elu(cat([xa, xb]))`` without the concatenation (see the module docstring)."""
    y = torch.empty(_out_shape(xa, xb, weight), device=xa.device, dtype=xa.dtype,
                    memory_format=_CL)
    na = xa.shape[0]
    wk = conv3x3.kernel_weight(weight, xa.dtype)     # cast once for both launches
    for x, out in ((xa, y[:na]), (xb, y[na:])):
        run_forward(x, weight, bias, None, False, 1, activation, out=out, w_kernel=wk,
                    op="conv3x3_elu_pair")
    return y


@_pair_op.register_fake
def _(xa, xb, weight, bias, wgrad_scale, activation):
    return torch.empty(_out_shape(xa, xb, weight), device=xa.device, dtype=xa.dtype,
                       memory_format=_CL)


def _setup(ctx, inputs, output):
    xa, xb, weight, bias, wgrad_scale, activation = inputs
    ctx.activation = bool(activation)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(xa, xb, weight, output if activation else None, wgrad_scale)


def _backward(ctx, dy):
    xa, xb, weight, y, scale = ctx.saved_tensors
    need_a, need_b, need_w, need_bias = ctx.needs_input_grad[:4]
    na = xa.shape[0]
    ops = torch.ops.fastbegan
    halves = ((xa, slice(0, na)), (xb, slice(na, None)))
    ya = [None if y is None else y[s] for _, s in halves]
    dxa = ops.conv3x3_dgrad(dy[:na], ya[0], weight, xa, 0, False, 1) if need_a else None
    dxb = ops.conv3x3_dgrad(dy[na:], ya[1], weight, xb, 0, False, 1) if need_b else None
    dw = db = None
    has_bias = ctx.bias_dtype is not None
    if need_w or (need_bias and has_bias):
        parts = [ops.conv3x3_wgrad(dy[s], yh, x, None, weight,
                                       None if scale is None else scale[s], False, 1)
                 for (x, s), yh in zip(halves, ya)]
        dw = parts[0][0] + parts[1][0] if need_w else None
        if need_bias and has_bias:
            db = (parts[0][1] + parts[1][1]).to(ctx.bias_dtype)
    return dxa, dxb, dw, db, None, None


torch.library.register_autograd("fastbegan::conv3x3_elu_pair", _backward, setup_context=_setup)


def conv3x3_elu_pair(xa: Tensor, xb: Tensor, weight: Tensor, bias: Optional[Tensor], *,
                     activation: bool = True, wgrad_scale: Optional[Tensor] = None) -> Tensor:
    """``conv3x3_elu(torch.cat([xa, xb]), weight, bias)`` (stride 1, no upsample, no skip)
    without forming the concatenation; see :func:`fastbegan.ops.conv3x3_elu_pair`."""
    op = "conv3x3_elu_pair"
    for name, t in (("xa", xa), ("xb", xb)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D (N, C, H, W) tensor")
    if xa.shape[1:] != xb.shape[1:]:
        raise ValueError(f"{op}: the halves differ beyond the batch: {tuple(xa.shape)} and "
                         f"{tuple(xb.shape)}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] != xa.shape[1]:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} must be (C_out, {xa.shape[1]}, 3, 3)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    n = xa.shape[0] + xb.shape[0]
    if wgrad_scale is not None and tuple(wgrad_scale.shape) != (n,):
        raise ValueError(f"{op}: wgrad_scale must be ({n},), got {tuple(wgrad_scale.shape)}")
    check_backend_device(xa, op)
    for name, t in (("xb", xb), ("weight", weight), ("bias", bias), ("wgrad_scale", wgrad_scale)):
        if t is not None:
            check_device(name, t, xa, op)
    xa, xb = autocast_inputs(xa, xb)
    if xa.dtype != xb.dtype:  # e.g. fp32 data and a bf16 G(z) outside autocast: as torch.cat
        dt = torch.promote_types(xa.dtype, xb.dtype)
        xa, xb = xa.to(dt), xb.to(dt)
    return _pair_op(xa.contiguous(memory_format=_CL), xb.contiguous(memory_format=_CL), weight,
                    bias, wgrad_scale, bool(activation))
