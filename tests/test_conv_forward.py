"""Forward Triton conv3x3(+ELU) and nearest-upsample kernels against the torch reference.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1) at small shapes (<= 32 channels, <= 16x16); on a CUDA GPU the same
tests run compiled, plus the real-shape bf16 tests at the bottom.

Tolerances:
- fp32: the interpreter computes the dot products exactly in fp32 -> atol = rtol = 1e-4
  (on a GPU fp32 uses TF32 like cuDNN's default -> 2e-2).
- fp16 activations (weights cast to fp16 tile by tile, fp32 accumulation): compared with
  a float64 reference over the same fp16-rounded inputs; the output is rounded to fp16
  (half an ulp = 2**-11 relative) -> atol = rtol = 5e-3.
- bf16 (GPU only): 8 mantissa bits on the output -> atol = rtol = 2e-2, weights scaled
  so outputs are O(1).
bf16 is not tested under the interpreter: ``tl.dot`` on bf16 operands returns garbage
there (Triton 3.6 and 3.9, docs/design.md §8).
"""
import os

import pytest
import torch

from testutil import DEVICE, HAS_CUDA, requires_gpu
from fastbegan import ops
from fastbegan.kernels import conv3x3
from fastbegan.ops import reference
from fastbegan.ops import triton_conv as tc

