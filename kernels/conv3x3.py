"""Forward Triton kernels of the fused ``[upsample 2x] -> [concat skip] -> conv3x3 -> +bias -> [ELU]``.

Layouts (see docs/design.md §3.1):

- activations are logical NCHW tensors in channels_last memory, i.e. NHWC: element
  ``(n, c, h, w)`` lives at ``n*sN + h*sH + w*sW + c`` (channel stride 1);
- the weight is logical ``(C_out, C_tot, 3, 3)`` in channels_last memory, i.e. a row-major
  ``(C_out, 9*C_tot)`` matrix whose K index is ``(kh*3 + kw)*C_tot + c``
  (``C_tot = C_x + C_skip``). Weights may be fp32 while activations are bf16/fp16: weight
  tiles are cast to the activation dtype when they are loaded.

The convolution is an implicit GEMM: ``M = N*H_out*W_out`` output pixels, ``N = C_out``,
``K = 9*C_tot``; the A operand (im2col of the input) is never materialised, each K step
gathers it straight from the NHWC input. Accumulation is fp32; the epilogue adds the bias,
applies ELU (alpha 1) unless ``ACTIVATION=False``, casts to the activation dtype and stores.

Two kernels compute the same thing:

``conv3x3_fwd_ptr_kernel``
    Plain pointer arithmetic; correct for every shape, layout and Triton version (odd
    channel counts such as the 3-channel first layer, any H/W). One flat K loop over
    ``9 * cdiv(C, BLOCK_K)`` steps (taps outer, channel blocks inner), so the index math per
    step is a few scalar ops plus one add per row.

``conv3x3_fwd_tma_kernel``
    Hopper-shaped (docs/design.md §3.1): the input is read through device-side tensor descriptors
    (TMA on sm_90) whose box is a spatial tile ``[BB, BH, BW, BLOCK_K]`` of ``BLOCK_M = BB*BH*BW``
    output pixels (several whole images per box for 8x8 layers); each of the 9 taps loads
    the same box shifted by ``(kh-1, kw-1)`` inside one flat K loop. TMA fills
    out-of-bounds rows and columns with zeros, so the conv's zero padding costs nothing.
    ``STRIDE=2`` and a high-resolution skip read a "phase view" of the input (see
    ``_phase_view``) so that each tap is still one rectangular box. ``UPSAMPLE`` tiles the
    low-res grid, one output phase (py, px) per program; by default (``SUBPIXEL``) it runs
    the sub-pixel decomposition: a 2x2 conv of the low-res input with summed weights,
    4 taps instead of 9 on x's channels. Needs 16-byte aligned rows (channel counts that
    are multiples of 8 in bf16); the launcher falls back to the pointer kernel otherwise.

Public API:
    :func:`conv3x3_fwd` (launcher), :func:`upsample_nearest2x_fwd`, :func:`tma_eligible`
    and :func:`resolve_kernel` (which kernel "auto" picks), :func:`weight_matrix` (the
    (C_out, 9*C_tot) view) and :func:`kernel_weight` (it, in the compute dtype),
    :func:`subpixel_weight`; the grid functions :func:`ptr_grid`, :func:`tma_grid`,
    :func:`upsample_grid`; the jitted kernels ``conv3x3_fwd_ptr_kernel``,
    ``conv3x3_fwd_tma_kernel``, ``upsample_nearest2x_kernel``, ``subpixel_weight_kernel``;
    the shipped configs ``PTR_CONFIGS_GPU`` / ``TMA_CONFIGS_GPU`` (``PTR_CONFIGS`` /
    ``TMA_CONFIGS``: those in use, one small config under the interpreter); and
    :func:`aot_specs` / ``AOT_VARIANTS`` for the sm_90 resource check (kernels/aot.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import interpreting
from .common import autotune, cap, check_grid, check_int32, dot_precision, nhwc

INTERPRET = interpreting()
# "auto" (descriptor kernel where eligible, else pointer kernel), "ptr" or "tma": lets a GPU
# run force one kernel (e.g. FASTBEGAN_CONV_KERNEL=ptr) without touching code.
DEFAULT_KERNEL = os.environ.get("FASTBEGAN_CONV_KERNEL", "auto")
HAS_TENSOR_DESCRIPTOR = hasattr(tl, "make_tensor_descriptor")

_TL_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


# ----------------------------------------------------------------------------------------
# Autotune configs, keyed on (C_x, C_s, C_out, H_out, W_out, variant flags) plus the dtypes
# of all tensor arguments (Triton's autotuner appends those by itself). BLOCK_M = 128
# output pixels = two 64-row wgmma warpgroups with 8 warps; BLOCK_N 64/128; BLOCK_K 32/64;
# 2-4 stages. Narrow configs (BLOCK_N = 16, the smallest wgmma N that a 16-bit dot tiles
# well) serve C_out <= 16, i.e. the decoder's 3-channel to_rgb conv: BLOCK_N = 64 there
# would do 21x the useful MMA work, 16 does 5.3x. Under the interpreter one small config.
# ----------------------------------------------------------------------------------------
def _cfg(bm, bn, bk, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps,
                         num_stages=stages)


# Shipped GPU configs (every one is compiled for sm_90 by tests/test_sm90_compile_fwd.py).
PTR_CONFIGS_GPU = [
    _cfg(128, 128, 32, 8, 3),
    _cfg(128, 64, 32, 4, 3),
    _cfg(64, 128, 32, 4, 3),
    _cfg(64, 64, 32, 4, 2),
    _cfg(128, 16, 64, 4, 3),      # narrow: C_out <= 16
    _cfg(64, 16, 64, 4, 4),       # narrow
]
TMA_CONFIGS_GPU = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 128, 32, 8, 4),
    _cfg(128, 64, 64, 4, 3),
    _cfg(64, 128, 64, 4, 3),
    _cfg(128, 16, 64, 4, 3),      # narrow
    _cfg(64, 16, 64, 4, 4),       # narrow
]
NARROW_N = 16
# The interpreter runs one small config (tests stay fast; BLOCK_K=16 keeps phase views
# valid for channel counts that are multiples of 16).
PTR_CONFIGS = [_cfg(32, 16, 16, 4, 1)] if INTERPRET else PTR_CONFIGS_GPU
TMA_CONFIGS = [_cfg(64, 16, 16, 4, 1)] if INTERPRET else TMA_CONFIGS_GPU

# The constexpr variant flags are part of the key: a config is only reused for the same
# variant (for phase views not every BLOCK_K is valid, see _prune_tma).
_AUTOTUNE_KEY = ["C_x", "C_s", "C_out", "H_out", "W_out", "UPSAMPLE", "STRIDE", "HAS_SKIP",
                 "HAS_BIAS", "ACTIVATION"]
_TMA_AUTOTUNE_KEY = _AUTOTUNE_KEY + ["X_PHASE", "S_PHASE", "SUBPIXEL", "TILE_W", "TILE_H_MAX"]


def width_fits(block_n: int, c_out: int) -> bool:
    """The rule for BLOCK_N: narrow configs (16) exactly when C_out <= 16; otherwise
    32..max(64, next_pow2(C_out)), i.e. not much wider than the layer."""
    if c_out <= NARROW_N:
        return block_n == NARROW_N
    return NARROW_N < block_n <= max(64, triton.next_power_of_2(c_out))


def _prune_ptr(configs, nargs, **kwargs):
    """Keep the configs whose BLOCK_N fits C_out (:func:`width_fits`)."""
    kept = [c for c in configs if width_fits(c.kwargs["BLOCK_N"], nargs["C_out"])]
    return cap(kept or configs[-1:])


def _phase_bk_ok(bk: int, c_x: int, c_s: int, x_phase: bool, s_phase: bool) -> bool:
    """A phase-view box must not cross from phase 0's channels into phase 1's: BLOCK_K | C."""
    return not (x_phase and c_x % bk) and not (s_phase and c_s % bk)


def _prune_tma(configs, nargs, **kwargs):
    """Keep configs valid for the phase views (BLOCK_K | C, required: the launcher only
    picks this kernel when one exists), then prefer those whose BLOCK_N fits C_out."""
    a = {**nargs, **kwargs}
    valid = [c for c in configs if _phase_bk_ok(c.kwargs["BLOCK_K"], a["C_x"], a["C_s"],
                                                 a["X_PHASE"], a["S_PHASE"])]
    narrow = [c for c in valid if width_fits(c.kwargs["BLOCK_N"], a["C_out"])]
    return cap(narrow or valid)


# ----------------------------------------------------------------------------------------
# Pointer kernel
# ----------------------------------------------------------------------------------------
@triton.jit
def _accumulate_ptr(acc, src_ptr, w_ptr, row_off, hbase, wbase, m_ok, offs_k, offs_n, n_ok,
                    C, H_c, W_c, s_h, s_w, w_row, k_base, C_tot,
                    UPSAMPLE: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc += im2col(src)[rows, K] @ W[K, cols] for one input tensor (x or skip).

    One flat loop over 9 * cdiv(C, BLOCK_K) steps: step -> (tap, channel block). The A tile is
    gathered from the NHWC source at the tap's shifted pixel (halved when UPSAMPLE, i.e. the
    upsampled tensor is never formed); rows whose shifted pixel falls outside the conv's
    input (the zero padding) and channels >= C are masked to zero. The B tile is
    W[cols, tap*C_tot + k_base + c] (K-contiguous), cast to the activation dtype.
    """
    n_cb = tl.cdiv(C, BLOCK_K)
    for it in range(0, 9 * n_cb):
        tap = it // n_cb
        cb = it - tap * n_cb
        kh = tap // 3
        kw = tap - kh * 3
        hi = hbase + kh                      # row in the conv input (after upsample)
        wi = wbase + kw
        ok = m_ok & (hi >= 0) & (hi < H_c) & (wi >= 0) & (wi < W_c)
        if UPSAMPLE:
            hi = hi // 2                     # nearest 2x upsample folded into the gather
            wi = wi // 2
        c = cb * BLOCK_K + offs_k
        c_ok = c < C
        a = tl.load(src_ptr + (row_off + hi * s_h + wi * s_w)[:, None] + c[None, :],
                    mask=ok[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(w_ptr + offs_n[None, :] * w_row + (tap * C_tot + k_base + c)[:, None],
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _epilogue(acc, b_ptr, y_ptr, y_off, m_ok, offs_n, n_ok,
              HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """y[rows, cols] = elu(acc + bias) (or acc + bias), cast to y's dtype, masked store."""
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc + bias[None, :]
    if ACTIVATION:
        # ELU, alpha = 1. exp of a positive argument is discarded by the where().
        acc = tl.where(acc > 0.0, acc, tl.exp(tl.minimum(acc, 0.0)) - 1.0)
    tl.store(y_ptr + y_off[:, None] + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@autotune(PTR_CONFIGS, _AUTOTUNE_KEY,
          prune_configs_by={"early_config_prune": _prune_ptr})
@triton.jit
def conv3x3_fwd_ptr_kernel(
    x_ptr, s_ptr, w_ptr, b_ptr, y_ptr,
    M, H_c, W_c, H_out, W_out, C_x, C_s, C_out,
    sxn, sxh, sxw, ssn, ssh, ssw, w_row, syn, syh, syw,
    UPSAMPLE: tl.constexpr, STRIDE: tl.constexpr, HAS_SKIP: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program computes a [BLOCK_M output pixels, BLOCK_N output channels] tile of y.

    Programs are ordered with the C_out tile fastest, so the programs sharing one input
    tile run together (L2 reuse). ``H_c, W_c``: the conv input's size (after the upsample);
    x itself is ``H_c/2 x W_c/2`` when UPSAMPLE. Masks: rows >= M, channels >= C,
    columns >= C_out and the padding ring.
    """
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_out, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid - pid_m * num_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    hw = H_out * W_out
    n_img = offs_m // hw
    rem = offs_m - n_img * hw
    ho = rem // W_out
    wo = rem - ho * W_out
    hbase = ho * STRIDE - 1                  # top-left tap of the 3x3 window, pad 1
    wbase = wo * STRIDE - 1
    C_tot = C_x + C_s

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate_ptr(acc, x_ptr, w_ptr, n_img * sxn, hbase, wbase, m_ok, offs_k, offs_n,
                          n_ok, C_x, H_c, W_c, sxh, sxw, w_row, 0, C_tot,
                          UPSAMPLE, BLOCK_K, DOT_PRECISION)
    if HAS_SKIP:
        acc = _accumulate_ptr(acc, s_ptr, w_ptr, n_img * ssn, hbase, wbase, m_ok, offs_k,
                              offs_n, n_ok, C_s, H_c, W_c, ssh, ssw, w_row, C_x, C_tot,
                              False, BLOCK_K, DOT_PRECISION)
    _epilogue(acc, b_ptr, y_ptr, n_img * syn + ho * syh + wo * syw, m_ok, offs_n, n_ok,
              HAS_BIAS, ACTIVATION)


# ----------------------------------------------------------------------------------------
# Tensor-descriptor (TMA) kernel
# ----------------------------------------------------------------------------------------
@triton.jit
def _phase_view(ptr, N, H, W, C, s_n, s_h, s_w, BB: tl.constexpr, BH: tl.constexpr,
                BW: tl.constexpr, BLOCK_K: tl.constexpr):
    """5-D descriptor over an NHWC tensor with even H, W: ``[N, H/2, 2, W/2, 2*C]``.

    Row ``h = 2*i + ph`` is (i, ph); column ``w = 2*j + pw`` with channel c is
    (j, pw*C + c). A box ``[BB, BH, 1, BW, BLOCK_K]`` at (n, i, ph, j, pw*C + c0) therefore reads
    the pixels (2*(i + a) + ph, 2*(j + b) + pw): every second row and column, which is
    what a stride-2 tap (or a high-res tap seen from a low-res tile) needs. A box never
    crosses from phase 0's channels into phase 1's because BLOCK_K divides C (pruned configs).
    """
    return tl.make_tensor_descriptor(ptr, shape=[N, H // 2, 2, W // 2, 2 * C],
                                     strides=[s_n, 2 * s_h, s_h, 2 * s_w, 1],
                                     block_shape=[BB, BH, 1, BW, BLOCK_K])


@triton.jit
def _plain_view(ptr, N, H, W, C, s_n, s_h, s_w, BB: tl.constexpr, BH: tl.constexpr,
                BW: tl.constexpr, BLOCK_K: tl.constexpr):
    """4-D descriptor ``[N, H, W, C]`` over an NHWC tensor, box ``[BB, BH, BW, BLOCK_K]``."""
    return tl.make_tensor_descriptor(ptr, shape=[N, H, W, C], strides=[s_n, s_h, s_w, 1],
                                     block_shape=[BB, BH, BW, BLOCK_K])


@triton.jit
def _accumulate_tma(acc, src, w_desc, n0, r0, q0, n_off, C, k_base, C_tot, tile_py, tile_px,
                    PHASE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """acc += im2col(src) @ W over 9 taps x cdiv(C, BLOCK_K) channel blocks (one flat loop).

    Plain view (PHASE=False): tile pixel (r0 + a, q0 + b) reads, for tap (kh, kw), source
    pixel (r0 + a + kh - 1, q0 + b + kw - 1): the box at (n0, r0 + kh - 1, q0 + kw - 1, c0).
    Phase view (PHASE=True): tile pixel (r, q) reads source row 2*r + t with
    t = tile_py + kh - 1 in [-1, 2] (stride 2: tile_py = 0; upsampled output phase py
    reading a high-res skip: tile_py = py), i.e. box row r0 + floor(t / 2) in phase t mod 2;
    columns alike. Out-of-bounds box rows / columns / channels read 0 (the conv padding).
    W's box is [BLOCK_N, BLOCK_K] at (n_off, tap*C_tot + k_base + c0), transposed for the dot.
    """
    n_cb = tl.cdiv(C, BLOCK_K)
    for it in range(0, 9 * n_cb):
        tap = it // n_cb
        c0 = (it - tap * n_cb) * BLOCK_K
        kh = tap // 3
        kw = tap - kh * 3
        th = tile_py + kh - 1
        tw = tile_px + kw - 1
        if PHASE:
            ph = th & 1                       # th in [-1, 2]: floor-div / mod by shifts
            pw = tw & 1
            a = src.load([n0, r0 + (th >> 1), ph, q0 + (tw >> 1), pw * C + c0])
        else:
            a = src.load([n0, r0 + th, q0 + tw, c0])
        a = a.reshape(BLOCK_M, BLOCK_K)
        b = w_desc.load([n_off, tap * C_tot + k_base + c0])
        acc = tl.dot(a, tl.trans(b.to(a.dtype)), acc, input_precision=DOT_PRECISION)
    return acc


@autotune(TMA_CONFIGS, _TMA_AUTOTUNE_KEY,
          prune_configs_by={"early_config_prune": _prune_tma})
@triton.jit
def conv3x3_fwd_tma_kernel(
    x_ptr, s_ptr, w_ptr, ws_ptr, b_ptr, y_ptr,
    N, H_x, W_x, H_out, W_out, C_x, C_s, C_out,
    sxn, sxh, sxw, ssn, ssh, ssw, syn, syh, syw,
    UPSAMPLE: tl.constexpr, STRIDE: tl.constexpr, HAS_SKIP: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
    X_PHASE: tl.constexpr, S_PHASE: tl.constexpr, SUBPIXEL: tl.constexpr,
    TILE_W: tl.constexpr, TILE_H_MAX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program computes BLOCK_M output pixels x BLOCK_N output channels.

    Tiling: the pixel tile is a box of ``BB images x BH rows x BW columns`` (BB*BH*BW = BLOCK_M,
    BW = TILE_W, BH = min(BLOCK_M // BW, TILE_H_MAX)) over the *tile grid* (H_t, W_t):
    the output itself, except with UPSAMPLE, where the program also picks one of the 4
    output phases (py, px) and its tile covers the low-res pixels (i, j), i.e. outputs
    (2i + py, 2j + px). Then every tap of x (read at (h//2, w//2)) is one low-res box
    shifted by floor((p + k - 1) / 2), and the skip tensor (high-res) is a phase view.
    With SUBPIXEL (docs/design.md §3.1) the x-part is instead a 2x2 conv of the low-res input with
    the phase's summed weights ``ws`` (see ``subpixel_weight``): 4 taps instead of 9.
    With STRIDE=2, x (and skip) are phase views and the tile grid is the output.
    The C_out tile varies fastest across programs (L2 reuse of the input tile).
    Epilogue: bias, ELU, masked pointer store (handles the phase interleave and C_out
    not a multiple of 16).
    """
    BW: tl.constexpr = TILE_W
    BH: tl.constexpr = BLOCK_M // BW if BLOCK_M // BW <= TILE_H_MAX else TILE_H_MAX
    BB: tl.constexpr = BLOCK_M // (BW * BH)

    if UPSAMPLE:
        H_t = H_x                              # tile grid = low-res pixels, 4 phases
        W_t = W_x
        NPH = 4
    else:
        H_t = H_out
        W_t = W_out
        NPH = 1
    pid = tl.program_id(0)
    num_n = tl.cdiv(C_out, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid - pid_m * num_n
    tiles_w = tl.cdiv(W_t, BW)
    tiles_h = tl.cdiv(H_t, BH)
    phase = pid_m % NPH
    t = pid_m // NPH
    q0 = (t % tiles_w) * BW
    t = t // tiles_w
    r0 = (t % tiles_h) * BH
    n0 = (t // tiles_h) * BB
    tile_py = phase // 2
    tile_px = phase % 2

    C_tot = C_x + C_s
    n_off = pid_n * BLOCK_N
    # The weight as a row-major (C_out, 9*C_tot) matrix, box [BLOCK_N, BLOCK_K]; rows >= C_out and
    # columns >= 9*C_tot read 0.
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[C_out, 9 * C_tot], strides=[9 * C_tot, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if UPSAMPLE:
        x_desc = _plain_view(x_ptr, N, H_x, W_x, C_x, sxn, sxh, sxw, BB, BH, BW, BLOCK_K)
        if SUBPIXEL:
            # ws: (4*C_out, 4*C_x) row-major, row phase*C_out + co, column (a*2+b)*C_x + c.
            # Rows past this phase's C_out read the next phase's weights: those output
            # columns are masked at the store.
            ws_desc = tl.make_tensor_descriptor(ws_ptr, shape=[4 * C_out, 4 * C_x],
                                                strides=[4 * C_x, 1], block_shape=[BLOCK_N, BLOCK_K])
            acc = _accumulate_tma_subpixel(acc, x_desc, ws_desc, n0, r0, q0,
                                           phase * C_out + n_off, C_x, tile_py, tile_px,
                                           BLOCK_M, BLOCK_K, DOT_PRECISION)
        else:
            # each 3x3 tap is a low-res box shifted by floor((p + k - 1) / 2)
            acc = _accumulate_tma_up(acc, x_desc, w_desc, n0, r0, q0, n_off, C_x, C_tot,
                                     tile_py, tile_px, BLOCK_M, BLOCK_K, DOT_PRECISION)
    elif X_PHASE:
        # stride 2: output row ho reads input row 2*ho + kh - 1 (phase view, t = kh - 1)
        x_desc = _phase_view(x_ptr, N, H_x, W_x, C_x, sxn, sxh, sxw, BB, BH, BW, BLOCK_K)
        acc = _accumulate_tma(acc, x_desc, w_desc, n0, r0, q0, n_off, C_x, 0, C_tot, 0, 0,
                              True, BLOCK_M, BLOCK_K, DOT_PRECISION)
    else:
        x_desc = _plain_view(x_ptr, N, H_x, W_x, C_x, sxn, sxh, sxw, BB, BH, BW, BLOCK_K)
        acc = _accumulate_tma(acc, x_desc, w_desc, n0, r0, q0, n_off, C_x, 0, C_tot, 0, 0,
                              False, BLOCK_M, BLOCK_K, DOT_PRECISION)
    if HAS_SKIP:
        if UPSAMPLE:
            # skip is high-res: output (2i + py) reads row 2i + py + kh - 1 (phase view)
            s_desc = _phase_view(s_ptr, N, 2 * H_x, 2 * W_x, C_s, ssn, ssh, ssw, BB, BH, BW, BLOCK_K)
            acc = _accumulate_tma(acc, s_desc, w_desc, n0, r0, q0, n_off, C_s, C_x, C_tot,
                                  tile_py, tile_px, True, BLOCK_M, BLOCK_K, DOT_PRECISION)
        elif S_PHASE:
            s_desc = _phase_view(s_ptr, N, H_x, W_x, C_s, ssn, ssh, ssw, BB, BH, BW, BLOCK_K)
            acc = _accumulate_tma(acc, s_desc, w_desc, n0, r0, q0, n_off, C_s, C_x, C_tot,
                                  0, 0, True, BLOCK_M, BLOCK_K, DOT_PRECISION)
        else:
            s_desc = _plain_view(s_ptr, N, H_x, W_x, C_s, ssn, ssh, ssw, BB, BH, BW, BLOCK_K)
            acc = _accumulate_tma(acc, s_desc, w_desc, n0, r0, q0, n_off, C_s, C_x, C_tot,
                                  0, 0, False, BLOCK_M, BLOCK_K, DOT_PRECISION)

    # Output coordinates of the BLOCK_M rows of acc (box order: image, row, column).
    offs = tl.arange(0, BLOCK_M)
    bb = offs // (BH * BW)
    a_ = (offs // BW) % BH
    b_ = offs % BW
    n_img = n0 + bb
    if UPSAMPLE:
        ho = 2 * (r0 + a_) + tile_py
        wo = 2 * (q0 + b_) + tile_px
    else:
        ho = r0 + a_
        wo = q0 + b_
    m_ok = (n_img < N) & (ho < H_out) & (wo < W_out)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C_out
    _epilogue(acc, b_ptr, y_ptr, n_img * syn + ho * syh + wo * syw, m_ok, offs_n, n_ok,
              HAS_BIAS, ACTIVATION)


@triton.jit
def _accumulate_tma_up(acc, x_desc, w_desc, n0, r0, q0, n_off, C, C_tot, tile_py, tile_px,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """UPSAMPLE x-part: the low-res box for tap (kh, kw) of output phase (py, px) starts at
    (r0 + floor((py + kh - 1) / 2), q0 + floor((px + kw - 1) / 2)); 9 taps, 3x3 weights."""
    n_cb = tl.cdiv(C, BLOCK_K)
    for it in range(0, 9 * n_cb):
        tap = it // n_cb
        c0 = (it - tap * n_cb) * BLOCK_K
        kh = tap // 3
        kw = tap - kh * 3
        a = x_desc.load([n0, r0 + ((tile_py + kh - 1) >> 1), q0 + ((tile_px + kw - 1) >> 1), c0])
        a = a.reshape(BLOCK_M, BLOCK_K)
        b = w_desc.load([n_off, tap * C_tot + c0])
        acc = tl.dot(a, tl.trans(b.to(a.dtype)), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _accumulate_tma_subpixel(acc, x_desc, ws_desc, n0, r0, q0, w_row0, C, tile_py, tile_px,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Sub-pixel UPSAMPLE x-part: output phase (py, px) of a 3x3 conv of the 2x-upsampled x
    is a 2x2 conv of x itself: tap (a, b) reads the low-res box at
    (r0 + a - 1 + py, q0 + b - 1 + px) (offsets -1/0 for phase 0, 0/+1 for phase 1) with
    the summed weights ws[w_row0 + n, (a*2 + b)*C + c]. 4 taps x cdiv(C, BLOCK_K) blocks."""
    n_cb = tl.cdiv(C, BLOCK_K)
    for it in range(0, 4 * n_cb):
        tap = it // n_cb
        c0 = (it - tap * n_cb) * BLOCK_K
        ta = tap // 2
        tb = tap - ta * 2
        a = x_desc.load([n0, r0 + ta - 1 + tile_py, q0 + tb - 1 + tile_px, c0])
        a = a.reshape(BLOCK_M, BLOCK_K)
        b = ws_desc.load([w_row0, tap * C + c0])
        acc = tl.dot(a, tl.trans(b.to(a.dtype)), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _subpixel_sum(v0, v1, v2, P: tl.constexpr, A: tl.constexpr):
    """Which 3x3 taps along one axis fold into 2x2 tap A of output phase P (docs/design.md §3.1):
    P=0: A=0 <- {0}, A=1 <- {1, 2};  P=1: A=0 <- {0, 1}, A=1 <- {2}."""
    if P == 0:
        if A == 0:
            r = v0
        else:
            r = v1 + v2
    else:
        if A == 0:
            r = v0 + v1
        else:
            r = v2
    return r


@triton.jit
def subpixel_weight_kernel(w_ptr, ws_ptr, C_out, C_x, C_tot, BLOCK: tl.constexpr):
    """ws[(py*2 + px)*C_out + co, (a*2 + b)*C_x + c] = sum of the 3x3 taps of
    w[co, c] that land on low-res tap (a, b) of output phase (py, px), in fp32, stored in
    ws's dtype. w: the (C_out, 9*C_tot) matrix (x's channels are the first C_x of each
    tap); one program handles BLOCK (co, c) pairs and writes their 16 sub-pixel weights."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < C_out * C_x
    co = offs // C_x
    c = offs - co * C_x
    src = w_ptr + co * (9 * C_tot) + c
    w00 = tl.load(src + 0 * C_tot, mask=ok, other=0.0).to(tl.float32)
    w01 = tl.load(src + 1 * C_tot, mask=ok, other=0.0).to(tl.float32)
    w02 = tl.load(src + 2 * C_tot, mask=ok, other=0.0).to(tl.float32)
    w10 = tl.load(src + 3 * C_tot, mask=ok, other=0.0).to(tl.float32)
    w11 = tl.load(src + 4 * C_tot, mask=ok, other=0.0).to(tl.float32)
    w12 = tl.load(src + 5 * C_tot, mask=ok, other=0.0).to(tl.float32)
    w20 = tl.load(src + 6 * C_tot, mask=ok, other=0.0).to(tl.float32)
    w21 = tl.load(src + 7 * C_tot, mask=ok, other=0.0).to(tl.float32)
    w22 = tl.load(src + 8 * C_tot, mask=ok, other=0.0).to(tl.float32)
    for py in tl.static_range(2):
        for a in tl.static_range(2):
            r0 = _subpixel_sum(w00, w10, w20, py, a)      # kh folded, kw = 0, 1, 2
            r1 = _subpixel_sum(w01, w11, w21, py, a)
            r2 = _subpixel_sum(w02, w12, w22, py, a)
            for px in tl.static_range(2):
                for b in tl.static_range(2):
                    v = _subpixel_sum(r0, r1, r2, px, b)
                    dst = ws_ptr + ((py * 2 + px) * C_out + co) * (4 * C_x) + (a * 2 + b) * C_x + c
                    tl.store(dst, v.to(ws_ptr.dtype.element_ty), mask=ok)


# ----------------------------------------------------------------------------------------
# Standalone nearest upsample (for the drop-in API where the fusion is not possible)
# ----------------------------------------------------------------------------------------
@triton.jit
def upsample_nearest2x_kernel(x_ptr, y_ptr, P, H, W, C, sxn, sxh, sxw, syn, syh, syw,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program reads a [BLOCK_P input pixels, BLOCK_C channels] NHWC tile once and writes it to
    the 4 output pixels (2h + dy, 2w + dx). Masks: pixels >= P = N*H*W, channels >= C."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = offs_p < P
    mask = p_ok[:, None] & (offs_c < C)[None, :]
    n = offs_p // (H * W)
    rem = offs_p - n * (H * W)
    h = rem // W
    w = rem - h * W
    v = tl.load(x_ptr + (n * sxn + h * sxh + w * sxw)[:, None] + offs_c[None, :], mask=mask)
    out = (n * syn + 2 * h * syh + 2 * w * syw)[:, None] + offs_c[None, :]
    tl.store(y_ptr + out, v, mask=mask)
    tl.store(y_ptr + out + syw, v, mask=mask)
    tl.store(y_ptr + out + syh, v, mask=mask)
    tl.store(y_ptr + out + syh + syw, v, mask=mask)


# ----------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------
def _check_runnable(t: torch.Tensor, what: str) -> None:
    if t.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            f"{what}: got a CPU tensor, but Triton kernels need a CUDA GPU (or the Triton "
            "interpreter, TRITON_INTERPRET=1 set before importing fastbegan). Use the torch "
            "backend instead: fastbegan.ops.set_backend('torch').")


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_tot, 3, 3) -> the row-major (C_out, 9*C_tot) matrix the kernels read,
    K index (kh*3 + kw)*C_tot + c. A view (no copy) for a channels_last contiguous weight;
    a 2-D tensor is taken to be that matrix already."""
    if weight.dim() == 2:
        return weight
    c_out, c_tot = weight.shape[0], weight.shape[1]
    if not weight.is_contiguous(memory_format=torch.channels_last):
        weight = weight.contiguous(memory_format=torch.channels_last)
    return weight.permute(0, 2, 3, 1).reshape(c_out, 9 * c_tot)


def kernel_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The (C_out, 9*C_tot) weight matrix in the compute dtype ``dtype``: fp32 master
    weights are cast once per call (one weight-sized pass), never inside the K loop, where
    a per-tile cast (shared -> registers -> convert -> shared) serialises every MMA step
    (the sm_90 TTGIR showed ``truncf`` + ``local_alloc`` and a full wgmma wait per
    iteration; tests/test_sm90_ttgir.py checks it is gone)."""
    w2 = weight_matrix(weight)
    return w2 if w2.dtype == dtype else w2.to(dtype)


def _aligned16(t: torch.Tensor) -> bool:
    es = t.element_size()
    return (t.data_ptr() % 16 == 0 and all((s * es) % 16 == 0 for s in (t.stride(0), t.stride(2),
                                                                       t.stride(3))))


def tma_eligible(x, weight2d, skip, upsample: bool, stride: int) -> bool:
    """Whether the tensor-descriptor kernel can run these inputs: Triton with tensor
    descriptors, Hopper or newer (or the interpreter), 16-byte aligned rows of x / skip /
    weight, and even sizes where a phase view is needed."""
    if not HAS_TENSOR_DESCRIPTOR:
        return False
    if not INTERPRET:
        if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
    if x.dtype not in _TL_DTYPES:
        return False
    es = x.element_size()   # the weight matrix the kernel reads is in x's dtype
    if not _aligned16(x) or (weight2d.stride(0) * es) % 16 or weight2d.data_ptr() % 16:
        return False
    x_phase = stride == 2
    s_phase = skip is not None and (upsample or stride == 2)
    if x_phase and (x.shape[2] % 2 or x.shape[3] % 2):
        return False
    if skip is not None:
        if not _aligned16(skip):
            return False
        if s_phase and (skip.shape[2] % 2 or skip.shape[3] % 2):
            return False
    c_s = skip.shape[1] if skip is not None else 0
    return any(_phase_bk_ok(c.kwargs["BLOCK_K"], x.shape[1], c_s, x_phase, s_phase)
               for c in TMA_CONFIGS)


def _torch_alloc(size: int, alignment: int, stream):
    # the current device: the ops run their launches under fastbegan.kernels.common.device_guard
    return torch.empty(size, device=torch.device("cuda", torch.cuda.current_device()),
                       dtype=torch.int8)


def _ensure_allocator():
    """Device-side tensor descriptors need a global scratch allocator (``triton.set_allocator``,
    Triton >= 3.3). Triton keeps it in a ContextVar (per thread), so this runs on every
    launch; an allocator the user set is left alone."""
    if not hasattr(triton, "set_allocator"):
        return
    try:
        from triton.runtime import _allocation
        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except Exception:  # private API moved: set ours
        pass
    triton.set_allocator(_torch_alloc)


def subpixel_weight(weight2d: torch.Tensor, c_x: int, dtype: torch.dtype) -> torch.Tensor:
    """The sub-pixel weights of the x channels: (4*C_out, 4*C_x) in ``dtype``, row
    (py*2 + px)*C_out + co, column (a*2 + b)*C_x + c (see ``subpixel_weight_kernel``).
    weight2d: the (C_out, 9*C_tot) matrix of :func:`weight_matrix`. One small launch."""
    c_out, c_tot = weight2d.shape[0], weight2d.shape[1] // 9
    ws = torch.empty((4 * c_out, 4 * c_x), device=weight2d.device, dtype=dtype)
    block = 64 if INTERPRET else 256
    subpixel_weight_kernel[(triton.cdiv(c_out * c_x, block),)](weight2d, ws, c_out, c_x, c_tot,
                                                                BLOCK=block)
    return ws


def ptr_grid(M: int, C_out: int):
    """Launch grid of ``conv3x3_fwd_ptr_kernel``: one axis, C_out tiles fastest."""
    def grid(meta):
        return check_grid((triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(C_out, meta["BLOCK_N"]),),
                          "conv3x3_fwd")
    return grid


def tma_tile(W_t: int, H_t: int) -> tuple[int, int]:
    """(TILE_W, TILE_H_MAX) of the descriptor kernel's pixel box on a (H_t, W_t) tile grid."""
    return min(16, triton.next_power_of_2(W_t)), triton.next_power_of_2(H_t)


def tma_grid(N: int, H_t: int, W_t: int, n_phase: int, C_out: int):
    """Launch grid of ``conv3x3_fwd_tma_kernel``: one axis of (box, phase, C_out tile)."""
    tile_w, tile_h_max = tma_tile(W_t, H_t)

    def grid(meta):
        bh = min(meta["BLOCK_M"] // tile_w, tile_h_max)
        bb = meta["BLOCK_M"] // (tile_w * bh)
        tiles = triton.cdiv(N, bb) * triton.cdiv(H_t, bh) * triton.cdiv(W_t, tile_w)
        return check_grid((tiles * n_phase * triton.cdiv(C_out, meta["BLOCK_N"]),), "conv3x3_fwd")
    return grid


def _output(x, C_out, H_out, W_out, out):
    N = x.shape[0]
    if out is None:
        return torch.empty((N, C_out, H_out, W_out), device=x.device, dtype=x.dtype,
                           memory_format=torch.channels_last)
    if (tuple(out.shape) != (N, C_out, H_out, W_out) or out.dtype != x.dtype
            or not out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"conv3x3_fwd: out must be a channels_last {x.dtype} tensor of shape "
                         f"{(N, C_out, H_out, W_out)}")
    return out


def resolve_kernel(kernel: str, x, w2, skip, upsample: bool, stride: int) -> str:
    """"ptr" or "tma" for a ``kernel`` argument of "auto" | "ptr" | "tma"; "auto" (and the
    FASTBEGAN_CONV_KERNEL variable, for "auto" calls) never picks an ineligible kernel."""
    if kernel not in ("auto", "ptr", "tma"):
        raise ValueError(f"kernel must be 'auto', 'ptr' or 'tma', got {kernel!r}")
    if kernel != "auto":
        return kernel
    eligible = tma_eligible(x, w2, skip, upsample, stride)
    if DEFAULT_KERNEL == "ptr" or not eligible:
        return "ptr"
    return "tma"


def conv3x3_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                skip: torch.Tensor | None = None, upsample: bool = False, stride: int = 1,
                activation: bool = True, kernel: str = "auto",
                subpixel: bool = True, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the fused conv. Inputs are assumed validated (see fastbegan.ops.triton_conv).

    x: (N, C_x, H, W); skip: (N, C_s, H', W') with H' = 2H if upsample else H; weight:
    (C_out, C_x + C_s, 3, 3) any float dtype/layout, or the (C_out, 9*(C_x + C_s)) matrix
    of :func:`kernel_weight`; it is cast to x's dtype once here (:func:`kernel_weight`).
    bias: (C_out,) or None. ``kernel``: "auto" (the descriptor kernel where
    :func:`tma_eligible`, else the pointer kernel; FASTBEGAN_CONV_KERNEL=ptr forces the
    pointer kernel for "auto" calls) | "ptr" | "tma" (forced). ``subpixel``: with upsample
    on the descriptor kernel, fold the 3x3 taps of x into 4 per output phase (2.25x fewer
    MACs on x's channels; one extra tiny launch to sum the weights). Returns y
    (N, C_out, H_out, W_out) channels_last, H_out = (H' - 1) // stride + 1, in x's dtype;
    written into ``out`` when given (that shape, x's dtype, channels_last-dense: e.g. a
    batch slice of a larger channels_last tensor).
    """
    _check_runnable(x, "conv3x3_elu")
    x = nhwc(x)
    skip = nhwc(skip) if skip is not None else None
    N, C_x, H_x, W_x = x.shape
    H_c, W_c = (2 * H_x, 2 * W_x) if upsample else (H_x, W_x)
    H_out, W_out = (H_c - 1) // stride + 1, (W_c - 1) // stride + 1
    C_s = skip.shape[1] if skip is not None else 0
    w_master = weight_matrix(weight)
    C_out = w_master.shape[0]
    w2 = kernel_weight(w_master, x.dtype)
    y = _output(x, C_out, H_out, W_out, out)
    if y.numel() == 0:
        return y
    check_int32("conv3x3_elu", x, skip, y)
    s = skip if skip is not None else x
    b = bias if bias is not None else w2
    flags = dict(UPSAMPLE=upsample, STRIDE=stride, HAS_SKIP=skip is not None,
                 HAS_BIAS=bias is not None, ACTIVATION=activation,
                 DOT_PRECISION=dot_precision(x.dtype))
    kernel = resolve_kernel(kernel, x, w2, skip, upsample, stride)
    if kernel == "tma":
        if not INTERPRET:
            _ensure_allocator()
        H_t, W_t = (H_x, W_x) if upsample else (H_out, W_out)
        tile_w, tile_h_max = tma_tile(W_t, H_t)
        use_sub = bool(upsample and subpixel)
        # sub-pixel sums from the master weights (one rounding to x's dtype)
        ws = subpixel_weight(w_master, C_x, x.dtype) if use_sub else w2
        conv3x3_fwd_tma_kernel[tma_grid(N, H_t, W_t, 4 if upsample else 1, C_out)](
            x, s, w2, ws, b, y, N, H_x, W_x, H_out, W_out, C_x, C_s, C_out,
            x.stride(0), x.stride(2), x.stride(3), s.stride(0), s.stride(2), s.stride(3),
            y.stride(0), y.stride(2), y.stride(3),
            X_PHASE=stride == 2, S_PHASE=skip is not None and (upsample or stride == 2),
            SUBPIXEL=use_sub, TILE_W=tile_w, TILE_H_MAX=tile_h_max, **flags)
    else:
        conv3x3_fwd_ptr_kernel[ptr_grid(N * H_out * W_out, C_out)](
            x, s, w2, b, y, N * H_out * W_out, H_c, W_c, H_out, W_out, C_x, C_s, C_out,
            x.stride(0), x.stride(2), x.stride(3), s.stride(0), s.stride(2), s.stride(3),
            w2.stride(0), y.stride(0), y.stride(2), y.stride(3), **flags)
    return y


def upsample_grid(P: int, C: int, block_p: int, block_c: int) -> tuple:
    """Launch grid of ``upsample_nearest2x_kernel``: pixel blocks on axis 0."""
    return check_grid((triton.cdiv(P, block_p), triton.cdiv(C, block_c)), "upsample_nearest2x")


def upsample_nearest2x_fwd(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W) nearest, channels_last output."""
    _check_runnable(x, "upsample_nearest2x")
    x = nhwc(x)
    N, C, H, W = x.shape
    y = torch.empty((N, C, 2 * H, 2 * W), device=x.device, dtype=x.dtype,
                    memory_format=torch.channels_last)
    if y.numel() == 0:
        return y
    check_int32("upsample_nearest2x", y)
    P = N * H * W
    BLOCK_C = min(64, triton.next_power_of_2(C))
    BLOCK_P = max(16, 4096 // BLOCK_C) if not INTERPRET else 64
    upsample_nearest2x_kernel[upsample_grid(P, C, BLOCK_P, BLOCK_C)](
        x, y, P, H, W, C, x.stride(0), x.stride(2), x.stride(3),
        y.stride(0), y.stride(2), y.stride(3), BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C)
    return y


# ----------------------------------------------------------------------------------------
# Ahead-of-time compile specs (tests/test_sm90_compile_fwd.py, kernels/aot.py)
# ----------------------------------------------------------------------------------------
# name -> (UPSAMPLE, STRIDE, HAS_SKIP, ACTIVATION)
AOT_VARIANTS = {
    "plain": (False, 1, False, True),
    "upsample": (True, 1, False, True),
    "upsample_9tap": (True, 1, False, True),      # descriptor kernel: SUBPIXEL=False
    "stride2": (False, 2, False, True),
    "skip": (False, 1, True, True),
    "upsample_skip": (True, 1, True, True),
    "linear": (False, 1, False, False),
}


def aot_specs(act_dtype: str = "bf16", weight_dtype: str | None = None, variants=None,
              helpers: bool = True):
    """Everything needed to compile each shipped forward kernel, variant and GPU config
    ahead of time: a list of dicts with keys ``kernel, variant, config, fn, signature,
    constexprs, num_warps, num_stages, divisible_by_16`` (for
    :func:`fastbegan.kernels.aot.compile_for_sm90`). Sizes and strides are marked
    16-divisible as Triton's launcher specialises them at the real shapes (channels 64+).
    ``act_dtype``: Triton type name (bf16, fp16, fp32) of the activations; the weight
    matrix is in the same dtype, as :func:`conv3x3_fwd` launches it (``weight_dtype``
    overrides that, e.g. to see the per-tile cast of fp32 weights). Variant names get a
    ``/<act_dtype>`` suffix unless bf16. ``variants``: a subset of ``AOT_VARIANTS``
    (default all); ``helpers``: include the upsample and sub-pixel-weight kernels.
    Narrow configs (BLOCK_N = 16, C_out <= 16) are compiled for the variants a 3-channel
    conv has in the model (plain and linear), with C_out not 16-divisible.
    """
    weight_dtype = weight_dtype or act_dtype
    ptrs = {"x_ptr": f"*{act_dtype}", "s_ptr": f"*{act_dtype}", "w_ptr": f"*{weight_dtype}",
            "b_ptr": "*fp32", "y_ptr": f"*{act_dtype}"}
    prec = "tf32"
    specs = []
    ptr_ints = ["M", "H_c", "W_c", "H_out", "W_out", "C_x", "C_s", "C_out", "sxn", "sxh", "sxw",
                "ssn", "ssh", "ssw", "w_row", "syn", "syh", "syw"]
    tma_ints = ["N", "H_x", "W_x", "H_out", "W_out", "C_x", "C_s", "C_out", "sxn", "sxh", "sxw",
                "ssn", "ssh", "ssw", "syn", "syh", "syw"]
    not_div = {"N", "M", "H_c", "W_c", "H_out", "W_out", "H_x", "W_x"}   # sizes: 8..128, vary
    for kname, fn, ints, configs in (("ptr", conv3x3_fwd_ptr_kernel, ptr_ints, PTR_CONFIGS_GPU),
                                     ("tma", conv3x3_fwd_tma_kernel, tma_ints, TMA_CONFIGS_GPU)):
        sig = dict(ptrs, **{k: "i32" for k in ints})
        if kname == "tma":
            sig = dict(ptrs, ws_ptr=f"*{act_dtype}", **{k: "i32" for k in ints})
        for vname, (up, stride, skip, act) in AOT_VARIANTS.items():
            if variants is not None and vname not in variants:
                continue
            if kname == "ptr" and vname == "upsample_9tap":
                continue                        # the pointer kernel has no sub-pixel path
            tilings = [(16, 128)]
            if kname == "tma" and vname in ("plain", "upsample"):
                tilings.append((8, 8))          # 8x8 images: a box of 2 (or 1) images
            for tile_w, tile_h in tilings:
                for cfg in configs:
                    narrow = cfg.kwargs["BLOCK_N"] == NARROW_N
                    if narrow and (vname not in ("plain", "linear") or tile_w != 16):
                        continue
                    div = [k for k in sig if k not in not_div and not (narrow and k == "C_out")]
                    ce = dict(UPSAMPLE=up, STRIDE=stride, HAS_SKIP=skip, HAS_BIAS=True,
                              ACTIVATION=act, DOT_PRECISION=prec, **cfg.kwargs)
                    variant = vname
                    if kname == "tma":
                        ce.update(X_PHASE=stride == 2, S_PHASE=skip and (up or stride == 2),
                                  SUBPIXEL=up and vname != "upsample_9tap",
                                  TILE_W=tile_w, TILE_H_MAX=tile_h)
                        variant = (f"{vname}@tile{tile_w}x"
                                   f"{min(tile_h, cfg.kwargs['BLOCK_M'] // tile_w)}")
                    if act_dtype != "bf16":
                        variant += f"/{act_dtype}"
                    if weight_dtype != act_dtype:
                        variant += f"/w{weight_dtype}"
                    specs.append(dict(kernel=f"conv3x3_fwd_{kname}", variant=variant,
                                      config=dict(cfg.kwargs, num_warps=cfg.num_warps,
                                                  num_stages=cfg.num_stages),
                                      fn=fn, signature=sig, constexprs=ce,
                                      num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                      divisible_by_16=div))
    if not helpers:
        return specs
    up_sig = {"x_ptr": f"*{act_dtype}", "y_ptr": f"*{act_dtype}",
              **{k: "i32" for k in ["P", "H", "W", "C", "sxn", "sxh", "sxw", "syn", "syh", "syw"]}}
    specs.append(dict(kernel="upsample_nearest2x", variant="C>=64", config=dict(BLOCK_P=64, BLOCK_C=64),
                      fn=upsample_nearest2x_kernel, signature=up_sig,
                      constexprs=dict(BLOCK_P=64, BLOCK_C=64), num_warps=4, num_stages=3,
                      divisible_by_16=["x_ptr", "y_ptr", "C", "sxn", "sxh", "sxw", "syn", "syh",
                                       "syw"]))
    specs.append(dict(kernel="subpixel_weight", variant=f"fp32->{act_dtype}",
                      config=dict(BLOCK=256), fn=subpixel_weight_kernel,
                      signature={"w_ptr": "*fp32", "ws_ptr": f"*{act_dtype}",
                                 "C_out": "i32", "C_x": "i32", "C_tot": "i32"},
                      constexprs=dict(BLOCK=256), num_warps=4, num_stages=3,
                      divisible_by_16=["w_ptr", "ws_ptr", "C_out", "C_x", "C_tot"]))
    return specs


def aot_specs_cast_control():
    """Control for the K-loop cast check (tests/test_sm90_compile_fwd.py): the plain variant's
    first config of each kernel with fp32 weights and bf16 activations, i.e. weights cast
    inside the K loop, as the kernels were launched before :func:`kernel_weight`."""
    specs = aot_specs("bf16", "fp32", variants=("plain",), helpers=False)
    firsts = {}
    for sp in specs:
        firsts.setdefault(sp["kernel"], sp)
    return list(firsts.values())


def aot_specs_fp32():
    """fp32 activations and weights (TF32 dots), for the variants with the largest tiles in
    shared memory: the plain conv and upsample + skip (two descriptors)."""
    return aot_specs("fp32", variants=("plain", "upsample_skip"), helpers=False)
