"""Backward of the fused ``conv3x3_elu`` op on the triton backend (issue 5).

Kernels (fastbegan.kernels.conv3x3_bwd) and their custom ops / autograd
(fastbegan.ops.triton_conv_bwd) against torch autograd of the pure-PyTorch
reference (fastbegan.ops.reference), which defines correctness.

Without a GPU the kernels run in the Triton interpreter. Tolerances (max abs error over
the largest reference magnitude of each gradient): fp32 1e-5; fp16 activations 5e-3
(dpre and the source are rounded to fp16 before the fp32-accumulated dot, dx is stored
in fp16); bf16 (GPU only: the interpreter's bf16 tl.dot is wrong) 3e-2.
"""
from __future__ import annotations

import pytest
import torch
from torch import Tensor

from testutil import DEVICE, HAS_CUDA, requires_gpu
from fastbegan import ops
from fastbegan.kernels import conv3x3_bwd
from fastbegan.ops import reference as R
from fastbegan.ops import triton_conv_bwd

CL = torch.channels_last
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-10}

# name: (C_x, C_skip, C_out, N, H, W, upsample, stride, activation, split_k)
CASES = {
    "plain_3to5": (3, 0, 5, 2, 8, 8, False, 1, True, None),
    "nonsquare_noact": (4, 0, 6, 1, 8, 6, False, 1, False, 2),
    "upsample": (4, 0, 5, 2, 4, 5, True, 1, True, None),
    "upsample_noact": (3, 0, 4, 1, 3, 4, True, 1, False, 3),
    "stride2": (5, 0, 4, 2, 8, 8, False, 2, True, None),
    "stride2_odd": (3, 0, 5, 3, 7, 5, False, 2, True, 2),
    "skip": (3, 2, 5, 2, 6, 6, False, 1, True, None),
    "skip_upsample": (3, 4, 6, 2, 4, 4, True, 1, True, 2),
    "skip_stride2": (2, 3, 4, 1, 8, 7, False, 2, True, None),
    "wide": (24, 0, 20, 2, 8, 8, True, 1, True, None),      # several channel tiles
    "wide_skip_s2": (20, 12, 24, 2, 8, 8, False, 2, True, None),
}
HALF_CASES = ["plain_3to5", "upsample", "stride2_odd", "skip_upsample"]


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """These tensors are tiny: intra-op threads only add OpenMP overhead, which becomes
    seconds per gradcheck when the CPU is shared with other jobs."""
    if HAS_CUDA:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _inputs(case, dtype, device=DEVICE, seed=0, wdtype=torch.float32):
    cx, cs, co, n, h, w, up, stride, act, _ = CASES[case]
    g = torch.Generator().manual_seed(seed)
    h2, w2 = (2 * h, 2 * w) if up else (h, w)
    x = torch.randn(n, cx, h, w, generator=g).to(device, dtype).contiguous(memory_format=CL)
    skip = (torch.randn(n, cs, h2, w2, generator=g).to(device, dtype)
            .contiguous(memory_format=CL)) if cs else None
    wt = (torch.randn(co, cx + cs, 3, 3, generator=g) / (3 * (cx + cs)) ** 0.5)
    wt = wt.to(device, wdtype).contiguous(memory_format=CL)
    b = (0.1 * torch.randn(co, generator=g)).to(device, wdtype)
    scale = torch.randn(n, generator=g).to(device)
    return x, skip, wt, b, scale


