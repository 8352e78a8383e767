"""Backward of the Triton ``fastbegan::conv3x3_elu`` op (docs/design.md §3.2, §3.4).

Two custom ops, each a thin wrapper over a launcher in :mod:`fastbegan.kernels.conv3x3_bwd`
behind the fallback chain (:mod:`.fallback`: triton -> torch reference), with a fake
(meta) implementation, so forward + backward work in eager mode, under
``torch.compile(fullgraph=True)`` and inside CUDA graphs (no host synchronisation):

- ``fastbegan::conv3x3_dgrad(dy, y, weight, src, c_off, upsample, stride) -> dsrc``:
  the gradient of one input source (x, or the concatenated skip tensor whose channels
  start at weight input channel ``c_off``); upsample / stride-2 adjoints fused in.
- ``fastbegan::conv3x3_wgrad(dy, y, x, skip, weight, wgrad_scale, upsample, stride)
  -> (dW, db)``: split-K weight gradient in the weight's dtype and layout, and the bias
  gradient from the same pass; sample n's contribution is multiplied by
  ``wgrad_scale[n]`` when given.

``y`` is the forward output when the op applied ELU (its derivative is computed from
it inside the kernels), ``None`` otherwise.

:func:`setup_context` / :func:`conv3x3_elu_backward` are the autograd formula of the
forward op; :mod:`.triton_conv` (which imports this module, never the other way round)
registers them with :func:`register_conv3x3_elu_autograd` when it defines the op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from fastbegan.kernels import conv3x3_bwd
from fastbegan.kernels.common import device_guard

from . import fallback, reference

__all__ = ["conv3x3_dgrad", "conv3x3_wgrad", "setup_context", "conv3x3_elu_backward",
           "register_conv3x3_elu_autograd"]


# --------------------------------------------------------------------------------------
# backward custom ops
# --------------------------------------------------------------------------------------
@torch.library.custom_op("fastbegan::conv3x3_dgrad", mutates_args=())
def conv3x3_dgrad(dy: Tensor, y: Tensor | None, weight: Tensor, src: Tensor, c_off: int,
                  upsample: bool, stride: int) -> Tensor:
    """Gradient of ``conv3x3_elu`` w.r.t. one input source (see the module docstring)."""
    key = fallback.shape_key(dy=dy, src=src, weight=weight, c_off=c_off, elu=y is not None,
                             upsample=upsample, stride=stride, device=dy.device)
    with device_guard(dy.device):
        return fallback.run("conv3x3_dgrad", key, [
            ("triton", lambda: conv3x3_bwd.conv3x3_dgrad(dy, y, weight, src, c_off=c_off,
                                                          upsample=upsample, stride=stride)),
            ("torch", lambda: reference.conv3x3_dgrad_ref(dy, y, weight, src, c_off,
                                                          upsample, stride)),
        ], dy.device)


@conv3x3_dgrad.register_fake
def _dgrad_fake(dy, y, weight, src, c_off, upsample, stride):
    return torch.empty(src.shape, dtype=src.dtype, device=src.device,
                       memory_format=torch.channels_last)


@torch.library.custom_op("fastbegan::conv3x3_wgrad", mutates_args=())
def conv3x3_wgrad(dy: Tensor, y: Tensor | None, x: Tensor, skip: Tensor | None,
                  weight: Tensor, wgrad_scale: Tensor | None, upsample: bool,
                  stride: int) -> tuple[Tensor, Tensor]:
    """``(dW, db)`` of ``conv3x3_elu``; both in the weight's dtype, dW in its layout."""
    key = fallback.shape_key(dy=dy, x=x, skip=skip, weight=weight, elu=y is not None,
                             scale=wgrad_scale is not None, upsample=upsample, stride=stride,
                             device=dy.device)
    with device_guard(dy.device):
        return fallback.run("conv3x3_wgrad", key, [
            ("triton", lambda: conv3x3_bwd.conv3x3_wgrad(dy, y, x, skip, weight, wgrad_scale,
                                                          upsample=upsample, stride=stride,
                                                          need_bias=True)),
            ("torch", lambda: reference.conv3x3_wgrad_ref(dy, y, x, skip, weight, wgrad_scale,
                                                          upsample, stride)),
        ], dy.device, dtype=dy.dtype)


@conv3x3_wgrad.register_fake
def _wgrad_fake(dy, y, x, skip, weight, wgrad_scale, upsample, stride):
    return torch.empty_like(weight), weight.new_empty((weight.shape[0],))


# --------------------------------------------------------------------------------------
# autograd formula of fastbegan::conv3x3_elu (registered by .triton_conv)
# --------------------------------------------------------------------------------------
def setup_context(ctx, inputs, output):
    """Saves x, weight, skip, wgrad_scale and, with the ELU, the output y (the derivative
    comes from it); the pre-activation is never stored."""
    x, weight, bias, skip, wgrad_scale, upsample, stride, activation = inputs
    ctx.cfg = (bool(upsample), int(stride), bool(activation), bias is not None,
               None if bias is None else bias.dtype)
    ctx.save_for_backward(x, weight, skip, output if activation else None, wgrad_scale)


def conv3x3_elu_backward(ctx, dy):
    """Gradients for (x, weight, bias, skip, wgrad_scale, upsample, stride, activation)."""
    x, weight, skip, y, scale = ctx.saved_tensors
    upsample, stride, activation, has_bias, bias_dtype = ctx.cfg
    need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
    ops = torch.ops.fastbegan
    dx = dskip = dw = db = None
    if need_x:
        dx = ops.conv3x3_dgrad(dy, y, weight, x, 0, upsample, stride)
    if skip is not None and need_s:
        dskip = ops.conv3x3_dgrad(dy, y, weight, skip, x.shape[1], False, stride)
    if need_w or (has_bias and need_b):
        dw, db = ops.conv3x3_wgrad(dy, y, x, skip, weight, scale, upsample, stride)
        if not need_w:
            dw = None
        if has_bias and need_b:
            if db.dtype != bias_dtype:
                db = db.to(bias_dtype)
        else:
            db = None
    return dx, dw, db, dskip, None, None, None, None


_registered: set[str] = set()


def register_conv3x3_elu_autograd(op: str) -> None:
    """Attach the backward to ``op`` (an op with the schema of ``fastbegan::conv3x3_elu``;
    tests attach it to a stand-in op too). Idempotent."""
    if op not in _registered:
        torch.library.register_autograd(op, conv3x3_elu_backward, setup_context=setup_context)
        _registered.add(op)
