"""One training step captured once into a CUDA graph and replayed (docs/design.md §4.2).

:class:`GraphedStep` wraps any step callable ``fn(capturing: bool) -> outputs`` (device
work only, no host read): the first ``warmup`` calls run it eagerly on a side stream (what
a capture needs: every lazy allocation, autotuning and kernel choice made before it), the
next call captures it into a ``torch.cuda.CUDAGraph`` and every later call replays the
graph and returns the outputs of the captured call: static buffers that the next replay
overwrites (read them before the next call). ``fn(True)`` is the call being captured
(a step leaves ``.grad`` as ``None`` before it, so the graph allocates the gradients).

A capture that raises is retried once after ``warmup`` more eager calls (a first capture
can fail for reasons a second does not meet, such as a lazy initialisation made during
it); a second failure warns with the eager rate and the wrapper runs ``fn`` eagerly for
good. Either way that call is an eager step, so training goes on with the same steps.
:class:`fastbegan.ops.KernelFatalError` (the GPU is unusable) is never retried.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any, Callable

import torch

from . import ops


class GraphedStep:
    """``GraphedStep(fn, device)()`` runs one step, from a CUDA graph once captured.

    fn: ``fn(capturing) -> outputs``, the whole step as device work. device: its CUDA
    device. warmup: eager calls before the capture (at least 1). capture_context: a
    context manager factory entered around the capture (the caller's set-up that only a
    capture needs: optimisers switched to device-side learning rates, say); it is left
    whether or not the capture succeeds. generators: device generators the step draws
    from (registered with the graph, so a replay advances them). ``enabled`` turns False
    after the second failed capture.
    """

    def __init__(self, fn: Callable[[bool], Any], device: torch.device, *, warmup: int = 2,
                 capture_context: Callable[[], contextlib.AbstractContextManager] | None = None,
                 generators: tuple = ()):
        self.fn, self.device, self.warmup = fn, device, max(1, int(warmup))
        self.capture_context = capture_context or contextlib.nullcontext
        self.generators = tuple(generators)
        self.enabled = True
        self.graph = None
        self.static: Any = None
        self.warm = 0
        self.retried = False
        self._side = torch.cuda.Stream(device)

    def reset(self) -> None:
        """Drop the captured graph; the next calls warm up and capture again (after the
        step's tensors changed identity: new optimiser state, say)."""
        self.graph, self.static, self.warm = None, None, 0

    def __call__(self) -> Any:
        if not self.enabled:
            return self.fn(False)
        if self.graph is None:
            if self.warm < self.warmup:
                return self._warm_up()
            try:
                self._capture()
            except ops.KernelFatalError:
                raise
            except Exception as e:  # keep training: eager steps are the same steps
                return self._capture_failed(e)
        self.graph.replay()
        return self.static

    def _warm_up(self) -> Any:
        self.warm += 1
        cur = torch.cuda.current_stream(self.device)
        self._side.wait_stream(cur)
        with torch.cuda.stream(self._side):
            out = self.fn(False)
        cur.wait_stream(self._side)
        return out

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        if hasattr(graph, "register_generator_state"):
            for gen in self.generators:
                graph.register_generator_state(gen)
        with self.capture_context():
            # thread_local: a background thread (checkpoint writer, NCCL's watchdog, the
            # distributed watchdog) cannot break the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static = self.fn(True)
        self.graph, self.static = graph, static

    def _capture_failed(self, e: Exception) -> Any:
        """First failure: re-warm (``warmup`` eager calls) and capture again. Second: eager
        calls for good, with the eager rate in the warning (what the graph would have
        saved is launch overhead on top of it). Either way this call is an eager step."""
        why = f"{e.__class__.__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        self.reset()
        if not self.retried:
            self.retried = True
            warnings.warn(f"fastbegan: CUDA graph capture of the training step failed ({why}); "
                          f"re-warming ({self.warmup} eager steps) and capturing once more",
                          stacklevel=4)
            return self()
        self.enabled = False
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = self.fn(False)
        torch.cuda.synchronize(self.device)
        warnings.warn(f"fastbegan: CUDA graph capture of the training step failed twice ({why}); "
                      f"continuing with eager steps at {1 / (time.perf_counter() - t0):.1f} "
                      "steps/s", stacklevel=4)
        return out
