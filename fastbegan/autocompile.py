"""The fused training step's forward region, eager or torch.compile'd, and its self-check.

:class:`CompiledForward` runs the fused step's forward region (``step.step_forward``) and its
one backward, eager or compiled (docs/design.md §4.2), and checks each compiled graph once
against the eager step (:func:`fastbegan.compile_check.compare_step`); a compilation that
raises or fails the check is dropped for the eager forward. When to compile and in which
mode, and the records of earlier runs, are :mod:`fastbegan.compile_policy` (its names are
re-exported here). Under torchrun every one of these decisions is made once for all ranks.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings

import torch
from torch import nn

from . import compile_policy as policy
from . import distributed, ops
from .compile_check import TOLERANCES, CheckReport, _grad_error, compare_step, snapshot  # noqa: F401
from .compile_policy import (CPU_COLD_COMPILE_S, CPU_COMPILE_MODE, CPU_GAIN,  # noqa: F401
                             DEFAULT_COMPILE_MODE, EAGER_PROBE_STEPS, GAIN_STEPS, Decision,
                             config_key, decide, inductor_cache_dir, record, record_compile_time,
                             recorded, records_path, step_code_version, use_persistent_inductor_cache)


class CompiledForward:
    """The fused step's forward region and its one backward, eager or compiled.

    ``cf(args)`` runs ``eager(*args)`` (or its compilation) and the backward from the
    objective; ``args`` and the returned ``step.StepOutputs`` are ``step.step_forward``'s
    (``(data, idx, flip, z, k) -> (x, fake, losses, k_next, M, objective, terms)``).

    compile: False; True (:meth:`default_mode`); a mode string; or ``"auto"``
    (:func:`~fastbegan.compile_policy.decide`: on CUDA at once, on a CPU after
    ``EAGER_PROBE_STEPS + 1`` eager steps that the caller times, :meth:`observe`). The
    first compiled call compiles (:attr:`pending` before it); it and every call that
    compiled a new graph (a recompilation: a dynamo guard failed) are checked against the
    eager step on the same inputs (:meth:`_check`). A compilation that raises or fails the
    check is dropped with one warning, recorded (auto does not compile it again), and that
    step and every later one run eagerly. ``mode`` says what is in use (None: eager),
    ``why`` why; ``self_check`` is the last check's (worst item, error, allowed), ``report``
    its :class:`~fastbegan.compile_check.CheckReport`.

    Under torchrun (``distributed`` initialised) every rank makes the same decision, so
    ranks never run different graphs: auto's is rank 0's (broadcast), a check's is the
    worst rank's (a MAX all-reduce of the error's share of its allowance, infinite where
    the compilation raised). A recompilation is caused by what all ranks share (shapes,
    None or a tensor, the modules' state), so the ranks check at the same step. Only rank 0
    (``main``) writes records and warns.
    """

    def __init__(self, eager, model: nn.Module, cfg, *, device: torch.device, backend: str,
                 compile: bool | str | None = "auto", log=print, main: bool = True,
                 reference=None):
        self.eager = self.fn = eager
        self.reference = reference     # the eager forward in fp32 (bf16 runs): the check's noise floor
        self.model, self.cfg, self.device, self.backend = model, cfg, device, backend
        self.log, self.main = log, main
        self.mode: str | None = None   # None: eager forward (also after a fallback)
        self.why = "--no-compile"
        self.pending = False           # compiled, first call (compilation) not done yet
        self.probe: list[float] | None = None       # eager step times while auto decides
        self.t_eager: float | None = None           # their median (auto on CPU)
        self.gain_probe: list[float] | None = None  # compiled step times, to record the gain
        self.compile_s: float | None = None         # how long the compilation took
        self.checks = 0                             # compiled graphs checked so far
        self.recheck = False                        # the last check was a near miss: check the next step too
        self.report: CheckReport | None = None      # the last check's
        self.self_check: tuple[str, float, float] | None = None  # (worst item, error, allowed)
        if compile in (None, "auto"):
            if device.type == "cpu":
                self.probe = []
                self.why = "auto: decided after the first eager steps"
            else:
                d = policy.decide(0, 0.0, cfg.precision, self.key(), device.type)
                self._auto(d, DEFAULT_COMPILE_MODE)
        elif compile:
            self._start(compile if isinstance(compile, str) else self.default_mode(), "--compile")

    def default_mode(self) -> str | None:
        """The mode for ``compile=True`` and CPU auto: :data:`CPU_COMPILE_MODE` on a CPU with
        the torch backend, else inductor's default (None; the triton backend's custom ops
        are left as inductor calls them from Python)."""
        return CPU_COMPILE_MODE if self.backend == "torch" and self.device.type == "cpu" else None

    def key(self) -> str:
        return policy.config_key(self.cfg, self.device, self.backend, distributed.info().world)

    def _start(self, mode: str | None, why: str) -> None:
        self.mode, self.why = mode or "default", why
        self.fn = _compiled(self.eager, mode=mode)
        self.pending = True

    # ------------------------------------------------------------------ one step
    def __call__(self, args: tuple):
        if self.mode is None:
            out = self.fn(*args)
            out.objective.backward()
            return out
        first, graphs = self.pending, _graphs_compiled()
        self.pending = False
        t0 = time.perf_counter()
        failed = None
        try:
            # (not on every step: changing the warning filters resets Python's once-registry)
            with _quiet_compiler() if first else contextlib.nullcontext():
                out = self.fn(*args)
                out.objective.backward()
        except ops.KernelFatalError:
            raise  # the GPU is unusable: not a compile problem, no eager retry
        except Exception as e:  # noqa: BLE001 - any compile problem: eager from here on
            if _capturing(self.device):
                raise  # a CUDA graph capture problem: the step retries the capture (step.py)
            failed = f"failed ({_first_line(e)})"
        if failed is None and (not (first or self.recheck or _graphs_compiled() != graphs)
                               or _capturing(self.device)):
            return out  # no new graph (or one inside a CUDA graph capture, where no check can sync)
        if failed is None and first:
            # the compiling call also ran one step: count only the compilation
            self.compile_s = max(0.0, time.perf_counter() - t0 - (self.t_eager or 0.0))
            if self.main:
                policy.record_compile_time(self.key(), self.compile_s)
        return self._checked(args, None if failed else out, failed)

    def _checked(self, args: tuple, out, failed: str | None):
        """A new compiled graph's step: check it (:meth:`_check`; if its compilation
        raised here, or the check failed here or on any other rank, warn once, record the
        failure and run every later step eagerly). Returns the eager step's outputs, whose
        gradients are the ones kept (the same step: the random draws are made, and the
        forward changes no state)."""
        report = None
        if failed is None:
            try:
                out, report = self._check(args, out)
            except ops.KernelFatalError:
                raise
            except Exception as e:  # noqa: BLE001 - the check itself broke: do not trust the graph
                failed = f"could not be checked ({_first_line(e)})"
        if report is None:
            out = self._eager_step(args)
        ratio = report.ratio if report is not None else math.inf
        worst = distributed.max_over_ranks(ratio, self.device)
        if worst <= 1.0:
            self.recheck = False
            return out
        if failed is None and not self.recheck and worst <= RECHECK_RATIO and self.cfg.precision == "fp32":
            # an fp32 near miss gets a second look on the next step's inputs: one residual of the
            # L1 losses within rounding of 0 takes the other sign in one of the two runs and moves
            # a gradient by ~1e-3 of its norm (docs/design.md §4.2); a wrong graph is off on every
            # step, a flipped sign on one (bf16's allowances are 50x wider than that)
            self.recheck = True
            if self.main:
                self.log(f"torch.compile self-check: a near miss ({report.describe()}); checking the next "
                         f"step too")
            return out
        if failed is None and self.main:
            policy.record(self.key(), gain=-1.0, self_check_error=min(worst, 1e6))
        self._drop(failed or (
            f"gave results that differ from the eager step's: {report.describe()} with torch "
            f"{torch.__version__}" if ratio > 1.0 else
            f"failed or gave wrong results in another process ({worst:.3g} times the allowed error)"))
        return out

    def _eager_step(self, args: tuple, forward=None):
        _zero_grads(self.model)  # a failure inside the backward may have left grads
        out = (forward or self.eager)(*args)
        out.objective.backward()
        return out

    def _check(self, args: tuple, compiled_out) -> tuple[object, CheckReport]:
        """The eager step on the same ``args``, and :func:`compare_step` of the compiled
        step's outputs and gradients against it (in bf16 also the eager step in fp32,
        ``self.reference``, for what bf16 rounding alone moves each of them). Beyond the
        tolerances (docs/design.md §4.2) the compilation is dropped: a torch or inductor
        bug must never silently change the training (torch 2.11 once zeroed G's
        gradients). One or two extra eager steps and a host sync, once per compiled graph."""
        k, cfg = args[4], self.cfg
        take = lambda out: snapshot(out, k, self.model, cfg.lambda_k, cfg.gamma)  # noqa: E731
        got = take(compiled_out)
        out = self._eager_step(args)
        want = take(out)
        reference = None
        if self.reference is not None:
            reference = take(self._eager_step(args, self.reference))
            for name, p in self.model.named_parameters():  # the bf16 step's gradients are kept
                p.grad = want.grads[name]
        report = compare_step(got, want, TOLERANCES[cfg.precision], reference)
        self.checks += 1
        self.report, self.self_check = report, (report.worst.split(":", 1)[1], report.error, report.allowed)
        return out, report

    def _drop(self, why: str) -> None:
        """Eager forward for good, with one warning (rank 0) saying why."""
        if self.main:
            warnings.warn(f"fastbegan: torch.compile of the training step (mode {self.mode}) "
                          f"{why}; continuing with the eager forward", stacklevel=7)
        self.fn, self.mode = self.eager, None
        self.why = f"dropped: {why}"
        self.gain_probe = None

    # ------------------------------------------------------------------ --compile auto
    def observe(self, seconds: float, steps_planned: int | None) -> None:
        """A step's wall time (CPU work is synchronous): auto's eager probe, then the decision;
        after a compilation, the gain over the eager steps (recorded by rank 0)."""
        if self.probe is not None:
            self.probe.append(seconds)
            if len(self.probe) > EAGER_PROBE_STEPS:
                self._decide(steps_planned)
        elif self.gain_probe is not None and not self.pending:
            self.gain_probe.append(seconds)
            if len(self.gain_probe) == GAIN_STEPS:
                t_compiled = sorted(self.gain_probe)[len(self.gain_probe) // 2]
                if self.main:
                    policy.record(self.key(), gain=1.0 - t_compiled / self.t_eager)
                self.gain_probe = None

    def _decide(self, steps_planned: int | None) -> None:
        """--compile auto on CPU: :func:`decide` on the timed eager steps (the first one, with
        its allocations, is left out)."""
        times, self.probe = sorted(self.probe[1:]), None
        self.t_eager = times[len(times) // 2]
        left = (steps_planned or 0) - len(times) - 1
        if self._auto(policy.decide(left, self.t_eager, self.cfg.precision, self.key()), self.default_mode()):
            self.gain_probe = []
        self.log(f"torch.compile {'on' if self.mode else 'off'} ({self.why.split(': ', 1)[1]})")

    def _auto(self, d: Decision, mode: str | None) -> bool:
        """Apply auto's decision ``d``; rank 0's holds for every rank."""
        go = distributed.from_rank0(d.compile, self.device)
        why = d.why if go == d.compile else "rank 0's decision for all processes"
        if go:
            self._start(mode, "auto: " + why)
        else:
            self.why = "auto, not compiled: " + why
        return go


# a check off by at most this many times its allowance is repeated on the next step before the
# compilation is dropped (a wrong graph, e.g. zeroed gradients, is off by 1e2-1e6 times)
RECHECK_RATIO = 10.0


def _compiled(fn, mode: str | None):
    """``torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)``, or for
    :data:`CPU_COMPILE_MODE` inductor's default mode with ``cpp_wrapper`` (inductor applies
    it to the backward too). One graph: the model's ops are custom ops (triton backend) or
    plain aten ops and autograd.Functions with written-out backwards (torch backend), none
    of which breaks the graph."""
    if mode == CPU_COMPILE_MODE:
        return torch.compile(fn, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)


def _graphs_compiled() -> int:
    """How many graphs dynamo has compiled in this process (0 before it is imported): a
    call that raises it compiled a new graph of its own (single-threaded)."""
    if "torch._dynamo" not in sys.modules:
        return 0
    return sys.modules["torch._dynamo"].utils.counters["stats"]["unique_graphs"]


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def _quiet_compiler():
    """torch's own deprecation notices from inside inductor (torch 2.13 prints one per
    lowering): nothing the user can act on, and they bury the training log."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
        yield


def _first_line(e: Exception) -> str:
    return f"{e.__class__.__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None