def _ref_grads(x, skip, w, b, dy, case, scale=None):
    """float64 CPU autograd of conv3x3_elu_ref; per-sample weight scale by hand (a loop)."""
    _, _, _, n, _, _, up, stride, act, _ = CASES[case]
    d = lambda t: None if t is None else t.detach().cpu().double().requires_grad_(True)  # noqa: E731
    x, skip, w, b = d(x), d(skip), d(w), d(b)
    dy = dy.detach().cpu().double()
    kw = dict(upsample=up, stride=stride, activation=act)
    y = R.conv3x3_elu_ref(x, w, b, skip=skip, **kw)
    ins = [x, w, b] + ([skip] if skip is not None else [])
    gx, gw, gb, *gs = torch.autograd.grad(y, ins, dy)
    if scale is not None:
        gw, gb = torch.zeros_like(w), torch.zeros_like(b)
        for i in range(n):
            yi = R.conv3x3_elu_ref(x[i:i + 1], w, b, skip=None if skip is None else skip[i:i + 1], **kw)
            gwi, gbi = torch.autograd.grad(yi, [w, b], dy[i:i + 1])
            gw += float(scale[i]) * gwi
            gb += float(scale[i]) * gbi
    return y.detach(), {"dx": gx, "dw": gw, "db": gb, "dskip": gs[0] if gs else None}


def _close(name, got, ref, dtype):
    assert got is not None, name
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    err = (got.detach().cpu().double() - ref).abs().max().item()
    mag = ref.abs().max().item()
    assert err <= TOL[dtype] * max(mag, 1e-3), f"{name}: max err {err:.3e} vs |ref| {mag:.3e}"


def _run_kernels(x, skip, w, dy, y, case, scale=None, split=None):
    cx, cs, _, _, _, _, up, stride, act, case_split = CASES[case]
    ya = y if act else None
    out = {"dx": conv3x3_bwd.conv3x3_dgrad(dy, ya, w, x, 0, up, stride)}
    if skip is not None:
        out["dskip"] = conv3x3_bwd.conv3x3_dgrad(dy, ya, w, skip, cx, False, stride)
    out["dw"], out["db"] = conv3x3_bwd.conv3x3_wgrad(dy, ya, x, skip, w, scale, up, stride,
                                               split_k=split or case_split)
    return out


# --------------------------------------------------------------------------------------
# launchers vs autograd of the reference
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_reference_fp32(case):
    x, skip, w, b, _ = _inputs(case, torch.float32)
    with torch.no_grad():
        y = R.conv3x3_elu_ref(x, w, b, skip=skip, upsample=CASES[case][6], stride=CASES[case][7],
                              activation=CASES[case][8])
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y).contiguous(memory_format=CL)
    _, ref = _ref_grads(x, skip, w, b, dy, case)
    got = _run_kernels(x, skip, w, dy, y.contiguous(memory_format=CL), case)
    for k in ("dx", "dw", "db", "dskip"):
        if ref[k] is not None:
            _close(k, got[k], ref[k], torch.float32)
    assert got["dx"].is_contiguous(memory_format=CL) and got["dx"].dtype == x.dtype
    assert got["dw"].is_contiguous(memory_format=CL) and got["dw"].dtype == w.dtype


@pytest.mark.parametrize("case", HALF_CASES)
def test_kernels_match_reference_fp16(case):
    """fp16 activations with fp32 master weights (cast inside the kernels)."""
    x, skip, w, b, _ = _inputs(case, torch.float16)
    up, stride, act = CASES[case][6:9]
    with torch.no_grad():
        y = R.conv3x3_elu_ref(x.float(), w, b, skip=None if skip is None else skip.float(),
                              upsample=up, stride=stride, activation=act)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    y = y.to(x.dtype).contiguous(memory_format=CL)
    _, ref = _ref_grads(x, skip, w, b, dy, case)
    got = _run_kernels(x, skip, w, dy.contiguous(memory_format=CL), y, case)
    for k in ("dx", "dw", "db", "dskip"):
        if ref[k] is not None:
            _close(k, got[k], ref[k], torch.float16)
    assert got["dx"].dtype == torch.float16 and got["dw"].dtype == torch.float32


