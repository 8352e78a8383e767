"""The guards around Triton's autotuner (fastbegan.kernels.common.autotune), the same on
Triton 3.6 and 3.9: one config that fails does not take the kernel down, a single config
left after pruning is not benchmarked, and nothing is tuned inside a CUDA graph capture.
Under the interpreter with a counting stand-in for the benchmark timer (the interpreter has
no GPU timer)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from fastbegan.kernels import interpreting
from fastbegan.kernels.common import autotune

pytestmark = pytest.mark.skipif(not interpreting(), reason="runs kernels in the Triton interpreter")


def _tuned(timed, prune=None):
    """A kernel writing 0..n-1, tuned over BLOCK 3 (cannot be built: tl.arange needs a
    power of two) and BLOCK 4; ``timed`` collects the configs the timer ran."""
    def bench(fn, quantiles=None, **kw):
        timed.append(fn)
        fn()
        return [1.0, 1.0, 1.0]
    extra = {"prune_configs_by": {"early_config_prune": prune}} if prune else {}

    @autotune([triton.Config({"BLOCK": 3}), triton.Config({"BLOCK": 4})], key=["n"], do_bench=bench,
              **extra)
    @triton.jit
    def kernel(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, offs.to(tl.float32), mask=offs < n)
    return kernel


def test_one_failing_config_does_not_take_the_kernel_down():
    timed = []
    kernel = _tuned(timed)
    x = torch.zeros(4)
    kernel[(1,)](x, 4)
    assert torch.equal(x, torch.arange(4.0)) and kernel.best_config.kwargs == {"BLOCK": 4}
    assert len(timed) == 2


def test_a_single_pruned_config_is_not_benchmarked():
    timed = []
    kernel = _tuned(timed, prune=lambda configs, nargs, **kw: configs[1:])
    x = torch.zeros(4)
    kernel[(1,)](x, 4)
    assert torch.equal(x, torch.arange(4.0)) and timed == []


def test_nothing_is_tuned_inside_a_cuda_graph_capture(monkeypatch):
    kernel = _tuned([])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="autotuned inside a CUDA graph capture"):
        kernel[(1,)](torch.zeros(4), 4)
