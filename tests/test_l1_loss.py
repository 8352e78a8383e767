"""The Triton L1 loss / BEGAN update kernels against the reference (interpreter on CPU).

Tolerances: fp32 sums differ from torch's by reduction order only (rtol 1e-6); fp16 / bf16
inputs are upcast to fp32 in both, so the same. Gradients are sign(.) * g / n: exact in
fp32 / fp16 (bf16: see the test). No tl.dot here, so bf16 is right in the interpreter.
"""
import pytest
import torch

from fastbegan.ops import reference as ref

tl_loss = pytest.importorskip("fastbegan.ops.triton_loss", reason="triton is not importable")

CL = torch.channels_last


def _t(shape, dtype=torch.float32, cl=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(device, dtype)
    return t.contiguous(memory_format=CL) if cl and t.dim() == 4 else t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous", "mixed", "strided"])
def test_l1_forward_backward(dtype, layout, device):
    """bf16 gradients: 1 ulp (the interpreter's fp32 -> bf16 cast does not round to nearest
    as the GPU's does); fp32 / fp16 gradients exact."""
    x = _t((3, 3, 7, 5), dtype, cl=layout != "contiguous", seed=1, device=device)
    r = _t((3, 3, 7, 5), dtype, cl=layout == "channels_last", seed=2, device=device)
    if layout == "strided":
        r = _t((3, 3, 14, 5), dtype, seed=2, device=device)[:, :, ::2]
    x[0, 0, 0, :3] = r[0, 0, 0, :3]  # exact ties: sign(0) = 0
    xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
    xb, rb = x.clone().requires_grad_(), r.clone().requires_grad_()
    loss = tl_loss.l1_recon_loss(xa, ra)
    want = ref.l1_recon_loss_ref(xb, rb)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=0)
    (loss * 3.0).backward()
    (want * 3.0).backward()
    assert xa.grad.dtype == dtype and ra.grad.dtype == dtype
    tol = dict(rtol=2**-7, atol=0) if dtype == torch.bfloat16 else dict(rtol=0, atol=0)
    torch.testing.assert_close(xa.grad, xb.grad, **tol)
    torch.testing.assert_close(ra.grad, rb.grad, **tol)
    assert (ra.grad[0, 0, 0, :3] == 0).all()


def test_l1_gradient_for_recon_only(device):
    """The trainer's L_real: the target x needs no gradient, only D's output does (the
    backward op then returns two empty placeholders, which must not alias each other)."""
    x = _t((2, 3, 4, 4), seed=3, device=device)
    r = _t((2, 3, 4, 4), seed=4, device=device).requires_grad_()
    g, = torch.autograd.grad(tl_loss.l1_recon_loss(x, r), r)
    want, = torch.autograd.grad(ref.l1_recon_loss_ref(x, r), r)
    torch.testing.assert_close(g, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32, torch.float32),
                                    (torch.float32, torch.float16, torch.float16)])
def test_l1_pair(dtypes, device):
    """Real (fp32 data) and fake (G's dtype) halves against D's 2B output, one launch."""
    b = 2
    x_real = _t((b, 3, 8, 8), dtypes[0], seed=3, device=device)
    x_fake = _t((b, 3, 8, 8), dtypes[1], seed=4, device=device).requires_grad_()
    rec = _t((2 * b, 3, 8, 8), dtypes[2], seed=5, device=device).requires_grad_()
    lr, lf = tl_loss.l1_recon_loss_pair(x_real, x_fake, rec)
    xf2, rec2 = x_fake.detach().clone().requires_grad_(), rec.detach().clone().requires_grad_()
    lr2 = ref.l1_recon_loss_ref(x_real, rec2[:b])
    lf2 = ref.l1_recon_loss_ref(xf2, rec2[b:])
    torch.testing.assert_close(lr, lr2, rtol=1e-6, atol=0)
    torch.testing.assert_close(lf, lf2, rtol=1e-6, atol=0)
    (lr * 0.7 - lf * 1.3).backward()
    (lr2 * 0.7 - lf2 * 1.3).backward()
    torch.testing.assert_close(x_fake.grad, xf2.grad, rtol=0, atol=0)
    torch.testing.assert_close(rec.grad, rec2.grad, rtol=0, atol=0)