def test_weight_dtype_and_layout_follow_the_weight():
    """fp16 weight in plain (OIHW) layout: dW comes back fp16 with the same strides;
    an NCHW-contiguous dy is accepted (converted to channels_last by the launcher)."""
    case = "plain_3to5"
    x, skip, w, b, _ = _inputs(case, torch.float16, wdtype=torch.float16)
    w = w.contiguous()
    with torch.no_grad():
        y = R.conv3x3_elu_ref(x.float(), w.float(), b.float())
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    _, ref = _ref_grads(x, None, w, b, dy, case)
    dw, db = conv3x3_bwd.conv3x3_wgrad(dy.contiguous(), y.half(), x, None, w)
    assert dw.dtype == torch.float16 and dw.stride() == w.stride() and db.dtype == torch.float16
    _close("dw", dw, ref["dw"], torch.float16)
    _close("db", db, ref["db"], torch.float16)


# --------------------------------------------------------------------------------------
# per-sample weight-gradient scale
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["plain_3to5", "upsample", "stride2_odd", "skip_upsample"])
def test_wgrad_scale_matches_per_sample_loop(case):
    """dW = sum_n scale[n] dW_n (a loop over samples), db likewise; dx is unscaled. Also
    equal to the reference's own scaled path, conv3x3_elu_scaled_ref."""
    x, skip, w, b, scale = _inputs(case, torch.float32, seed=3)
    up, stride, act = CASES[case][6:9]
    with torch.no_grad():
        y = R.conv3x3_elu_ref(x, w, b, skip=skip, upsample=up, stride=stride, activation=act)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).contiguous(memory_format=CL)
    _, ref = _ref_grads(x, skip, w, b, dy, case, scale=scale)
    got = _run_kernels(x, skip, w, dy, y.contiguous(memory_format=CL), case, scale=scale, split=2)
    for k in ("dx", "dw", "db", "dskip"):
        if ref[k] is not None:
            _close(k, got[k], ref[k], torch.float32)
    # the reference's scaled autograd.Function agrees with the loop
    ins = [t.detach().double().requires_grad_(True) for t in (x, w, b)]
    sk = None if skip is None else skip.detach().double().requires_grad_(True)
    ys = R.conv3x3_elu_scaled_ref(*ins, scale.double(), upsample=up, stride=stride,
                                  activation=act, skip=sk)
    gs = torch.autograd.grad(ys, ins, dy.double())
    for name, gg in zip(("dx", "dw", "db"), gs):
        _close(name, gg, ref[name], torch.float32)


