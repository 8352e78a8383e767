"""Backward kernels of the fused ``conv3x3_elu`` op (docs/design.md §3.2).

Forward (kernels/conv3x3.py)::

    inp = cat([up2x(x) if UPSAMPLE else x, skip], channels)      # conv-input resolution
    pre = conv3x3(inp, W, pad=1, stride=S) + bias
    y   = elu(pre) if ACT else pre

All activations are NHWC in memory (logical NCHW tensors in channels_last format).
Four kernels compute the gradients:

0. ``conv3x3_dgrad_weight_kernel`` -- a weight-sized pass that lays out one source's weights for
   dgrad as ``wt[tap, co, ci]`` in the activations' dtype (fp32 master weights are cast
   here, once, instead of in every dgrad tile; the sub-pixel tap sums are formed here).
1. ``conv3x3_dgrad_kernel``  -- gradient of one *source* tensor (x, or the concatenated skip)::

       dsrc = conv_transpose3x3(dpre, W[:, c_off:c_off + C_src])      (+ adjoints)

   an implicit GEMM with M = source pixels, N = source channels, K = taps x C_out.
2. ``conv3x3_wgrad_kernel``  -- partial weight (and bias) gradients of one source: a GEMM with
   M = C_out, N = taps x C_src and K = the pixels of the whole batch, split into
   ``S`` chunks ("split-K"); every program writes its own fp32 partial tile, so the
   result is deterministic (no atomics). Sample n's pixels are multiplied by an optional
   per-sample scale while dpre is loaded (D's fake half gets -k_t, docs/design.md §1).
3. ``conv3x3_wgrad_reduce_kernel`` -- sums the split-K partials in fp32 and writes dW in the
   weight's own layout and dtype (and db).

Launchers: :func:`conv3x3_dgrad` (kernels 0 + 1) and :func:`conv3x3_wgrad`
(kernels 2 + 3, once per source); the custom ops ``fastbegan::conv3x3_dgrad`` /
``fastbegan::conv3x3_wgrad`` and the autograd formula that calls them live in
:mod:`fastbegan.ops.triton_conv_bwd`.

The ELU derivative is taken from the saved *output* y:  d elu / d pre = 1 if y > 0
else y + 1 (= exp(pre)).  It is applied while dy is loaded (``_load_dpre``), so the
pre-activation is never stored and there is no separate elementwise pass.

Upsample (nearest 2x) uses the "sub-pixel" decomposition (docs/design.md §3.1): along one axis,
output row ``2i + p`` (phase p) of the conv reads low-resolution rows ``i + p + a - 1``,
a in {0, 1}, with the 3x3 rows summed as follows::

    p = 0:  a = 0 (offset -1) <- row 0          a = 1 (offset 0)  <- rows 1 + 2
    p = 1:  a = 0 (offset  0) <- rows 0 + 1     a = 1 (offset +1) <- row 2

* dgrad: low-res pixel i receives from output rows ``2i - 1 + a'``, a' = 0..3, i.e. a 4x4
  "stride-2" correlation of dpre whose taps are sums of 3x3 taps (rows kh in
  [max(0, 2 - a'), min(2, 3 - a')]): 16 taps per low-res pixel instead of 4 x 9.
* wgrad: 16 (phase, tap) combinations, each a GEMM over the *low-res* pixels (K = N*H*W
  instead of N*4HW); the reduce kernel maps them back onto the 3x3 taps (each 3x3 tap is the
  sum of 4 combinations). 2.25x fewer FLOPs than gathering the upsampled input.

Stride 2 dgrad is split by output phase as well: the source pixels of phase (py, px)
(``h = 2i + py``) receive only from taps kh = 1 (py = 0) or kh in {0, 2} (py = 1), so no
MACs are wasted on the zeros a masked stride-1 formulation would multiply.

Data types: activations fp32 / fp16 / bf16, weights any float dtype (cast to the
activations' dtype for ``tl.dot`` by kernel 0; dW / db come back in the weight's dtype),
accumulation and split-K partials in fp32 (fp64 for fp64 tensors, which the tests use for
gradcheck). fp32 dots use TF32 when ``torch.backends.cudnn.allow_tf32`` allows it (the
PyTorch default for convolutions). Integer offsets are int32: the launchers check that
every tensor has fewer than 2**31 elements.

Hopper: pointer loads (masked gathers: the conv padding, the phase and upsample index
maps), ``tl.dot`` lowered to wgmma; every config is compiled for sm_90 by
tests/test_sm90_compile_bwd.py (no spills, shared memory <= 227 KB; table in
benchmarks/results/sm90_resources_bwd.json).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import interpreting
from .common import (acc_dtype, autotune, cap, check_grid, check_int32, dot_precision, nhwc,
                     num_sms)

INTERPRET = interpreting()


# --------------------------------------------------------------------------------------
# autotune configs
# --------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                         num_warps=warps, num_stages=stages)


# dgrad: BLOCK_M source pixels x BLOCK_N source channels, K step BLOCK_K output channels.
# Hopper-shaped (128 x 128 x 64, 8 warps = 2 warpgroups of wgmma) down to small channel
# counts (the first / last layers of BEGAN have 3 channels on one side).
DGRAD_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 32, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 3),
    _cfg(128, 32, 32, 4, 4),
    # narrow K (BLOCK_K = 16, the smallest K of a 16-bit MMA): C_out <= 16, i.e. the
    # decoder's 3-channel to_rgb conv, whose dgrad has K = 9 taps x 3 channels; the last
    # one is also the fallback for 3-channel sources (the encoder's first conv)
    _cfg(128, 128, 16, 8, 3),
    _cfg(128, 64, 16, 8, 3),      # 4 warps: 255 registers, spills in the L1 mode
    _cfg(64, 32, 16, 4, 3),
]
# wgrad: BLOCK_M output channels x BLOCK_N source channels, K step BLOCK_K pixels.
WGRAD_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 3),
    _cfg(64, 32, 64, 4, 3),
    _cfg(64, 16, 64, 4, 3),   # 3-channel sources (the encoder's first conv)
    _cfg(32, 64, 64, 4, 3),   # 3-channel outputs (the decoder's last conv)
]
# The interpreter runs one config (it has nothing to tune and every config costs time):
# long pixel blocks (few loop iterations, the interpreter's cost) and narrow channel
# blocks, so that the tests' 20-40 channel tensors still span several channel tiles.
_INTERP_DGRAD = [_cfg(128, 16, 16, 4, 1)]
_INTERP_WGRAD = [_cfg(16, 16, 128, 4, 1)]


def for_element_size(cfg, itemsize: int):
    """The config as run on ``itemsize``-byte activations: fp32 tiles take half the K
    block, so the pipeline's shared memory stays what the 16-bit config needs."""
    if itemsize < 4 or cfg.kwargs["BLOCK_K"] <= 16:
        return cfg
    return triton.Config(dict(cfg.kwargs, BLOCK_K=cfg.kwargs["BLOCK_K"] // 2),
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _dgrad_fits(cfg, C: int, Co: int) -> bool:
    """The config's channel blocks are not far wider than the tensor's (e.g. BLOCK_N = 128
    for 3 source channels), and its K block is the narrow one (16) exactly when
    C_out <= 16."""
    bk = cfg.kwargs["BLOCK_K"]
    return (cfg.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(C))
            and (bk == 16 if Co <= 16 else bk > 16))


def _wgrad_fits(cfg, C: int, Co: int) -> bool:
    return (cfg.kwargs["BLOCK_M"] <= max(32, triton.next_power_of_2(Co))
            and cfg.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(C)))


