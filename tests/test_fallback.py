"""The triton backend's fallback chain (fastbegan.ops.fallback): a failing kernel is
dropped with one warning line and the result is the next path's, equal to the reference.

Failures are injected into the launchers the ops call (the tensor-descriptor forward, the
pointer forward, the dgrad kernel): a real Triton error (a kernel that cannot be built:
``tl.arange`` over a non-power-of-two range), a launch error as CUDA reports it, a wrong
result (seen only with verification on), and a sticky CUDA error (ends the run). Under the
interpreter, on CPU, at tiny shapes.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import triton
import triton.language as tl

from testutil import DEVICE, assert_close_rel
from fastbegan import ops
from fastbegan.kernels import conv3x3, conv3x3_bwd, interpreting
from fastbegan.ops import fallback, reference

pytestmark = [pytest.mark.skipif(not (interpreting() or DEVICE == "cuda"),
                                 reason="needs the Triton interpreter or a GPU"),
              pytest.mark.usefixtures("triton_backend")]

CL = torch.channels_last


@pytest.fixture(autouse=True)
def chain():
    """The chain as in training (not the suite's strict mode), decisions forgotten."""
    fallback.set_strict(False)
    fallback.reset()
    yield
    fallback.reset()


@triton.jit
def _unbuildable_kernel(x_ptr):
    offs = tl.arange(0, 3)            # not a power of two: Triton refuses to build it
    tl.store(x_ptr + offs, tl.zeros((3,), tl.float32))


def _compile_error(*args, **kwargs):
    _unbuildable_kernel[(1,)](torch.zeros(4, device=DEVICE))
    raise AssertionError("the broken kernel ran")


def _launch_error(*args, **kwargs):
    raise RuntimeError("Triton Error [CUDA]: too many resources requested for launch")


def _inputs(c_in=8, c_out=8, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c_in, hw, hw, generator=g).to(DEVICE).contiguous(memory_format=CL)
    w = (torch.randn(c_out, c_in, 3, 3, generator=g) * 0.3).to(DEVICE)
    b = (0.1 * torch.randn(c_out, generator=g)).to(DEVICE)
    return x, w, b


def _break(monkeypatch, module, name, paths, failure):
    """Replace ``module.name`` by a launcher that fails (``failure``) for the given
    kernel paths ("tma"/"ptr" for the forward, None: every call) and counts its calls."""
    real = getattr(module, name)
    calls = []

    def launcher(*args, **kwargs):
        calls.append(kwargs.get("kernel"))
        if paths is None or kwargs.get("kernel") in paths:
            return failure(real, *args, **kwargs)
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, launcher)
    return calls


def _fails_with(fn):
    return lambda real, *a, **k: fn(*a, **k)


def _wrong_result(real, *args, **kwargs):
    return real(*args, **kwargs).add_(1.0)


def _dropped(record, path):
    msgs = [str(w.message) for w in record if issubclass(w.category, ops.KernelFallbackWarning)]
    return [m for m in msgs if f"dropped the {path} path" in m]


@pytest.mark.parametrize("failure, what", [(_fails_with(_compile_error), "arange"),
                                           (_fails_with(_launch_error), "too many resources")])
def test_forward_kernel_errors_fall_back_to_the_reference(monkeypatch, failure, what):
    """Both kernel paths fail: one warning each naming op, shape, path and error; the
    result is the reference's; the decision is kept (no retry, no second warning)."""
    calls = _break(monkeypatch, conv3x3, "conv3x3_fwd", ("tma", "ptr"), failure)
    x, w, b = _inputs()
    with pytest.warns(ops.KernelFallbackWarning) as rec:
        y = ops.conv3x3_elu(x, w, b)
    lines = _dropped(rec, "ptr")
    assert len(lines) == 1 and "conv3x3_elu" in lines[0] and "x=2x8x4x4:float32" in lines[0]
    assert what in lines[0] and "using torch" in lines[0]
    assert_close_rel("y", y, reference.conv3x3_elu_ref(x, w, b), torch.float32)
    n = len(calls)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.KernelFallbackWarning)
        y2 = ops.conv3x3_elu(x, w, b)
    assert len(calls) == n                      # decided: the broken kernels are not retried
    assert torch.equal(y, y2)
    (key, path), = fallback.decisions()["chosen"].items()
    assert key.startswith("conv3x3_elu x=2x8x4x4:float32 weight=8x8x3x3") and path == "torch"


