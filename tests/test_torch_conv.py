"""fastbegan.ops.torch_conv (the torch backend's conv3x3 + bias + ELU) against the reference.

The reference is ``reference.conv3x3_elu_ref`` under plain autograd, with the per-sample
weight-gradient scale written out by hand (sample n's weight/bias gradient times s[n]),
in float64; every variant: plain, sub-pixel upsample, stride 2, skip, linear, scale.
"""
import itertools

import pytest
import torch

from fastbegan.ops import reference as R
from fastbegan.ops.torch_conv import conv3x3_elu_torch, subpixel_weight, subpixel_weight_adjoint

CASES = [c for c in itertools.product([False, True], [1, 2], [True, False], [False, True], [False, True])
         if not (c[0] and c[1] == 2)]  # upsample and stride 2 are not combined


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _inputs(up, skip, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = _cl(torch.randn(3, 5, 6, 6, generator=g, dtype=dtype)).requires_grad_()
    hs = 12 if up else 6
    sk = _cl(torch.randn(3, 2, hs, hs, generator=g, dtype=dtype)).requires_grad_() if skip else None
    w = torch.randn(4, 5 + (2 if skip else 0), 3, 3, generator=g, dtype=dtype).requires_grad_()
    b = torch.randn(4, generator=g, dtype=dtype).requires_grad_()
    return x, sk, w, b


def _reference_grads(x, sk, w, b, up, stride, act, scale, dy):
    """Input gradients of the plain autograd reference; weight and bias gradients as the
    per-sample sum weighted by ``scale``."""
    y = R.conv3x3_elu_ref(x, w, b, upsample=up, stride=stride, activation=act, skip=sk)
    gx = torch.autograd.grad(y, [t for t in (x, sk) if t is not None], dy)
    gw, gb = torch.zeros_like(w), torch.zeros_like(b)
    for n in range(x.shape[0]):
        yn = R.conv3x3_elu_ref(x[n:n + 1], w, b, upsample=up, stride=stride, activation=act,
                               skip=None if sk is None else sk[n:n + 1])
        a, c = torch.autograd.grad(yn, [w, b], dy[n:n + 1])
        s = 1.0 if scale is None else scale[n]
        gw, gb = gw + s * a, gb + s * c
    return y, gx, gw, gb


@pytest.mark.parametrize("up,stride,act,skip,scaled", CASES)
def test_matches_the_reference_float64(up, stride, act, skip, scaled):
    x, sk, w, b = _inputs(up, skip)
    scale = torch.tensor([1.0, -0.37, 0.5], dtype=torch.float64) if scaled else None
    y = conv3x3_elu_torch(x, w, b, upsample=up, stride=stride, activation=act, skip=sk, wgrad_scale=scale)
    assert y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(y)
    ry, rgx, rgw, rgb = _reference_grads(x, sk, w, b, up, stride, act, scale, dy)
    torch.testing.assert_close(y, ry, rtol=0, atol=1e-12)
    got = torch.autograd.grad(y, [t for t in (x, sk) if t is not None] + [w, b], dy)
    for g, want in zip(got, list(rgx) + [rgw, rgb]):
        torch.testing.assert_close(g, want, rtol=0, atol=1e-11)


def test_subpixel_weight_and_its_adjoint():
    """<subpixel_weight(w), g> = <w, adjoint(g)>, and each phase's taps sum the 3x3 taps
    they cover (16 of the 36 MACs per low-res pixel; design §3.1)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64)
    d4 = torch.randn(16, 3, 2, 2, generator=g, dtype=torch.float64)
    assert torch.allclose((subpixel_weight(w) * d4).sum(), (w * subpixel_weight_adjoint(d4)).sum())
    w4 = subpixel_weight(w).unflatten(0, (4, 4))
    torch.testing.assert_close(w4[0, :, :, 0, 0], w[:, :, 0, 0])  # phase (0, 0), tap (-1, -1)
    torch.testing.assert_close(w4[3, :, :, 1, 1], w[:, :, 2, 2])  # phase (1, 1), tap (+1, +1)
    torch.testing.assert_close(w4[0, :, :, 1, 1], w[:, :, 1:, 1:].sum((2, 3)))


@pytest.mark.parametrize("up", [False, True])
def test_bf16_autocast_close_to_fp32_and_dtypes(up):
    """Under bf16 autocast: bf16 output, gradients in the inputs' dtypes (fp32 master
    weights), values within bf16 rounding of the fp32 computation."""
    x, _, w, b = (t.detach().float().requires_grad_() if t is not None else None
                  for t in _inputs(up, False, seed=3))
    scale = torch.tensor([1.0, -0.2, 1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv3x3_elu_torch(x, w, b, upsample=up, wgrad_scale=scale)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y, dtype=torch.float32)
    gx, gw, gb = torch.autograd.grad(y, [x, w, b], dy.to(y.dtype))
    assert (gx.dtype, gw.dtype, gb.dtype) == (torch.float32,) * 3
    y32 = conv3x3_elu_torch(x, w, b, upsample=up, wgrad_scale=scale)
    want = torch.autograd.grad(y32, [x, w, b], dy)
    for got, ref in zip((y, gx, gw, gb), (y32,) + want):
        scale_ = ref.abs().max().item()
        assert (got.float() - ref).abs().max().item() <= 3e-2 * scale_


def test_no_grad_forward_is_the_reference():
    x, _, w, b = _inputs(True, False)
    with torch.no_grad():
        for up in (False, True):
            got = conv3x3_elu_torch(x, w, b, upsample=up)
            torch.testing.assert_close(got, R.conv3x3_elu_ref(x, w, b, upsample=up), rtol=0, atol=1e-12)


@pytest.mark.parametrize("up", [False, True])
def test_output_layout_follows_the_input_like_conv2d(up):
    """nn.Conv2d's rule (the drop-in relies on it): channels_last in -> channels_last out,
    NCHW in -> NCHW out, on the sub-pixel path too."""
    x, _, w, b = _inputs(up, False)
    assert conv3x3_elu_torch(x, w, b, upsample=up).is_contiguous(memory_format=torch.channels_last)
    y = conv3x3_elu_torch(x.detach().contiguous().requires_grad_(), w, b, upsample=up)
    assert y.is_contiguous()
    torch.testing.assert_close(y, R.conv3x3_elu_ref(x, w, b, upsample=up), rtol=0, atol=1e-12)
