"""Autograd for the Triton ``fastbegan::conv3x3_elu`` op (docs/design.md §3.2, §3.4).

The backward runs two custom ops, each a thin wrapper over a launcher in
:mod:`fastbegan.kernels.conv3x3_bwd` with a fake (meta) implementation, so the whole
forward + backward works in eager mode, under ``torch.compile(fullgraph=True)`` and
inside CUDA graphs (no host synchronisation, no ``.item()``):

- ``fastbegan::conv3x3_elu_dgrad(dy, y, weight, src, c_off, upsample, stride) -> dsrc``:
  the gradient of one input source (x, or the concatenated skip tensor whose channels
  start at weight input channel ``c_off``); upsample / stride-2 adjoints fused in.
- ``fastbegan::conv3x3_elu_wgrad(dy, y, x, skip, weight, wgrad_scale, upsample, stride)
  -> (dW, db)``: split-K weight gradient in the weight's dtype and layout, and the bias
  gradient from the same pass; sample n's contribution is multiplied by
  ``wgrad_scale[n]`` when given.

``y`` is the forward output when the op applied ELU (its derivative is computed from
it inside the kernels), ``None`` otherwise. Only x, skip, weight, y (with activation)
and wgrad_scale are saved for the backward; the pre-activation never is.

The forward op is defined in :mod:`fastbegan.ops.triton_conv`, which imports this
module at its end; :func:`register_conv3x3_elu_autograd` attaches the backward to it.
"""
from __future__ import annotations

import importlib

import torch
from torch import Tensor

from fastbegan.kernels import conv3x3_bwd as _bwd

__all__ = ["conv3x3_elu_dgrad", "conv3x3_elu_wgrad", "register_conv3x3_elu_autograd",
           "conv3x3_elu_backward"]


# --------------------------------------------------------------------------------------
# backward custom ops
# --------------------------------------------------------------------------------------
@torch.library.custom_op("fastbegan::conv3x3_elu_dgrad", mutates_args=())
def conv3x3_elu_dgrad(dy: Tensor, y: Tensor | None, weight: Tensor, src: Tensor, c_off: int,
                      upsample: bool, stride: int) -> Tensor:
    """Gradient of ``conv3x3_elu`` w.r.t. one input source (see the module docstring)."""
    return _bwd.conv3x3_elu_dgrad(dy, y, weight, src, c_off=c_off, upsample=upsample,
                                  stride=stride)


@conv3x3_elu_dgrad.register_fake
def _dgrad_fake(dy, y, weight, src, c_off, upsample, stride):
    return torch.empty(src.shape, dtype=src.dtype, device=src.device,
                       memory_format=torch.channels_last)


@torch.library.custom_op("fastbegan::conv3x3_elu_wgrad", mutates_args=())
def conv3x3_elu_wgrad(dy: Tensor, y: Tensor | None, x: Tensor, skip: Tensor | None,
                      weight: Tensor, wgrad_scale: Tensor | None, upsample: bool,
                      stride: int) -> tuple[Tensor, Tensor]:
    """``(dW, db)`` of ``conv3x3_elu``; both in the weight's dtype, dW in its layout."""
    return _bwd.conv3x3_elu_wgrad(dy, y, x, skip, weight, wgrad_scale, upsample=upsample,
                                  stride=stride, need_bias=True)


@conv3x3_elu_wgrad.register_fake
def _wgrad_fake(dy, y, x, skip, weight, wgrad_scale, upsample, stride):
    return (torch.empty_like(weight),
            weight.new_empty((weight.shape[0],)))


# --------------------------------------------------------------------------------------
# autograd of the forward op
# --------------------------------------------------------------------------------------
_FWD_OP = "fastbegan::conv3x3_elu"
_registered: set[str] = set()


def _setup_context(ctx, inputs, output):
    x, weight, bias, skip, wgrad_scale, upsample, stride, activation = inputs
    ctx.cfg = (bool(upsample), int(stride), bool(activation), bias is not None,
               None if bias is None else bias.dtype)
    # Only what the backward reads: the ELU derivative comes from the output y.
    ctx.save_for_backward(x, weight, skip, output if activation else None, wgrad_scale)


def conv3x3_elu_backward(ctx, dy):
    """Gradients for (x, weight, bias, skip, wgrad_scale, upsample, stride, activation)."""
    x, weight, skip, y, scale = ctx.saved_tensors
    upsample, stride, activation, has_bias, bias_dtype = ctx.cfg
    need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
    dx = dskip = dw = db = None
    if need_x:
        dx = torch.ops.fastbegan.conv3x3_elu_dgrad(dy, y, weight, x, 0, upsample, stride)
    if skip is not None and need_s:
        dskip = torch.ops.fastbegan.conv3x3_elu_dgrad(dy, y, weight, skip, x.shape[1], False,
                                                      stride)
    if need_w or (has_bias and need_b):
        dw, db = torch.ops.fastbegan.conv3x3_elu_wgrad(dy, y, x, skip, weight, scale,
                                                       upsample, stride)
        if not need_w:
            dw = None
        if has_bias and need_b:
            if db.dtype != bias_dtype:
                db = db.to(bias_dtype)
        else:
            db = None
    return dx, dw, db, dskip, None, None, None, None


def _op_defined(qualname: str) -> bool:
    ns, name = qualname.split("::")
    try:
        getattr(getattr(torch.ops, ns), name)
        return True
    except (AttributeError, RuntimeError):
        return False


def register_conv3x3_elu_autograd(op: str = _FWD_OP) -> bool:
    """Attach the backward to ``op`` (schema of ``fastbegan::conv3x3_elu``); idempotent.

    Returns True when the backward is registered (now or before), False when the op does
    not exist (yet). ``op`` is a parameter so that tests can attach the same backward to
    a stand-in op with the same schema.
    """
    if op in _registered:
        return True
    if not _op_defined(op):
        return False
    torch.library.register_autograd(op, conv3x3_elu_backward, setup_context=_setup_context)
    _registered.add(op)
    return True


# The forward op's module imports this one at its end. If this module is imported first,
# import the forward module (its import of this partly initialised module is a no-op),
# then register.
if not register_conv3x3_elu_autograd():
    try:
        importlib.import_module("fastbegan.ops.triton_conv")
    except ImportError:
        pass
    register_conv3x3_elu_autograd()
