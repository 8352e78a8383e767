"""The fused step's CUDA graph capture: a failed capture is retried once after re-warming,
then training goes on with eager steps, with the eager rate in the warning.

The GPU-free part: :meth:`FusedStep._capture_failed` on a step object whose device work is
stubbed (the real capture needs a GPU; its success path is covered by the GPU tests of
tests/test_fused_step.py), and the first compiled call's error handling
(:class:`fastbegan.autocompile.CompiledForward`)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fastbegan import ops
from fastbegan.autocompile import CompiledForward
from fastbegan.step import FusedStep, StepOutputs


class _Stub(FusedStep):
    def __init__(self):                      # no trainer: only the capture bookkeeping
        self.cuda_graph, self.warmup, self.device = True, 2, torch.device("cpu")
        self._graph, self._static, self._warm = "graph", None, 2
        self.calls = []

    def _graph_step(self):
        self.calls.append(("warm-up", self._warm))
        return {"step": "warm-up"}

    def _device_step(self, zero_grad):
        self.calls.append("eager")
        return {"step": "eager"}


def test_capture_failure_retried_once_then_eager(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    st = _Stub()
    with pytest.warns(UserWarning, match="re-warming .2 eager steps. and capturing once more"):
        out = st._capture_failed(RuntimeError("operation not permitted when stream is capturing"))
    assert out == {"step": "warm-up"} and st.cuda_graph
    assert st.calls == [("warm-up", 0)] and st._graph is None     # warm-up restarts from 0
    with pytest.warns(UserWarning, match=r"failed twice .*eager steps at [0-9.]+ steps/s"):
        out = st._capture_failed(RuntimeError("capture failed again"))
    assert out == {"step": "eager"} and not st.cuda_graph


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
