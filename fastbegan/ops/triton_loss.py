"""Triton BEGAN losses: L1 reconstruction loss and the k_t / M_global update, as custom ops.

Kernels: :mod:`fastbegan.kernels.l1_loss`. Semantics: :func:`reference.l1_recon_loss_ref`
and :func:`reference.began_update_ref` (the tests compare them).

Custom ops (namespace ``fastbegan``; all have fake implementations, the losses have
autograd, so they work in eager, under ``torch.compile`` and inside CUDA graphs):

- ``l1_loss(x, recon) -> Tensor``: 0-d fp32 ``mean |x - recon|``.
- ``l1_loss_pair(x_real, x_fake, recon) -> Tensor``: ``recon`` is D's output for
  ``[x_real; x_fake]`` (2B samples); returns the (2,) fp32 tensor ``[L_real, L_fake]``.
  One launch reads both halves (one pass, fp32 partial sums), a second one-program launch
  sums the partials in a fixed order (deterministic).
- ``l1_loss_pair_began(x_real, x_fake, recon, k, gamma, lambda_k) -> (losses, k_next, M)``:
  the same, with the BEGAN update computed in the second (finalize) launch: the whole
  loss + equilibrium bookkeeping of a training step in two launches, no host sync.
- ``began_update(k, loss_real, loss_fake, gamma, lambda_k) -> (k_next, M)``: the update
  alone (one one-program launch); not differentiable.
- ``l1_loss_backward(...)``: the gradient kernel the autograd formulas call.

The L1 gradient. These ops produce it in their own backward: one elementwise launch
over both halves writing ``d recon = sign(recon - x) * g / n`` and ``d x = -d recon`` (the
latter only for inputs that need it). The training step does not use them for D's
losses: :mod:`.triton_conv_l1` fuses D's last conv with the same forward kernels and forms
the L1 gradient inside that conv's backward kernels (docs/design.md §3.3), so d recon is never
written. These ops stay for other callers (evaluation, interpolation, drop-in users).

Layout: ``x`` and ``recon`` are read as flat buffers in one common memory layout; when
``recon`` is NCHW-contiguous or channels_last (what the model produces) nothing is
copied, otherwise the launcher makes contiguous copies.
"""
from __future__ import annotations

import torch
import triton
from torch import Tensor

from fastbegan.kernels import interpreting, l1_loss
from fastbegan.kernels.common import check_grid, device_guard

from . import fallback, reference

__all__ = ["l1_recon_loss", "l1_recon_loss_pair", "l1_recon_loss_pair_began", "began_update",
           "pair_began_forward"]

_INTERPRET = interpreting()
# Block sizes and the cap on partial sums per half (see the kernels module); smaller
# under the interpreter so that the tests exercise several blocks and partials.
_BLOCK = 1024 if _INTERPRET else l1_loss.GPU_BLOCK
_BLOCK_BWD = 1024 if _INTERPRET else l1_loss.GPU_BLOCK_BWD
_MAX_PARTS = 16 if _INTERPRET else l1_loss.GPU_MAX_PARTS
_NUM_WARPS = l1_loss.NUM_WARPS


# ----------------------------------------------------------------------------------------
# layout helpers and launchers
# ----------------------------------------------------------------------------------------
def _common_layout(recon: Tensor, *xs: Tensor) -> tuple[Tensor, list[Tensor]]:
    """recon and xs in one dense memory layout, batch outermost (copies only if needed)."""
    if recon.is_contiguous():
        fmt = torch.contiguous_format
    elif recon.dim() == 4 and recon.is_contiguous(memory_format=torch.channels_last):
        fmt = torch.channels_last
    else:
        recon, fmt = recon.contiguous(), torch.contiguous_format
    return recon, [x if x.is_contiguous(memory_format=fmt) else x.contiguous(memory_format=fmt)
                   for x in xs]


def _check(name: str, xs: list[Tensor], recon: Tensor, halves: int) -> int:
    for t in (*xs, recon):
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected floating-point tensors, got {t.dtype}")
        if t.device != recon.device:
            raise ValueError(f"{name}: tensors on different devices ({t.device}, {recon.device})")
    x0 = xs[0]
    for x in xs[1:]:
        if x.shape != x0.shape:
            raise ValueError(f"{name}: x_real {tuple(x0.shape)} and x_fake {tuple(x.shape)} differ")
    if x0.dim() == 0 and halves == 2:
        raise ValueError(f"{name}: x_real must have a batch dimension")
    want = (x0.shape[0] * halves, *x0.shape[1:]) if halves == 2 else x0.shape
    if tuple(recon.shape) != tuple(want):
        raise ValueError(f"{name}: recon has shape {tuple(recon.shape)}, expected {tuple(want)}")
    n = x0.numel()
    if n == 0:
        raise ValueError(f"{name}: empty input")
    if n * halves >= 2**31:
        raise ValueError(f"{name}: {n * halves} elements: more than the kernels' int32 indexing")
    return n


