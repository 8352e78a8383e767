"""The drop-in paths (issue 8): fastbegan.nn.Conv2dELU, fastbegan.optimize and
torch.compile(backend="fastbegan"), on third-party-style models written here in three
styles. Each must compute what the original model computes (outputs and parameter
gradients), with state_dict keys and values unchanged and unsupported layers left alone.

Cost (2 CPU cores): one inductor compile (the README example, forward + backward, ~30 s),
two aot_eager compiles (a few s each), the Triton interpreter at 8x8 / 4 channels.
"""
from __future__ import annotations

import copy
import functools
import importlib
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastbegan
from fastbegan import dropin, ops
from fastbegan.nn import Conv2dELU, conv2d_support

from testutil import HAS_CUDA

ROOT = Path(__file__).resolve().parents[1]
C = 4  # channels: tiny, the Triton interpreter is slow
pytestmark = pytest.mark.filterwarnings("ignore:`nn.functional.upsample_nearest` is deprecated")


# ----------------------------------------------------------------------------------------
# Third-party-style models
# ----------------------------------------------------------------------------------------
def seq_net(c: int = C) -> nn.Sequential:
    """Style 1: nn.Sequential stacks, nested, every fusable variant plus a BatchNorm."""
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ELU(),                                      # 0, 1
        nn.Sequential(nn.Conv2d(c, c, 3, padding=1, stride=2, bias=False),
                      nn.ELU(inplace=True)),                                          # 2
        nn.Conv2d(c, c, 3, padding="same"), nn.BatchNorm2d(c), nn.ELU(),              # 3-5: kept
        nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1),
        nn.ELU(),                                                                     # 6-8
        nn.UpsamplingNearest2d(scale_factor=2), nn.Conv2d(c, 3, 3, padding=(1, 1)),   # 9, 10
        nn.Tanh())


SEQ_FUSED = ["0", "2.0", "7", "10"]
SEQ_KEPT = ["3"]


class FunctionalNet(nn.Module):
    """Style 2: raw Parameters and functional calls in forward (F.conv2d / F.elu /
    F.interpolate / F.upsample_nearest), one conv module called from forward."""

    def __init__(self, c: int = C):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        p = lambda *s: nn.Parameter(0.3 * torch.randn(*s, generator=g))  # noqa: E731
        self.w1, self.b1 = p(c, 3, 3, 3), p(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.w3 = p(c, c, 3, 3)
        self.w4, self.b4 = p(c, c, 3, 3), p(c)
        self.w5 = p(c, c, 3, 3)
        self.w6 = p(3, c, 3, 3)

    def forward(self, x):
        h = F.elu(F.conv2d(x, self.w1, self.b1, padding=1))                 # conv + elu
        h = F.elu(self.conv2(h), inplace=True)                               # module conv + elu_
        h = F.elu(F.conv2d(h, self.w3, stride=2, padding=1), 1.0)            # stride 2
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = F.elu(F.conv2d(h, self.w4, self.b4, 1, (1, 1)))                  # upsample + conv + elu
        y = F.conv2d(h, self.w5, padding=1)
        h = F.elu(y) + 0.1 * y                                               # 2 users: not fused
        return F.conv2d(F.upsample_nearest(h, scale_factor=2), self.w6, padding=1)  # up + conv


FUNC_COMPILE_FUSED = 5  # w1, conv2, w3, w4 (with upsample), w6 (upsample, no ELU)


class SkipNet(nn.Module):
    """Style 3: U-Net-like, Sequential blocks, a torch.cat skip, and convs the kernels do
    not support (5x5, dilation 2, groups 2, reflect padding, ELU alpha 0.5), left alone."""

    def __init__(self, c: int = C):
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.ELU(),
                                  nn.Conv2d(c, c, 3, stride=2, padding=1), nn.ELU())
        self.mid = nn.Sequential(nn.Conv2d(c, c, 5, padding=2), nn.ELU(),
                                 nn.Conv2d(c, c, 3, padding=2, dilation=2), nn.ELU(),
                                 nn.Conv2d(c, c, 3, padding=1, groups=2), nn.ELU())
        self.up = nn.Sequential(nn.UpsamplingNearest2d(scale_factor=2),
                                nn.Conv2d(c, c, 3, padding=1), nn.ELU())
        self.skip_proj = nn.Conv2d(3, c, 1)
        self.head = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1), nn.ELU(alpha=0.5),
                                  nn.Conv2d(c, 3, 3, padding=1, padding_mode="reflect"))

    def forward(self, x):
        u = self.up(self.mid(self.down(x)))
        return self.head(torch.cat([u, self.skip_proj(x)], dim=1))