def _prune_dgrad(configs, nargs, **kw):
    """Drop the configs that do not fit the channel counts; adapt the rest to the element
    size."""
    keep = [c for c in configs if _dgrad_fits(c, nargs["C"], nargs["Co"])]
    size = nargs["y_ptr"].element_size()  # = dy when there is no ELU; L1 mode: dy_ptr is a target
    return [for_element_size(c, size) for c in cap(keep or configs[-1:])]


def _prune_wgrad(configs, nargs, **kw):
    keep = [cf for cf in configs if _wgrad_fits(cf, nargs["C"], nargs["Co"])]
    size = nargs["src_ptr"].element_size()
    return [for_element_size(cf, size) for cf in cap(keep or configs[-1:])]


# --------------------------------------------------------------------------------------
# shared helper: dy -> dpre (ELU derivative from the saved output, applied on load)
# --------------------------------------------------------------------------------------
@triton.jit
def _load_dpre(dy_ptr, y_ptr, offs, mask, ACT: tl.constexpr, ACC: tl.constexpr):
    """``dpre = dy * elu'(pre)`` at ``offs`` in ACC precision (fp32; fp64 for fp64
    tensors); 0 where ``mask`` is false.

    elu'(pre) = 1 for pre > 0, exp(pre) = y + 1 otherwise, and y > 0 <=> pre > 0.
    """
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(ACC)
    if ACT:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
        dy = tl.where(y > 0.0, dy, dy * (y + 1.0))
    return dy


@triton.jit
def _load_dpre_l1(xr_ptr, xf_ptr, y_ptr, offs, mask, fake, half_numel, g_real, g_fake,
                  ACC: tl.constexpr):
    """L1 mode (the decoder's last conv fused with the BEGAN losses): no dy tensor exists;
    ``dpre = sign(y - x) * g`` where y is the conv output (linear, no ELU) at ``offs``,
    x the L1 target, and g the upstream gradient of the sample's half divided by the
    half's element count (``g_real`` / ``g_fake``, fp32 scalars).

    y holds 2B samples ``[real; fake]``; the targets are two (B, ...) tensors in y's
    memory layout, so a fake row's target offset is ``offs - half_numel``. ``fake``:
    boolean, broadcastable to ``offs`` (sample index >= B). 0 where ``mask`` is false.
    sign(0) = 0, like the derivative torch's autograd gives ``abs`` at 0.
    """
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(xr_ptr + offs, mask=mask & (fake == 0), other=0.0).to(ACC)
    t += tl.load(xf_ptr + (offs - half_numel), mask=mask & fake, other=0.0).to(ACC)
    d = y - t
    sgn = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
    return sgn * tl.where(fake, g_fake, g_real).to(ACC)


# --------------------------------------------------------------------------------------
# 1. dgrad
# --------------------------------------------------------------------------------------
@autotune(_INTERP_DGRAD if INTERPRET else DGRAD_CONFIGS,
          ["C", "Co", "Hs", "Ws", "UPSAMPLE", "STRIDE", "ACT", "L1"],
          prune_configs_by={"early_config_prune": _prune_dgrad})