def _n_parts(n: int) -> int:
    return max(1, min(triton.cdiv(n, _BLOCK), _MAX_PARTS))


def _launch_forward(xa: Tensor, xb: Tensor, recon: Tensor, n: int, halves: int,
                    k: Tensor | None = None, gamma: float = 0.0, lambda_k: float = 0.0):
    recon, (xa, xb) = _common_layout(recon, xa, xb)
    dev = recon.device
    parts = _n_parts(n)
    part = torch.empty((halves, parts), device=dev, dtype=torch.float32)
    out = torch.empty((halves,) if halves == 2 else (), device=dev, dtype=torch.float32)
    l1_loss.l1_partial_kernel[(parts, halves)](xa, xb, recon, part, n, parts, HALVES=halves,
                                               BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    update = k is not None
    if update:
        k_next = torch.empty((), device=dev, dtype=torch.float32)
        m = torch.empty((), device=dev, dtype=torch.float32)
    else:
        k, k_next, m = out, out, out  # unused pointers (UPDATE is False)
    l1_loss.l1_finalize_kernel[(1,)](part, out, n, parts, k, k_next, m, float(gamma),
                                     float(lambda_k), HALVES=halves, UPDATE=update,
                                     BLOCK_P=triton.next_power_of_2(parts), num_warps=4)
    return (out, k_next, m) if update else out


def _launch_backward(xa: Tensor, xb: Tensor, recon: Tensor, grad: Tensor, halves: int,
                     need_xa: bool, need_xb: bool):
    recon, (xa, xb) = _common_layout(recon, xa, xb)
    n = xa.numel()
    grad = grad.to(torch.float32).contiguous()
    g_recon = torch.empty_like(recon)
    g_xa = torch.empty_like(xa) if need_xa else None
    g_xb = torch.empty_like(xb) if (need_xb and halves == 2) else None
    l1_loss.l1_backward_kernel[check_grid((triton.cdiv(n, _BLOCK_BWD), halves), "l1_loss")](
        xa, xb, recon, grad, g_xa if need_xa else recon, g_xb if g_xb is not None else recon,
        g_recon, n, HALVES=halves, WRITE_XA=need_xa, WRITE_XB=g_xb is not None,
        BLOCK=_BLOCK_BWD, num_warps=l1_loss.NUM_WARPS_BWD)
    return g_xa, g_xb, g_recon


def _ref_losses(xa: Tensor, xb: Tensor, recon: Tensor, halves: int) -> Tensor:
    if halves == 1:
        return reference.l1_recon_loss_ref(xa, recon)
    b = xa.shape[0]
    return torch.stack([reference.l1_recon_loss_ref(xa, recon[:b]),
                        reference.l1_recon_loss_ref(xb, recon[b:])])


def _forward(op: str, xa: Tensor, xb: Tensor, recon: Tensor, halves: int, k=None,
             gamma: float = 0.0, lambda_k: float = 0.0):
    """The losses (and, with ``k``, the BEGAN update) through the fallback chain."""
    n = _check(op, [xa] if halves == 1 else [xa, xb], recon, halves)

    def ref():
        losses = _ref_losses(xa, xb, recon, halves)
        if k is None:
            return losses
        return (losses, *reference.began_update_ref(k.float(), losses[0], losses[1], gamma,
                                                    lambda_k))
    key = fallback.shape_key(x=xa, recon=recon, update=k is not None, device=recon.device)
    with device_guard(recon.device):
        return fallback.run(op, key, [
            ("triton", lambda: _launch_forward(xa, xb, recon, n, halves, k, gamma, lambda_k)),
            ("torch", ref)], recon.device)


def pair_began_forward(x_real: Tensor, x_fake: Tensor, recon: Tensor, k: Tensor, gamma: float,
                       lambda_k: float):
    """``(losses, k_next, M)`` of D's output ``recon`` for ``[x_real; x_fake]``: both L1
    losses and the BEGAN update in two launches (or the torch path of the chain)."""
    return _forward("l1_loss_pair_began", x_real, x_fake, recon, 2, k, gamma, lambda_k)


def _ref_backward(xa, xb, recon, grad, halves, need_xa, need_xb):
    """The torch path of :func:`_launch_backward`: (d xa | None, d xb | None, d recon)."""
    recon, (xa, xb) = _common_layout(recon, xa, xb)
    g = grad.float() / xa.numel()
    targets = xa if halves == 1 else torch.cat([xa, xb])
    per = g.repeat_interleave(xa.shape[0]).view(-1, *([1] * (xa.dim() - 1))) if halves == 2 \
        else g.reshape(())
    d = torch.sign(recon.float() - targets.float()) * per
    b = xa.shape[0] if halves == 2 else None
    g_xa = (-(d[:b] if b else d)).to(xa.dtype) if need_xa else None
    g_xb = (-d[b:]).to(xb.dtype) if (need_xb and halves == 2) else None
    return g_xa, g_xb, d.to(recon.dtype)


def _empty_like_or_none(flag: bool, t: Tensor) -> Tensor:
    return torch.empty_like(t) if flag else t.new_empty((0,))


# ----------------------------------------------------------------------------------------
# custom ops
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("fastbegan::l1_loss", mutates_args=())
def _l1_loss_op(x: Tensor, recon: Tensor) -> Tensor:
    return _forward("l1_recon_loss", x, x, recon, 1)


@_l1_loss_op.register_fake
def _(x, recon):
    return recon.new_empty((), dtype=torch.float32)


@torch.library.custom_op("fastbegan::l1_loss_pair", mutates_args=())
def _l1_loss_pair_op(x_real: Tensor, x_fake: Tensor, recon: Tensor) -> Tensor:
    return _forward("l1_recon_loss_pair", x_real, x_fake, recon, 2)


@_l1_loss_pair_op.register_fake
def _(x_real, x_fake, recon):
    return recon.new_empty((2,), dtype=torch.float32)


@torch.library.custom_op("fastbegan::l1_loss_pair_began", mutates_args=())
def _l1_loss_pair_began_op(x_real: Tensor, x_fake: Tensor, recon: Tensor, k: Tensor,
                           gamma: float, lambda_k: float) -> tuple[Tensor, Tensor, Tensor]:
    if k.numel() != 1:
        raise ValueError(f"l1_recon_loss_pair: k must be a scalar tensor, got shape {tuple(k.shape)}")
    return pair_began_forward(x_real, x_fake, recon, k.to(recon.device), gamma, lambda_k)


@_l1_loss_pair_began_op.register_fake
def _(x_real, x_fake, recon, k, gamma, lambda_k):
    f32 = dict(dtype=torch.float32)
    return recon.new_empty((2,), **f32), recon.new_empty((), **f32), recon.new_empty((), **f32)


@torch.library.custom_op("fastbegan::l1_loss_backward", mutates_args=())
def _l1_loss_backward_op(xa: Tensor, xb: Tensor, recon: Tensor, grad: Tensor, need_xa: bool,
                         need_xb: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(d xa, d xb, d recon) for ``grad`` = the upstream gradient of the (halves,) losses.

    ``halves`` = grad.numel(); with one half ``xb`` is ignored. Gradients not asked for
    come back as empty (0,) tensors.
    """
    halves = grad.numel()
    key = fallback.shape_key(x=xa, recon=recon, need_xa=need_xa, need_xb=need_xb,
                             device=recon.device)
    with device_guard(recon.device):
        g_xa, g_xb, g_r = fallback.run("l1_loss_backward", key, [
            ("triton", lambda: _launch_backward(xa, xb, recon, grad.reshape(-1), halves,
                                                need_xa, need_xb)),
            ("torch", lambda: _ref_backward(xa, xb, recon, grad.reshape(-1), halves, need_xa,
                                            need_xb))], recon.device)
    # A fresh empty tensor per missing gradient: custom-op outputs must not alias each other.
    return (g_xa if g_xa is not None else recon.new_empty((0,)),
            g_xb if g_xb is not None else recon.new_empty((0,)), g_r)


@_l1_loss_backward_op.register_fake
def _(xa, xb, recon, grad, need_xa, need_xb):
    halves = grad.numel()
    recon, (xa, xb) = _common_layout(recon, xa, xb)
    return (_empty_like_or_none(need_xa, xa), _empty_like_or_none(need_xb and halves == 2, xb),
            torch.empty_like(recon))


@torch.library.custom_op("fastbegan::began_update", mutates_args=())
def _began_update_op(k: Tensor, loss_real: Tensor, loss_fake: Tensor, gamma: float,
                     lambda_k: float) -> tuple[Tensor, Tensor]:
    dev = k.device

    def launch():
        k_next = torch.empty((), device=dev, dtype=torch.float32)
        m = torch.empty((), device=dev, dtype=torch.float32)
        l1_loss.began_update_kernel[(1,)](k, loss_real.to(dev), loss_fake.to(dev), k_next, m,
                                          float(gamma), float(lambda_k), num_warps=1)
        return k_next, m

    def ref():
        return reference.began_update_ref(k.float(), loss_real.to(dev).float(),
                                          loss_fake.to(dev).float(), gamma, lambda_k)
    with device_guard(dev):
        return fallback.run("began_update", fallback.shape_key(device=dev),
                            [("triton", launch), ("torch", ref)], dev)


@_began_update_op.register_fake
def _(k, loss_real, loss_fake, gamma, lambda_k):
    return k.new_empty((), dtype=torch.float32), k.new_empty((), dtype=torch.float32)


# ----------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------
def _grad_or_none(flag: bool, g: Tensor) -> Tensor | None:
    return g if flag else None


def _l1_setup(ctx, inputs, output):
    x, recon = inputs
    ctx.save_for_backward(x, recon)


def _l1_backward(ctx, grad):
    x, recon = ctx.saved_tensors
    need_x, need_r = ctx.needs_input_grad[:2]
    if not (need_x or need_r):
        return None, None
    g_x, _, g_r = _l1_loss_backward_op(x, x, recon, grad.reshape(1), need_x, False)
    return _grad_or_none(need_x, g_x), _grad_or_none(need_r, g_r)


torch.library.register_autograd("fastbegan::l1_loss", _l1_backward, setup_context=_l1_setup)


def _pair_setup(ctx, inputs, output):
    x_real, x_fake, recon = inputs[:3]
    ctx.save_for_backward(x_real, x_fake, recon)


def _pair_grads(ctx, grad_losses):
    x_real, x_fake, recon = ctx.saved_tensors
    need_a, need_b, need_r = ctx.needs_input_grad[:3]
    if grad_losses is None or not (need_a or need_b or need_r):
        return None, None, None
    g_a, g_b, g_r = _l1_loss_backward_op(x_real, x_fake, recon, grad_losses, need_a, need_b)
    return _grad_or_none(need_a, g_a), _grad_or_none(need_b, g_b), _grad_or_none(need_r, g_r)


def _pair_backward(ctx, grad_losses):
    return _pair_grads(ctx, grad_losses)


def _pair_began_backward(ctx, grad_losses, grad_k_next, grad_m):
    # k_next and M are bookkeeping, not differentiable (the reference detaches them).
    return (*_pair_grads(ctx, grad_losses), None, None, None)


torch.library.register_autograd("fastbegan::l1_loss_pair", _pair_backward,
                                setup_context=_pair_setup)
torch.library.register_autograd("fastbegan::l1_loss_pair_began", _pair_began_backward,
                                setup_context=_pair_setup)


# ----------------------------------------------------------------------------------------
# public wrappers
# ----------------------------------------------------------------------------------------
def l1_recon_loss(x: Tensor, recon: Tensor) -> Tensor:
    """``mean |x - recon|`` as a 0-d fp32 tensor, differentiable in both arguments."""
    return _l1_loss_op(x, recon)


def l1_recon_loss_pair(x_real: Tensor, x_fake: Tensor, recon: Tensor) -> tuple[Tensor, Tensor]:
    """``(L_real, L_fake)``: ``recon`` is D's output for ``[x_real; x_fake]`` (2B samples).

    ``L_real = mean |x_real - recon[:B]|``, ``L_fake = mean |x_fake - recon[B:]|``; both
    0-d fp32, differentiable in all three inputs; one pass over the data.
    """
    losses = _l1_loss_pair_op(x_real, x_fake, recon)
    return losses[0], losses[1]


def l1_recon_loss_pair_began(x_real: Tensor, x_fake: Tensor, recon: Tensor, k: Tensor,
                             gamma: float, lambda_k: float):
    """``(losses, k_next, M)``: :func:`l1_recon_loss_pair` (as one (2,) tensor
    ``[L_real, L_fake]``) plus the BEGAN update of :func:`began_update` from those losses,
    in the same two launches. ``k_next`` and ``M`` are detached 0-d fp32 tensors."""
    losses, k_next, m = _l1_loss_pair_began_op(x_real, x_fake, recon, k, float(gamma),
                                               float(lambda_k))
    return losses, k_next.detach(), m.detach()


def began_update(k: Tensor, loss_real: Tensor, loss_fake: Tensor, gamma: float,
                 lambda_k: float) -> tuple[Tensor, Tensor]:
    """``(k_next, M_global)`` as 0-d fp32 device tensors (see ``began_update_ref``)."""
    return _began_update_op(k.detach(), loss_real.detach(), loss_fake.detach(), float(gamma),
                            float(lambda_k))
