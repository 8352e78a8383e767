"""torch.compile of the fused training step: how, when it pays, and the check that it is right.

:class:`CompiledForward` runs the fused step's forward region (``step.step_forward``) and its
one backward, eager or compiled (docs/design.md §4.2): the compile mode per device
(:data:`DEFAULT_COMPILE_MODE` on CUDA, :data:`CPU_COMPILE_MODE` on a CPU), ``--compile
auto``'s decision, and the self-check of the first compiled step's gradients against the
eager step's. Under torchrun every one of these decisions is made once for all ranks.

When it pays on a CPU: compiling costs a one-off ``T_c`` seconds (dynamo, AOTAutograd,
inductor's C++ build; much less once inductor's on-disk cache holds the graphs) and then
saves a fraction ``g`` of every step. ``--compile auto`` compiles iff the steps still to
run win that back::

    steps_left * t_eager * g  >  T_c

``t_eager`` is the run's own eager step time, measured on its first steps. ``g`` and
``T_c`` are what the last compiled run of the same configuration measured (recorded in
``$FASTBEGAN_CACHE/compile_times.json``: its compile time reflects the warm cache a later
run finds); for a configuration never compiled here, the defaults below, measured on the
project's 2-core CPU (benchmarks/results/cpu-*-anatomy-*.md). On CUDA, auto always
compiles (GPU runs are long).
"""
from __future__ import annotations

import functools
import hashlib
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from . import distributed, ops

# torch.compile mode of the step's forward on CUDA: no CUDA graphs of inductor's own (the
# step captures its own graph around the whole step; cudagraph trees must not nest in it).
DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"
# On a CPU (torch backend): inductor's default mode with its C++ wrapper, which makes the
# compiled graph's hundreds of kernel and oneDNN calls per step from C++ instead of
# Python (the anatomy results file times both; docs/design.md §4.4).
CPU_COMPILE_MODE = "default+cpp_wrapper"
# The compile self-check (CompiledForward._self_check): largest relative L2 error of a
# parameter's gradient, compiled against eager, per precision. Measured on the first
# command's shapes (docs/design.md §4.2): well below these; a dropped or zeroed gradient gives 1.
SELF_CHECK_TOL = {"fp32": 1e-3, "bf16": 5e-2}
# In bf16 a parameter may also be off by up to this many times what bf16 rounding alone moves
# its gradient (eager bf16 against eager fp32 on the same inputs, measured in the same check):
# trained weights make some gradients (a bias summed over every pixel) mostly cancellation,
# where compiled and eager bf16 round differently by more than the fixed tolerance.
SELF_CHECK_NOISE_FACTOR = 3.0

# Defaults for a configuration never compiled here, from the anatomy results file (2-core
# Xeon, AMX-BF16; fused step, n 64, batch 16; C++ wrapper): per precision the smallest gain
# it measured (bf16: 27% at res 32, 18% at res 64; fp32: 17% at res 32), and its largest
# cold-cache compile time (69.2 s, res 64).
CPU_GAIN = {"bf16": 0.18, "fp32": 0.17}
CPU_COLD_COMPILE_S = 69.2
EAGER_PROBE_STEPS = 3  # eager steps timed before deciding (the first one is not timed)
GAIN_STEPS = 5         # compiled steps timed after the compilation, to record the gain


def inductor_cache_dir() -> Path:
    """Where inductor keeps compiled graphs: $TORCHINDUCTOR_CACHE_DIR if the user set it,
    else a folder in fastbegan's cache (kept across reboots, unlike /tmp)."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    from .data import default_cache_dir
    return default_cache_dir() / "inductor"


def use_persistent_inductor_cache() -> Path:
    """Point inductor at :func:`inductor_cache_dir` (before anything is compiled)."""
    path = inductor_cache_dir()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(path))
    return path


def config_key(cfg, device: torch.device) -> str:
    """What a compiled step depends on: shapes, precision, options (the remedies add terms
    to the graph), torch version, and the code of the step itself: a recorded gain is
    measured on one version of the step and is not carried over to another (a gain once
    recorded as negative would otherwise stop auto from ever compiling, and so from ever
    measuring it again)."""
    return (f"{device.type}|torch {torch.__version__}|{cfg.precision}|res {cfg.res}|n {cfg.filters}|"
            f"z {cfg.z_dim}|h {cfg.h}|b {cfg.batch_size}|skip {cfg.skip}|vr {bool(cfg.vanishing_residual)}"
            f"|flip {cfg.flip}|cs {cfg.cs_alpha:g}|pt {cfg.pt_weight:g}{_pt_anneal(cfg)}"
            f"|code {step_code_version()}")


def _pt_anneal(cfg) -> str:
    """The pulling-away weight's anneal window, part of the compiled graph (empty if off)."""
    return f"|pt-anneal {cfg.pt_anneal_start}-{cfg.pt_anneal_end}-{cfg.pt_final:g}" if cfg.pt_anneal_end else ""


