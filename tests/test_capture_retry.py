"""The CUDA graph wrapper of the training step (fastbegan.cudagraph.GraphedStep): warm-up
on a side stream, capture, replay; a failed capture is retried once after re-warming, then
training goes on with eager steps, with the eager rate in the warning.

GPU-free: the CUDA pieces the wrapper calls (streams, the graph, the capture context) are
faked on CPU, so the whole sequence of eager, captured and replayed calls runs here (the
real capture needs a GPU; its success path is covered by the GPU tests of
tests/test_fused_step.py). Also the first compiled call's error handling
(:class:`fastbegan.autocompile.CompiledForward`)."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from fastbegan import cudagraph, ops
from fastbegan.autocompile import CompiledForward
from fastbegan.step import StepOutputs


class _FakeGraph:
    """A CUDA graph that counts its replays."""
    fail = []          # errors the next captures raise, in order
    captures = 0

    def __init__(self):
        self.replays = 0

    def replay(self):
        self.replays += 1


@pytest.fixture
def fake_cuda(monkeypatch):
    log = []
    _FakeGraph.fail, _FakeGraph.captures = [], 0

    @contextlib.contextmanager
    def graph(g, capture_error_mode=None):
        assert capture_error_mode == "thread_local"
        log.append("capture")
        _FakeGraph.captures += 1
        if _FakeGraph.fail:
            raise _FakeGraph.fail.pop(0)
        yield
    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    return log


def _step(log):
    """A step callable recording how it is called; returns a fresh output per call."""
    calls = []

    def fn(capturing):
        calls.append("capture" if capturing else "eager")
        return {"n": len(calls)}
    entered = []

    @contextlib.contextmanager
    def capture_context():
        entered.append("in")
        try:
            yield
        finally:
            entered.append("out")
    g = cudagraph.GraphedStep(fn, torch.device("cpu"), warmup=2, capture_context=capture_context)
    return g, calls, entered


def test_warm_up_capture_replay(fake_cuda):
    g, calls, entered = _step(fake_cuda)
    outs = [g() for _ in range(2)]                  # warm-up: eager on the side stream
    assert calls == ["eager", "eager"] and g.graph is None and outs == [{"n": 1}, {"n": 2}]
    static = g()                                    # captured (the call inside the capture) + replayed
    assert calls[2:] == ["capture"] and g.graph.replays == 1 and entered == ["in", "out"]
    assert g() is static and g.graph.replays == 2 and len(calls) == 3  # replays: no Python step
    g.reset()                                       # new optimiser state: warm up and capture again
    g(), g(), g()
    assert _FakeGraph.captures == 2 and g.graph is not None


def test_capture_failure_retried_once_then_eager(fake_cuda):
    g, calls, entered = _step(fake_cuda)
    _FakeGraph.fail = [RuntimeError("operation not permitted when stream is capturing"),
                       RuntimeError("capture failed again")]
    g(), g()
    with pytest.warns(UserWarning, match="re-warming .2 eager steps. and capturing once more"):
        out = g()                                   # capture fails: this call is a warm-up step
    assert out == {"n": 3} and g.enabled and g.graph is None and g.warm == 1
    assert entered == ["in", "out"]                 # the capture set-up is undone on failure
    g()                                             # second warm-up step
    with pytest.warns(UserWarning, match=r"failed twice .*eager steps at [0-9.]+ steps/s"):
        out = g()
    assert out == {"n": 5} and not g.enabled and _FakeGraph.captures == 2
    g()
    assert calls == ["eager"] * 6 and _FakeGraph.captures == 2   # eager for good, no third capture


def test_fatal_kernel_error_is_not_retried(fake_cuda):
    g, calls, _ = _step(fake_cuda)
    _FakeGraph.fail = [ops.KernelFatalError("GPU unusable")]
    g(), g()
    with pytest.raises(ops.KernelFatalError):
        g()


@pytest.mark.parametrize("fatal", [True, False])
def test_first_step_error_handling(fatal):
    """A sticky CUDA error (KernelFatalError) in the first, compiling step ends the run; any
    other error is a compile problem: warn, and run the same step eagerly."""
    err = ops.KernelFatalError("GPU unusable") if fatal else RuntimeError("dynamo failed")
    eager = []

    def eager_fwd(*args):
        eager.append(args)
        t = torch.ones(2, requires_grad=True)
        return StepOutputs(None, None, t * 2, None, None, (t * 2).sum(), {})

    def compiled(*args):
        raise err
    cfg = SimpleNamespace(precision="fp32", res=8)
    cf = CompiledForward(eager_fwd, torch.nn.Linear(2, 2), cfg, device=torch.device("cpu"),
                         backend="torch", compile=False)
    cf.fn, cf.mode, cf.pending = compiled, "max-autotune-no-cudagraphs", True
    if fatal:
        with pytest.raises(ops.KernelFatalError):
            cf((1,))
        assert not eager
    else:
        with pytest.warns(UserWarning, match="torch.compile of the training step"):
            cf((1,))
        assert eager == [(1,)] and cf.mode is None and cf.fn is eager_fwd