CL = torch.channels_last
FP32_TOL = dict(atol=2e-2, rtol=2e-2) if HAS_CUDA else dict(atol=1e-4, rtol=1e-4)
FP16_TOL = dict(atol=5e-3, rtol=5e-3)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def make(n, c_x, c_out, h, w, *, c_s=0, upsample=False, dtype=torch.float32,
         wdtype=torch.float32, bias=True, seed=0, device=DEVICE):
    """Random channels_last inputs; weights scaled like a kaiming init (outputs O(1))."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_x, h, w, generator=g).to(device=device, dtype=dtype)
    hs, ws = (2 * h, 2 * w) if upsample else (h, w)
    skip = (torch.randn(n, c_s, hs, ws, generator=g).to(device=device, dtype=dtype)
            if c_s else None)
    fan_in = 9 * (c_x + c_s)
    wt = (torch.randn(c_out, c_x + c_s, 3, 3, generator=g) * (2.0 / fan_in) ** 0.5)
    wt = wt.to(device=device, dtype=wdtype).contiguous(memory_format=CL)
    b = (0.1 * torch.randn(c_out, generator=g)).to(device=device, dtype=wdtype) if bias else None
    x = x.contiguous(memory_format=CL)
    skip = skip.contiguous(memory_format=CL) if skip is not None else None
    return x, skip, wt, b


def ref64(x, skip, w, b, act_dtype, **kw):
    """Reference in float64 over the inputs as the kernel sees them (weights rounded to
    the activation dtype, as the kernel casts weight tiles on load)."""
    f = lambda t: None if t is None else t.to(act_dtype).double().cpu()  # noqa: E731
    return reference.conv3x3_elu_ref(f(x), f(w), None if b is None else b.double().cpu(),
                                     skip=f(skip), **kw)


def check(y, x, skip, w, b, tol, *, upsample=False, stride=1, activation=True):
    exp = ref64(x, skip, w, b, x.dtype, upsample=upsample, stride=stride, activation=activation)
    assert y.shape == exp.shape
    assert y.dtype == x.dtype
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y.double().cpu(), exp, **tol)


# (name, n, c_x, c_s, c_out, h, w, upsample, stride, activation): every constexpr variant.
VARIANTS = [
    ("plain", 2, 16, 0, 16, 8, 8, False, 1, True),
    ("upsample_nonsquare", 1, 16, 0, 16, 4, 8, True, 1, True),
    ("stride2", 2, 16, 0, 16, 8, 8, False, 2, True),
    ("skip", 1, 16, 16, 16, 8, 8, False, 1, True),
    ("upsample_skip", 1, 16, 16, 16, 4, 4, True, 1, True),
    ("stride2_skip_linear", 1, 16, 16, 16, 8, 8, False, 2, False),
    ("linear_to_rgb", 1, 16, 0, 3, 8, 16, False, 1, False),
]


@pytest.mark.parametrize("kernel", ["ptr", "tma"])
@pytest.mark.parametrize("case", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variants_fp32(kernel, case):
    name, n, c_x, c_s, c_out, h, w, up, stride, act = case
    if kernel == "tma" and not conv3x3.HAS_TENSOR_DESCRIPTOR:
        pytest.skip("this Triton has no tl.make_tensor_descriptor")
    if kernel == "tma" and HAS_CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor-descriptor kernel needs sm_90+")
    x, skip, wt, b = make(n, c_x, c_out, h, w, c_s=c_s, upsample=up)
    if kernel == "tma":
        assert conv3x3.tma_eligible(x, conv3x3.weight_matrix(wt), skip, up, stride)
    y = conv3x3.conv3x3_fwd(x, wt, b, skip=skip, upsample=up, stride=stride, activation=act,
                      kernel=kernel)
    check(y, x, skip, wt, b, FP32_TOL, upsample=up, stride=stride, activation=act)


@pytest.mark.parametrize("subpixel", [True, False], ids=["subpixel", "9tap"])
@pytest.mark.parametrize("c_s,c_out", [(0, 5), (16, 16)], ids=["cout5", "skip"])
def test_upsample_subpixel_and_9tap(subpixel, c_s, c_out):
    """Descriptor kernel, UPSAMPLE: the sub-pixel path (2x2 convs of the low-res input with
    summed weights, docs/design.md §3.1) and the 9-tap path give the reference result; C_out = 5
    checks that a phase's weight rows past C_out (the next phase's) are masked out."""
    if not conv3x3.HAS_TENSOR_DESCRIPTOR or (HAS_CUDA and torch.cuda.get_device_capability()[0] < 9):
        pytest.skip("tensor-descriptor kernel not available here")
    x, skip, wt, b = make(1, 16, c_out, 4, 6, c_s=c_s, upsample=True)
    y = conv3x3.conv3x3_fwd(x, wt, b, skip=skip, upsample=True, kernel="tma", subpixel=subpixel)
    check(y, x, skip, wt, b, FP32_TOL, upsample=True)


def test_subpixel_weights():
    """ws[phase, co, tap, c] sums the 3x3 taps that the 2x2 tap covers (docs/design.md §3.1)."""
    _, _, wt, _ = make(1, 4, 3, 4, 4, c_s=2)
    ws = conv3x3.subpixel_weight(conv3x3.weight_matrix(wt), 4, torch.float32).cpu()
    w = wt[:, :4].float().cpu()                          # (C_out, C_x, 3, 3)
    fold = {0: [[0], [1, 2]], 1: [[0, 1], [2]]}
    for py in range(2):
        for px in range(2):
            for a in range(2):
                for b in range(2):
                    exp = sum(w[:, :, kh, kw] for kh in fold[py][a] for kw in fold[px][b])
                    got = ws[(py * 2 + px) * 3:(py * 2 + px + 1) * 3,
                             (a * 2 + b) * 4:(a * 2 + b + 1) * 4]
                    torch.testing.assert_close(got, exp)


# Odd shapes: channel counts that are not multiples of 16 (the 3-channel first layer),
# odd and non-square spatial sizes, batch 1. These go through the custom op (auto pick).
ODD = [
    ("rgb_in", 1, 3, 0, 5, 8, 8, False, 1, True),
    ("rgb_in_nonsquare", 1, 3, 0, 5, 8, 16, False, 1, True),
    ("odd_hw_stride2", 1, 3, 0, 5, 7, 9, False, 2, True),
    ("odd_hw", 2, 5, 0, 7, 5, 3, False, 1, True),
    ("odd_upsample_skip", 1, 5, 3, 5, 3, 5, True, 1, True),
    ("no_bias_linear", 1, 6, 0, 3, 6, 10, False, 1, False),
]


@pytest.mark.parametrize("case", ODD, ids=[v[0] for v in ODD])
def test_odd_shapes(case):
    name, n, c_x, c_s, c_out, h, w, up, stride, act = case
    x, skip, wt, b = make(n, c_x, c_out, h, w, c_s=c_s, upsample=up,
                          bias=name != "no_bias_linear")
    y = tc.conv3x3_elu(x, wt, b, upsample=up, stride=stride, activation=act, skip=skip)
    check(y, x, skip, wt, b, FP32_TOL, upsample=up, stride=stride, activation=act)


def test_odd_channels_use_pointer_kernel_16_use_descriptors():
    x, _, wt, _ = make(1, 3, 5, 8, 8)
    assert not conv3x3.tma_eligible(x, conv3x3.weight_matrix(wt), None, False, 1)
    x, _, wt, _ = make(1, 16, 16, 8, 8)
    assert conv3x3.tma_eligible(x, conv3x3.weight_matrix(wt), None, False, 1) == (
        conv3x3.HAS_TENSOR_DESCRIPTOR and (not HAS_CUDA or torch.cuda.get_device_capability()[0] >= 9))


@pytest.mark.parametrize("kernel", ["ptr", "tma"])
@pytest.mark.parametrize("up,stride,c_s", [(False, 1, 0), (True, 1, 16), (False, 2, 0)],
                         ids=["plain", "upsample_skip", "stride2"])
def test_fp16_activations_fp32_weights(kernel, up, stride, c_s):
    """fp32 master weights with half activations: weight tiles are cast on load."""
    if kernel == "tma" and not (conv3x3.HAS_TENSOR_DESCRIPTOR and (
            not HAS_CUDA or torch.cuda.get_device_capability()[0] >= 9)):
        pytest.skip("tensor-descriptor kernel not available here")
    x, skip, wt, b = make(1, 16, 16, 8, 8, c_s=c_s, upsample=up, dtype=torch.float16)
    assert wt.dtype == torch.float32
    y = conv3x3.conv3x3_fwd(x, wt, b, skip=skip, upsample=up, stride=stride, kernel=kernel)
    check(y, x, skip, wt, b, FP16_TOL, upsample=up, stride=stride)


def test_fp16_weights_and_odd_channels():
    x, _, wt, b = make(1, 3, 5, 8, 8, dtype=torch.float16, wdtype=torch.float16)
    y = tc.conv3x3_elu(x, wt, b)
    check(y, x, None, wt, b, FP16_TOL)


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 tl.dot returns garbage under the Triton "
                    "interpreter (docs/design.md §8); bf16 is checked on the GPU")
@pytest.mark.parametrize("up,stride,c_s", [(False, 1, 0), (True, 1, 16), (False, 2, 0)])
def test_bf16_small(up, stride, c_s):
    x, skip, wt, b = make(2, 16, 16, 8, 8, c_s=c_s, upsample=up, dtype=torch.bfloat16)
    y = tc.conv3x3_elu(x, wt, b, upsample=up, stride=stride, skip=skip)
    check(y, x, skip, wt, b, BF16_TOL, upsample=up, stride=stride)


# ---------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------
def test_nchw_and_noncontiguous_inputs():
    x, skip, wt, b = make(1, 8, 8, 6, 6, c_s=8, upsample=True)
    expected = tc.conv3x3_elu(x, wt, b, upsample=True, skip=skip)
    check(expected, x, skip, wt, b, FP32_TOL, upsample=True)
    # NCHW-contiguous activations and an OIHW-contiguous weight
    y = tc.conv3x3_elu(x.contiguous(), wt.contiguous(), b, upsample=True, skip=skip.contiguous())
    assert y.is_contiguous(memory_format=CL)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)
    # non-contiguous views: every other channel of a wider tensor, a transposed skip
    wide = torch.zeros(1, 16, 6, 6, device=x.device, dtype=x.dtype)
    wide[:, ::2] = x
    skip_t = skip.transpose(2, 3).contiguous().transpose(2, 3)   # a W-major layout
    assert not wide[:, ::2].is_contiguous() and not skip_t.is_contiguous()
    y = tc.conv3x3_elu(wide[:, ::2], wt, b, upsample=True, skip=skip_t)
    torch.testing.assert_close(y, expected, atol=1e-6, rtol=1e-6)


def test_channels_last_weight_read_without_copy():
    _, _, wt, _ = make(1, 16, 16, 4, 4)
    w2 = conv3x3.weight_matrix(wt)
    assert w2.data_ptr() == wt.data_ptr() and w2.shape == (16, 9 * 16) and w2.is_contiguous()
    # K index (kh*3 + kw)*C_in + ci
    assert torch.equal(w2[3, (2 * 3 + 1) * 16 + 5], wt[3, 5, 2, 1])


# ---------------------------------------------------------------------------------------
# dispatch, validation
# ---------------------------------------------------------------------------------------
def _triton_ops_or_skip():
    try:
        import fastbegan.ops.triton_ops  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("fastbegan.ops.triton_") and e.name != \
                "fastbegan.ops.triton_conv":
            pytest.skip(f"triton backend incomplete in this tree ({e.name} missing)")
        raise


def test_dispatch_through_fastbegan_ops():
    _triton_ops_or_skip()
    x, skip, wt, b = make(1, 8, 8, 4, 4, c_s=4, upsample=True)
    with ops.use_backend("triton"):
        assert ops.get_backend() == "triton"
        y = ops.conv3x3_elu(x, wt, b, upsample=True, skip=skip)
        u = ops.upsample_nearest2x(x)
    check(y, x, skip, wt, b, FP32_TOL, upsample=True)
    torch.testing.assert_close(u, reference.upsample_nearest2x_ref(x), atol=0, rtol=0)
    with ops.use_backend("triton"):
        y2 = ops.conv3x3_elu(x, wt[:, :8], b, stride=2, activation=False)
    check(y2, x, None, wt[:, :8], b, FP32_TOL, stride=2, activation=False)


def test_input_validation_messages():
    x, skip, wt, b = make(1, 4, 4, 4, 4, c_s=2)
    with pytest.raises(ValueError, match="4-D"):
        tc.conv3x3_elu(x[0], wt, b, skip=skip)
    with pytest.raises(ValueError, match="channel mismatch"):
        tc.conv3x3_elu(x, wt, b)                     # weight expects 6 = 4 + 2 channels
    with pytest.raises(ValueError, match="skip has shape"):
        tc.conv3x3_elu(x, wt, b, skip=skip[:, :, :2])
    with pytest.raises(ValueError, match=r"\(C_out, C_in, 3, 3\)"):
        tc.conv3x3_elu(x, wt[:, :, :2], b, skip=skip)
    with pytest.raises(ValueError, match="bias"):
        tc.conv3x3_elu(x, wt, b[:2], skip=skip)
    with pytest.raises(ValueError, match="stride"):
        tc.conv3x3_elu(x, wt, b, skip=skip, stride=3)
    with pytest.raises(ValueError, match="upsample and stride"):
        tc.conv3x3_elu(x, wt, b, upsample=True, stride=2)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        tc.conv3x3_elu(x.double(), wt, b, skip=skip)
    with pytest.raises(ValueError, match="same device"):
        tc.conv3x3_elu(x, wt.to("meta"), b, skip=skip)
    with pytest.raises(ValueError, match="4-D"):
        tc.upsample_nearest2x(x[0])


def test_cpu_tensor_without_interpreter_says_use_torch_backend(monkeypatch):
    x, _, wt, b = make(1, 4, 4, 4, 4, device="cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="torch backend"):
        tc.conv3x3_elu(x, wt, b)
    with pytest.raises(RuntimeError, match="torch backend"):
        tc.upsample_nearest2x(x)
    monkeypatch.setattr(conv3x3, "INTERPRET", False)      # the launcher checks too
    with pytest.raises(RuntimeError, match="torch backend"):
        conv3x3.conv3x3_fwd(x, wt, b)


# ---------------------------------------------------------------------------------------
# upsample_nearest2x
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,dtype", [((2, 5, 3, 4), torch.float32),
                                         ((1, 16, 8, 8), torch.float16),
                                         ((1, 3, 1, 7), torch.bfloat16)])
def test_upsample_nearest2x(shape, dtype):
    x = torch.randn(*shape).to(device=DEVICE, dtype=dtype)
    y = tc.upsample_nearest2x(x)
    assert y.is_contiguous(memory_format=CL) and y.dtype == dtype
    torch.testing.assert_close(y, reference.upsample_nearest2x_ref(x), atol=0, rtol=0)


def test_upsample_nearest2x_autograd():
    x = torch.randn(2, 3, 3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    torch.autograd.gradcheck(tc.upsample_nearest2x, (x,))
    g = torch.randn(2, 3, 6, 10, dtype=torch.float64, device=DEVICE)
    dx, = torch.autograd.grad(tc.upsample_nearest2x(x), x, g)
    torch.testing.assert_close(dx, g.unflatten(3, (5, 2)).unflatten(2, (3, 2)).sum((3, 5)))


# ---------------------------------------------------------------------------------------
# custom-op registration
# ---------------------------------------------------------------------------------------
# opcheck runs: test_schema (the op does not mutate or alias its inputs),
# test_faketensor (fake impl: shape, dtype, strides -- channels_last -- match the real op),
# test_aot_dispatch_static / _dynamic (the op traces through AOTAutograd, with symbolic
# shapes for the dynamic one). The inputs do not require grad: the backward is another
# module's (triton_conv_bwd) and has its own opcheck; test_autograd_registration is
# then trivially satisfied.
OPCHECK_CASES = [
    ("plain", dict(c_s=0, upsample=False), False, 1, True),
    ("upsample_skip", dict(c_s=4, upsample=True), True, 1, True),
    ("stride2_linear", dict(c_s=0, upsample=False), False, 2, False),
    ("odd", dict(c_s=0, upsample=False), False, 1, True),
]


@pytest.mark.parametrize("case", OPCHECK_CASES, ids=[c[0] for c in OPCHECK_CASES])
def test_opcheck_conv3x3_elu(case):
    name, kw, up, stride, act = case
    c_x = 3 if name == "odd" else 4
    x, skip, wt, b = make(1, c_x, 4, 4, 4, **kw)
    scale = torch.ones(1, device=x.device)
    torch.library.opcheck(torch.ops.fastbegan.conv3x3_elu.default,
                          (x, wt, b, skip, scale, up, stride, act))


def test_opcheck_upsample_nearest2x():
    x = torch.randn(1, 4, 3, 5, device=DEVICE).contiguous(memory_format=CL)
    torch.library.opcheck(torch.ops.fastbegan.upsample_nearest2x.default, (x,))


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        x = torch.empty(2, 8, 5, 7).contiguous(memory_format=CL)
        w = torch.empty(6, 12, 3, 3)
        s = torch.empty(2, 4, 10, 14)
        y = torch.ops.fastbegan.conv3x3_elu(x, w, None, s, None, True, 1, True)
        assert y.shape == (2, 6, 10, 14) and y.is_contiguous(memory_format=CL)
        y = torch.ops.fastbegan.conv3x3_elu(x, w[:, :8], None, None, None, False, 2, False)
        assert y.shape == (2, 6, 3, 4) and y.is_contiguous(memory_format=CL)
        u = torch.ops.fastbegan.upsample_nearest2x(x)
        assert u.shape == (2, 8, 10, 14) and u.is_contiguous(memory_format=CL)


# ---------------------------------------------------------------------------------------
# GPU: real shapes in bf16
# ---------------------------------------------------------------------------------------
REAL = [
    # (name, c_x, c_s, c_out, h, w, upsample, stride, activation)
    ("plain_8", 128, 0, 128, 8, 8, False, 1, True),
    ("plain_128", 128, 0, 128, 128, 128, False, 1, True),
    ("upsample_8to16", 128, 0, 128, 8, 8, True, 1, True),
    ("upsample_64to128", 128, 0, 128, 64, 64, True, 1, True),
    ("upsample_skip_32to64", 128, 128, 128, 32, 32, True, 1, True),
    ("stride2_128", 128, 0, 128, 128, 128, False, 2, True),
    ("encoder_widen_32", 256, 0, 384, 32, 32, False, 1, True),
    ("rgb_in_128", 3, 0, 128, 128, 128, False, 1, True),
    ("to_rgb_128", 128, 0, 3, 128, 128, False, 1, False),
]


@requires_gpu
@pytest.mark.parametrize("case", REAL, ids=[c[0] for c in REAL])
def test_real_shapes_bf16_gpu(case):
    name, c_x, c_s, c_out, h, w, up, stride, act = case
    x, skip, wt, b = make(16, c_x, c_out, h, w, c_s=c_s, upsample=up, dtype=torch.bfloat16)
    y = tc.conv3x3_elu(x, wt, b, upsample=up, stride=stride, activation=act, skip=skip)
    exp = reference.conv3x3_elu_ref(x.float(), wt.to(torch.bfloat16).float(), b.float(),
                                    upsample=up, stride=stride, activation=act,
                                    skip=None if skip is None else skip.float())
    torch.testing.assert_close(y.float(), exp, **BF16_TOL)


@requires_gpu
@pytest.mark.parametrize("kernel", ["ptr", "tma"])
def test_both_kernels_agree_gpu(kernel):
    if kernel == "tma" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor-descriptor kernel needs sm_90+")
    x, skip, wt, b = make(16, 128, 128, 32, 32, c_s=64, upsample=True, dtype=torch.bfloat16)
    y = conv3x3.conv3x3_fwd(x, wt, b, skip=skip, upsample=True, kernel=kernel)
    exp = reference.conv3x3_elu_ref(x.float(), wt.to(torch.bfloat16).float(), b.float(),
                                    upsample=True, skip=skip.float())
    torch.testing.assert_close(y.float(), exp, **BF16_TOL)


def test_interpreter_flag_consistent():
    """The kernels were defined in the mode this test session runs in."""
    assert conv3x3.INTERPRET == (os.environ.get("TRITON_INTERPRET") == "1")
