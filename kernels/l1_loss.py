"""Triton kernels of the BEGAN losses: ``mean |x - D(x)|`` and the k_t / M_global update.

docs/design.md §3.3. Everything stays on the device; the host never reads a value.

Tensors are read as flat buffers: the launcher (:mod:`fastbegan.ops.triton_loss`) makes
sure ``x`` and ``recon`` share one memory layout (NCHW-contiguous or channels_last), so
element ``i`` of one is element ``i`` of the other, and the batch dimension is outermost
(the first half of a 2B-sample ``recon`` is the first ``n_half`` elements).

``HALVES = 2`` (the training step): ``recon`` holds D's output for ``[x_real; x_fake]``;
half 0 is compared with ``xa`` (x_real), half 1 with ``xb`` (x_fake). ``xa`` and ``xb`` are
separate tensors that may have different dtypes (fp32 data, bf16 generator output), which
is why each half's loop is a separate branch (a pointer cannot change its element type).

Kernels:

``l1_partial_kernel``   grid (P, HALVES): program p sums ``|x - r|`` in fp32 over blocks
                        p, p + P, p + 2P, ... of its half and writes one partial sum.
``l1_finalize_kernel``  one program: sums each half's P partials in a fixed order (the
                        result is deterministic), divides by the half's element count and,
                        with ``UPDATE``, also writes ``k_next`` and ``M_global`` (the BEGAN
                        update fused into the same tiny launch).
``began_update_kernel`` one program: the BEGAN update alone, from two 0-d loss tensors.
``l1_backward_kernel``  grid (cdiv(n_half, BLOCK), HALVES): ``d recon = sign(r - x) * g / n``
                        and ``d x = -d recon`` (each written only when asked for).

Scalars (``gamma``, ``lambda_k``) are cast to fp32 inside the kernels: inductor passes
Python floats as fp64.
"""
from __future__ import annotations

import triton
import triton.language as tl

# Launch parameters on a GPU (the launcher uses smaller ones under the interpreter). The cap
# on partial sums per half is a power of two (the finalize kernel loads them as one block)
# and does not depend on the device, so results are the same on every GPU.
GPU_BLOCK = 4096
GPU_BLOCK_BWD = 2048
GPU_MAX_PARTS = 256
NUM_WARPS = 8
NUM_WARPS_BWD = 4


# ----------------------------------------------------------------------------------------
# forward: partial sums
# ----------------------------------------------------------------------------------------
@triton.jit
def _sum_abs_diff(x_ptr, r_ptr, n, pid, P, BLOCK: tl.constexpr):
    """fp32 sum of |x[i] - r[i]| over the blocks pid, pid + P, ... of [0, n)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    offs0 = tl.arange(0, BLOCK)
    for start in range(pid * BLOCK, n, P * BLOCK):
        offs = start + offs0
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.abs(x - r)
    return tl.sum(acc, axis=0)


@triton.jit
def l1_partial_kernel(xa_ptr, xb_ptr, r_ptr, part_ptr, n_half, P,
                      HALVES: tl.constexpr, BLOCK: tl.constexpr):
    """part[h, p] = sum over program p's blocks of half h of |x_h - recon_h|."""
    pid = tl.program_id(0)
    half = tl.program_id(1)
    if HALVES == 1:
        s = _sum_abs_diff(xa_ptr, r_ptr, n_half, pid, P, BLOCK)
    else:
        if half == 0:
            s = _sum_abs_diff(xa_ptr, r_ptr, n_half, pid, P, BLOCK)
        else:
            s = _sum_abs_diff(xb_ptr, r_ptr + n_half, n_half, pid, P, BLOCK)
    tl.store(part_ptr + half * P + pid, s)


# ----------------------------------------------------------------------------------------
# forward: finalize (+ fused BEGAN update)
# ----------------------------------------------------------------------------------------
@triton.jit
def _began(k, loss_real, loss_fake, gamma, lambda_k):
    """k_next = clip(k + lambda_k * (gamma * L_real - L_fake), 0, 1);
    M = L_real + |gamma * L_real - L_fake| (all fp32)."""
    balance = gamma * loss_real - loss_fake
    k_next = tl.minimum(tl.maximum(k + lambda_k * balance, 0.0), 1.0)
    m_global = loss_real + tl.abs(balance)
    return k_next, m_global


@triton.jit
def l1_finalize_kernel(part_ptr, out_ptr, n_half, P,
                       k_ptr, k_next_ptr, m_ptr, gamma, lambda_k,
                       HALVES: tl.constexpr, UPDATE: tl.constexpr, BLOCK_P: tl.constexpr):
    """out[h] = sum(part[h, :P]) / n_half; with UPDATE (HALVES == 2) also k_next and M."""
    offs = tl.arange(0, BLOCK_P)
    mask = offs < P
    n_f = n_half * 1.0  # (n_half may be specialised to a constexpr)
    loss0 = tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), axis=0) / n_f
    tl.store(out_ptr, loss0)
    if HALVES == 2:
        loss1 = tl.sum(tl.load(part_ptr + P + offs, mask=mask, other=0.0), axis=0) / n_f
        tl.store(out_ptr + 1, loss1)
        if UPDATE:
            k = tl.load(k_ptr).to(tl.float32)
            k_next, m_global = _began(k, loss0, loss1, tl.cast(gamma, tl.float32),
                                      tl.cast(lambda_k, tl.float32))
            tl.store(k_next_ptr, k_next)
            tl.store(m_ptr, m_global)


