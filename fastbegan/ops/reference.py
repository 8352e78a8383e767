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
        x = upsample_nearest2x_ref(x)
    if skip is not None:
        x = torch.cat([x, skip], dim=1)
    y = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                 stride=stride, padding=1)
    return F.elu(y) if activation else y


class _ScaledWgradConv(torch.autograd.Function):
    """Reference for the per-sample weight-gradient scale (docs/design.md §1, §3.2).

    Forward: ``conv3x3_elu_ref``. Backward: the input (and skip) gradient is the plain
    one; the weight and bias gradients weight sample n's contribution by ``scale[n]``.
    The fused training step uses this to give D's fake half the factor ``-k_t`` in the
    same backward pass that sends G the unscaled gradient of L_G.

    The backward is written out (no ``torch.autograd.grad`` inside, so that dynamo can
    trace it under ``torch.compile(fullgraph=True)``), and written to be fast on a CPU
    (docs/design.md §4.4): ELU's derivative from the saved output in one pass
    (``aten.elu_backward``), ``aten.convolution_backward`` on the conv's real input and
    weight as the forward used them (saved in the compute dtype: no recast, no second
    upsample, channels_last kept). An upsample without a skip runs in sub-pixel form
    (:func:`subpixel_weight`: one 2x2 conv with 4*C_out outputs of the low-res input,
    4 instead of 9 MACs per output pixel, no upsampled tensor); with a skip, the input is
    upsampled and its adjoint is ``upsample_nearest2d_backward``.
    It runs in the autocast dtype under autocast and returns each gradient in its input's
    dtype.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, upsample, stride, activation, skip):
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        inp = x.to(dt)
        sub = upsample and skip is None and stride == 1
        if sub:  # sub-pixel: one 2x2 conv with 4*C_out outputs on the low-res input
            w = subpixel_weight(weight).to(dt)  # taps summed in the master dtype, then rounded
            b = None if bias is None else bias.repeat(4).to(dt)
            y = _subpixel_to_image(F.conv2d(inp, w, b, padding=1), weight.shape[0])
        else:
            if upsample:
                inp = upsample_nearest2x_ref(inp)
            if skip is not None:
                inp = torch.cat([inp, skip.to(dt)], dim=1)
            w = weight.to(dt)
            y = F.conv2d(inp, w, None if bias is None else bias.to(dt), stride=stride, padding=1)
        if activation:
            # Eager: in place (the conv's output is ours; ELU' needs only y). Traced: out of
            # place, which inductor fuses just the same; torch 2.11's compile of an in-place
            # ELU saved by an autograd.Function gives zero input gradients (docs/design.md §4.4)
            y = F.elu(y, inplace=not torch.compiler.is_compiling())
        ctx.cfg = (upsample, sub, stride, activation, bias is not None, x.dtype, x.shape, weight.dtype,
                   None if skip is None else skip.dtype)
        ctx.save_for_backward(inp, w, scale, y if activation else None)
        return y

    @staticmethod
    def backward(ctx, dy):
        inp, w, scale, y = ctx.saved_tensors
        upsample, sub, stride, activation, has_bias, x_dtype, x_shape, w_dtype, skip_dtype = ctx.cfg
        dt = w.dtype
        dy = dy.to(dt)
        dpre = torch.ops.aten.elu_backward(dy, 1.0, 1, 1, True, y) if activation else dy
        if sub:  # the gradient at the four phase outputs of the 2x2 conv
            dpre = _image_to_subpixel(dpre)
        geom = ([stride, stride], [1, 1], [1, 1], False, [0, 0], 1)
        dx = dskip = None
        if ctx.needs_input_grad[0] or (skip_dtype is not None and ctx.needs_input_grad[7]):
            dinp = torch.ops.aten.convolution_backward(dpre, inp, w, None, *geom, [True, False, False])[0]
            dx = dinp[:, :x_shape[1]]
            if upsample and not sub:
                dx = _upsample_adjoint(dx, x_shape)
            dx = dx.to(x_dtype)
            if skip_dtype is not None:
                dskip = dinp[:, x_shape[1]:].to(skip_dtype)
        need_w, need_b = ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]
        dw = db = None
        if need_w or need_b:  # (frozen weights, e.g. the pulling-away pass: no weight-gradient work)
            bias_sizes, mask = [w.shape[0]] if has_bias else None, [False, True, has_bias]

            def wgrad(dp, ip):
                return torch.ops.aten.convolution_backward(dp, ip, w, bias_sizes, *geom, mask)

            if scale.dim() == 2 and dpre[0].numel() >= SPLIT_WGRAD_MIN_NUMEL:
                # per-block scale on a large layer: one weight-gradient call per block, each
                # result scaled (weight-sized), instead of a scaled copy of dpre
                parts = [wgrad(dp, ip)[1:] for dp, ip in zip(dpre.chunk(len(scale)), inp.chunk(len(scale)))]
                dw = sum(pw.to(w_dtype) * sg.to(w_dtype) for (pw, _), sg in zip(parts, scale))
                db = sum(pb.to(w_dtype) * sg.to(w_dtype) for (_, pb), sg in zip(parts, scale)) if has_bias else None
            else:
                s = per_sample_scale(scale, dpre.shape[0]).to(dt).view(-1, 1, 1, 1)
                dpre = dpre.mul_(s) if activation or sub else dpre * s  # ours to scale
                _, dw, db = wgrad(dpre, inp)
                dw, db = dw.to(w_dtype), db.to(w_dtype) if has_bias else None
            if sub:  # back to the 3x3 kernel and one bias per output channel
                dw = _subpixel_weight_adjoint(dw)
                db = db.view(4, -1).sum(0) if has_bias else None
        return (dx, dw, db, None, None, None, None, dskip)


def subpixel_weight(w: Tensor) -> Tensor:
    """(C_out, C_in, 3, 3) -> (4*C_out, C_in, 2, 2), phase-major (p = 2*py + px).

    A 3x3 conv (padding 1) of the 2x nearest-upsampled input, at output pixel
    (2i+py, 2j+px), is a 2x2 conv of the input at rows i-1+py, i+py (columns likewise)
    whose taps are the 3x3 taps landing on the same input pixel, summed: along one axis
    phase 0 has taps (0 | 1+2), phase 1 (0+1 | 2) (docs/design.md §3.1). As one 2x2 conv
    with padding 1, phase p's output (i, j) sits at (i+py, j+px) of an (H+1, W+1) map.
    """
    def fold(t: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        k0, k1, k2 = t.unbind(dim)
        return torch.stack([k0, k1 + k2], dim), torch.stack([k0 + k1, k2], dim)
    return torch.cat([p for rows in fold(w, 2) for p in fold(rows, 3)])


def _subpixel_weight_adjoint(d: Tensor) -> Tensor:
    """Adjoint of :func:`subpixel_weight`: (4*C_out, C_in, 2, 2) -> (C_out, C_in, 3, 3)."""
    def unfold(t: Tensor, dim: int, phase: int) -> Tensor:  # (0 | 1+2) or (0+1 | 2), transposed
        a0, a1 = t.unbind(dim)
        return torch.stack([a0, a1, a1] if phase == 0 else [a0, a0, a1], dim)
    d = d.unflatten(0, (2, 2, -1))  # (py, px, C_out, C_in, 2, 2)
    return sum(unfold(unfold(d[py, px], 3, px), 2, py) for py in (0, 1) for px in (0, 1))


def _phase_view(t: Tensor, h: int, w: int, c: int) -> Tensor:
    """(N, H+1, W+1, 4C) NHWC memory viewed as the image it makes, (N, H, 2, W, 2, C):
    element (n, i, py, j, px, c) is phase 2py+px's channel c at (i+py, j+px)."""
    s0, s1, s2 = t.stride()[:3]
    return t.as_strided((t.shape[0], h, 2, w, 2, c), (s0, s1, s1 + 2 * c, s2, s2 + c, 1))