SKIP_FUSED = ["down.0", "down.2", "up.1"]
SKIP_KEPT = {"mid.0": "5, 5", "mid.2": "dilation", "mid.4": "groups", "head.0": "alpha",
             "head.2": "reflect", "skip_proj": "1, 1"}

MODELS = {"sequential": (seq_net, SEQ_FUSED, SEQ_KEPT),
          "functional": (FunctionalNet, [], ["conv2"]),
          "skip": (SkipNet, SKIP_FUSED, list(SKIP_KEPT))}


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[name][0]()


def grads_of(model: nn.Module, x: torch.Tensor):
    """Output, input gradient and {name: parameter gradient} of a fixed scalar loss."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    torch.manual_seed(123)
    (y * torch.randn_like(y)).sum().backward()
    return y.detach(), x.grad, {n.removeprefix("_orig_mod."): p.grad.clone()
                                for n, p in model.named_parameters()}


def assert_same_computation(a: nn.Module, b: nn.Module, x: torch.Tensor, **tol):
    ya, gxa, ga = grads_of(a, x)
    yb, gxb, gb = grads_of(b, x)
    torch.testing.assert_close(yb, ya, **tol)
    torch.testing.assert_close(gxb, gxa, **tol)
    assert list(gb) == list(ga)
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], msg=lambda m: f"grad of {n}: {m}", **tol)


def assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sb) == list(sa)
    for k in sa:
        assert sb[k].shape == sa[k].shape and sb[k].dtype == sa[k].dtype, k
        assert torch.equal(sb[k], sa[k]), k


def x_input(n=2, h=8, device="cpu"):
    return torch.randn(n, 3, h, h, generator=torch.Generator().manual_seed(7)).to(device)


# ----------------------------------------------------------------------------------------
# fastbegan.optimize on the torch backend
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODELS))
def test_optimize_same_outputs_grads_and_state(name):
    model = make(name)
    fast, report = fastbegan.optimize(model, backend="torch")
    _, fused, kept = MODELS[name]
    assert fast is not model
    assert [r.path for r in report.replaced] == fused
    assert sorted(s.path for s in report.skipped) == sorted(kept)
    assert f"fused {len(fused)} of {len(fused) + len(kept)} Conv2d" in str(report)
    for path in fused:
        assert isinstance(fast.get_submodule(path), Conv2dELU)
    for path in kept:
        assert type(fast.get_submodule(path)) is nn.Conv2d
    assert_same_state(model, fast)
    assert_same_computation(model, fast, x_input())


def test_optimize_report_reasons_and_identities():
    model = make("skip")
    fast, report = fastbegan.optimize(model, backend="torch")
    reasons = {s.path: s.reason for s in report.skipped}
    for path, word in SKIP_KEPT.items():
        assert word in reasons[path], (path, reasons[path])
    # absorbed neighbours become Identity, at the same keys
    assert isinstance(fast.up[0], nn.Identity) and isinstance(fast.up[2], nn.Identity)
    assert isinstance(fast.down[1], nn.Identity) and isinstance(fast.down[3], nn.Identity)
    assert type(fast.head[1]) is nn.ELU and fast.head[1].alpha == 0.5
    r = {r.path: r for r in report.replaced}
    assert r["up.1"].pattern.startswith("Upsample") and r["up.1"].absorbed == ["up.0", "up.2"]
    assert fast.up[1].upsample and fast.down[2].stride == (2, 2)
    text = str(report)
    assert "left alone" in text and "mid.2" in text and "backend torch" in text
    # functional model: convs used from forward() are reported as out of reach
    _, rep = fastbegan.optimize(make("functional"), backend="torch")
    assert rep.replaced == [] and "torch.compile" in rep.skipped[0].reason


def test_optimize_inplace_shares_parameters_and_trains():
    model = make("sequential")
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref = copy.deepcopy(model)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    out, report = fastbegan.optimize(model, inplace=True, backend="torch")
    assert out is model and report.num_replaced == len(SEQ_FUSED)
    assert all(p is params[n] for n, p in out.named_parameters())
    assert out[0].weight is params["0.weight"] and out[2][0].bias is None
    # the optimizer built before the swap still trains the fused model like the original
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = x_input()
    for m, o in ((out, opt), (ref, opt_ref)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    # the fused conv's written-out backward sums in another order than cuDNN/oneDNN's: the
    # same step up to float rounding (bit-equal on some CPUs, not on an AVX2-only one)
    sa, sb = ref.state_dict(), out.state_dict()
    assert list(sb) == list(sa)
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(sa[k], params_before) for k, params_before in before.items())


def test_optimize_idempotent():
    fast, rep1 = fastbegan.optimize(make("skip"), backend="torch")
    again, rep2 = fastbegan.optimize(fast, backend="torch")
    assert rep2.replaced == [] and rep2.already_fused == SKIP_FUSED
    assert sorted(s.path for s in rep2.skipped) == sorted(SKIP_KEPT)
    assert repr(again) == repr(fast)
    assert_same_state(fast, again)
    once_more, _ = fastbegan.optimize(again, inplace=True, backend="torch")
    assert once_more is again and repr(once_more) == repr(fast)


def test_optimize_nothing_to_replace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.BatchNorm2d(4), nn.ELU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    out, report = fastbegan.optimize(model, backend="torch")
    assert report.replaced == [] and len(report.skipped) == 2
    assert repr(out) == repr(model)
    assert [type(m) for m in out.modules()] == [type(m) for m in model.modules()]
    assert_same_state(model, out)
    assert "fused 0 of 2" in str(report)


def test_optimize_old_checkpoint_loads():
    model = make("sequential", seed=3)
    ckpt = copy.deepcopy(model.state_dict())
    fast, _ = fastbegan.optimize(make("sequential", seed=4), backend="torch")
    fast.load_state_dict(ckpt)  # strict: same keys
    model.eval(), fast.eval()
    x = x_input()
    torch.testing.assert_close(fast(x), model(x))


def test_optimize_auto_without_gpu_leaves_model_unchanged():
    if HAS_CUDA:  # (under the Triton interpreter "auto" does not use it either)
        pytest.skip("auto swaps on a CUDA GPU")
    model = make("sequential")
    with pytest.warns(UserWarning, match="left unchanged"):
        out, report = fastbegan.optimize(model)
    assert not report.applied and report.replaced == [] and "unchanged" in str(report)
    assert repr(out) == repr(model) and out is not model
    assert ops.get_backend() == "torch"
    with pytest.raises(ValueError, match="unknown backend"):
        fastbegan.optimize(model, backend="cuda")


# ----------------------------------------------------------------------------------------
# fastbegan.nn.Conv2dELU
# ----------------------------------------------------------------------------------------
def test_conv2delu_module():
    torch.manual_seed(5)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    torch.manual_seed(5)
    m = Conv2dELU(4, 6)
    assert torch.equal(m.weight, conv.weight) and torch.equal(m.bias, conv.bias)  # same init
    assert list(m.state_dict()) == ["weight", "bias"]
    m.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(m(x), F.elu(conv(x)))
    torch.testing.assert_close(m(x[0]), F.elu(conv(x[0])))  # unbatched
    xc = x.to(memory_format=torch.channels_last)
    assert m(xc).is_contiguous(memory_format=torch.channels_last) and m(x).is_contiguous()
    # variants
    up = Conv2dELU.from_conv2d(conv, upsample=True, activation=False)
    assert up.weight is conv.weight
    torch.testing.assert_close(up(x), conv(F.interpolate(x, scale_factor=2)))
    s2 = Conv2dELU(4, 6, stride=2, bias=False)
    assert s2(x).shape == (2, 6, 3, 3) and s2.bias is None
    sk = Conv2dELU(4 + 2, 6)
    skip = torch.randn(2, 2, 12, 12)
    sk_up = Conv2dELU(6, 6, upsample=True)
    torch.testing.assert_close(
        sk_up(x, skip), F.elu(F.conv2d(torch.cat([F.interpolate(x, scale_factor=2), skip], 1),
                                       sk_up.weight, sk_up.bias, padding=1)))
    assert "upsample=True" in repr(sk_up) and sk.in_channels == 6
    for bad in (dict(kernel_size=5), dict(padding=0), dict(stride=3),
                dict(upsample=True, stride=2)):
        with pytest.raises(ValueError):
            Conv2dELU(4, 6, **bad)
    with pytest.raises(ValueError, match="dilation"):
        Conv2dELU.from_conv2d(nn.Conv2d(4, 6, 3, padding=2, dilation=2))
    assert "lazy" in conv2d_support(nn.LazyConv2d(4, 3, padding=1))
    hooked = nn.Conv2d(4, 4, 3, padding=1)
    hooked.register_forward_hook(lambda *a: None)
    assert "hooks" in conv2d_support(hooked)
    assert "parametrized" in conv2d_support(
        nn.utils.parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1)))


def test_conv2delu_autocast_matches_conv():
    conv = nn.Conv2d(4, 4, 3, padding=1)
    m = Conv2dELU.from_conv2d(conv)
    x = torch.randn(2, 4, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = m(x), F.elu(conv(x))
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------
# the triton backend (interpreter on CPU, the GPU when there is one)
# ----------------------------------------------------------------------------------------
def _triton_or_skip():
    try:
        importlib.import_module("fastbegan.ops.triton_ops")
    except Exception as e:  # not written yet, or triton missing
        pytest.skip(f"fastbegan.ops.triton_ops is not importable: {e.__class__.__name__}: {e}")
    ok, why = ops.triton_status()
    if not ok:
        pytest.skip(f"triton backend cannot run: {why}")


DEV = "cuda" if HAS_CUDA else "cpu"
# fp32: the interpreter computes exactly in fp32; the GPU uses TF32 like cuDNN does.
TRITON_TOL = dict(atol=2e-2, rtol=2e-2) if HAS_CUDA else dict(atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["sequential", "skip"])
def test_optimize_triton_backend(name):
    _triton_or_skip()
    model = make(name).to(DEV)
    fast, report = fastbegan.optimize(model, backend="triton")
    assert ops.get_backend() == "triton" and report.backend == "triton"
    assert [r.path for r in report.replaced] == MODELS[name][1]
    x = x_input(device=DEV)
    assert_same_computation(model, fast, x, **TRITON_TOL)
    # memory format follows nn.Conv2d's rule: NCHW in -> NCHW out, NHWC in -> NHWC out
    conv = fast.get_submodule(MODELS[name][1][0])
    assert conv(x).is_contiguous()
    xc = x.to(memory_format=torch.channels_last)
    assert conv(xc).is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------
# torch.compile(backend="fastbegan")
# ----------------------------------------------------------------------------------------
def test_backend_registered_by_import():
    import torch._dynamo
    assert "fastbegan" in torch._dynamo.list_backends()
    fn = torch._dynamo.lookup_backend("fastbegan")
    assert fn.__module__ == "fastbegan._compile_registration"


def test_backend_registered_in_fresh_process_before_dynamo_import():
    """`import fastbegan` registers the backend without importing torch._dynamo itself
    (an import hook registers it when torch.compile imports dynamo)."""
    code = ("import sys, fastbegan\n"
            "lazy = 'torch._dynamo' not in sys.modules\n"
            "import torch\n"
            "f = torch.compile(lambda x: x + 1, backend='fastbegan')\n"
            "import torch._dynamo\n"
            "print(lazy, 'fastbegan' in torch._dynamo.list_backends())\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lazy, registered = out.stdout.split()[-2:]
    assert registered == "True"
    # lazy == "False" only if some other import now pulls torch._dynamo in at import time


aot_eager_backend = functools.partial(dropin.compile_backend, inner="aot_eager")


def _compiled_reports(fn):
    dropin.compile_reports.clear()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn()
    return out, list(dropin.compile_reports)


@pytest.mark.parametrize("name", ["functional", "skip"])
def test_compile_rewrites_and_matches(name):
    """The FX pass (handed to aot_eager here: same pass, no C++ build)."""
    model = make(name)
    compiled = torch.compile(model, backend=aot_eager_backend)
    x = x_input()
    (y, gx, g), reports = _compiled_reports(lambda: grads_of(compiled, x))
    fused = sum(r.num_fused for r in reports)
    expected = FUNC_COMPILE_FUSED if name == "functional" else len(SKIP_FUSED)
    assert fused == expected, "\n".join(map(str, reports))
    skipped = [why for r in reports for _, why in r.skipped]
    if name == "skip":
        assert any("5, 5" in w for w in skipped) and any("dilation" in w for w in skipped)
        assert any("groups" in w for w in skipped) and any("alpha=0.5" in w for w in skipped)
    else:
        assert any("2 users" in w for w in skipped)  # conv output used twice: not fused
    y0, gx0, g0 = grads_of(model, x)
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(gx, gx0)
    for n in g0:
        torch.testing.assert_close(g[n], g0[n])


def test_compile_an_optimized_model():
    """Both paths together: an optimize()d model compiled with the backend (the torch
    reference inside Conv2dELU decomposes and is found again)."""
    model = make("sequential")
    fast, _ = fastbegan.optimize(model, backend="torch")
    compiled = torch.compile(fast, backend=aot_eager_backend)
    x = x_input()
    (y, gx, g), reports = _compiled_reports(lambda: grads_of(compiled, x))
    assert sum(r.num_fused for r in reports) == len(SEQ_FUSED)
    y0, gx0, g0 = grads_of(model, x)
    torch.testing.assert_close(y, y0)
    for n in g0:
        torch.testing.assert_close(g[n], g0[n])


class MutatingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        x = x * 1.0
        u = F.interpolate(x, scale_factor=2, mode="nearest")
        x.mul_(2)  # mutates the upsample's input after the upsample read it
        return F.elu(self.conv(u)) + x.mean()


def test_compile_does_not_move_reads_past_mutations():
    model = MutatingNet()
    compiled = torch.compile(model, backend=aot_eager_backend)
    x = x_input(n=1, h=4)
    y, reports = _compiled_reports(lambda: compiled(x))
    assert [p for r in reports for _, p in r.fused] == ["conv3x3 + elu"]  # upsample kept
    torch.testing.assert_close(y, model(x))


def test_compile_triton_backend_interpreter():
    _triton_or_skip()
    model = make("functional").to(DEV)
    ops.set_backend("triton")  # the compile backend uses triton where ops are set to it
    compiled = torch.compile(model, backend=aot_eager_backend)
    x = x_input(device=DEV)
    (y, gx, g), reports = _compiled_reports(lambda: grads_of(compiled, x))
    assert sum(r.num_fused for r in reports) == FUNC_COMPILE_FUSED
    assert all(r.backend == "triton" for r in reports)
    ops.set_backend("torch")
    y0, gx0, g0 = grads_of(model, x)
    torch.testing.assert_close(y, y0, **TRITON_TOL)
    torch.testing.assert_close(gx, gx0, **TRITON_TOL)
    for n in g0:
        torch.testing.assert_close(g[n], g0[n], **TRITON_TOL)


def test_rewrite_graph_module_form():
    """call_module Conv2d / ELU (graphs not from dynamo, e.g. torch.fx.symbolic_trace)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ELU(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU())
    gm = torch.fx.symbolic_trace(model)
    report = dropin.rewrite_graph(gm)
    assert report.fused == [("0", "conv3x3 + elu")]
    assert report.skipped == [("2", "no ELU after it and no upsample before it")]
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [ops.conv3x3_elu]
    x = x_input()
    torch.testing.assert_close(gm(x), model(x))