def _f64_layer(n, c, hw, out_hw, seed):
    """float64 (x, weight, bias, dy, per-block scale [1; -0.37]) of a c -> c conv, channels_last."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, hw, hw, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
    w = (0.1 * torch.randn(c, c, 3, 3, generator=g, dtype=torch.float64)).contiguous(memory_format=CL)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    dy = torch.randn(n, c, out_hw, out_hw, generator=g, dtype=torch.float64).contiguous(memory_format=CL)
    return x, w, b, dy, torch.tensor([[1.0], [-0.37]], dtype=torch.float64)


@pytest.mark.parametrize("c,hw,upsample,stride", [(64, 32, False, 1), (64, 16, True, 1), (4, 8, False, 2)])
def test_per_block_wgrad_scale_equals_the_per_sample_one(c, hw, upsample, stride):
    """A (G, 1) scale means the same as its per-sample expansion: dx, dW and db agree, on
    a layer large enough for one weight-gradient call per block (64 channels at 32x32,
    also after the upsample) and on small ones (the scaled-copy path); float64."""
    n, out_hw = 4, hw * 2 if upsample else hw // stride
    x, w, b, dy, block = _f64_layer(n, c, hw, out_hw, seed=11)
    assert (c * out_hw * out_hw >= R.SPLIT_WGRAD_MIN_NUMEL) == (c == 64)
    grads = []
    for scale in (block, R.per_sample_scale(block, n)):
        ins = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
        y = R.conv3x3_elu_scaled_ref(*ins, scale, upsample=upsample, stride=stride)
        grads.append(torch.autograd.grad(y, ins, dy))
    assert torch.equal(R.per_sample_scale(block, n), torch.tensor([1.0, 1.0, -0.37, -0.37], dtype=torch.float64))
    for name, got, want in zip(("dx", "dw", "db"), *grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    with pytest.raises(ValueError, match="G dividing N"):
        R.per_sample_scale(torch.ones(3, 1), n)


@pytest.mark.parametrize("n,c_in,c_out,h,w", [(2, 3, 5, 4, 6), (3, 8, 4, 5, 3)])
def test_subpixel_upsample_conv_equals_conv_of_the_upsampled_input(n, c_in, c_out, h, w):
    """The written-out conv runs an upsample (no skip) as one 2x2 conv with 4*C_out outputs
    on the low-res input (R.subpixel_weight): its output and its input, weight and bias
    gradients equal autograd of the plain conv of the nearest-upsampled input; and the
    weight fold's adjoint is its transpose (<S w, d> = <w, S^T d>); float64."""
    g = torch.Generator().manual_seed(21)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = mk(n, c_in, h, w).contiguous(memory_format=CL)
    wt, b = mk(c_out, c_in, 3, 3), mk(c_out)
    dy = mk(n, c_out, 2 * h, 2 * w).contiguous(memory_format=CL)
    outs = []
    for f in (lambda *a: R.conv3x3_elu_ref(*a, upsample=True),
              lambda *a: R.conv3x3_elu_scaled_ref(*a, torch.ones(1, 1, dtype=torch.float64), upsample=True)):
        ins = [t.clone().requires_grad_(True) for t in (x, wt, b)]
        y = f(*ins)
        outs.append((y.detach(), *torch.autograd.grad(y, ins, dy)))
    assert outs[1][0].is_contiguous(memory_format=CL)
    for name, got, want in zip(("y", "dx", "dw", "db"), outs[1], outs[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)
    d = mk(4 * c_out, c_in, 2, 2)
    torch.testing.assert_close((R.subpixel_weight(wt) * d).sum(), (wt * R._subpixel_weight_adjoint(d)).sum(),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c,hw", [(3, 4), (64, 16)])
def test_written_out_backward_traced_by_dynamo_equals_eager(c, hw):
    """Under torch.compile the written-out backward takes its compile-time forms (the 2x2
    block-sum upsample adjoint; with a per-block scale on a large layer, one weight-gradient
    call per block): traced by dynamo + AOTAutograd (aot_eager, no C++ build), the gradients
    equal eager's; float64."""
    x, w, b, dy, scale = _f64_layer(4, c, hw, 2 * hw, seed=12)

    def loss(x, w, b):
        return (R.conv3x3_elu_scaled_ref(x, w, b, scale, upsample=True) * dy).sum()

    grads = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        ins = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
        grads.append(torch.autograd.grad(fn(*ins), ins))
    for name, got, want in zip(("dx", "dw", "db"), grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=name)


# --------------------------------------------------------------------------------------
# gradcheck (float64) of the reference path
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["plain_3to5", "upsample", "stride2_odd", "skip_upsample"])
def test_gradcheck_reference(case):
    cx, cs, co, n, h, w_, up, stride, act, _ = CASES[case]
    g = torch.Generator().manual_seed(5)
    cx, cs, co, h, w_ = min(cx, 2), min(cs, 2), min(co, 3), min(h, 3), min(w_, 3)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    x = mk(n, cx, h, w_)
    skip = mk(n, cs, 2 * h if up else h, 2 * w_ if up else w_) if cs else None
    wt, b = mk(co, cx + cs, 3, 3), mk(co)
    kw = dict(upsample=up, stride=stride, activation=act)
    f = lambda x, wt, b, *s: R.conv3x3_elu_ref(x, wt, b, skip=s[0] if s else None, **kw)  # noqa: E731
    args = (x, wt, b) + ((skip,) if skip is not None else ())
    assert torch.autograd.gradcheck(f, args)
    # scaled reference: with scale == 1 every gradient is the true one ...
    one = torch.ones(n, dtype=torch.float64)
    fs = lambda x, wt, b, *s: R.conv3x3_elu_scaled_ref(x, wt, b, one, skip=s[0] if s else None, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(fs, args, fast_mode=True)
    # ... and with any scale, the input (and skip) gradients still are
    sc = torch.randn(n, generator=g, dtype=torch.float64)
    fx = lambda x, *s: R.conv3x3_elu_scaled_ref(x, wt.detach(), b.detach(), sc,  # noqa: E731
                                                 skip=s[0] if s else None, **kw)
    assert torch.autograd.gradcheck(fx, (x,) + ((skip,) if skip is not None else ()),
                                    fast_mode=True)


# --------------------------------------------------------------------------------------
# custom ops: opcheck, autograd registration (stand-in forward until the real one exists)
# --------------------------------------------------------------------------------------
@torch.library.custom_op("fastbegan_test::conv3x3_elu_ref", mutates_args=())
def _stand_in(x: Tensor, weight: Tensor, bias: Tensor | None, skip: Tensor | None,
              wgrad_scale: Tensor | None, upsample: bool, stride: int, activation: bool) -> Tensor:
    """The reference forward under the schema of fastbegan::conv3x3_elu."""
    y = R.conv3x3_elu_ref(x, weight, bias, upsample=upsample, stride=stride,
                          activation=activation, skip=skip)
    return y.contiguous(memory_format=CL)


@_stand_in.register_fake
def _stand_in_fake(x, weight, bias, skip, wgrad_scale, upsample, stride, activation):
    n, _, h, w = x.shape
    if upsample:
        h, w = 2 * h, 2 * w
    return x.new_empty((n, weight.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1)
                       ).contiguous(memory_format=CL)


STAND_IN = "fastbegan_test::conv3x3_elu_ref"
triton_conv_bwd.register_conv3x3_elu_autograd(STAND_IN)


def _real_op_registered():
    import fastbegan.ops.triton_conv  # noqa: F401  (registers the backward; fails loudly)
    return "fastbegan::conv3x3_elu" in triton_conv_bwd._registered


@pytest.mark.parametrize("case", ["upsample", "stride2_odd", "skip_upsample"])
def test_opcheck_backward_ops(case):
    x, skip, w, b, scale = _inputs(case, torch.float32)
    cx, _, _, _, _, _, up, stride, act, _ = CASES[case]
    with torch.no_grad():
        y = R.conv3x3_elu_ref(x, w, b, skip=skip, upsample=up, stride=stride,
                              activation=act).contiguous(memory_format=CL)
    dy = torch.randn_like(y)
    ya = y if act else None
    torch.library.opcheck(torch.ops.fastbegan.conv3x3_dgrad.default,
                          (dy, ya, w, x, 0, up, stride))
    if skip is not None:
        torch.library.opcheck(torch.ops.fastbegan.conv3x3_dgrad.default,
                              (dy, ya, w, skip, cx, False, stride))
    torch.library.opcheck(torch.ops.fastbegan.conv3x3_wgrad.default,
                          (dy, ya, x, skip, w, scale, up, stride))


def _op_grads(op, case, dtype=torch.float32, use_scale=True, seed=0):
    x, skip, w, b, scale = _inputs(case, dtype, seed=seed)
    up, stride, act = CASES[case][6:9]
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, w, b, skip)]
    xl, wl, bl, sl = leaves
    y = op(xl, wl, bl, sl, scale if use_scale else None, up, stride, act)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    ins = [t for t in leaves if t is not None]
    got = dict(zip(["dx", "dw", "db"] + (["dskip"] if skip is not None else []),
                   torch.autograd.grad(y, ins, dy)))
    _, ref = _ref_grads(x, skip, w, b, dy, case, scale=scale if use_scale else None)
    return got, ref, (x, w, b, skip, scale)