def test_l1_pair_many_partials(device):
    """More blocks than the cap on partial sums: programs loop over several blocks."""
    n_block = tl_loss._BLOCK * tl_loss._MAX_PARTS
    b = 1
    x_real = torch.rand(b, 3, 1, n_block // 3 + 101, device=device)
    x_fake = torch.rand_like(x_real)
    rec = torch.rand(2 * b, *x_real.shape[1:], device=device)
    lr, lf = tl_loss.l1_recon_loss_pair(x_real, x_fake, rec)
    torch.testing.assert_close(lr, ref.l1_recon_loss_ref(x_real, rec[:b]), rtol=1e-5, atol=0)
    torch.testing.assert_close(lf, ref.l1_recon_loss_ref(x_fake, rec[b:]), rtol=1e-5, atol=0)


@pytest.mark.parametrize("k,lr,lf", [(0.3, 0.5, 0.2), (0.0005, 0.1, 0.9), (0.9995, 0.9, 0.01),
                                     (0.0, 0.0, 0.0)])
def test_began_update(k, lr, lf, device):
    """Including the clip at 0 and 1."""
    k_t = torch.tensor(k, device=device)
    a, b = torch.tensor(lr, device=device), torch.tensor(lf, device=device)
    got = tl_loss.began_update(k_t, a, b, 0.5, 0.001)
    want = ref.began_update_ref(k_t, a, b, 0.5, 0.001)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and g.shape == ()
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # clip: a large lambda_k drives k past both ends
    for lam in (10.0, -10.0):
        torch.testing.assert_close(tl_loss.began_update(k_t, a, b, 0.5, lam)[0],
                                   ref.began_update_ref(k_t, a, b, 0.5, lam)[0], rtol=0, atol=0)


def test_pair_with_fused_update(device):
    b = 2
    x_real, x_fake = _t((b, 3, 8, 8), seed=6, device=device), _t((b, 3, 8, 8), seed=7, device=device)
    rec = _t((2 * b, 3, 8, 8), seed=8, device=device)
    k = torch.tensor(0.25, device=device)
    losses, k_next, m = tl_loss.l1_recon_loss_pair_began(x_real, x_fake, rec, k, 0.7, 0.01)
    lr, lf = tl_loss.l1_recon_loss_pair(x_real, x_fake, rec)
    torch.testing.assert_close(losses, torch.stack([lr, lf]), rtol=0, atol=0)
    k_ref, m_ref = ref.began_update_ref(k, lr, lf, 0.7, 0.01)
    torch.testing.assert_close(k_next, k_ref, rtol=0, atol=0)
    torch.testing.assert_close(m, m_ref, rtol=0, atol=0)
    assert not k_next.requires_grad and not m.requires_grad


def test_bad_shapes_are_clear_errors(device):
    x = torch.zeros(2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="recon has shape"):
        tl_loss.l1_recon_loss(x, torch.zeros(2, 3, 4, 5, device=device))
    with pytest.raises(ValueError, match="recon has shape"):
        tl_loss.l1_recon_loss_pair(x, x, x)


def test_backend_dispatch(device):
    """ops.l1_recon_loss / ops.began_update on the triton backend reach these kernels."""
    pytest.importorskip("fastbegan.ops.triton_conv", reason="fastbegan.ops.triton_conv not importable yet")
    from fastbegan import ops
    x, r = _t((2, 3, 4, 4), seed=9, device=device), _t((2, 3, 4, 4), seed=10, device=device)
    with ops.use_backend("triton"):
        got = ops.l1_recon_loss(x, r)
    torch.testing.assert_close(got, ref.l1_recon_loss_ref(x, r), rtol=1e-6, atol=0)


def test_opcheck(device):
    """Schema, fake impls, autograd registration, aot dispatch (torch.library.opcheck)."""
    ops_ = torch.ops.fastbegan
    b = 2
    x_real = _t((b, 3, 4, 4), seed=11, device=device)
    x_fake = _t((b, 3, 4, 4), seed=12, device=device).requires_grad_()
    rec = _t((2 * b, 3, 4, 4), seed=13, device=device).requires_grad_()
    k = torch.tensor(0.2, device=device)
    cases = [
        (ops_.l1_loss.default, (x_fake, rec[:b].detach().requires_grad_())),
        (ops_.l1_loss_pair.default, (x_real, x_fake, rec)),
        (ops_.l1_loss_pair_began.default, (x_real, x_fake, rec, k, 0.5, 0.001)),
        (ops_.began_update.default, (k, torch.tensor(0.3, device=device),
                                     torch.tensor(0.1, device=device), 0.5, 0.001)),
        (ops_.l1_loss_backward.default, (x_real, x_fake.detach(), rec.detach(),
                                         torch.tensor([1.0, -2.0], device=device), False, True)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.slow
def test_sm90_compile():
    """Every loss kernel variant compiles for Hopper (sm_90) without spills (no GPU needed)."""
    from fastbegan.kernels import aot
    try:
        rows = aot.compile_table_subprocess(["fastbegan.kernels.l1_loss:aot_specs"], workers=1)
    except aot.Sm90Unavailable as e:
        pytest.skip(str(e))
    assert len(rows) == 8
    bad = [(r["kernel"], r["variant"], r["problems"]) for r in rows if r["problems"]]
    assert not bad, bad