@triton.jit
def began_update_kernel(k_ptr, lr_ptr, lf_ptr, k_next_ptr, m_ptr, gamma, lambda_k):
    """The BEGAN update from 0-d tensors (any float dtype), written as fp32."""
    k = tl.load(k_ptr).to(tl.float32)
    loss_real = tl.load(lr_ptr).to(tl.float32)
    loss_fake = tl.load(lf_ptr).to(tl.float32)
    k_next, m_global = _began(k, loss_real, loss_fake, tl.cast(gamma, tl.float32),
                              tl.cast(lambda_k, tl.float32))
    tl.store(k_next_ptr, k_next)
    tl.store(m_ptr, m_global)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------
@triton.jit
def _bwd_block(x_ptr, gx_ptr, r_ptr, gr_ptr, offs, mask, g_over_n, WRITE_X: tl.constexpr):
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = r - x
    sign = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, 0.0))
    g = sign * g_over_n
    tl.store(gr_ptr + offs, g.to(gr_ptr.dtype.element_ty), mask=mask)
    if WRITE_X:
        tl.store(gx_ptr + offs, (-g).to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def l1_backward_kernel(xa_ptr, xb_ptr, r_ptr, g_ptr, gxa_ptr, gxb_ptr, gr_ptr, n_half,
                       HALVES: tl.constexpr, WRITE_XA: tl.constexpr, WRITE_XB: tl.constexpr,
                       BLOCK: tl.constexpr):
    """d recon_h = sign(recon_h - x_h) * g[h] / n_half; d x_h = -d recon_h.

    ``sign(0) = 0``, as the derivative of ``abs`` at 0 in PyTorch.
    """
    pid = tl.program_id(0)
    half = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_half
    g_over_n = tl.load(g_ptr + half).to(tl.float32) / (n_half * 1.0)
    if HALVES == 1:
        _bwd_block(xa_ptr, gxa_ptr, r_ptr, gr_ptr, offs, mask, g_over_n, WRITE_XA)
    else:
        if half == 0:
            _bwd_block(xa_ptr, gxa_ptr, r_ptr, gr_ptr, offs, mask, g_over_n, WRITE_XA)
        else:
            _bwd_block(xb_ptr, gxb_ptr, r_ptr + n_half, gr_ptr + n_half, offs, mask, g_over_n,
                       WRITE_XB)


# ----------------------------------------------------------------------------------------
# ahead-of-time compile specs (fastbegan.kernels.aot)
# ----------------------------------------------------------------------------------------
def aot_specs():
    """Every kernel and variant with the GPU launch parameters, for
    :func:`fastbegan.kernels.aot.compile_for_sm90` (bf16 activations, fp32 data)."""
    specs = []

    def add(kernel, variant, fn, sig, ce, warps):
        specs.append(dict(kernel=kernel, variant=variant, config=dict(ce, num_warps=warps),
                          fn=fn, signature=sig, constexprs=ce, num_warps=warps, num_stages=1))

    for halves in (1, 2):
        add("l1_partial", f"halves={halves}", l1_partial_kernel,
            {"xa_ptr": "*fp32", "xb_ptr": "*bf16", "r_ptr": "*bf16", "part_ptr": "*fp32",
             "n_half": "i32", "P": "i32"}, dict(HALVES=halves, BLOCK=GPU_BLOCK), NUM_WARPS)
        for update in ((False, True) if halves == 2 else (False,)):
            add("l1_finalize", f"halves={halves},update={update}", l1_finalize_kernel,
                {"part_ptr": "*fp32", "out_ptr": "*fp32", "n_half": "i32", "P": "i32",
                 "k_ptr": "*fp32", "k_next_ptr": "*fp32", "m_ptr": "*fp32", "gamma": "fp32",
                 "lambda_k": "fp32"},
                dict(HALVES=halves, UPDATE=update, BLOCK_P=GPU_MAX_PARTS), 4)
        add("l1_backward", f"halves={halves}", l1_backward_kernel,
            {"xa_ptr": "*fp32", "xb_ptr": "*bf16", "r_ptr": "*bf16", "g_ptr": "*fp32",
             "gxa_ptr": "*fp32", "gxb_ptr": "*bf16", "gr_ptr": "*bf16", "n_half": "i32"},
            dict(HALVES=halves, WRITE_XA=halves == 1, WRITE_XB=True, BLOCK=GPU_BLOCK_BWD),
            NUM_WARPS_BWD)
    add("began_update", "", began_update_kernel,
        {"k_ptr": "*fp32", "lr_ptr": "*fp32", "lf_ptr": "*fp32", "k_next_ptr": "*fp32",
         "m_ptr": "*fp32", "gamma": "fp64", "lambda_k": "fp64"}, {}, 1)
    return specs