@pytest.mark.parametrize("case", ["plain_3to5", "upsample", "skip_stride2"])
def test_autograd_registration_stand_in(case):
    """The registered backward (saving x, skip, weight, y, scale) on the reference forward."""
    op = torch.ops.fastbegan_test.conv3x3_elu_ref
    got, ref, (x, w, b, skip, scale) = _op_grads(op, case)
    for k, v in got.items():
        _close(k, v, ref[k], torch.float32)
    up, stride, act = CASES[case][6:9]
    torch.library.opcheck(op.default, (x.requires_grad_(), w.requires_grad_(), b, skip, scale,
                                       up, stride, act))


def test_backward_skips_unneeded_gradients(monkeypatch):
    """No dgrad launch when x does not need a gradient (D's first conv on real images),
    no wgrad launch when neither weight nor bias does."""
    calls = []
    for name in ("conv3x3_dgrad", "conv3x3_wgrad"):
        real = getattr(conv3x3_bwd, name)
        monkeypatch.setattr(conv3x3_bwd, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    x, _, w, b, _ = _inputs("plain_3to5", torch.float32)
    op = torch.ops.fastbegan_test.conv3x3_elu_ref
    y = op(x, w.requires_grad_(), b.requires_grad_(), None, None, False, 1, True)
    y.sum().backward()
    assert calls == ["conv3x3_wgrad"]
    calls.clear()
    xg = x.detach().requires_grad_()
    y = op(xg, w.detach(), b.detach(), None, None, False, 1, True)
    y.sum().backward()
    assert calls == ["conv3x3_dgrad"]


def test_gradcheck_triton_backward_float64():
    """Numerical vs analytical Jacobian of the stand-in op whose backward runs the Triton
    kernels (float64 through tl.dot in the interpreter)."""
    if HAS_CUDA:
        pytest.skip("float64 gradcheck runs under the interpreter only")
    op = torch.ops.fastbegan_test.conv3x3_elu_ref
    g = torch.Generator().manual_seed(7)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).contiguous(  # noqa: E731
        memory_format=CL if len(s) == 4 else torch.contiguous_format).requires_grad_(True)
    for up, stride, cs in [(True, 1, 2), (False, 2, 0)]:
        x = mk(2, 2, 3, 3)
        skip = mk(2, cs, 6, 6) if cs else None
        wt, b = mk(3, 2 + cs, 3, 3), mk(3)
        f = lambda x, wt, b, *s: op(x, wt, b, s[0] if s else None, None, up, stride, True)  # noqa: E731
        # fast mode: a few random Jacobian-vector products (each full gradcheck column
        # would be one interpreted backward)
        assert torch.autograd.gradcheck(f, (x, wt, b) + ((skip,) if cs else ()), atol=1e-6,
                                        fast_mode=True)


