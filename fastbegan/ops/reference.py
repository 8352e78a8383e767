"""Pure-PyTorch reference implementation of every fastbegan op (the "torch" backend).

This file *defines* correctness: every Triton kernel is tested against it, and it is
the path used on CPU and wherever Triton is unavailable.

Layout: activations are logical NCHW tensors, normally in channels_last memory format
(NHWC in memory). Weights are logical OIHW (``(C_out, C_in, 3, 3)``), any strides.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def conv3x3_elu_ref(x: Tensor, weight: Tensor, bias: Tensor | None, *, upsample: bool = False,
                    stride: int = 1, activation: bool = True, skip: Tensor | None = None) -> Tensor:
    """``elu(conv3x3(cat(up(x), skip), weight, pad=1, stride) + bias)``.

    x: (N, C_x, H, W). With ``upsample`` the input is first nearest-upsampled 2x.
    skip: optional (N, C_s, H', W') concatenated after x's channels, at the conv's input
    resolution (after the upsample). weight: (C_out, C_x + C_s, 3, 3). Returns
    (N, C_out, H'/stride, W'/stride), ELU (alpha 1) applied unless ``activation=False``.
    """
    if upsample:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
    if skip is not None:
        x = torch.cat([x, skip], dim=1)
    y = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                 stride=stride, padding=1)
    return F.elu(y) if activation else y


class _ScaledWgradConv(torch.autograd.Function):
    """Reference for the per-sample weight-gradient scale (DESIGN 1 and 3.2).

    Forward: ``conv3x3_elu_ref``. Backward: the input (and skip) gradient is the plain
    one; the weight and bias gradients weight sample n's contribution by ``scale[n]``.
    The fused training step uses this to give D's fake half the factor ``-k_t`` in the
    same backward pass that sends G the unscaled gradient of L_G.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, upsample, stride, activation, skip):
        ctx.cfg = (upsample, stride, activation, bias is not None, skip is not None)
        ctx.save_for_backward(x, weight, bias, scale, skip)
        with torch.no_grad():
            return conv3x3_elu_ref(x, weight, bias, upsample=upsample, stride=stride,
                                   activation=activation, skip=skip)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, scale, skip = ctx.saved_tensors
        upsample, stride, activation, has_bias, has_skip = ctx.cfg
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            si = skip.detach().requires_grad_(True) if has_skip else None
            inp = F.interpolate(xi, scale_factor=2, mode="nearest") if upsample else xi
            if has_skip:
                inp = torch.cat([inp, si], dim=1)
            pre = F.conv2d(inp, weight.to(inp.dtype), None if bias is None else bias.to(inp.dtype),
                           stride=stride, padding=1)
            y = F.elu(pre) if activation else pre
            dpre, = torch.autograd.grad(y, pre, dy, retain_graph=True)
            grads = torch.autograd.grad(pre, [xi] + ([si] if has_skip else []), dpre)
        s = scale.to(dpre.dtype).view(-1, 1, 1, 1)
        dpre_s = dpre * s
        dw = torch.nn.grad.conv2d_weight(inp.detach(), weight.shape, dpre_s, stride=stride,
                                         padding=1).to(weight.dtype)
        db = dpre_s.sum((0, 2, 3)).to(weight.dtype) if has_bias else None
        return grads[0], dw, db, None, None, None, None, (grads[1] if has_skip else None)


def conv3x3_elu_scaled_ref(x, weight, bias, wgrad_scale, *, upsample=False, stride=1,
                           activation=True, skip=None):
    return _ScaledWgradConv.apply(x, weight, bias, wgrad_scale, upsample, stride, activation, skip)


class _ScaledWgradLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)``; the weight/bias gradients weight sample n by scale[n].

    The input gradient is the plain one (the same contract as the conv's ``wgrad_scale``).
    Under autocast the forward runs in the autocast dtype (as ``F.linear`` does) and the
    backward in the gradient's dtype; weight gradients come back in the parameters' dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale):
        ctx.save_for_backward(x, weight, scale)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight, scale = ctx.saved_tensors
        dt = dy.dtype
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_x:
            dx = (dy @ weight.to(dt)).to(x.dtype)
        if need_w or (need_b and ctx.has_bias):
            s = scale.to(dt).view(-1, *([1] * (dy.dim() - 1)))
            dys = (dy * s).flatten(0, -2)
            if need_w:
                dw = (dys.t() @ x.to(dt).flatten(0, -2)).to(weight.dtype)
            if need_b and ctx.has_bias:
                db = dys.sum(0).to(weight.dtype)
        return dx, dw, db, None


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, wgrad_scale: Tensor | None = None) -> Tensor:
    """``F.linear``; with ``wgrad_scale`` (N,) the weight/bias gradients weight sample n by it."""
    if wgrad_scale is None:
        return F.linear(x, weight, bias)
    return _ScaledWgradLinear.apply(x, weight, bias, wgrad_scale)


def upsample_nearest2x_ref(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W), nearest neighbour."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def l1_recon_loss_ref(x: Tensor, recon: Tensor) -> Tensor:
    """Pixel-wise L1 reconstruction loss ``mean |x - D(x)|`` (eta = 1), in fp32."""
    return (x.float() - recon.float()).abs().mean()


def began_update_ref(k: Tensor, loss_real: Tensor, loss_fake: Tensor, gamma: float,
                     lambda_k: float) -> tuple[Tensor, Tensor]:
    """Equilibrium control and convergence measure (BEGAN eq. 4 and section 3.4.1).

    Returns ``(k_next, M_global)`` with
    ``k_next = clip(k + lambda_k * (gamma * L(x) - L(G(z))), 0, 1)`` and
    ``M_global = L(x) + |gamma * L(x) - L(G(z))|``. All 0-d fp32 device tensors.
    """
    balance = gamma * loss_real - loss_fake
    k_next = (k + lambda_k * balance).clamp(0.0, 1.0)
    m_global = loss_real + balance.abs()
    return k_next.detach(), m_global.detach()


def conv3x3_l1_pair_began_ref(h: Tensor, weight: Tensor, bias: Tensor | None, x_real: Tensor,
                              x_fake: Tensor, k: Tensor, gamma: float, lambda_k: float,
                              wgrad_scale: Tensor | None = None):
    """The decoder's last conv, the L1 pair loss and the BEGAN update, composed.

    h: (2B, C, H, W), the last conv's input for the batch ``[x_real; x_fake]``; weight
    (3, C, 3, 3), linear (no ELU). Returns ``(losses, k_next, M, recon)``: losses the
    differentiable (2,) fp32 ``[L_real, L_fake]`` of ``recon = conv3x3(h)`` against
    ``[x_real; x_fake]``; k_next, M as :func:`began_update_ref`; recon detached.
    """
    if wgrad_scale is None:
        recon = conv3x3_elu_ref(h, weight, bias, activation=False)
    else:
        recon = conv3x3_elu_scaled_ref(h, weight, bias, wgrad_scale, activation=False)
    b = x_real.shape[0]
    losses = torch.stack([l1_recon_loss_ref(x_real, recon[:b]), l1_recon_loss_ref(x_fake, recon[b:])])
    k_next, m = began_update_ref(k, losses[0].detach(), losses[1].detach(), gamma, lambda_k)
    return losses, k_next, m, recon.detach()