def test_tma_failure_falls_back_to_the_pointer_kernel(monkeypatch):
    calls = _break(monkeypatch, conv3x3, "conv3x3_fwd", ("tma",), _fails_with(_launch_error))
    x, w, b = _inputs(16, 16, 8)
    with pytest.warns(ops.KernelFallbackWarning) as rec:
        y = ops.conv3x3_elu(x, w, b)
    assert len(_dropped(rec, "tma")) == 1 and "using ptr" in _dropped(rec, "tma")[0]
    assert calls == ["tma", "ptr"]
    assert_close_rel("y", y, reference.conv3x3_elu_ref(x, w, b), torch.float32)


def test_wrong_result_is_caught_with_verification_only(monkeypatch):
    calls = _break(monkeypatch, conv3x3, "conv3x3_fwd", ("tma",), _wrong_result)
    x, w, b = _inputs(16, 16, 8)
    ref = reference.conv3x3_elu_ref(x, w, b)
    y = ops.conv3x3_elu(x, w, b)                # no verification: the wrong path stays
    assert (y - ref).abs().max() > 0.5 and calls == ["tma"]
    fallback.reset()
    ops.set_verify_kernels(True)
    with pytest.warns(ops.KernelFallbackWarning, match="tma path .max relative error"):
        y = ops.conv3x3_elu(x, w, b)
    assert calls == ["tma", "tma", "ptr"]
    assert_close_rel("y", y, ref, torch.float32)


def test_backward_kernel_failure_gives_reference_gradients(monkeypatch):
    _break(monkeypatch, conv3x3_bwd, "conv3x3_dgrad", None, _fails_with(_compile_error))
    x, w, b = _inputs(4, 4, 4)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    with pytest.warns(ops.KernelFallbackWarning, match="conv3x3_dgrad .*dropped the triton"):
        ops.conv3x3_elu(xg, wg, b).square().sum().backward()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    reference.conv3x3_elu_ref(xr, wr, b).square().sum().backward()
    assert_close_rel("dx", xg.grad, xr.grad, torch.float32)
    assert_close_rel("dw", wg.grad, wr.grad, torch.float32)   # wgrad kernel still in use


def test_sticky_cuda_error_ends_the_run(monkeypatch):
    _break(monkeypatch, conv3x3, "conv3x3_fwd", ("tma", "ptr"), _fails_with(_launch_error))
    monkeypatch.setattr(fallback, "_sticky_cuda_error",
                        lambda dev: "RuntimeError: CUDA error: an illegal memory access")
    x, w, b = _inputs(4, 4, 4)
    with pytest.raises(ops.KernelFatalError, match="last checkpoint is intact"):
        ops.conv3x3_elu(x, w, b)


def test_strict_mode_raises_instead_of_falling_back(monkeypatch):
    _break(monkeypatch, conv3x3, "conv3x3_fwd", ("tma", "ptr"), _fails_with(_launch_error))
    fallback.set_strict(True)
    x, w, b = _inputs(4, 4, 4)
    with pytest.raises(RuntimeError, match="too many resources"):
        ops.conv3x3_elu(x, w, b)


def test_verification_passes_the_real_kernels():
    """Every real path agrees with the reference (no warning with verification on)."""
    ops.set_verify_kernels(True)
    x, w, b = _inputs(16, 16, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ops.KernelFallbackWarning)
        y = ops.conv3x3_elu(x, w, b, upsample=True)
    assert_close_rel("y", y, reference.conv3x3_elu_ref(x, w, b, upsample=True), torch.float32)
    assert set(fallback.decisions()["chosen"].values()) == {"tma"}


def test_train_verify_kernels_flag(monkeypatch, tmp_path):
    """``fastbegan train --verify-kernels`` turns verification on before training starts."""
    from click.testing import CliRunner

    import fastbegan.train
    from fastbegan.cli import main
    seen = {}

    class _Done:
        step = 0

    def fake_train(cfg, **kw):
        seen["verify"] = fallback.verify_enabled()
        return _Done()
    monkeypatch.setattr(fastbegan.train, "train", fake_train)
    args = ["train", "--device", "cpu", "--res", "8", "--steps", "1", "--out", str(tmp_path / "r")]
    assert CliRunner().invoke(main, args).exit_code == 0 and seen == {"verify": False}
    r = CliRunner().invoke(main, args + ["--verify-kernels"])
    assert r.exit_code == 0, r.output
    assert seen == {"verify": True}


# ------------------------------------------------------------------ drops that outlive the process
@pytest.fixture
def persisted(monkeypatch, tmp_path):
    """Records on this device too (on a GPU they are kept by default), in a fresh cache."""
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path))
    monkeypatch.setattr(fallback, "_persists", lambda device: True)
    return tmp_path / "dropped_paths.json"


