"""The torch backend's conv3x3 + bias + ELU: the reference math, fast on a CPU.

Same contract as :func:`fastbegan.ops.conv3x3_elu` (``reference.conv3x3_elu_ref`` is the
definition it is tested against), with a written-out backward that does what the Triton
kernels do, in oneDNN calls:

- ELU's derivative from the saved output in one pass (``elu_backward``, is_result);
- the nearest 2x upsample in *sub-pixel* form: each of the four output phases (py, px)
  is a 2x2 conv of the low-resolution input with weights summed from the 3x3 kernel
  (docs/design.md §3.1), computed as one 2x2 conv with 4*C_out outputs; 16 instead of 36
  MACs per low-res pixel and channel pair, and no upsampled tensor in the forward or
  (its adjoint) in the backward;
- the optional per-sample weight-gradient scale (``wgrad_scale``, the fused step's
  ``[1]*B + [-k_t]*B``) applied to the output gradient of the weight-gradient call only;
- ``aten.convolution_backward`` on the real tensors, so oneDNN keeps channels_last.

Layouts: activations NCHW logical, channels_last memory; weight (C_out, C_in, 3, 3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import conv3x3_elu_ref


def _fold(t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Along ``dim`` (3 taps): the two phases' 2 taps. Phase 0 reads offsets (-1, 0) with
    taps (0 | 1+2), phase 1 reads (0, +1) with taps (0+1 | 2)."""
    t0, t1, t2 = t.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


def _fold_adjoint(p0: Tensor, p1: Tensor, dim: int) -> Tensor:
    """Adjoint of :func:`_fold`: the two phases' 2-tap gradients -> the 3 taps' gradient."""
    a0, a1 = p0.unbind(dim)
    b0, b1 = p1.unbind(dim)
    return torch.stack([a0 + b0, a1 + b0, a1 + b1], dim)


def subpixel_weight(w: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) -> (4*C_out, C_in, 2, 2): phase p = 2*py + px's 2x2 kernel,
    phase-major (rows folded, then columns)."""
    return torch.cat([phase for rows in _fold(w, 2) for phase in _fold(rows, 3)], 0)


def subpixel_weight_adjoint(dw4: Tensor) -> Tensor:
    """Adjoint of :func:`subpixel_weight`: (4*C_out, C_in, 2, 2) -> (C_out, C_in, 3, 3)."""
    p = dw4.unflatten(0, (4, -1)).unbind(0)
    return _fold_adjoint(_fold_adjoint(p[0], p[1], 3), _fold_adjoint(p[2], p[3], 3), 2)


def _memory_format(t: Tensor) -> torch.memory_format:
    """nn.Conv2d's rule: channels_last in, channels_last out; otherwise contiguous."""
    cl = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _phases_to_image(out4: Tensor, c_out: int, memory_format: torch.memory_format) -> Tensor:
    """(N, 4*C, H+1, W+1) phase outputs -> (N, C, 2H, 2W) image:
    image[2i+py, 2j+px] = out4[phase 2py+px, i+py, j+px]."""
    n, _, h1, w1 = out4.shape
    h, w = h1 - 1, w1 - 1
    y = torch.empty((n, c_out, 2 * h, 2 * w), dtype=out4.dtype, device=out4.device,
                    memory_format=memory_format)
    y6 = y.unflatten(3, (w, 2)).unflatten(2, (h, 2))  # (N, C, H, 2, W, 2), a view in any layout
    for py in (0, 1):
        for px in (0, 1):
            p = 2 * py + px
            y6[:, :, :, py, :, px] = out4[:, p * c_out:(p + 1) * c_out, py:py + h, px:px + w]
    return y


def _image_to_phases(dy: Tensor) -> Tensor:
    """Adjoint of :func:`_phases_to_image`: (N, C, 2H, 2W) -> (N, 4*C, H+1, W+1)
    channels_last, zero where a phase has no output pixel."""
    n, c, h2, w2 = dy.shape
    h, w = h2 // 2, w2 // 2
    d4 = dy.new_zeros((n, h + 1, w + 1, 4 * c)).permute(0, 3, 1, 2)  # NHWC memory
    dy6 = dy.unflatten(3, (w, 2)).unflatten(2, (h, 2))
    for py in (0, 1):
        for px in (0, 1):
            p = 2 * py + px
            d4[:, p * c:(p + 1) * c, py:py + h, px:px + w] = dy6[:, :, :, py, :, px]
    return d4