@functools.lru_cache(maxsize=1)
def step_code_version() -> str:
    """A short hash of the source files the compiled step is made of (model, step, ops, and
    this module: the compile modes)."""
    root = Path(__file__).resolve().parent
    files = [root / "model.py", root / "step.py", root / "remedies.py", root / "autocompile.py",
             *sorted((root / "ops").glob("*.py"))]
    h = hashlib.sha1()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def records_path() -> Path:
    """The compile records: ``$FASTBEGAN_CACHE/compile_times.json``."""
    from .data import default_cache_dir
    return default_cache_dir() / "compile_times.json"


def recorded(key: str) -> dict:
    """``{"compile_s": ..., "gain": ...}`` of the last compiled run of ``key`` (parts may be absent)."""
    from .data import read_json_table
    entry = read_json_table(records_path()).get(key)
    return entry if isinstance(entry, dict) else {}


def record(key: str, **values: float) -> None:
    """Merge ``values`` into ``key``'s entry (atomic write; errors are ignored)."""
    from .data import read_json_table, write_json_atomic
    path = records_path()
    table = read_json_table(path)
    entry = table.get(key) if isinstance(table.get(key), dict) else {}
    entry.update({k: round(v, 4) for k, v in values.items()})
    table[key] = entry
    write_json_atomic(path, table)


_compiled_here = False  # a compilation has already run in this process


def record_compile_time(key: str, seconds: float) -> None:
    """Record a compilation's time if it was this process's first. A later one finds dynamo
    and inductor warm in memory (a second trainer in one script, a benchmark comparing two
    steps): its time would promise later runs a compile time a new process does not get."""
    global _compiled_here
    if not _compiled_here:
        record(key, compile_s=seconds)
    _compiled_here = True


@dataclass
class Decision:
    compile: bool
    why: str


def decide(steps_left: int, t_eager_s: float, precision: str, key: str) -> Decision:
    """The CPU rule above, with the numbers it used in ``why``."""
    past = recorded(key)
    if "self_check_error" in past:
        return Decision(False, "the compiled step of this configuration failed its gradient "
                               f"self-check here (error {past['self_check_error']:.3g})")
    gain = past.get("gain", CPU_GAIN.get(precision, min(CPU_GAIN.values())))
    t_c = past.get("compile_s", CPU_COLD_COMPILE_S)
    source = ("the last compiled run of this configuration" if past else
              "defaults: no compiled run of this configuration here yet")
    saved = steps_left * t_eager_s * max(gain, 0.0)
    verdict = saved > t_c
    why = (f"{steps_left} steps x {1e3 * t_eager_s:.0f} ms x {gain:.0%} saved = {saved:.0f} s "
           f"{'>' if verdict else '<='} {t_c:.0f} s to compile; {source}")
    return Decision(verdict, why)