@triton.jit
def conv3x3_dgrad_kernel(
    dy_ptr, y_ptr, wt_ptr, out_ptr,
    xf_ptr, g_ptr, dxr_ptr, dxf_ptr, n_half, inv_n,   # L1 mode only (else unused)
    Hs, Ws, C,              # source (= output of this kernel): NHWC, C channels
    Ho, Wo, Co,             # dy / y: NHWC, Co channels
    Hb, Wb, M,              # base grid of one phase (M = N * Hb * Wb rows of the GEMM)
    ACT: tl.constexpr, UPSAMPLE: tl.constexpr, STRIDE: tl.constexpr,
    L1: tl.constexpr, WRITE_XR: tl.constexpr, WRITE_XF: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: a [BLOCK_M pixels, BLOCK_N channels] tile of dsrc for one phase.

    Grid (:func:`dgrad_grid`): (cdiv(C, BLOCK_N) * cdiv(M, BLOCK_M), phases); phases = 4
    for stride 2 (the source pixel parity (py, px)), else 1. Rows of the tile are "base" pixels (n, i, j):

    * plain:    source pixel (i, j);          taps 3x3:  dy row i + 1 - kh
    * STRIDE=2: source pixel (2i+py, 2j+px);  taps (1+py) x (1+px): kh = 1 (py = 0) or
                kh in {0, 2} (py = 1), dy row i + (py + 1 - kh) / 2
    * UPSAMPLE: low-res pixel (i, j) of x;    taps 4x4: dy row 2i - 1 + a, weight = sum of
                the 3x3 taps kh in [max(0, 2 - a), min(2, 3 - a)] (same for columns)

    The K loop is one flat loop over (tap, C_out chunk); A = dpre (masked where the dy
    pixel is outside the image: the zero padding), B = wt[tap, co, ci], the weights
    prepared by ``conv3x3_dgrad_weight_kernel`` (this source's channels, activation dtype,
    taps already summed for UPSAMPLE): one contiguous 16-bit tile per step.

    L1 (plain variant only): dpre is made from y and the two L1 targets by
    ``_load_dpre_l1`` (dy_ptr is then the real target x_r, xf_ptr the fake one, g_ptr the
    (2,) upstream gradient of [L_real, L_fake], n_half = B). After the K loop the
    programs of channel tile 0 also write the targets' gradients ``-dpre`` at their own
    pixels (WRITE_XR / WRITE_XF): the fake target is G's output, whose gradient the L1
    term contributes to.
    """
    # axis 0: (pixel tile, channel tile), channel tiles fastest (the programs that share a
    # dy tile run together); axis 1: the phase. Folded so that no axis exceeds CUDA's
    # 65,535 limit on axes 1 and 2 (cdiv(M, BLOCK_M) alone does at batch 128, res 128).
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(C, BLOCK_N)
    pid_m = pid // n_tiles_n
    pid_n = pid - pid_m * n_tiles_n
    phase = tl.program_id(1)
    py = phase // 2
    px = phase % 2

    # ---- rows: base pixels -> (n, i, j), and the source pixel each one writes
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    hw_b = Hb * Wb
    nb = offs_m // hw_b
    rem = offs_m % hw_b
    bi = rem // Wb
    bj = rem % Wb
    if STRIDE == 2:
        oh = 2 * bi + py
        ow = 2 * bj + px
        m_ok = m_ok & (oh < Hs) & (ow < Ws)
    else:
        oh = bi
        ow = bj
    if UPSAMPLE:
        hb = 2 * bi - 1       # dy row of tap a is hb + a
        wb = 2 * bj - 1
    else:
        hb = bi
        wb = bj
    dy_row = nb * (Ho * Wo)   # pixel index of image n's first dy pixel

    # ---- columns: source channels
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C
    offs_k = tl.arange(0, BLOCK_K)

    # ---- taps of this phase
    if UPSAMPLE:
        nth = 4
        ntw = 4
    elif STRIDE == 2:
        nth = 1 + py
        ntw = 1 + px
    else:
        nth = 3
        ntw = 3
    k_chunks = tl.cdiv(Co, BLOCK_K)
    n_iter = nth * ntw * k_chunks
    if L1:
        half_numel = n_half * (Ho * Wo * Co)
        g_real = tl.load(g_ptr).to(tl.float32) * inv_n
        g_fake = tl.load(g_ptr + 1).to(tl.float32) * inv_n
        fake_row = (nb >= n_half)[:, None]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for it in range(0, n_iter):
        tap = it // k_chunks
        c0 = (it % k_chunks) * BLOCK_K
        th = tap // ntw
        tw = tap % ntw
        # dy pixel offset (dh, dw) of this tap, and its row in the prepared weights
        if UPSAMPLE:
            dh = th
            dw = tw
            wtap = tap
        elif STRIDE == 2:
            kh = tl.where(py == 0, 1, 2 * th)
            kw = tl.where(px == 0, 1, 2 * tw)
            dh = (py + 1 - kh) // 2       # >= 0: exact division
            dw = (px + 1 - kw) // 2
            wtap = kh * 3 + kw
        else:
            dh = 1 - th
            dw = 1 - tw
            wtap = tap

        # A tile [BLOCK_M, BLOCK_K]: dpre at dy pixel (hb + dh, wb + dw), channels c0..
        hh = hb + dh
        ww = wb + dw
        row_ok = m_ok & (hh >= 0) & (hh < Ho) & (ww >= 0) & (ww < Wo)
        ck = c0 + offs_k
        k_ok = ck < Co
        a_offs = ((dy_row + hh * Wo + ww) * Co)[:, None] + ck[None, :]
        a_mask = row_ok[:, None] & k_ok[None, :]
        if L1:
            a = _load_dpre_l1(dy_ptr, xf_ptr, y_ptr, a_offs, a_mask, fake_row, half_numel,
                              g_real, g_fake, ACC).to(y_ptr.dtype.element_ty)
        else:
            a = _load_dpre(dy_ptr, y_ptr, a_offs, a_mask, ACT, ACC).to(dy_ptr.dtype.element_ty)

        # B tile [BLOCK_K, BLOCK_N]: wt[wtap, co, ci]
        b_offs = ((wtap * Co + ck) * C)[:, None] + offs_n[None, :]
        b = tl.load(wt_ptr + b_offs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)

        # out_dtype: the accumulator's (fp64 in gradcheck; Triton 3.6 assumes fp32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=ACC)

    # ---- epilogue: store the tile (NHWC, source dtype)
    o_offs = (((nb * Hs + oh) * Ws + ow) * C)[:, None] + offs_n[None, :]
    tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])

    # ---- L1 mode: the targets' gradients -dpre at this tile's pixels (plain variant:
    # source pixel = output pixel), written once, by channel tile 0
    if WRITE_XR or WRITE_XF:
        if pid_n == 0:
            for c0 in range(0, Co, BLOCK_K):
                ck = c0 + offs_k
                t_offs = (((nb * Ho + oh) * Wo + ow) * Co)[:, None] + ck[None, :]
                t_mask = m_ok[:, None] & (ck < Co)[None, :]
                g = -_load_dpre_l1(dy_ptr, xf_ptr, y_ptr, t_offs, t_mask, fake_row, half_numel,
                                   g_real, g_fake, ACC)
                if WRITE_XR:
                    tl.store(dxr_ptr + t_offs, g.to(dxr_ptr.dtype.element_ty),
                             mask=t_mask & (fake_row == 0))
                if WRITE_XF:
                    tl.store(dxf_ptr + (t_offs - half_numel), g.to(dxf_ptr.dtype.element_ty),
                             mask=t_mask & fake_row)


@triton.jit
def conv3x3_dgrad_weight_kernel(
    w_ptr, wt_ptr, Co, C, c_off, sw_o, sw_i, sw_h, sw_w,
    UPSAMPLE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Weights of one source for ``conv3x3_dgrad_kernel``: ``wt[t, co, ci]`` in the activation dtype.

    One program: BLOCK consecutive elements of wt, numbered (t, co, ci).
    * plain / stride 2: t = kh * 3 + kw, wt = W[co, c_off + ci, kh, kw];
    * UPSAMPLE: t = a * 4 + b (the 4x4 sub-pixel taps), wt = the ACC-precision sum of
      W[co, c_off + ci, kh, kw] over kh in [max(0, 2 - a), min(2, 3 - a)] and kw likewise.
    A weight-sized pass (Co * C * 9 or 16 elements) per backward: it casts fp32 master
    weights to 16 bits once instead of in every dgrad tile, and leaves the dgrad loop one
    contiguous 16-bit weight load per step.
    """
    pid = tl.program_id(0)
    n_tap = 16 if UPSAMPLE else 9
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_tap * Co * C
    t = offs // (Co * C)
    rem = offs % (Co * C)
    co = rem // C
    ci = rem % C
    base = w_ptr + co * sw_o + (c_off + ci) * sw_i
    if UPSAMPLE:
        ta = t // 4
        tb = t % 4
        kh0 = tl.maximum(2 - ta, 0)
        kh1 = tl.minimum(3 - ta, 2)
        kw0 = tl.maximum(2 - tb, 0)
        kw1 = tl.minimum(3 - tb, 2)
        two_h = kh1 != kh0
        two_w = kw1 != kw0
        v = tl.load(base + kh0 * sw_h + kw0 * sw_w, mask=mask, other=0.0).to(ACC)
        v += tl.load(base + kh0 * sw_h + kw1 * sw_w, mask=mask & two_w, other=0.0).to(ACC)
        v += tl.load(base + kh1 * sw_h + kw0 * sw_w, mask=mask & two_h, other=0.0).to(ACC)
        v += tl.load(base + kh1 * sw_h + kw1 * sw_w, mask=mask & two_h & two_w,
                     other=0.0).to(ACC)
    else:
        v = tl.load(base + (t // 3) * sw_h + (t % 3) * sw_w, mask=mask, other=0.0)
    tl.store(wt_ptr + offs, v.to(wt_ptr.dtype.element_ty), mask=mask)


_PREP_BLOCK = 1024


# --------------------------------------------------------------------------------------
# 2. wgrad (split-K partials) + bias
# --------------------------------------------------------------------------------------
@autotune(_INTERP_WGRAD if INTERPRET else WGRAD_CONFIGS,
          ["C", "Co", "Ho", "Wo", "SUBPIXEL", "STRIDE", "ACT", "HAS_SCALE", "L1"],
          prune_configs_by={"early_config_prune": _prune_wgrad})
@triton.jit
def conv3x3_wgrad_kernel(
    dy_ptr, y_ptr, src_ptr, scale_ptr, part_ptr, bpart_ptr,
    xf_ptr, g_ptr, n_half, inv_n,   # L1 mode only (else unused)
    Hs, Ws, C,              # source (x or skip): NHWC, C channels
    Ho, Wo, Co,             # dy / y
    Hb, Wb, K,              # base grid: K = N * Hb * Wb pixels (the GEMM's K)
    K_PER_SPLIT,            # pixels per split (grid axis 2)
    T,                      # taps: 9, or 16 (phase, tap) combinations with SUBPIXEL
    ACT: tl.constexpr, SUBPIXEL: tl.constexpr, STRIDE: tl.constexpr,
    HAS_SCALE: tl.constexpr, DO_BIAS: tl.constexpr, L1: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program: partial dW[co tile, tap t, ci tile] over one K chunk of pixels.

    Grid: (cdiv(Co, BLOCK_M), T * cdiv(C, BLOCK_N), S). Output:
    ``part[s, co, t, ci] = sum_{pixels of chunk s} scale[n] * dpre[pix, co] * src(pix, t)[ci]``

    * plain / STRIDE: base pixel = dy pixel (ho, wo); tap t = (kh, kw) reads the source at
      (ho * STRIDE - 1 + kh, wo * STRIDE - 1 + kw) (zero outside: the conv padding).
    * SUBPIXEL (upsampled x): base pixel = low-res pixel (i, j); t = (p, q, a, b) reads
      dy at (2i + p, 2j + q) and x at (i + p + a - 1, j + q + b - 1).

    Bias: ``bpart[s, phase, co] = sum scale[n] * dpre`` is written by the programs of
    ci tile 0 and tap 0 (SUBPIXEL: the a = b = 0 tap of each of the 4 phases).

    L1: dpre comes from y and the L1 targets (``_load_dpre_l1``; dy_ptr = real target),
    as in ``conv3x3_dgrad_kernel``; plain variant only.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_ci = tl.cdiv(C, BLOCK_N)
    t = pid_n // n_ci
    pid_c = pid_n % n_ci
    if SUBPIXEL:
        p = t // 8
        q = (t // 4) % 2
        ta = (t // 2) % 2
        tb = t % 2
        sh = p + ta - 1       # source offset from the low-res pixel
        sw = q + tb - 1
        bias_prog = (pid_c == 0) & (ta == 0) & (tb == 0)
        bias_slot = p * 2 + q
    else:
        kh = t // 3
        kw = t % 3
        sh = kh - 1
        sw = kw - 1
        p = 0
        q = 0
        bias_prog = (pid_c == 0) & (t == 0)
        bias_slot = 0

    offs_co = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co_ok = offs_co < Co
    offs_ci = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = offs_ci < C

    k_lo = pid_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    hw_b = Hb * Wb

    if L1:
        half_numel = n_half * (Ho * Wo * Co)
        g_real = tl.load(g_ptr).to(tl.float32) * inv_n
        g_fake = tl.load(g_ptr + 1).to(tl.float32) * inv_n

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    bacc = tl.zeros((BLOCK_M,), dtype=ACC)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        pix = k0 + tl.arange(0, BLOCK_K)
        p_ok = pix < k_hi
        nb = pix // hw_b
        rem = pix % hw_b
        bi = rem // Wb
        bj = rem % Wb
        if SUBPIXEL:
            oh = 2 * bi + p
            ow = 2 * bj + q
            ih = bi + sh
            iw = bj + sw
        else:
            oh = bi
            ow = bj
            ih = bi * STRIDE + sh
            iw = bj * STRIDE + sw

        # A tile [BLOCK_M co, BLOCK_K pixels] = (scale * dpre)^T
        a_offs = (((nb * Ho + oh) * Wo + ow) * Co)[None, :] + offs_co[:, None]
        a_mask = co_ok[:, None] & p_ok[None, :]
        if L1:
            a = _load_dpre_l1(dy_ptr, xf_ptr, y_ptr, a_offs, a_mask, (nb >= n_half)[None, :],
                              half_numel, g_real, g_fake, ACC)
        else:
            a = _load_dpre(dy_ptr, y_ptr, a_offs, a_mask, ACT, ACC)
        if HAS_SCALE:
            s = tl.load(scale_ptr + nb, mask=p_ok, other=0.0).to(ACC)
            a = a * s[None, :]
        if DO_BIAS:
            bacc += tl.sum(a, axis=1)

        # B tile [BLOCK_K pixels, BLOCK_N ci] = source at the tap's pixel, 0 in the padding
        in_ok = p_ok & (ih >= 0) & (ih < Hs) & (iw >= 0) & (iw < Ws)
        b_offs = (((nb * Hs + ih) * Ws + iw) * C)[:, None] + offs_ci[None, :]
        b = tl.load(src_ptr + b_offs, mask=in_ok[:, None] & ci_ok[None, :], other=0.0)

        acc = tl.dot(a.to(src_ptr.dtype.element_ty), b.to(src_ptr.dtype.element_ty), acc,
                     input_precision=DOT_PRECISION, out_dtype=ACC)

    # partial tile -> part[s, co, t, ci] (fp32; fp64 for fp64 tensors)
    p_offs = (((pid_s * Co + offs_co) * T + t) * C)[:, None] + offs_ci[None, :]
    tl.store(part_ptr + p_offs, acc, mask=co_ok[:, None] & ci_ok[None, :])
    if DO_BIAS:
        if bias_prog:  # bias partials per split: 4 phases (SUBPIXEL) or 1
            tl.store(bpart_ptr + (pid_s * (3 * SUBPIXEL + 1) + bias_slot) * Co + offs_co, bacc,
                     mask=co_ok)


# --------------------------------------------------------------------------------------
# 3. split-K reduction -> dW (weight layout and dtype), db
# --------------------------------------------------------------------------------------
@triton.jit
def conv3x3_wgrad_reduce_kernel(
    part_ptr, bpart_ptr, dw_ptr, db_ptr,
    S, Co, C, T, c_off,
    sw_o, sw_i, sw_h, sw_w,
    SUBPIXEL: tl.constexpr, DO_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: BLOCK elements of dW[:, c_off:c_off + C] (or of db).

    Elements are numbered in (co, kh, kw, ci) order, the memory order of a channels_last
    weight, so those writes are contiguous. dW[co, ci, kh, kw] = sum over splits s of
    part[s, co, t, ci], t = kh * 3 + kw; with SUBPIXEL the sum runs over the 4 (phase, tap)
    combinations that contain 3x3 tap (kh, kw): along rows, phase p = 0 with a = min(kh, 1)
    and phase p = 1 with a = kh // 2 (likewise columns). Programs past the weight
    elements reduce the bias partials bpart[s, phase, co].
    """
    pid = tl.program_id(0)
    n_w = Co * 9 * C
    n_w_blocks = tl.cdiv(n_w, BLOCK)
    if pid < n_w_blocks:
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_w
        co = offs // (9 * C)
        rem = offs % (9 * C)
        tap = rem // C
        ci = rem % C
        kh = tap // 3
        kw = tap % 3
        acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
        for s in range(0, S):
            base = part_ptr + (s * Co + co) * T * C + ci
            if SUBPIXEL:
                for pq in tl.static_range(4):
                    pp = pq // 2
                    qq = pq % 2
                    if pp == 0:
                        a = tl.minimum(kh, 1)
                    else:
                        a = kh // 2
                    if qq == 0:
                        b = tl.minimum(kw, 1)
                    else:
                        b = kw // 2
                    t = ((pp * 2 + qq) * 2 + a) * 2 + b
                    acc += tl.load(base + t * C, mask=mask, other=0.0)
            else:
                acc += tl.load(base + tap * C, mask=mask, other=0.0)
        w_offs = co * sw_o + (c_off + ci) * sw_i + kh * sw_h + kw * sw_w
        tl.store(dw_ptr + w_offs, acc.to(dw_ptr.dtype.element_ty), mask=mask)
    else:
        if DO_BIAS:
            # bias partials per split: 4 phases (SUBPIXEL) or 1; a constexpr expression
            offs = (pid - n_w_blocks) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < Co
            acc = tl.zeros((BLOCK,), dtype=part_ptr.dtype.element_ty)
            for s in range(0, S):
                for ph in tl.static_range(3 * SUBPIXEL + 1):
                    acc += tl.load(bpart_ptr + (s * (3 * SUBPIXEL + 1) + ph) * Co + offs,
                                   mask=mask, other=0.0)
            tl.store(db_ptr + offs, acc.to(db_ptr.dtype.element_ty), mask=mask)


_REDUCE_BLOCK = 1024


# --------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------
def dgrad_grid(C: int, M: int, phases: int):
    """Launch grid of ``conv3x3_dgrad_kernel``: (pixel x channel tiles, phases)."""
    def grid(meta):
        return check_grid((triton.cdiv(C, meta["BLOCK_N"]) * triton.cdiv(M, meta["BLOCK_M"]),
                           phases, 1), "conv3x3_dgrad")
    return grid


def wgrad_grid(Co: int, C: int, T: int, S: int):
    """Launch grid of ``conv3x3_wgrad_kernel``: (C_out tiles, taps x C tiles, splits); S is
    at most :data:`MAX_SPLIT` (see :func:`_wgrad_split`), T * C tiles at most 16 * C / 16."""
    def grid(meta):
        return check_grid((triton.cdiv(Co, meta["BLOCK_M"]), T * triton.cdiv(C, meta["BLOCK_N"]),
                           S), "conv3x3_wgrad")
    return grid


MAX_SPLIT = 1024


def conv_input_size(x, upsample: bool):
    """(H', W') of the conv input: x's size, doubled with ``upsample``."""
    f = 2 if upsample else 1
    return x.shape[2] * f, x.shape[3] * f


def conv3x3_dgrad(dy, y, weight, src, c_off: int = 0, upsample: bool = False,
                      stride: int = 1):
    """Gradient w.r.t. one input source of ``conv3x3_elu``.

    dy: (N, Co, Ho, Wo) upstream gradient; y: the forward output (same shape) when the op
    had the ELU, else None. weight: (Co, Ci_total, 3, 3). src: the source tensor (x, or
    the skip tensor; only its shape, dtype and device are used), (N, C, Hs, Ws), whose
    channels are weight input channels ``c_off .. c_off + C``. ``upsample``: the source
    was nearest-upsampled 2x before the conv (x only). Returns dsrc, shaped and typed like
    src, channels_last.
    """
    N, C, Hs, Ws = src.shape
    _, Co, Ho, Wo = dy.shape
    if stride not in (1, 2) or (upsample and stride != 1):
        raise ValueError("conv3x3_dgrad: stride 1 or 2, and no upsample with stride 2")
    dy = nhwc(dy)
    y = nhwc(y) if y is not None else dy
    check_int32("conv3x3_dgrad", dy, src)
    out = torch.empty((N, C, Hs, Ws), device=dy.device, dtype=src.dtype,
                      memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    if dy.numel() == 0:
        return out.zero_()
    if stride == 2:
        Hb, Wb, phases = triton.cdiv(Hs, 2), triton.cdiv(Ws, 2), 4
    else:
        Hb, Wb, phases = Hs, Ws, 1
    M = N * Hb * Wb
    sw = weight.stride()
    n_tap = 16 if upsample else 9
    wt = torch.empty((n_tap, Co, C), device=dy.device, dtype=dy.dtype)
    conv3x3_dgrad_weight_kernel[(triton.cdiv(wt.numel(), _PREP_BLOCK),)](
        weight, wt, Co, C, c_off, sw[0], sw[1], sw[2], sw[3],
        UPSAMPLE=upsample, ACC=acc_dtype(dy.dtype), BLOCK=_PREP_BLOCK,
    )

    conv3x3_dgrad_kernel[dgrad_grid(C, M, phases)](
        dy, y, wt, out, *_L1_UNUSED_DGRAD(dy),
        Hs, Ws, C, Ho, Wo, Co, Hb, Wb, M,
        ACT=y is not dy, UPSAMPLE=upsample, STRIDE=stride, L1=False, WRITE_XR=False,
        WRITE_XF=False, DOT_PRECISION=dot_precision(dy.dtype), ACC=acc_dtype(dy.dtype),
    )
    return out


def _L1_UNUSED_DGRAD(t):
    """Placeholders for the L1-mode arguments of ``conv3x3_dgrad_kernel`` (L1=False)."""
    return t, t, t, t, 0, 0.0


def _L1_UNUSED_WGRAD(t):
    return t, t, 0, 0.0


def _check_l1(h, weight, x_real, x_fake, y, grad):
    """Shapes of the L1 mode: y (2B, Co, H, W) = conv(h), targets (B, Co, H, W)."""
    b2, co, ho, wo = y.shape
    if h.shape[0] != b2 or tuple(h.shape[2:]) != (ho, wo) or weight.shape[0] != co:
        raise ValueError(f"conv3x3_l1: h {tuple(h.shape)}, weight {tuple(weight.shape)} and "
                         f"y {tuple(y.shape)} do not fit a stride-1 conv")
    if b2 % 2 or tuple(x_real.shape) != (b2 // 2, co, ho, wo) or x_fake.shape != x_real.shape:
        raise ValueError(f"conv3x3_l1: x_real {tuple(x_real.shape)} and x_fake "
                         f"{tuple(x_fake.shape)} must both be half of y {tuple(y.shape)}")
    if grad.numel() != 2:
        raise ValueError(f"conv3x3_l1: the loss gradient must have 2 elements, got {grad.numel()}")


def conv3x3_l1_dgrad(h, weight, x_real, x_fake, y, grad, need_x_real: bool = False,
                     need_x_fake: bool = True):
    """Backward of ``losses = [mean|x_real - y[:B]|, mean|x_fake - y[B:]|]`` with
    ``y = conv3x3(h, weight) + b`` (stride 1, no activation: the decoder's last conv)
    w.r.t. h and the targets, in one launch (plus the weight-layout pass).

    grad: (2,) upstream gradient of the losses. The L1 gradient ``sign(y - x) * grad /
    numel`` is formed while loading (L1 mode), never written. Returns ``(dh, dx_real,
    dx_fake)``; a target gradient not asked for is None. All channels_last, each in its
    tensor's dtype.
    """
    _check_l1(h, weight, x_real, x_fake, y, grad)
    N, C, Hs, Ws = h.shape
    Co, Ho, Wo = y.shape[1], y.shape[2], y.shape[3]
    y = nhwc(y)
    xr, xf = nhwc(x_real), nhwc(x_fake)
    g = grad.reshape(2).to(torch.float32).contiguous()
    check_int32("conv3x3_l1_dgrad", y, h)
    out = torch.empty((N, C, Hs, Ws), device=y.device, dtype=h.dtype,
                      memory_format=torch.channels_last)
    dxr = torch.empty_like(xr) if need_x_real else None
    dxf = torch.empty_like(xf) if need_x_fake else None
    if out.numel() == 0:
        return out, dxr, dxf
    wt = torch.empty((9, Co, C), device=y.device, dtype=y.dtype)
    sw = weight.stride()
    conv3x3_dgrad_weight_kernel[(triton.cdiv(wt.numel(), _PREP_BLOCK),)](
        weight, wt, Co, C, 0, sw[0], sw[1], sw[2], sw[3],
        UPSAMPLE=False, ACC=acc_dtype(y.dtype), BLOCK=_PREP_BLOCK,
    )
    M = N * Hs * Ws

    conv3x3_dgrad_kernel[dgrad_grid(C, M, 1)](
        xr, y, wt, out, xf, g, dxr if need_x_real else y, dxf if need_x_fake else y,
        N // 2, 1.0 / xr.numel(),
        Hs, Ws, C, Ho, Wo, Co, Hs, Ws, M,
        ACT=False, UPSAMPLE=False, STRIDE=1, L1=True, WRITE_XR=need_x_real,
        WRITE_XF=need_x_fake, DOT_PRECISION=dot_precision(y.dtype), ACC=acc_dtype(y.dtype),
    )
    return out, dxr, dxf


def _wgrad_split(K: int, tiles: int, device, split_k):
    """(S, K_PER_SPLIT): enough programs to fill the GPU ~4x, >= 512 pixels per split."""
    if split_k is None:
        target = 4 * num_sms(device)
        split_k = min(triton.cdiv(target, max(tiles, 1)), max(1, K // 512))
    split_k = max(1, min(int(split_k), K, MAX_SPLIT))
    kps = triton.cdiv(K, split_k)
    return triton.cdiv(K, kps), kps


def conv3x3_l1_wgrad(h, weight, x_real, x_fake, y, grad, scale=None, need_bias: bool = True,
                     split_k: int | None = None):
    """``(dW, db)`` of the L1 losses of :func:`conv3x3_l1_dgrad`, the L1 gradient formed
    while loading (L1 mode); ``scale``: optional (2B,) per-sample factor, as in
    :func:`conv3x3_wgrad`."""
    _check_l1(h, weight, x_real, x_fake, y, grad)
    g = grad.reshape(2).to(torch.float32).contiguous()
    l1 = (nhwc(x_real), nhwc(x_fake), g, y.shape[0] // 2, 1.0 / x_real.numel())
    return conv3x3_wgrad(y, None, h, None, weight, scale, need_bias=need_bias,
                             split_k=split_k, _l1=l1)


def conv3x3_wgrad(dy, y, x, skip, weight, scale=None, upsample: bool = False,
                      stride: int = 1, need_bias: bool = True, split_k: int | None = None,
                      _l1=None):
    """Weight and bias gradients of ``conv3x3_elu``: ``(dW, db)``.

    dy, y: as in :func:`conv3x3_dgrad`. x, skip: the forward's inputs (skip may be
    None). weight: the forward weight (dW comes back in its dtype and strides, so a
    channels_last weight gets a channels_last gradient). scale: optional (N,) per-sample
    factor on sample n's contribution. db (weight's dtype; None unless ``need_bias``): the bias
    gradient, in the same pass. ``split_k`` overrides the split-K heuristic (tests).
    ``_l1`` (x_real, x_fake, grad, B, 1/numel): L1 mode, where ``dy`` is the forward
    output y (see :func:`conv3x3_l1_wgrad`).
    """
    N = dy.shape[0]
    Co, Ci = weight.shape[0], weight.shape[1]
    Ho, Wo = dy.shape[2], dy.shape[3]
    dy = nhwc(dy)
    act = y is not None
    y = nhwc(y) if act else dy
    check_int32("conv3x3_wgrad", dy, x, skip)
    dw = torch.empty_like(weight)  # same strides when dense (channels_last stays so)
    db = torch.empty((Co,), device=dy.device, dtype=weight.dtype) if need_bias else None
    if scale is not None:
        scale = scale.reshape(-1).contiguous()
        if scale.numel() != N:
            raise ValueError(f"wgrad_scale must have N={N} elements, got {scale.numel()}")
    if dy.numel() == 0:
        dw.zero_()
        if db is not None:
            db.zero_()
        return dw, db

    sources = [(x, 0, upsample)]
    if skip is not None:
        sources.append((skip, x.shape[1], False))
    sw = dw.stride()
    for si, (src, c_off, subpix) in enumerate(sources):
        src = nhwc(src)
        C, Hs, Ws = src.shape[1], src.shape[2], src.shape[3]
        if subpix:
            Hb, Wb, T, nph = Hs, Ws, 16, 4
        else:
            Hb, Wb, T, nph = Ho, Wo, 9, 1
        K = N * Hb * Wb
        do_bias = need_bias and si == 0
        tiles = triton.cdiv(Co, 128) * T * triton.cdiv(C, 128)
        S, kps = _wgrad_split(K, tiles, dy.device, split_k)
        pdt = torch.float64 if src.dtype == torch.float64 else torch.float32
        part = torch.empty((S, Co, T, C), device=dy.device, dtype=pdt)
        bpart = torch.empty((S, nph, Co), device=dy.device, dtype=pdt) \
            if do_bias else part

        if _l1 is None:
            a_ptr, l1_args = dy, _L1_UNUSED_WGRAD(dy)
        else:  # the kernel reads the real target where it would read dy, and y as y
            a_ptr, y, l1_args = _l1[0], dy, _l1[1:]
        conv3x3_wgrad_kernel[wgrad_grid(Co, C, T, S)](
            a_ptr, y, src, scale if scale is not None else dy, part, bpart, *l1_args,
            Hs, Ws, C, Ho, Wo, Co, Hb, Wb, K, kps, T,
            ACT=act, SUBPIXEL=subpix, STRIDE=stride, HAS_SCALE=scale is not None,
            DO_BIAS=do_bias, L1=_l1 is not None, DOT_PRECISION=dot_precision(src.dtype),
            ACC=acc_dtype(src.dtype),
        )
        n_blocks = triton.cdiv(Co * 9 * C, _REDUCE_BLOCK) + \
            (triton.cdiv(Co, _REDUCE_BLOCK) if do_bias else 0)
        conv3x3_wgrad_reduce_kernel[(n_blocks,)](
            part, bpart, dw, db if do_bias else dw,
            S, Co, C, T, c_off, sw[0], sw[1], sw[2], sw[3],
            SUBPIXEL=subpix, DO_BIAS=do_bias, BLOCK=_REDUCE_BLOCK,
        )
    return dw, db


# --------------------------------------------------------------------------------------
# ahead-of-time specs (tests/test_sm90_compile_bwd.py, fastbegan.kernels.aot)
# --------------------------------------------------------------------------------------
# variant -> (UPSAMPLE / SUBPIXEL, STRIDE); all with ELU (its loads are the larger case)
# and, for wgrad, a per-sample scale and the bias reduction.
# "l1": the decoder's last conv fused with the L1 losses (3 output channels; dgrad writes
# the fake target's gradient), with the configs the autotuner keeps for 3 channels.
AOT_VARIANTS = {"plain": (False, 1), "upsample": (True, 1), "stride2": (False, 2),
                "l1": (False, 1)}


def aot_dgrad_configs(l1: bool) -> list:
    """The dgrad configs the autotuner can keep for a variant: the L1 mode runs on the
    3-channel last conv only (the narrow-K configs); the ELU variants at C_out >= 64 (the
    wide ones) plus the fallback config of 3-channel sources (the encoder's first conv)."""
    if l1:
        return [c for c in DGRAD_CONFIGS if _dgrad_fits(c, 128, 3)]
    return [c for c in DGRAD_CONFIGS if _dgrad_fits(c, 128, 128)] + DGRAD_CONFIGS[-1:]


def aot_specs(act_dtype: str = "bf16", variants=None, helpers: bool = True):
    """Every shipped GPU config of the backward kernels, per variant, as compile specs for
    :func:`fastbegan.kernels.aot.compile_for_sm90` (dicts with ``kernel, variant, config,
    fn, signature, constexprs, num_warps, num_stages, divisible_by_16``).

    ``act_dtype``: Triton name of the activations' dtype (bf16, fp16, fp32); configs are
    adapted to it exactly as the autotuner's prune step does (``for_element_size``).
    Pointers and channel counts are marked 16-divisible (the launcher's specialisation at
    real channel counts, 64+); spatial sizes are not.
    """
    act = f"*{act_dtype}"
    size = {"bf16": 2, "fp16": 2, "fp32": 4}[act_dtype]
    prec = "tf32"
    suffix = "" if act_dtype == "bf16" else f"/{act_dtype}"
    specs = []

    def cfg_dict(cfg):
        return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    l1_sig = {"xf_ptr": act, "g_ptr": "*fp32", "n_half": "i32", "inv_n": "fp32"}
    dsig = {"dy_ptr": act, "y_ptr": act, "wt_ptr": act, "out_ptr": act,
            "xf_ptr": act, "g_ptr": "*fp32", "dxr_ptr": act, "dxf_ptr": act,
            "n_half": "i32", "inv_n": "fp32",
            **{k: "i32" for k in ("Hs", "Ws", "C", "Ho", "Wo", "Co", "Hb", "Wb", "M")}}
    wsig = {"dy_ptr": act, "y_ptr": act, "src_ptr": act, "scale_ptr": "*fp32",
            "part_ptr": "*fp32", "bpart_ptr": "*fp32", **l1_sig,
            **{k: "i32" for k in ("Hs", "Ws", "C", "Ho", "Wo", "Co", "Hb", "Wb", "K",
                                  "K_PER_SPLIT", "T")}}
    dplain = dict(L1=False, WRITE_XR=False, WRITE_XF=False)
    for vname, (up, stride) in AOT_VARIANTS.items():
        if variants is not None and vname not in variants:
            continue
        l1 = vname == "l1"
        # L1 mode: dy_ptr is the real target, fp32 in the training step (the exact
        # uint8 -> [-1, 1] batch); Co = 3 is not 16-divisible
        ds, ws = (dict(dsig, dy_ptr="*fp32"), dict(wsig, dy_ptr="*fp32")) if l1 else (dsig, wsig)
        co16 = [] if l1 else ["Co"]
        for cfg in aot_dgrad_configs(l1):
            cfg = for_element_size(cfg, size)
            specs.append(dict(
                kernel="conv3x3_dgrad", variant=vname + suffix, config=cfg_dict(cfg),
                fn=conv3x3_dgrad_kernel, signature=ds,
                constexprs=dict(cfg.kwargs, ACT=not l1, UPSAMPLE=up, STRIDE=stride,
                                DOT_PRECISION=prec, ACC=tl.float32,
                                **(dict(L1=True, WRITE_XR=False, WRITE_XF=True) if l1 else dplain)),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                divisible_by_16=["dy_ptr", "y_ptr", "wt_ptr", "out_ptr", "C", *co16]))
        for cfg in WGRAD_CONFIGS:
            if l1 and not _wgrad_fits(cfg, 128, 3):
                continue
            cfg = for_element_size(cfg, size)
            specs.append(dict(
                kernel="conv3x3_wgrad", variant=("subpixel" if up else vname) + suffix,
                config=cfg_dict(cfg), fn=conv3x3_wgrad_kernel, signature=ws,
                constexprs=dict(cfg.kwargs, ACT=not l1, SUBPIXEL=up, STRIDE=stride,
                                HAS_SCALE=True, DO_BIAS=True, L1=l1, DOT_PRECISION=prec,
                                ACC=tl.float32),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                divisible_by_16=["dy_ptr", "y_ptr", "src_ptr", "part_ptr", "bpart_ptr",
                                 "C", *co16]))
    if helpers:
        for up in (False, True):
            specs.append(dict(
                kernel="conv3x3_dgrad_weight", variant="upsample" if up else "plain",
                config=dict(BLOCK=_PREP_BLOCK, num_warps=4, num_stages=1),
                fn=conv3x3_dgrad_weight_kernel,
                signature={"w_ptr": "*fp32", "wt_ptr": act,
                           **{k: "i32" for k in ("Co", "C", "c_off", "sw_o", "sw_h", "sw_w")}},
                constexprs=dict(UPSAMPLE=up, ACC=tl.float32, BLOCK=_PREP_BLOCK, sw_i=1),
                num_warps=4, num_stages=1,
                divisible_by_16=["w_ptr", "wt_ptr", "Co", "C", "c_off", "sw_o", "sw_h", "sw_w"]))
            specs.append(dict(
                kernel="conv3x3_wgrad_reduce", variant="subpixel" if up else "plain",
                config=dict(BLOCK=_REDUCE_BLOCK, num_warps=4, num_stages=3),
                fn=conv3x3_wgrad_reduce_kernel,
                signature={"part_ptr": "*fp32", "bpart_ptr": "*fp32", "dw_ptr": "*fp32",
                           "db_ptr": "*fp32",
                           **{k: "i32" for k in ("S", "Co", "C", "T", "c_off", "sw_o",
                                                 "sw_h", "sw_w")}},
                constexprs=dict(SUBPIXEL=up, DO_BIAS=True, BLOCK=_REDUCE_BLOCK, sw_i=1),
                num_warps=4, num_stages=3,
                divisible_by_16=["part_ptr", "bpart_ptr", "dw_ptr", "db_ptr", "Co", "C",
                                 "sw_o", "sw_h", "sw_w"]))
    return specs


def aot_specs_fp32():
    """fp32 activations (TF32 dots, half the K block): the plain and upsample variants."""
    return aot_specs("fp32", variants=("plain", "upsample"), helpers=False)


__all__ = ["conv3x3_dgrad", "conv3x3_wgrad", "conv3x3_l1_dgrad", "conv3x3_l1_wgrad",
           "dgrad_grid", "wgrad_grid", "DGRAD_CONFIGS", "WGRAD_CONFIGS", "aot_dgrad_configs",
           "aot_specs", "aot_specs_fp32", "for_element_size"]
