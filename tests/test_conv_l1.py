"""D's last conv fused with the L1 losses and the BEGAN update (fastbegan::conv3x3_l1_pair_began).

Against the pure-PyTorch composition (``reference.conv3x3_l1_pair_began_ref``: F.conv2d,
fp32 L1 means, ``began_update_ref``) and torch autograd through it: the losses, k_next,
M, the reconstruction, and the gradients of h, the weight, the bias and both targets,
with and without the per-sample weight-gradient scale. Without a GPU the kernels run in
the Triton interpreter (fp32 and fp16; bf16 on the GPU only, docs/design.md §8).
"""
from __future__ import annotations

import pytest
import torch

from testutil import DEVICE, assert_close_rel, requires_gpu
from fastbegan import ops
from fastbegan.kernels import conv3x3_bwd
from fastbegan.ops import reference as R

CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("triton_backend")


def _inputs(b, c, hw, dtype, device=DEVICE, bias=True, nchw_targets=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_, w_ = hw

    def t(*shape, cl=True, dt=dtype):
        x = torch.randn(*shape, generator=g).to(device=device, dtype=dt)
        return (x.contiguous(memory_format=CL) if cl else x).requires_grad_(True)

    return dict(
        h=t(2 * b, c, h_, w_),
        weight=t(3, c, 3, 3, dt=torch.float32),  # fp32 master weights, as in training
        bias=t(3, cl=False, dt=torch.float32) if bias else None,
        x_real=t(b, 3, h_, w_, cl=not nchw_targets, dt=torch.float32),  # the exact real batch
        x_fake=t(b, 3, h_, w_, cl=not nchw_targets),
    )


def _run(fn, inp, k, scale, upstream):
    """Values and gradients of every differentiable input for ``sum(upstream * losses)``."""
    losses, k_next, m, recon = fn(inp["h"], inp["weight"], inp["bias"], inp["x_real"],
                                  inp["x_fake"], k, 0.7, 0.01, scale)
    leaves = {n: v for n, v in inp.items() if v is not None}
    grads = torch.autograd.grad((losses * upstream).sum(), list(leaves.values()))
    return dict(losses=losses, k_next=k_next, M=m, recon=recon), dict(zip(leaves, grads))


def _triton(h, w, b, xr, xf, k, gamma, lam, scale):
    return ops.conv3x3_l1_pair_began(h, w, b, xr, xf, k, gamma, lam, wgrad_scale=scale)


def _reference(h, w, b, xr, xf, k, gamma, lam, scale):
    return R.conv3x3_l1_pair_began_ref(h, w, b, xr, xf, k, gamma, lam, scale)


# (B, C, (H, W)): tiny; odd sizes; several 128-pixel M tiles and 16-channel tiles of the
# interpreter's config (dgrad writes the target gradients from channel tile 0 only)
SHAPES = {"tiny": (1, 4, (5, 5)), "odd": (2, 5, (7, 6)), "tiles": (2, 20, (9, 9))}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("scaled", [True, False])
def test_matches_reference_fp32(shape, scaled):
    b, c, hw = SHAPES[shape]
    inp = _inputs(b, c, hw, torch.float32, nchw_targets=shape == "odd", bias=shape != "tiny")
    k = torch.tensor(0.37, device=DEVICE)
    scale = torch.cat([torch.ones(b), torch.full((b,), -0.37)]).to(DEVICE) if scaled else None
    up = torch.tensor([0.8, -1.7], device=DEVICE)  # both halves' upstream gradients used
    vals, grads = _run(_triton, inp, k, scale, up)
    rvals, rgrads = _run(_reference, inp, k, scale, up)
    for name in vals:
        assert_close_rel(name, vals[name], rvals[name], torch.float32)
    assert set(grads) == set(rgrads)
    for name in grads:
        assert_close_rel("grad " + name, grads[name], rgrads[name], torch.float32)
    assert not vals["recon"].requires_grad and not vals["k_next"].requires_grad


def test_matches_reference_fp16():
    inp = _inputs(2, 6, (6, 7), torch.float16)
    k = torch.tensor(0.5, device=DEVICE)
    scale = torch.tensor([1.0, 1.0, -0.5, -0.5], device=DEVICE)
    up = torch.tensor([1.0, 1.0], device=DEVICE)
    vals, grads = _run(_triton, inp, k, scale, up)
    rvals, rgrads = _run(_reference, inp, k, scale, up)
    for name in ("losses", "recon"):
        assert_close_rel(name, vals[name], rvals[name], torch.float16)
    for name in grads:
        assert_close_rel("grad " + name, grads[name], rgrads[name], torch.float16)


def test_l1_gradient_is_sign_over_numel_and_zero_on_ties():
    """The kernels' L1 gradient written out by hand: targets equal to the reconstruction
    give sign 0 (no gradient from that half, as torch's abs' at 0) and L_fake = 0."""
    b, c, hw = 2, 4, (5, 6)
    inp = _inputs(b, c, hw, torch.float32)
    k = torch.tensor(0.0, device=DEVICE)
    with torch.no_grad():
        *_, recon = _triton(inp["h"], inp["weight"], inp["bias"], inp["x_real"], inp["x_fake"],
                            k, 0.7, 0.01, None)
    x_fake = recon[b:].clone().requires_grad_(True)
    losses, *_ = _triton(inp["h"], inp["weight"], inp["bias"], inp["x_real"], x_fake, k, 0.7,
                         0.01, None)
    assert losses[1].item() == 0.0
    dh, dw, dxr, dxf = torch.autograd.grad(losses.sum(), [inp["h"], inp["weight"], inp["x_real"],
                                                          x_fake])
    assert torch.count_nonzero(dxf) == 0
    n = inp["x_real"].numel()
    want_dxr = -torch.sign(recon[:b] - inp["x_real"].detach()) / n
    torch.testing.assert_close(dxr, want_dxr, rtol=1e-6, atol=0)
    # dh of the real half only: conv_transpose of sign/n; the fake half receives nothing
    assert torch.count_nonzero(dh[b:]) == 0
    dpre = torch.cat([-want_dxr, torch.zeros_like(want_dxr)])
    want_dh = torch.nn.grad.conv2d_input(inp["h"].shape, inp["weight"].detach(), dpre, padding=1)
    torch.testing.assert_close(dh, want_dh, rtol=1e-5, atol=1e-7)


def test_kernels_directly_with_split_k():
    """The launchers without autograd: several split-K chunks, both target gradients."""
    b, c, hw = 2, 6, (8, 8)
    inp = {n: v.detach() for n, v in _inputs(b, c, hw, torch.float32).items()}
    with torch.no_grad():
        y = R.conv3x3_elu_ref(inp["h"], inp["weight"], inp["bias"], activation=False)
    y = y.contiguous(memory_format=CL)
    g = torch.tensor([0.3, -2.0], device=DEVICE)
    scale = torch.tensor([1.0, 0.5, -0.2, -0.2], device=DEVICE)
    n = inp["x_real"].numel()
    target = torch.cat([inp["x_real"], inp["x_fake"]])
    dpre = torch.sign(y - target) * torch.cat([g[0].expand(b), g[1].expand(b)]).view(-1, 1, 1, 1) / n
    dh, dxr, dxf = conv3x3_bwd.conv3x3_l1_dgrad(inp["h"], inp["weight"], inp["x_real"], inp["x_fake"], y, g,
                                      True, True)
    torch.testing.assert_close(dxr, -dpre[:b], rtol=1e-6, atol=0)
    torch.testing.assert_close(dxf, -dpre[b:], rtol=1e-6, atol=0)
    want_dh = torch.nn.grad.conv2d_input(inp["h"].shape, inp["weight"], dpre, padding=1)
    torch.testing.assert_close(dh, want_dh, rtol=1e-5, atol=1e-7)
    dw, db = conv3x3_bwd.conv3x3_l1_wgrad(inp["h"], inp["weight"], inp["x_real"], inp["x_fake"], y, g,
                                scale, split_k=3)
    ds = dpre * scale.view(-1, 1, 1, 1)
    torch.testing.assert_close(dw, torch.nn.grad.conv2d_weight(inp["h"], inp["weight"].shape, ds,
                                                               padding=1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(db, ds.sum((0, 2, 3)), rtol=1e-5, atol=1e-7)
    _, none_r, none_f = conv3x3_bwd.conv3x3_l1_dgrad(inp["h"], inp["weight"], inp["x_real"], inp["x_fake"],
                                           y, g, False, False)
    assert none_r is None and none_f is None


def test_opcheck():
    inp = {n: (v.detach() if v is not None else None) for n, v in
           _inputs(1, 4, (5, 5), torch.float32).items()}
    k = torch.tensor(0.2, device=DEVICE)
    scale = torch.tensor([1.0, -0.2], device=DEVICE)
    args = (inp["h"].requires_grad_(), inp["weight"].requires_grad_(), inp["bias"],
            inp["x_real"], inp["x_fake"].requires_grad_(), scale, k, 0.7, 0.01)
    torch.library.opcheck(torch.ops.fastbegan.conv3x3_l1_pair_began.default, args)
    _, _, _, y = torch.ops.fastbegan.conv3x3_l1_pair_began(*[a.detach() if torch.is_tensor(a)
                                                            else a for a in args])
    g = torch.tensor([1.0, 0.5], device=DEVICE)
    base = (inp["h"].detach(), inp["weight"].detach(), inp["x_real"], inp["x_fake"].detach(), y, g)
    torch.library.opcheck(torch.ops.fastbegan.conv3x3_l1_dgrad.default, (*base, True, True))
    torch.library.opcheck(torch.ops.fastbegan.conv3x3_l1_wgrad.default, (*base, scale))


@pytest.mark.parametrize("bad, match", [
    (dict(x_fake=torch.zeros(1, 3, 5, 5)), "must both be"),
    (dict(h=torch.zeros(3, 4, 5, 5)), "must both be"),
    (dict(weight=torch.zeros(3, 5, 3, 3)), "must be \\(C_out, 4, 3, 3\\)"),
    (dict(scale=torch.ones(3)), "wgrad_scale must be \\(4,\\)"),
])
def test_bad_inputs_say_what_is_wrong(bad, match):
    inp = {n: (v.detach() if v is not None else None) for n, v in
           _inputs(2, 4, (5, 5), torch.float32).items()}
    scale = bad.pop("scale", None)
    inp.update({n: v.to(DEVICE) for n, v in bad.items()})
    with pytest.raises(ValueError, match=match):
        ops.conv3x3_l1_pair_began(inp["h"], inp["weight"], inp["bias"], inp["x_real"],
                                  inp["x_fake"], torch.tensor(0.0, device=DEVICE), 0.7, 0.01,
                                  wgrad_scale=None if scale is None else scale.to(DEVICE))


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_shape(dtype):
    """The decoder's last conv at res 128, n 128, batch 16 (2B = 32 samples)."""
    inp = _inputs(16, 128, (128, 128), dtype)
    k = torch.tensor(0.3, device=DEVICE)
    scale = torch.cat([torch.ones(16), torch.full((16,), -0.3)]).to(DEVICE)
    up = torch.tensor([1.0, 1.0], device=DEVICE)
    vals, grads = _run(_triton, inp, k, scale, up)
    rvals, rgrads = _run(_reference, inp, k, scale, up)
    for name in ("losses", "recon"):
        assert_close_rel(name, vals[name], rvals[name], dtype)
    for name in grads:
        assert_close_rel("grad " + name, grads[name], rgrads[name], dtype)
