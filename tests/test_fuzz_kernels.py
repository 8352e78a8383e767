"""Fuzzing the Triton ops against the torch reference backend with hypothesis.

Random shapes (batch 1-2, channels 1-24, H, W 2..12, odd and non-square), dtypes (fp32,
fp16 activations; fp32 or activation-dtype weights), layouts (channels_last or NCHW) and
every variant (upsample, stride 2, skip concat, ELU or linear, bias or none, per-sample
wgrad scale) of ``fastbegan.ops.conv3x3_elu``, forward and backward, under
``use_backend("triton")`` vs ``use_backend("torch")``; the same for ``l1_recon_loss``
(including strided inputs and exact ties) and ``began_update``.

On CPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, tests/conftest.py),
so the number of examples is bounded: 20 conv cases (forward + backward), 25 loss and 25
k-update cases, about a minute on 2 idle cores; FASTBEGAN_FUZZ_EXAMPLES=200 fuzzes longer.
The reference runs in float64 over the inputs as the kernel sees them (rounded to the
activation dtype), and each tensor is compared as max |error| / max |reference|:
fp32 <= 1e-4, fp16 <= 1e-2 (fp16 storage of y, dy, dx; fp32 accumulation). A kernel bug
(a wrong index, a missed tail, a wrong adjoint) shows up as an O(1) error.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastbegan import ops

try:
    import fastbegan.ops.triton_ops  # noqa: F401  (the conv and the loss ops)
    _IMPORT_ERROR = None
except Exception as e:  # Triton missing, or the ops not written yet
    _IMPORT_ERROR = f"{e.__class__.__name__}: {e}"
_USABLE, _WHY = ops.triton_status()
pytestmark = [
    pytest.mark.skipif(_IMPORT_ERROR is not None, reason=f"the Triton ops are not importable ({_IMPORT_ERROR})"),
    pytest.mark.skipif(not _USABLE, reason=f"the triton backend cannot run here ({_WHY})"),
]

N = int(os.environ.get("FASTBEGAN_FUZZ_EXAMPLES", "10"))  # CI budget; more for a longer campaign
FUZZ = settings(max_examples=N, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@st.composite
def conv_cases(draw):
    variant = draw(st.sampled_from(["plain", "upsample", "stride2"]))
    c_x = draw(st.integers(1, 24))
    c_s = draw(st.integers(1, max(1, 24 - c_x))) if draw(st.booleans()) else 0
    if variant == "upsample":  # the conv's input (after the 2x upsample) is 2..12 a side
        h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    else:
        h, w = draw(st.integers(2, 12)), draw(st.integers(2, 12))
    return dict(variant=variant, n=draw(st.integers(1, 2)), c_x=c_x, c_s=c_s,
                c_out=draw(st.integers(1, 24)), h=h, w=w, activation=draw(st.booleans()),
                bias=draw(st.booleans()), scale=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float16])),
                w_fp32=draw(st.booleans()), channels_last=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def _rel_err(got, ref):
    return ((got.double().cpu() - ref).abs().max() / ref.abs().max().clamp_min(1e-3)).item()


def _conv(backend, c, x, w, b, skip, scale, dy):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, skip)]
    with ops.use_backend(backend):
        y = ops.conv3x3_elu(leaves[0], leaves[1], leaves[2], upsample=c["variant"] == "upsample",
                            stride=2 if c["variant"] == "stride2" else 1,
                            activation=c["activation"], skip=leaves[3], wgrad_scale=scale)
        ins = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(y, ins, dy.to(y.dtype))
    names = [n for n, t in zip(("dx", "dw", "db", "dskip"), leaves) if t is not None]
    return y, dict(zip(names, grads))


@FUZZ
@given(c=conv_cases())
def test_conv3x3_elu_forward_backward(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt, n = c["dtype"], c["n"]
    hs, ws = (2 * c["h"], 2 * c["w"]) if c["variant"] == "upsample" else (c["h"], c["w"])
    fmt = torch.channels_last if c["channels_last"] else torch.contiguous_format
    x = torch.randn(n, c["c_x"], c["h"], c["w"], generator=g).to(dt).contiguous(memory_format=fmt)
    skip = (torch.randn(n, c["c_s"], hs, ws, generator=g).to(dt).contiguous(memory_format=fmt)
            if c["c_s"] else None)
    c_in = c["c_x"] + c["c_s"]
    wdt = torch.float32 if c["w_fp32"] else dt
    w = (torch.randn(c["c_out"], c_in, 3, 3, generator=g) * (2.0 / (9 * c_in)) ** 0.5).to(wdt)
    w = w.contiguous(memory_format=torch.channels_last)
    b = (0.1 * torch.randn(c["c_out"], generator=g)).to(wdt) if c["bias"] else None
    scale = torch.empty(n).uniform_(-1, 1, generator=g) if c["scale"] else None
    stride = 2 if c["variant"] == "stride2" else 1
    dy = torch.randn(n, c["c_out"], (hs - 1) // stride + 1, (ws - 1) // stride + 1, generator=g).to(dt)
    mv = lambda t: None if t is None else t.to(DEV)  # noqa: E731
    y, got = _conv("triton", c, mv(x), mv(w), mv(b), mv(skip), mv(scale), mv(dy))
    # the reference: float64 over the values the kernel sees (weights rounded to the activation dtype)
    d = lambda t: None if t is None else t.to(dt).double()  # noqa: E731
    y_ref, ref = _conv("torch", c, d(x), d(w), None if b is None else b.double(), d(skip),
                       None if scale is None else scale.double(), dy.double())
    assert y.shape == y_ref.shape and y.dtype == dt
    errs = {"y": _rel_err(y, y_ref)} | {k: _rel_err(got[k], ref[k]) for k in ref}
    assert got["dw"].dtype == wdt and got["dx"].dtype == dt
    bad = {k: f"{e:.2e}" for k, e in errs.items() if not e <= TOL[dt]}
    assert not bad, f"{c}: relative errors {bad} (tolerance {TOL[dt]})"


@st.composite
def loss_cases(draw):
    return dict(shape=(draw(st.integers(1, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 12)),
                       draw(st.integers(1, 12))),
                dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                layout_x=draw(st.sampled_from(["channels_last", "contiguous", "strided"])),
                layout_r=draw(st.sampled_from(["channels_last", "contiguous", "strided"])),
                ties=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)))


def _layout(t, how):
    if how == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if how == "strided":  # every other column of a wider tensor
        wide = torch.zeros(*t.shape[:3], 2 * t.shape[3], dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t.contiguous()


@settings(FUZZ, max_examples=N + 5)
@given(c=loss_cases())
def test_l1_recon_loss(c):
    g = torch.Generator().manual_seed(c["seed"])
    x = torch.randn(c["shape"], generator=g).to(c["dtype"])
    r = torch.randn(c["shape"], generator=g).to(c["dtype"])
    if c["ties"]:  # x == recon somewhere: the gradient there is sign(0) = 0
        r.view(-1)[::3] = x.view(-1)[::3]
    x, r = _layout(x, c["layout_x"]).to(DEV), _layout(r, c["layout_r"]).to(DEV)
    out = {}
    for backend in ("triton", "torch"):
        xa, ra = x.detach().clone().requires_grad_(True), r.detach().clone().requires_grad_(True)
        with ops.use_backend(backend):
            loss = ops.l1_recon_loss(xa, ra)
            gx, gr = torch.autograd.grad(loss * 3.0, [xa, ra])
        out[backend] = (loss, gx, gr)
    (l_t, gx_t, gr_t), (l_r, gx_r, gr_r) = out["triton"], out["torch"]
    assert l_t.dtype == torch.float32 and l_t.shape == ()
    torch.testing.assert_close(l_t, l_r.float(), rtol=1e-5, atol=1e-7, msg=lambda m: f"{c}: {m}")
    # sign(x - r) * 3 / numel: exact in fp32 / fp16; bf16 within 1 ulp (the interpreter's cast)
    gtol = dict(rtol=1e-2, atol=0) if c["dtype"] == torch.bfloat16 else dict(rtol=0, atol=0)
    torch.testing.assert_close(gx_t, gx_r, **gtol, msg=lambda m: f"{c}: {m}")
    torch.testing.assert_close(gr_t, gr_r, **gtol, msg=lambda m: f"{c}: {m}")


@settings(FUZZ, max_examples=N + 5)
@given(k=st.floats(0, 1), lr_=st.floats(0, 2), lf=st.floats(0, 2), gamma=st.floats(0.05, 1.5),
       lam=st.floats(1e-4, 0.5))
def test_began_update(k, lr_, lf, gamma, lam):
    t = lambda v: torch.tensor(v, dtype=torch.float32, device=DEV)  # noqa: E731
    with ops.use_backend("triton"):
        k_t, m_t = ops.began_update(t(k), t(lr_), t(lf), gamma, lam)
    with ops.use_backend("torch"):
        k_r, m_r = ops.began_update(t(k), t(lr_), t(lf), gamma, lam)
    torch.testing.assert_close(k_t, k_r, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m_t, m_r, rtol=1e-6, atol=1e-7)
    assert 0.0 <= k_t.item() <= 1.0