# --------------------------------------------------------------------------------------
# the real forward op (fastbegan::conv3x3_elu) with this backward
# --------------------------------------------------------------------------------------
needs_real_op = pytest.mark.skipif(not _real_op_registered(),
                                   reason="fastbegan::conv3x3_elu (forward) is not defined yet")


@needs_real_op
@pytest.mark.parametrize("case", ["plain_3to5", "upsample_noact", "stride2_odd", "skip_upsample"])
def test_real_op_gradients(case):
    got, ref, args = _op_grads(torch.ops.fastbegan.conv3x3_elu, case)
    for k, v in got.items():
        _close(k, v, ref[k], torch.float32)


@needs_real_op
def test_real_op_opcheck_and_backend_dispatch():
    x, skip, w, b, scale = _inputs("skip_upsample", torch.float32)
    torch.library.opcheck(torch.ops.fastbegan.conv3x3_elu.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), skip,
                           scale, True, 1, True))
    # fastbegan.ops.conv3x3_elu on the triton backend == the reference backend, gradients too
    grads = {}
    for backend in ("torch", "triton"):
        leaves = [t.detach().requires_grad_(True) for t in (x, w, b, skip)]
        with ops.use_backend(backend):
            y = ops.conv3x3_elu(leaves[0], leaves[1], leaves[2], upsample=True,
                                skip=leaves[3], wgrad_scale=scale)
        (y * y).sum().backward()
        grads[backend] = [t.grad for t in leaves]
    for a, r in zip(grads["triton"], grads["torch"]):
        _close("grad", a, r.double(), torch.float32)


