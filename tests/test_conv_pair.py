"""``conv3x3_elu`` of a batch given as two halves (fastbegan::conv3x3_elu_pair) against the
reference ``conv3x3_elu(torch.cat([xa, xb]))``: values, the gradients of both halves, the
weight and the bias (with and without the per-sample scale), and that no gradient is
computed for a half that needs none. Triton interpreter without a GPU (fp32 / fp16)."""
from __future__ import annotations

import pytest
import torch

from testutil import DEVICE, assert_close_rel, requires_gpu
from fastbegan import ops

CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("triton_backend")


def _inputs(na, nb, c, co, hw, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def t(*shape, dt=dtype, cl=True):
        x = torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dt)
        return x.contiguous(memory_format=CL) if cl else x

    return (t(na, c, *hw), t(nb, c, *hw), t(co, c, 3, 3, dt=torch.float32),
            t(co, dt=torch.float32, cl=False))


def _grads(fn, xa, xb, w, b, scale, need_a, activation=True):
    xa = xa.detach().requires_grad_(need_a)
    leaves = [t.detach().requires_grad_(True) for t in (xb, w, b)]
    y = fn(xa, leaves[0], leaves[1], leaves[2], activation=activation, wgrad_scale=scale)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, ([xa] if need_a else []) + leaves, dy)
    return y, grads


def _reference(xa, xb, w, b, *, activation, wgrad_scale):
    with ops.use_backend("torch"):
        return ops.conv3x3_elu_pair(xa, xb, w, b, activation=activation, wgrad_scale=wgrad_scale)


@pytest.mark.parametrize("need_a", [False, True])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_concatenated_reference(need_a, scaled, dtype):
    na, nb = 2, 1  # unequal halves: the split is by the first half's size
    xa, xb, w, b = _inputs(na, nb, 3, 20, (7, 9), dtype)
    scale = torch.tensor([1.0, 0.5, -0.3], device=DEVICE) if scaled else None
    y, g = _grads(ops.conv3x3_elu_pair, xa, xb, w, b, scale, need_a)
    ry, rg = _grads(_reference, xa, xb, w, b, scale, need_a)
    assert y.shape == (na + nb, 20, 7, 9) and y.is_contiguous(memory_format=CL)
    assert_close_rel("y", y, ry, dtype)
    names = (["xa"] if need_a else []) + ["xb", "weight", "bias"]
    for name, a, r in zip(names, g, rg):
        assert_close_rel("grad " + name, a, r, dtype)


def test_linear_output_and_no_bias():
    xa, xb, w, _ = _inputs(1, 2, 4, 5, (6, 6), torch.float32)
    y = ops.conv3x3_elu_pair(xa, xb, w, None, activation=False)
    assert_close_rel("y", y, _reference(xa, xb, w, None, activation=False, wgrad_scale=None), torch.float32)
    assert (y < -1).any()  # no ELU: values below ELU's floor remain


def test_real_half_gets_no_dgrad(monkeypatch):
    """Only the half that needs a gradient is sent to the dgrad kernel (the saving)."""
    from fastbegan.kernels import conv3x3_bwd
    rows = []
    real = conv3x3_bwd.conv3x3_dgrad

    def spy(dy, y, weight, src, **kw):
        rows.append(src.shape[0])
        return real(dy, y, weight, src, **kw)
    monkeypatch.setattr(conv3x3_bwd, "conv3x3_dgrad", spy)
    xa, xb, w, b = _inputs(3, 2, 3, 4, (5, 5), torch.float32)
    _grads(ops.conv3x3_elu_pair, xa, xb, w, b, None, need_a=False)
    assert rows == [2]


def test_opcheck():
    xa, xb, w, b = _inputs(1, 1, 3, 4, (5, 5), torch.float32)
    scale = torch.tensor([1.0, -0.4], device=DEVICE)
    torch.library.opcheck(torch.ops.fastbegan.conv3x3_elu_pair.default,
                          (xa, xb.requires_grad_(), w.requires_grad_(), b, scale, True))


@pytest.mark.parametrize("kw, match", [
    (dict(xb=torch.zeros(1, 4, 5, 5)), "differ beyond the batch"),
    (dict(w=torch.zeros(4, 2, 3, 3)), "must be \\(C_out, 3, 3, 3\\)"),
    (dict(scale=torch.ones(5)), "wgrad_scale must be \\(2,\\)"),
])
def test_bad_inputs_say_what_is_wrong(kw, match):
    xa, xb, w, b = _inputs(1, 1, 3, 4, (5, 5), torch.float32)
    xb = kw.get("xb", xb).to(DEVICE)
    w = kw.get("w", w).to(DEVICE)
    scale = kw.get("scale")
    with pytest.raises(ValueError, match=match):
        ops.conv3x3_elu_pair(xa, xb, w, b, wgrad_scale=None if scale is None else scale.to(DEVICE))


@requires_gpu
def test_gpu_real_shape_bf16():
    """D's first conv at res 128, n 128: [x_real; G(z)] with batch 16 each."""
    xa, xb, w, b = _inputs(16, 16, 3, 128, (128, 128), torch.bfloat16)
    scale = torch.cat([torch.ones(16), torch.full((16,), -0.3)]).to(DEVICE)
    y, g = _grads(ops.conv3x3_elu_pair, xa, xb, w, b, scale, need_a=False)
    ry, rg = _grads(_reference, xa, xb, w, b, scale, need_a=False)
    assert_close_rel("y", y, ry, torch.bfloat16)
    for name, a, r in zip(["xb", "weight", "bias"], g, rg):
        assert_close_rel("grad " + name, a, r, torch.bfloat16)
