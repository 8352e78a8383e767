"""D's last conv fused with the BEGAN losses: ``fastbegan::conv3x3_l1_pair_began`` (docs/design.md §3.3).

The discriminator ends with a linear 3x3 conv (``decoder.to_rgb``) whose output is only
ever used by the two L1 losses of a training step. Treating the three as one op lets the
backward skip the L1 gradient tensor altogether::

    forward   y = conv3x3(h, W) + b                       (kernels/conv3x3.py, identity)
              [L_real, L_fake] = mean |[x_real; x_fake] - y| per half, k_next, M
                                                          (kernels/l1_loss.py, 2 launches)
    backward  dpre = sign(y - x) * dL_half / numel        formed while loading, in
              dh   = conv_transpose3x3(dpre, W)           conv3x3_dgrad_kernel (L1 mode),
              dx   = -dpre (the targets)                  which also writes dx_fake
              dW, db = sum_n scale[n] dpre (x) h          conv3x3_wgrad_kernel (L1 mode)

so d recon is never written or read back (the separate-loss path writes it in the
loss backward and reads it in both conv kernels). The fake target is G's output: its
gradient ``-dpre`` (the L1 term of dL_G / dfake) comes from the dgrad launch's channel
tile 0, at no extra pass.

Ops (all with fake implementations, so they work in eager, under ``torch.compile`` and
inside CUDA graphs):

- ``conv3x3_l1_pair_began(h, weight, bias, x_real, x_fake, wgrad_scale, k, gamma,
  lambda_k) -> (losses, k_next, M, y)``: differentiable in h, weight, bias, x_real and
  x_fake through ``losses`` (2,) fp32; k_next, M and y are not differentiable.
- ``conv3x3_l1_dgrad(h, weight, x_real, x_fake, y, grad, need_x_real, need_x_fake)
  -> (dh, dx_real, dx_fake)`` and ``conv3x3_l1_wgrad(h, weight, x_real, x_fake, y, grad,
  wgrad_scale) -> (dW, db)``: the backward.

Reference: :func:`fastbegan.ops.reference.conv3x3_l1_pair_began_ref` (the tests compare).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastbegan.kernels import conv3x3_bwd
from fastbegan.kernels.common import device_guard

from . import fallback, reference, triton_loss
from .checks import autocast_inputs, check_backend_device, check_device
from .triton_conv import run_forward

__all__ = ["conv3x3_l1_pair_began"]

_CL = torch.channels_last


# ----------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("fastbegan::conv3x3_l1_pair_began", mutates_args=())
def _fused_op(h: Tensor, weight: Tensor, bias: Optional[Tensor], x_real: Tensor, x_fake: Tensor,
              wgrad_scale: Optional[Tensor], k: Tensor, gamma: float,
              lambda_k: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y = run_forward(h, weight, bias, None, False, 1, False, op="conv3x3_l1_pair_began")
    losses, k_next, m = triton_loss.pair_began_forward(x_real, x_fake, y, k.to(y.device),
                                                       gamma, lambda_k)
    return losses, k_next, m, y


@_fused_op.register_fake
def _(h, weight, bias, x_real, x_fake, wgrad_scale, k, gamma, lambda_k):
    f32 = dict(dtype=torch.float32, device=h.device)
    y = torch.empty((h.shape[0], weight.shape[0], h.shape[2], h.shape[3]), dtype=h.dtype,
                    device=h.device, memory_format=_CL)
    return torch.empty((2,), **f32), torch.empty((), **f32), torch.empty((), **f32), y


@torch.library.custom_op("fastbegan::conv3x3_l1_dgrad", mutates_args=())
def _dgrad_op(h: Tensor, weight: Tensor, x_real: Tensor, x_fake: Tensor, y: Tensor, grad: Tensor,
              need_x_real: bool, need_x_fake: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dh, dx_real, dx_fake); a target gradient not asked for is an empty (0,) tensor."""
    key = fallback.shape_key(h=h, weight=weight, x_real=x_real, x_fake=x_fake, y=y,
                             need_x_real=need_x_real, need_x_fake=need_x_fake, device=h.device)
    args = (h, weight, x_real, x_fake, y, grad, need_x_real, need_x_fake)
    with device_guard(h.device):
        dh, dxr, dxf = fallback.run("conv3x3_l1_dgrad", key, [
            ("triton", lambda: conv3x3_bwd.conv3x3_l1_dgrad(*args)),
            ("torch", lambda: reference.conv3x3_l1_dgrad_ref(*args))], h.device,
            dtype=h.dtype)
    return (dh, dxr if dxr is not None else y.new_empty((0,)),
            dxf if dxf is not None else y.new_empty((0,)))


@_dgrad_op.register_fake
def _(h, weight, x_real, x_fake, y, grad, need_x_real, need_x_fake):
    def like(flag, t):
        return torch.empty(t.shape, dtype=t.dtype, device=t.device,
                           memory_format=_CL) if flag else y.new_empty((0,))
    return like(True, h), like(need_x_real, x_real), like(need_x_fake, x_fake)