# ----------------------------------------------------------------------------------------
# the README section's example runs as written (and is the inductor compile test)
# ----------------------------------------------------------------------------------------
README_SECTION = "## Drop-in: fastbegan.optimize and the torch.compile backend"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    assert README_SECTION in text
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.+?)```", section, re.S)
    assert len(blocks) == 1
    return blocks[0]


def test_readme_example_runs_and_compile_backend_fuses(capsys):
    ns: dict = {"__name__": "readme_example"}
    dropin.compile_reports.clear()
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(readme_example(), "README.md", "exec"), ns)
    printed = capsys.readouterr().out
    assert "optimize:" in printed and "compile:" in printed
    # the real inductor path: 3 fused calls (2 in the Sequential, 1 written in forward)
    assert sum(r.num_fused for r in dropin.compile_reports) == 3, dropin.compile_reports
    model, compiled, z = ns["model"], ns["compiled"], ns["z"]
    y, gz, g = grads_of(compiled, z)
    y0, gz0, g0 = grads_of(model, z)
    # inductor reorders fp32 reductions (grads differ by ~1e-5 relative); TF32 on a GPU
    tol = TRITON_TOL if HAS_CUDA else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y, y0, **tol)
    torch.testing.assert_close(gz, gz0, **tol)
    for n in g0:
        torch.testing.assert_close(g[n], g0[n], **tol)
    # optimize on the same model: the 2 Sequential patterns; the rest reported
    fast, report = fastbegan.optimize(model, backend="torch")
    assert report.num_replaced == 2 and len(report.skipped) == 2
    assert_same_state(model, fast)