def _subpixel_to_image(o: Tensor, c: int) -> Tensor:
    """The 2x2 conv's (N, 4C, H+1, W+1) output -> the (N, C, 2H, 2W) image, channels_last:
    one strided view and one copy (inductor fuses the following ELU into that copy)."""
    n, _, h1, w1 = o.shape
    nhwc = o.permute(0, 2, 3, 1).contiguous()  # a view when o is channels_last
    return _phase_view(nhwc, h1 - 1, w1 - 1, c).reshape(n, 2 * h1 - 2, 2 * w1 - 2, c).permute(0, 3, 1, 2)


def _image_to_subpixel(d: Tensor) -> Tensor:
    """Adjoint of :func:`_subpixel_to_image`: (N, C, 2H, 2W) -> (N, 4C, H+1, W+1)
    channels_last, zero where a phase has no output pixel."""
    n, c, h2, w2 = d.shape
    out = d.new_zeros((n, h2 // 2 + 1, w2 // 2 + 1, 4 * c))
    _phase_view(out, h2 // 2, w2 // 2, c).copy_(d.permute(0, 2, 3, 1).reshape(n, h2 // 2, 2, w2 // 2, 2, c))
    return out.permute(0, 3, 1, 2)


# Per-block weight-gradient scale (the fused step's [1; -k_t], docs/design.md §4.4): one
# weight-gradient call per block where dpre has at least this many elements per sample
# (64 channels at 32x32). There a scaled copy of dpre costs more memory traffic than a
# second oneDNN call; on the smaller layers the call's fixed cost is the larger.
SPLIT_WGRAD_MIN_NUMEL = 64 * 32 * 32


def per_sample_scale(scale: Tensor, n: int) -> Tensor:
    """A weight-gradient scale as one factor per sample: ``scale`` (n,) as it is, or a
    per-block scale (G, 1) (the batch is G equal blocks; block g's samples all get
    ``scale[g]``) expanded to (n,)."""
    if scale.dim() == 1:
        return scale
    if scale.dim() != 2 or scale.shape[1] != 1 or n % scale.shape[0]:
        raise ValueError(f"wgrad_scale must be (N,) or (G, 1) with G dividing N = {n}, "
                         f"got {tuple(scale.shape)}")
    return scale.expand(-1, n // scale.shape[0]).reshape(n)


def _upsample_adjoint(d: Tensor, x_shape) -> Tensor:
    """Adjoint of nearest 2x upsampling: each pixel receives its 2x2 block's sum.
    Eager: ``aten.upsample_nearest2d_backward`` (one pass; a reshape + sum is ~40x slower
    there). Compiled: the reshape + sum, one reduction loop in inductor, whose own lowering
    of upsample_nearest2d_backward is a much slower scatter-add (docs/design.md §4.4)."""
    if torch.compiler.is_compiling():
        h, w = x_shape[2:]
        return d.unflatten(3, (w, 2)).unflatten(2, (h, 2)).sum((3, 5))
    return torch.ops.aten.upsample_nearest2d_backward(d, d.shape[2:], x_shape, None, None)


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
            s = per_sample_scale(scale, dy.shape[0]).to(dt).view(-1, *([1] * (dy.dim() - 1)))
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


# ----------------------------------------------------------------------------------------
# Backward references: the torch path of the triton backend's backward ops (the fallback
# chain's last resort and what `fastbegan doctor` and --verify-kernels compare against).
# Computed in fp32 (fp64 for fp64 inputs); results in the kernels' dtypes and layouts.
# ----------------------------------------------------------------------------------------
def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _dpre(dy: Tensor, y: Tensor | None, dt: torch.dtype) -> Tensor:
    """dy * elu'(pre), ELU's derivative from the output y (1 if y > 0 else y + 1)."""
    dy = dy.to(dt)
    if y is None:
        return dy
    y = y.to(dt)
    return torch.where(y > 0, dy, dy * (y + 1))


def conv3x3_dgrad_ref(dy: Tensor, y: Tensor | None, weight: Tensor, src: Tensor, c_off: int = 0,
                      upsample: bool = False, stride: int = 1) -> Tensor:
    """Gradient of :func:`conv3x3_elu_ref` w.r.t. one input source: x (``c_off = 0``,
    nearest-upsampled 2x before the conv when ``upsample``) or the skip tensor (its
    channels start at weight input channel ``c_off``). ``y``: the forward output when the
    op had the ELU, else None. Returns dsrc like src (dtype), channels_last."""
    dt = _work_dtype(src)
    n, c, hs, ws = src.shape
    size = (n, c, 2 * hs, 2 * ws) if upsample else (n, c, hs, ws)
    w = weight.to(dt)[:, c_off:c_off + c]
    d = torch.nn.grad.conv2d_input(size, w, _dpre(dy, y, dt), stride=stride, padding=1)
    if upsample:  # adjoint of nearest 2x: the sum of each 2x2 block
        d = d.unflatten(3, (ws, 2)).unflatten(2, (hs, 2)).sum((3, 5))
    return d.to(src.dtype).contiguous(memory_format=torch.channels_last)


def conv3x3_wgrad_ref(dy: Tensor, y: Tensor | None, x: Tensor, skip: Tensor | None,
                      weight: Tensor, scale: Tensor | None = None, upsample: bool = False,
                      stride: int = 1) -> tuple[Tensor, Tensor]:
    """``(dW, db)`` of :func:`conv3x3_elu_ref`, sample n's contribution times ``scale[n]``;
    both in the weight's dtype, dW in the weight's layout."""
    dt = _work_dtype(x)
    dpre = _dpre(dy, y, dt)
    if scale is not None:
        dpre = dpre * scale.to(dt).view(-1, 1, 1, 1)
    inp = upsample_nearest2x_ref(x) if upsample else x
    if skip is not None:
        inp = torch.cat([inp, skip], dim=1)
    dw = torch.nn.grad.conv2d_weight(inp.to(dt), weight.shape, dpre, stride=stride, padding=1)
    return torch.empty_like(weight).copy_(dw), dpre.sum((0, 2, 3)).to(weight.dtype)


def _l1_dpre(x_real: Tensor, x_fake: Tensor, y: Tensor, grad: Tensor, dt) -> Tensor:
    """d [L_real, L_fake] / d y for y = [recon_real; recon_fake]: sign(y - x) * g / numel."""
    b = x_real.shape[0]
    g = grad.reshape(2).to(dt) / x_real.numel()
    per_sample = torch.cat([g[0].expand(b), g[1].expand(b)]).view(-1, 1, 1, 1)
    return torch.sign(y.to(dt) - torch.cat([x_real, x_fake]).to(dt)) * per_sample


def conv3x3_l1_dgrad_ref(h: Tensor, weight: Tensor, x_real: Tensor, x_fake: Tensor, y: Tensor,
                         grad: Tensor, need_x_real: bool = False, need_x_fake: bool = True):
    """``(dh, dx_real, dx_fake)`` of the L1 losses of ``y = conv3x3(h) + b`` (see
    :func:`conv3x3_l1_pair_began_ref`); a target gradient not asked for is None."""
    dpre = _l1_dpre(x_real, x_fake, y, grad, _work_dtype(h))
    b = x_real.shape[0]
    dh = conv3x3_dgrad_ref(dpre, None, weight, h)
    cl = torch.channels_last
    dxr = (-dpre[:b]).to(x_real.dtype).contiguous(memory_format=cl) if need_x_real else None
    dxf = (-dpre[b:]).to(x_fake.dtype).contiguous(memory_format=cl) if need_x_fake else None
    return dh, dxr, dxf


def conv3x3_l1_wgrad_ref(h: Tensor, weight: Tensor, x_real: Tensor, x_fake: Tensor, y: Tensor,
                         grad: Tensor, scale: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(dW, db)`` of the same L1 losses, sample n's contribution times ``scale[n]``."""
    dpre = _l1_dpre(x_real, x_fake, y, grad, _work_dtype(h))
    return conv3x3_wgrad_ref(dpre, None, h, None, weight, scale)