@torch.library.custom_op("fastbegan::conv3x3_l1_wgrad", mutates_args=())
def _wgrad_op(h: Tensor, weight: Tensor, x_real: Tensor, x_fake: Tensor, y: Tensor, grad: Tensor,
              wgrad_scale: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(dW in the weight's dtype and layout, db in the weight's dtype)."""
    key = fallback.shape_key(h=h, weight=weight, x_real=x_real, y=y,
                             scale=wgrad_scale is not None, device=h.device)
    args = (h, weight, x_real, x_fake, y, grad, wgrad_scale)
    with device_guard(h.device):
        return fallback.run("conv3x3_l1_wgrad", key, [
            ("triton", lambda: conv3x3_bwd.conv3x3_l1_wgrad(*args)),
            ("torch", lambda: reference.conv3x3_l1_wgrad_ref(*args))], h.device,
            dtype=h.dtype)


@_wgrad_op.register_fake
def _(h, weight, x_real, x_fake, y, grad, wgrad_scale):
    return torch.empty_like(weight), weight.new_empty((weight.shape[0],))


# ----------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------
def _setup(ctx, inputs, output):
    h, weight, bias, x_real, x_fake, wgrad_scale = inputs[:6]
    _, k_next, m, y = output
    ctx.mark_non_differentiable(k_next, m, y)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(h, weight, x_real, x_fake, y, wgrad_scale)


def _backward(ctx, grad_losses, grad_k, grad_m, grad_y):
    h, weight, x_real, x_fake, y, scale = ctx.saved_tensors
    need_h, need_w, need_b, need_xr, need_xf = ctx.needs_input_grad[:5]
    dh = dxr = dxf = dw = db = None
    if grad_losses is not None:
        if need_h or need_xr or need_xf:
            dh, dxr, dxf = _dgrad_op(h, weight, x_real, x_fake, y, grad_losses, need_xr, need_xf)
        if need_w or (need_b and ctx.bias_dtype is not None):
            dw, db = _wgrad_op(h, weight, x_real, x_fake, y, grad_losses, scale)
            if ctx.bias_dtype is not None and db.dtype != ctx.bias_dtype:
                db = db.to(ctx.bias_dtype)
    return (dh if need_h else None, dw if need_w else None,
            db if need_b and ctx.bias_dtype is not None else None,
            dxr if need_xr else None, dxf if need_xf else None, None, None, None, None)


torch.library.register_autograd("fastbegan::conv3x3_l1_pair_began", _backward,
                                setup_context=_setup)


# ----------------------------------------------------------------------------------------
# wrapper: validation and layout
# ----------------------------------------------------------------------------------------
def conv3x3_l1_pair_began(h: Tensor, weight: Tensor, bias: Optional[Tensor], x_real: Tensor,
                          x_fake: Tensor, k: Tensor, gamma: float, lambda_k: float, *,
                          wgrad_scale: Optional[Tensor] = None):
    """``(losses, k_next, M, recon)``; the contract of
    :func:`fastbegan.ops.conv3x3_l1_pair_began` (h (2B, C, H, W), weight (Co, C, 3, 3),
    targets (B, Co, H, W); stride 1, no upsample, no activation). ``recon`` is detached."""
    op = "conv3x3_l1_pair_began"
    for name, t in (("h", h), ("x_real", x_real), ("x_fake", x_fake)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D (N, C, H, W) tensor")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3) or weight.shape[1] != h.shape[1]:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} must be (C_out, {h.shape[1]}, 3, 3)")
    check_backend_device(h, op)
    for name, t in (("weight", weight), ("bias", bias), ("x_real", x_real), ("x_fake", x_fake),
                    ("wgrad_scale", wgrad_scale)):
        if t is not None:
            check_device(name, t, h, op)
    b2, _, hh, ww = h.shape
    want = (b2 // 2, weight.shape[0], hh, ww)
    if b2 % 2 or tuple(x_real.shape) != want or tuple(x_fake.shape) != want:
        raise ValueError(f"{op}: x_real {tuple(x_real.shape)} and x_fake {tuple(x_fake.shape)} "
                         f"must both be {want}: half of h's batch, the conv's output shape")
    if wgrad_scale is not None and tuple(wgrad_scale.shape) != (b2,):
        raise ValueError(f"{op}: wgrad_scale must be ({b2},), got {tuple(wgrad_scale.shape)}")
    if x_real.numel() * 2 >= 2**31:
        raise ValueError(f"{op}: tensors of 2**31 or more elements are not supported")
    h, = autocast_inputs(h)
    if k.numel() != 1:
        raise ValueError(f"{op}: k must be a scalar tensor, got shape {tuple(k.shape)}")
    losses, k_next, m, y = _fused_op(
        h.contiguous(memory_format=_CL), weight, bias, x_real.contiguous(memory_format=_CL),
        x_fake.contiguous(memory_format=_CL), wgrad_scale, k.reshape(()), float(gamma),
        float(lambda_k))
    return losses, k_next, m, y