def test_variant_keeps_flags_and_dtypes_not_sizes():
    a = fallback.shape_key(x=torch.zeros(2, 8, 4, 4), weight=torch.zeros(8, 8, 3, 3), upsample=True,
                           stride=1, elu=True, device=torch.device("cpu"))
    b = fallback.shape_key(x=torch.zeros(32, 64, 16, 16), weight=torch.zeros(64, 64, 3, 3),
                           upsample=True, stride=1, elu=True, device=torch.device("cpu"))
    c = fallback.shape_key(x=torch.zeros(2, 8, 4, 4, dtype=torch.float16),
                           weight=torch.zeros(8, 8, 3, 3), upsample=True, stride=1, elu=True)
    assert fallback.variant("conv3x3_elu", a) == fallback.variant("conv3x3_elu", b) == \
        "conv3x3_elu x:float32 weight:float32 upsample stride=1 elu"
    assert fallback.variant("conv3x3_elu", c) != fallback.variant("conv3x3_elu", a)


def test_a_wrong_path_is_skipped_by_later_processes(monkeypatch, persisted):
    """Verification drops a wrong tma path and records it; a later process (decisions and
    records forgotten, verification off) skips it with one warning, at every size of the
    variant, without calling it: the doctor's findings carry into training."""
    calls = _break(monkeypatch, conv3x3, "conv3x3_fwd", ("tma",), _wrong_result)
    x, w, b = _inputs(16, 16, 8)
    ops.set_verify_kernels(True)
    with pytest.warns(ops.KernelFallbackWarning, match="tma path .max relative error"):
        ops.conv3x3_elu(x, w, b)
    assert "max relative error" in persisted.read_text()
    fallback.reset()                              # a new process
    ops.set_verify_kernels(False)
    calls.clear()
    with pytest.warns(ops.KernelFallbackWarning, match="tma path .recorded by an earlier process") as rec:
        y = ops.conv3x3_elu(x, w, b)
        x2 = torch.randn(4, 16, 16, 16).contiguous(memory_format=CL)   # same variant, other size
        y2 = ops.conv3x3_elu(x2, w, b)
    assert len(_dropped(rec, "tma")) == 1 and calls == ["ptr", "ptr"]
    assert_close_rel("y", y, reference.conv3x3_elu_ref(x, w, b), torch.float32)
    assert_close_rel("y2", y2, reference.conv3x3_elu_ref(x2, w, b), torch.float32)
    assert fallback.forget_recorded(torch.device(DEVICE)) == 1    # doctor --retest
    fallback.reset()
    calls.clear()
    ops.conv3x3_elu(x, w, b)
    assert calls == ["tma"]


def test_a_sticky_error_is_recorded_and_the_next_process_takes_the_next_path(monkeypatch, persisted):
    calls = _break(monkeypatch, conv3x3, "conv3x3_fwd", ("tma",), _fails_with(_launch_error))
    with monkeypatch.context() as m:
        m.setattr(fallback, "_sticky_cuda_error", lambda dev: "RuntimeError: CUDA error: illegal address")
        x, w, b = _inputs(16, 16, 8)
        with pytest.raises(ops.KernelFatalError, match="running the same command again takes the next"):
            ops.conv3x3_elu(x, w, b)
    assert "sticky CUDA error" in persisted.read_text()
    fallback.reset()
    calls.clear()
    with pytest.warns(ops.KernelFallbackWarning, match="recorded by an earlier process: sticky"):
        y = ops.conv3x3_elu(x, w, b)
    assert calls == ["ptr"]
    assert_close_rel("y", y, reference.conv3x3_elu_ref(x, w, b), torch.float32)
    fallback.reset()
    fallback.set_strict(True)          # the tests' mode: the recorded path is reported, not run
    with pytest.raises(fallback.KernelPathDropped, match="dropped on this GPU by an earlier process"):
        ops.conv3x3_elu(x, w, b)


def test_a_wrong_result_record_does_not_skip_a_kernel_test(monkeypatch, persisted):
    """Strict mode (the tests) with a path recorded for a wrong result: no KernelPathDropped
    (which the conftest turns into a skip); the path runs and is verified against the
    reference even with verification off: a fixed kernel passes, a still-wrong one fails."""
    x, w, b = _inputs(16, 16, 8)
    with monkeypatch.context() as m:
        _break(m, conv3x3, "conv3x3_fwd", ("tma",), _wrong_result)
        ops.set_verify_kernels(True)
        with pytest.warns(ops.KernelFallbackWarning, match="tma path .max relative error"):
            ops.conv3x3_elu(x, w, b)
    assert "max relative error" in persisted.read_text()
    fallback.reset()                              # a new process: the tests' strict mode
    fallback.set_strict(True)
    ops.set_verify_kernels(False)
    calls = _break(monkeypatch, conv3x3, "conv3x3_fwd", None, lambda real, *a, **k: real(*a, **k))
    y = ops.conv3x3_elu(x, w, b)                  # the kernel is right now: it runs and passes
    assert calls == ["tma"]
    assert_close_rel("y", y, reference.conv3x3_elu_ref(x, w, b), torch.float32)
    fallback.reset()
    fallback.set_strict(True)
    _break(monkeypatch, conv3x3, "conv3x3_fwd", ("tma",), _wrong_result)
    with pytest.raises(AssertionError, match="recorded by an earlier process too: max relative error"):
        ops.conv3x3_elu(x, w, b)                  # still wrong: a failure, not a skip