_GEOM1 = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)  # stride, padding, dilation, ..., groups


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _forward(x, weight, bias, upsample, stride, activation, skip):
    """(y, tensors the backward needs: compute-dtype input, weight as used, skip)."""
    dt = _compute_dtype(x)
    xin = x.to(dt)
    b = None if bias is None else bias.to(dt)
    if upsample and skip is None:  # sub-pixel: one 2x2 conv with 4*C_out outputs
        w = subpixel_weight(weight).to(dt)  # summed in the master dtype, then rounded
        y = _phases_to_image(F.conv2d(xin, w, None if b is None else b.repeat(4), padding=1),
                             weight.shape[0], _memory_format(x))
    else:
        w = weight.to(dt)
        inp = F.interpolate(xin, scale_factor=2, mode="nearest") if upsample else xin
        if skip is not None:
            skip = skip.to(dt)
            inp = torch.cat([inp, skip], dim=1)
        y = F.conv2d(inp, w, b, stride=stride, padding=1)
    return (F.elu(y) if activation else y), xin, w, skip


class _Conv3x3ELU(torch.autograd.Function):
    """Forward and backward of conv3x3_elu on the torch backend (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, scale, upsample, stride, activation, skip):
        y, xin, w, skip_c = _forward(x, weight, bias, upsample, stride, activation, skip)
        ctx.cfg = (upsample, upsample and skip is None, stride, activation, bias is not None, x.dtype,
                   weight.dtype, None if skip is None else skip.dtype)
        ctx.save_for_backward(xin, w, scale, skip_c, y if activation else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        xin, w, scale, skip, y = ctx.saved_tensors
        upsample, sub, stride, activation, has_bias, x_dtype, w_dtype, skip_dtype = ctx.cfg
        dt = w.dtype
        dy = dy.to(dt)
        dpre = torch.ops.aten.elu_backward(dy, 1.0, 1, 1, True, y) if activation else dy
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_skip = skip is not None and ctx.needs_input_grad[7]
        if sub:
            dout, inp, geom = _image_to_phases(dpre), xin, _GEOM1
        else:
            inp = F.interpolate(xin, scale_factor=2, mode="nearest") if upsample else xin
            if skip is not None:
                inp = torch.cat([inp, skip], dim=1)
            dout, geom = dpre, ([stride, stride], *_GEOM1[1:])
        dx = dskip = dw = db = None
        if need_x or need_skip:
            dinp = torch.ops.aten.convolution_backward(dout, inp, w, None, *geom, [True, False, False])[0]
            dx = dinp[:, :xin.shape[1]]
            if upsample and not sub:  # adjoint of nearest 2x: each pixel gets its 2x2 block's sum
                dx = torch.ops.aten.upsample_nearest2d_backward(dx, dinp.shape[2:], xin.shape, None, None)
            dx = dx.to(x_dtype)
            if need_skip:
                dskip = dinp[:, xin.shape[1]:].to(skip_dtype)
        if need_w or need_b:
            ds = dout if scale is None else dout * scale.to(dt).view(-1, 1, 1, 1)
            _, dw, db = torch.ops.aten.convolution_backward(
                ds, inp, w, [w.shape[0]] if has_bias else None, *geom, [False, True, has_bias])
            if sub:
                dw = subpixel_weight_adjoint(dw.to(torch.promote_types(dw.dtype, torch.float32)))
                db = db.view(4, -1).sum(0) if has_bias else None
            dw = dw.to(w_dtype)
            db = db.to(w_dtype) if has_bias else None
        return dx, dw, db, None, None, None, None, dskip


def conv3x3_elu_torch(x: Tensor, weight: Tensor, bias: Tensor | None, *, upsample: bool = False,
                      stride: int = 1, activation: bool = True, skip: Tensor | None = None,
                      wgrad_scale: Tensor | None = None) -> Tensor:
    """:func:`fastbegan.ops.conv3x3_elu` on the torch backend (arguments and result as there)."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, skip))
    if needs_grad:
        return _Conv3x3ELU.apply(x, weight, bias, wgrad_scale, upsample, stride, activation, skip)
    with torch.no_grad():
        return _forward(x, weight, bias, upsample, stride, activation, skip)[0]