@needs_real_op
def test_compile_fullgraph_forward_backward():
    """torch.compile(fullgraph=True) traces forward and backward custom ops (fake impls,
    AOTAutograd); the aot_eager backend keeps the test fast on CPU (no C++ build)."""
    x, skip, w, b, scale = _inputs("upsample", torch.float32)
    op = torch.ops.fastbegan.conv3x3_elu

    def step(x, w, b, scale):
        y = op(x, w, b, None, scale, True, 1, True)
        return y.square().mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    res = {}
    for name, fn in (("eager", step), ("compiled", compiled)):
        leaves = [t.detach().requires_grad_(True) for t in (x, w, b)]
        fn(*leaves, scale).backward()
        res[name] = [t.grad for t in leaves]
    for a, r in zip(res["compiled"], res["eager"]):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)


def _model_grads(backend, seed=0, res=16, n=4):
    from fastbegan.model import BEGAN
    torch.manual_seed(seed)
    m = BEGAN(res, filters=n, z_dim=6, h=5, skip=True).to(DEVICE)
    g = torch.Generator().manual_seed(seed + 1)
    z = (torch.rand(2, 6, generator=g) * 2 - 1).to(DEVICE)
    x_real = (torch.rand(2, 3, res, res, generator=g) * 2 - 1).to(DEVICE).contiguous(memory_format=CL)
    k = torch.tensor(0.3, device=DEVICE)
    with ops.use_backend(backend):
        x_fake = m.G(z)
        scale = torch.cat([torch.ones(2, device=DEVICE), -k.expand(2)])
        recon = m.D(torch.cat([x_real, x_fake]), wgrad_scale=scale)
        l_real = (recon[:2] - x_real).abs().mean()
        l_fake = (recon[2:] - x_fake).abs().mean()
        (l_real + l_fake).backward()
    return {name: p.grad.clone() for name, p in m.named_parameters()}


@needs_real_op
def test_model_forward_backward_matches_reference():
    """Tiny BEGAN (res 16: upsample, stride 2 and skip convs) G + D forward and the fused
    backward (fake half of D's weight gradient scaled by -k_t): triton == torch backend."""
    pytest.importorskip("fastbegan.model")
    ref = _model_grads("torch")
    got = _model_grads("triton")
    assert ref.keys() == got.keys()
    for name in ref:
        _close(name, got[name], ref[name].double(), torch.float32 if not HAS_CUDA else torch.bfloat16)


# --------------------------------------------------------------------------------------
# bf16 (GPU only)
# --------------------------------------------------------------------------------------
@requires_gpu
@pytest.mark.parametrize("case", ["plain_3to5", "upsample", "stride2_odd", "skip_upsample", "wide"])
def test_kernels_bf16_gpu(case):
    x, skip, w, b, scale = _inputs(case, torch.bfloat16)
    up, stride, act = CASES[case][6:9]
    with torch.no_grad():
        y = R.conv3x3_elu_ref(x.float(), w, b, skip=None if skip is None else skip.float(),
                              upsample=up, stride=stride, activation=act)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, x.dtype)
    _, ref = _ref_grads(x, skip, w, b, dy, case, scale=scale)
    got = _run_kernels(x, skip, w, dy.contiguous(memory_format=CL),
                       y.to(x.dtype).contiguous(memory_format=CL), case, scale=scale)
    for k in ("dx", "dw", "db", "dskip"):
        if ref[k] is not None:
            _close(k, got[k], ref[k], torch.bfloat16)