# ----------------------------------------------------------------------------------------
# the fused step's forward region, eager or compiled
# ----------------------------------------------------------------------------------------
class CompiledForward:
    """The fused step's forward region and its one backward, eager or compiled.

    ``cf(args)`` runs ``eager(*args)`` (or its compilation) and the backward from the
    objective; ``args`` and the returned tuple are ``step.step_forward``'s
    (``(data, idx, flip, z, k) -> (x, fake, losses, k_next, M, objective, terms)``).

    compile: False; True (:meth:`default_mode`); a mode string; or ``"auto"``: on CUDA
    :data:`DEFAULT_COMPILE_MODE`, on a CPU the rule above, decided after
    ``EAGER_PROBE_STEPS + 1`` eager steps that the caller times (:meth:`observe`). The first
    compiled call compiles (:attr:`pending` before it) and is checked against the eager
    step (:meth:`_first_compiled`); a compilation that raises or fails the check is
    dropped with one warning and every later step runs eagerly. ``mode`` says what is in
    use (None: eager), ``why`` why.

    Under torchrun (``distributed`` initialised) every rank makes the same decision, so
    ranks never run different graphs: auto's is rank 0's (broadcast), the first compiled
    step's is the worst rank's (a MAX all-reduce of the gradient error, infinite where the
    compilation raised). Only rank 0 (``main``) writes records and warns.
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
        self.self_check: tuple[str, float, float] | None = None  # (worst parameter, error, allowed)
        if compile in (None, "auto"):
            if device.type == "cuda":
                self._start(DEFAULT_COMPILE_MODE, "auto: CUDA")
            else:
                self.probe = []
                self.why = "auto: decided after the first eager steps"
        elif compile:
            self._start(compile if isinstance(compile, str) else self.default_mode(), "--compile")

    def default_mode(self) -> str | None:
        """The mode for ``compile=True`` and CPU auto: :data:`CPU_COMPILE_MODE` on a CPU with
        the torch backend, else inductor's default (None; the triton backend's custom ops
        are left as inductor calls them from Python)."""
        return CPU_COMPILE_MODE if self.backend == "torch" and self.device.type == "cpu" else None

    def key(self) -> str:
        return config_key(self.cfg, self.device)

    def _start(self, mode: str | None, why: str) -> None:
        self.mode, self.why = mode or "default", why
        self.fn = _compiled(self.eager, mode=mode)
        self.pending = True

    # ------------------------------------------------------------------ one step
    def __call__(self, args: tuple) -> tuple:
        if self.pending:
            return self._first_compiled(args)
        out = self.fn(*args)
        out[5].backward()
        return out

    def _first_compiled(self, args: tuple) -> tuple:
        """The compiling call, then the check; if compiling raised here, or the check failed
        here or on any other rank, warn once and run this and every later step eagerly (the
        same step: the random draws are made, and the forward changes no state)."""
        self.pending = False
        t0 = time.perf_counter()
        failed = None
        try:
            with warnings.catch_warnings():
                # torch's own deprecation notices from inside inductor (torch 2.13 prints one per
                # lowering): nothing the user can act on, and they bury the training log
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
                warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
                out = self.fn(*args)
                out[5].backward()
        except ops.KernelFatalError:
            raise  # the GPU is unusable: not a compile problem, no eager retry
        except Exception as e:  # noqa: BLE001 - any compile problem: eager from here on
            failed = f"failed ({e.__class__.__name__}: {(str(e).strip().splitlines() or [''])[0][:200]})"
        if failed is None:
            # the compiling call also ran one step: count only the compilation
            self.compile_s = max(0.0, time.perf_counter() - t0 - (self.t_eager or 0.0))
            if self.main:
                record_compile_time(self.key(), self.compile_s)
            out, name, err, allowed = self._self_check(args)
        else:
            out, name, err, allowed = self._eager_step(args), None, math.inf, 1.0
        ratio = err / allowed
        worst = distributed.max_over_ranks(ratio if ratio == ratio else math.inf, self.device)
        if failed is not None:
            self._drop(failed)
        elif not worst <= 1.0:
            if self.main:
                record(self.key(), gain=-1.0, self_check_error=min(err, 1e6))
            self._drop(f"gave gradients that differ from the eager step's: {name} off by {err:.3g} "
                       f"(relative L2; allowed {allowed:.3g}) with torch {torch.__version__}"
                       if ratio > 1.0 else
                       f"failed or gave wrong gradients in another process ({worst:.3g} times the "
                       "allowed error)")
        return out

    def _eager_step(self, args: tuple, forward=None) -> tuple:
        _zero_grads(self.model)  # a failure inside the backward may have left grads
        out = (forward or self.eager)(*args)
        out[5].backward()
        return out

    def _self_check(self, args: tuple) -> tuple[tuple, str, float, float]:
        """Once, after the compiling step: run the eager step on the same ``args`` and
        compare every parameter's gradient with the compiled one's (relative L2 error
        ``|g_compiled - g_eager| / max(|g_eager|, |g_compiled|)``). A parameter may be off by
        :data:`SELF_CHECK_TOL`, and in bf16 also by :data:`SELF_CHECK_NOISE_FACTOR` times
        what bf16 rounding alone moves its gradient (the eager step in fp32,
        ``self.reference``, on the same inputs). Returns the eager step's output (its
        gradients are the ones kept), and the parameter whose error is the largest share of
        its allowance: its name, error and allowance. Beyond it the compilation is dropped:
        a torch or inductor bug must never silently stop a network from learning (torch 2.11
        once zeroed G's gradients, docs/design.md §4.2). One or two extra eager steps and a
        host sync, once per run."""
        named = list(self.model.named_parameters())
        compiled = [_grad_copy(p) for _, p in named]
        out = self._eager_step(args)
        eager = [_grad_copy(p) for _, p in named]
        errs = torch.stack([_grad_error(g, e, self.device) for g, e in zip(compiled, eager)])
        allowed = torch.full_like(errs, SELF_CHECK_TOL[self.cfg.precision])
        if self.reference is not None:
            self._eager_step(args, self.reference)
            noise = torch.stack([_grad_error(e, p.grad, self.device) for e, (_, p) in zip(eager, named)])
            allowed = torch.maximum(allowed, SELF_CHECK_NOISE_FACTOR * noise)
            for e, (_, p) in zip(eager, named):  # the bf16 step's gradients are the ones kept
                p.grad = e
        errs, allowed = errs.tolist(), allowed.tolist()
        worst = max(range(len(errs)), key=lambda i: errs[i] / allowed[i])
        self.self_check = (named[worst][0], errs[worst], allowed[worst])
        return out, named[worst][0], errs[worst], allowed[worst]

    def _drop(self, why: str) -> None:
        """Eager forward for good, with one warning (rank 0) saying why."""
        if self.main:
            warnings.warn(f"fastbegan: torch.compile of the training step (mode {self.mode}) "
                          f"{why}; continuing with the eager forward", stacklevel=6)
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
                    record(self.key(), gain=1.0 - t_compiled / self.t_eager)
                self.gain_probe = None

    def _decide(self, steps_planned: int | None) -> None:
        """--compile auto on CPU: :func:`decide` on the timed eager steps (the first one, with
        its allocations, is left out); rank 0's decision holds for every rank."""
        times, self.probe = sorted(self.probe[1:]), None
        self.t_eager = times[len(times) // 2]
        left = (steps_planned or 0) - len(times) - 1
        d = decide(left, self.t_eager, self.cfg.precision, self.key())
        go = distributed.from_rank0(d.compile, self.device)
        why = d.why if go == d.compile else "rank 0's decision for all processes"
        if go:
            self._start(self.default_mode(), "auto: " + why)
            self.gain_probe = []
        else:
            self.why = "auto, not compiled: " + why
        self.log(f"torch.compile {'on' if go else 'off'} ({why})")


def _compiled(fn, mode: str | None):
    """``torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)``, or for
    :data:`CPU_COMPILE_MODE` inductor's default mode with ``cpp_wrapper`` (inductor applies
    it to the backward too). One graph: the model's ops are custom ops (triton backend) or
    plain aten ops and autograd.Functions with written-out backwards (torch backend), none
    of which breaks the graph."""
    if mode == CPU_COMPILE_MODE:
        return torch.compile(fn, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)


def _zero_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


def _grad_copy(p: Tensor) -> Tensor | None:
    return None if p.grad is None else p.grad.detach().clone()


def _grad_error(got: Tensor | None, want: Tensor | None, device: torch.device) -> Tensor:
    """``|got - want| / max(|want|, |got|)`` (L2, fp32, 0-d on ``device``; 0 for two
    zeros, 1 where one of them is missing or zero)."""
    if got is None or want is None:
        return torch.tensor(0.0 if got is None and want is None else 1.0, device=device)
    g, w = got.detach().float(), want.detach().float()
    return (g - w).norm() / torch.maximum(w.norm(), g.norm()).clamp_min(1e-30)