@pytest.fixture
def conftest(request):
    """The tests' conftest module as pytest loaded it, from pytest's plugin manager (importing
    it again would make a second session cache; with ``tests benchmarks`` on the command line
    sys.modules["conftest"] may be benchmarks/conftest.py)."""
    from pathlib import Path
    want = Path(__file__).resolve().with_name("conftest.py")
    return next(p for p in request.config.pluginmanager.get_plugins()
                if getattr(p, "__file__", None) and Path(p.__file__).resolve() == want)


def _report_of(conftest, exc):
    """Drive the conftest's makereport hook wrapper for a test that raised ``exc``."""
    from types import SimpleNamespace
    try:
        raise exc
    except BaseException:
        excinfo = pytest.ExceptionInfo.from_current()
    report = SimpleNamespace(outcome="failed", longrepr="traceback")
    item = SimpleNamespace(path="tests/test_x.py", location=("tests/test_x.py", 3, "test_x"))
    hook = conftest.pytest_runtest_makereport(item, SimpleNamespace(excinfo=excinfo))
    next(hook)
    with pytest.raises(StopIteration):
        hook.send(SimpleNamespace(get_result=lambda: report))
    return report


def test_the_conftest_skips_only_sticky_records(conftest):
    """KernelPathDropped (raised for a sticky-error record only) becomes a skip with its
    reason; the AssertionError of a still-wrong recorded path stays a failure."""
    r = _report_of(conftest, fallback.KernelPathDropped("conv3x3_elu: the tma path was dropped (sticky CUDA error: x)"))
    assert r.outcome == "skipped" and "sticky CUDA error" in r.longrepr[2]
    r = _report_of(conftest, AssertionError("tma path: max relative error 0.5 > 0.001 (recorded by an earlier process too)"))
    assert r.outcome == "failed"


def test_the_session_cache_is_its_own_and_keeps_only_sticky_records(monkeypatch, tmp_path, conftest):
    """The test session's FASTBEGAN_CACHE is a fresh folder, not the user's; of the user's
    kernel-path records only the sticky-error ones are carried into it."""
    import json
    import os
    from fastbegan.data import default_cache_dir
    assert os.environ["FASTBEGAN_CACHE"] == conftest.SESSION_CACHE
    assert default_cache_dir() != __import__("pathlib").Path.home() / ".cache" / "fastbegan"
    user = tmp_path / "user"
    user.mkdir()
    (user / "dropped_paths.json").write_text(json.dumps({"GPU|triton 3.6|kernels abc": {
        "conv3x3_elu x:bfloat16": {"tma": "sticky CUDA error: RuntimeError: illegal address",
                                   "ptr": "max relative error 0.02 > 0.01 against the reference"},
        "conv3x3_dgrad x:bfloat16": {"triton": "max relative error 1 > 0.01 against the reference"}}}))
    monkeypatch.setenv("FASTBEGAN_CACHE", str(user))
    session = conftest._session_cache()           # sets the variable: monkeypatch restores it
    try:
        assert os.environ["FASTBEGAN_CACHE"] == session != str(user)
        assert json.loads((default_cache_dir() / "dropped_paths.json").read_text()) == {
            "GPU|triton 3.6|kernels abc": {
                "conv3x3_elu x:bfloat16": {"tma": "sticky CUDA error: RuntimeError: illegal address"}}}
    finally:
        import shutil
        shutil.rmtree(session, ignore_errors=True)


def test_no_path_is_tried_inside_a_capture(monkeypatch):
    """A key first met inside a CUDA graph capture raises (nothing may be tried, verified or
    autotuned there); a key decided before runs its path."""
    x, w, b = _inputs(4, 4, 4)
    ops.conv3x3_elu(x, w, b)
    monkeypatch.setattr(fallback, "_capturing", lambda: True)
    assert_close_rel("y", ops.conv3x3_elu(x, w, b), reference.conv3x3_elu_ref(x, w, b), torch.float32)
    with pytest.raises(RuntimeError, match="first called inside a CUDA graph capture"):
        ops.conv3x3_elu(x, w, b, upsample=True)
