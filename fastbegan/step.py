"""The fused single-pass BEGAN training step, :class:`FusedStep` (docs/design.md §1, §4.2).

One step on the device with no host synchronisation: G(z) once; D once over
[x_real; G(z)], its first conv reading the two halves as they are and its last conv fused
with both L1 losses and the BEGAN update; ONE backward, in which D's weight gradients
weight the fake half by -k_t per sample (exact, §1); fused Adam; k_t and the step counter
updated in place. The forward region (:func:`step_forward`) is torch.compile'd as one
graph on CUDA, and on a CPU when the run is long enough to win the compile time back
(:mod:`fastbegan.autocompile`); the random draws stay eager, from the trainer's generator and in
``Trainer.train_step``'s order, so both steps see the same batches and z. On CUDA the
whole step is captured once into a CUDA graph and replayed. A failed compilation or
capture falls back to eager steps with a warning.

Shapes: the data set is (N, H, W, 3) uint8 on the device; x and G(z) are (B, 3, H, W) in
channels_last memory; the returned losses, k and M are 0-d device tensors.
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.nn as nn
from torch import Tensor

from . import autocompile, ops, remedies
from .checkpoint import match_state_layout
from .images import to_unit_range
from .model import Conv3x3

__all__ = ["FusedStep", "fused_step_status", "step_forward", "d_losses", "match_state_layout",
           "DEFAULT_COMPILE_MODE", "CPU_COMPILE_MODE", "SELF_CHECK_TOL"]

# torch.compile mode of the step's forward on CUDA: no CUDA graphs of inductor's own (the
# step captures its own graph around the whole step; cudagraph trees must not nest in it).
DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"
# On a CPU (torch backend): inductor's default mode with its C++ wrapper, which makes the
# compiled graph's hundreds of kernel and oneDNN calls per step from C++ instead of
# Python (the anatomy results file times both; docs/design.md §4.4).
CPU_COMPILE_MODE = "default+cpp_wrapper"
# The compile self-check (FusedStep._self_check): largest relative L2 error of a parameter's
# gradient, compiled against eager, per precision. Measured on the first command's shapes
# (docs/design.md §4.2): well below these; a dropped or zeroed gradient gives 1.
SELF_CHECK_TOL = {"fp32": 1e-3, "bf16": 5e-2}


def _check_scalable(d: nn.Module) -> None:
    """Every parameter of D must get the per-sample scale: Conv3x3 or nn.Linear only."""
    covered = set()
    for m in d.modules():
        if isinstance(m, (Conv3x3, nn.Linear)):
            covered |= {id(p) for p in m.parameters(recurse=False)}
    missing = [n for n, p in d.named_parameters() if id(p) not in covered]
    if missing:
        raise NotImplementedError(
            "the fused step scales D's weight gradients per sample in Conv3x3 and nn.Linear "
            f"layers only; these parameters are in other layers: {missing[:4]}")


# ----------------------------------------------------------------------------------------
# D's losses + BEGAN update
# ----------------------------------------------------------------------------------------
def d_losses(d: nn.Module, x_real: Tensor, x_fake: Tensor, scale: Tensor, k: Tensor,
             gamma: float, lambda_k: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(losses, k_next, M)`` of D on ``[x_real; x_fake]`` in one pass, weight gradients
    scaled per sample by ``scale``: D up to its last conv, then
    :func:`ops.conv3x3_l1_pair_began` (the last conv, both L1 losses and the BEGAN update;
    on triton the L1 gradient is made inside that conv's backward kernels)."""
    last = d.decoder.to_rgb
    # D's first conv reads the two halves as they are (no concatenated copy; no input
    # gradient for the real half); the L1 target is x_real itself (fp32: exact values)
    feats = d.features(x_real, scale, x2=x_fake)
    losses, k_next, m, _ = ops.conv3x3_l1_pair_began(feats, last.weight, last.bias, x_real,
                                                     x_fake, k, gamma, lambda_k,
                                                     wgrad_scale=scale)
    return losses, k_next, m


# ----------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------
def fused_step_status(trainer) -> tuple[bool, str]:
    """(use it, why): should ``trainer`` take the fused step by default?

    Yes for the same-z step in one process, on every device and backend: it was measured
    faster than the reference step at the same precision on the CPU (torch backend, fp32
    and bf16, docs/design.md) and it is the GPU path. The reference step stays for
    ``--separate-z``, torchrun, and a D with layers the per-sample scale does not cover.
    """
    if trainer.cfg.reference_step:
        return False, "--reference-step"
    if trainer.cfg.separate_z:
        return False, "--separate-z needs two G passes (the fused step is the same-z step)"
    if getattr(getattr(trainer, "dist", None), "enabled", False):
        return False, "several processes (torchrun): the reference step all-reduces the gradients"
    try:
        _check_scalable(trainer.D)
    except NotImplementedError as e:
        return False, str(e)
    return True, f"single-pass step, {trainer.backend} backend on {trainer.device.type}"


class FusedStep:
    """The single-pass global step for a :class:`fastbegan.train.Trainer`.

    ``FusedStep(trainer)()`` does what ``trainer.train_step()`` does (same batches, same
    losses, gradients, Adam updates and k_t up to float rounding; step counter and lr
    schedule advanced) and returns the same dict of device scalars
    (loss_real, loss_fake, loss_d, k, M). In graph mode they are static buffers that the
    next replay overwrites: read them before the next step, as ``Trainer.fit`` does.

    cuda_graph: capture the step into a CUDA graph after ``warmup`` eager steps (default:
    on CUDA). compile: ``torch.compile`` the step's forward region (:func:`step_forward`:
    batch gather/conversion, G, D, losses; the random draws and Adam stay eager); False,
    True (inductor's default mode; :data:`CPU_COMPILE_MODE` on a CPU with the torch
    backend), a mode string, or ``"auto"`` (default): on CUDA :data:`DEFAULT_COMPILE_MODE`;
    on CPU the rule of :mod:`fastbegan.autocompile`, decided after a few timed eager steps
    from ``steps_planned`` (set by the trainer; unknown: no compile). ``compile_mode`` says what is in use (None: eager, also after a failed
    compilation fell back); ``compile_why`` why. fused_adam: switch the
    trainer's Adam optimisers to the fused implementation (on CPU too, where it removes
    the ``.item()`` the for-each Adam does on its step counters).
    """

    def __init__(self, trainer, *, cuda_graph: bool | None = None, warmup: int = 2,
                 compile: bool | str | None = "auto", fused_adam: bool = True):
        cfg = trainer.cfg
        if cfg.separate_z:
            raise ValueError("the fused step is the same-z step: it does not support separate_z")
        if getattr(getattr(trainer, "dist", None), "enabled", False):
            raise ValueError("the fused step runs in one process: use the reference step under torchrun")
        _check_scalable(trainer.D)
        self.tr = trainer
        self.device = dev = trainer.device
        if cuda_graph is None:
            cuda_graph = dev.type == "cuda"
        if cuda_graph and dev.type != "cuda":
            raise ValueError("cuda_graph=True needs a CUDA device")
        self.cuda_graph, self.warmup = cuda_graph, max(1, int(warmup))
        self.opts = (trainer.opt_d, trainer.opt_g)
        if fused_adam and (dev.type == "cuda" or _cpu_fused_adam()):
            for opt in self.opts:
                for group in opt.param_groups:
                    group["fused"], group["foreach"] = True, False
        # device-resident state; the trainer's tensors become these static buffers
        self.k = trainer.k.detach().to(dev, torch.float32).clone()
        trainer.k = self.k
        self.step_t = torch.full((), trainer.step, device=dev, dtype=torch.int64)
        self.lr_t = torch.full((), trainer.lr, device=dev, dtype=torch.float32)
        self._host_step, self._host_lr = trainer.step, trainer.lr
        self._ones = torch.ones(cfg.batch_size, device=dev)
        self.compile_mode: str | None = None  # None: eager forward (also after a fallback)
        self.compile_why = "--no-compile"
        self._forward_eager = step_forward(trainer.G, trainer.D, self._ones, gamma=cfg.gamma,
                                           lambda_k=cfg.lambda_k, device_type=dev.type,
                                           bf16=cfg.precision == "bf16", cs_alpha=cfg.cs_alpha,
                                           pt_weight=cfg.pt_weight, step_t=self.step_t,
                                           pt_anneal=(cfg.pt_anneal_start, cfg.pt_anneal_end))
        self._forward = self._forward_eager
        self._compile_pending = False  # compiled, first call (compilation) not done yet
        self.steps_planned: int | None = None  # steps this run will still take (--compile auto)
        self._probe: list[float] | None = None  # eager step times while auto decides
        self._t_eager: float | None = None  # their median (auto on CPU)
        self._gain_probe: list[float] | None = None  # compiled step times, to record the gain
        self.compile_s: float | None = None  # how long the compilation took
        self.self_check: tuple[str, float] | None = None  # (worst parameter, its gradient error)
        if compile in (None, "auto"):
            if dev.type == "cuda":
                self._start_compile(DEFAULT_COMPILE_MODE, "auto: CUDA")
            else:
                self._probe = []
                self.compile_why = "auto: decided after the first eager steps"
        elif compile:
            self._start_compile(compile if isinstance(compile, str) else self._default_mode(), "--compile")
        self._graph = None
        self._static: dict[str, Tensor] | None = None
        self._static_batch: dict[str, Tensor] = {}
        self._state_keys = self._keys()
        self._warm = 0
        self._side = torch.cuda.Stream(dev) if cuda_graph else None

    # ------------------------------------------------------------------ host side
    def __call__(self) -> dict[str, Tensor]:
        tr = self.tr
        self._sync_host_state()
        t0 = time.perf_counter()
        if self.cuda_graph:
            vals = self._graph_step()
        else:
            vals = self._device_step(zero_grad=True)
        if self._probe is not None:  # CPU, --compile auto: time eager steps, then decide
            self._probe.append(time.perf_counter() - t0)  # (CPU work is synchronous)
            if len(self._probe) > autocompile.EAGER_PROBE_STEPS:
                self._decide_compile()
        elif self._gain_probe is not None and not self._compile_pending:
            self._gain_probe.append(time.perf_counter() - t0)  # compiled steps: the real gain
            if len(self._gain_probe) == autocompile.GAIN_STEPS:
                t_compiled = sorted(self._gain_probe)[len(self._gain_probe) // 2]
                autocompile.record(self._config_key(), gain=1.0 - t_compiled / self._t_eager)
                self._gain_probe = None
        tr.step += 1
        self._host_step = tr.step
        tr._schedule_lr()
        tr.last_batch = dict(self._static_batch)
        return vals

    def _sync_host_state(self) -> None:
        """Mirror host-side changes (checkpoint load, lr halving) into the device state."""
        tr = self.tr
        if tr.k is not self.k:
            self.k.copy_(tr.k.detach())
            tr.k = self.k
        if tr.step != self._host_step:
            self.step_t.fill_(tr.step)
            self._host_step = tr.step
        if tr.lr != self._host_lr:
            self.lr_t.fill_(tr.lr)
            self._host_lr = tr.lr
        keys = self._keys()
        if any(a is not b for a, b in zip(self._state_keys, keys)):
            # new optimiser state (first step, checkpoint load, divergence restore)
            for opt in self.opts:
                match_state_layout(opt)
            if self._graph is not None:
                self.reset_graph()
            self._state_keys = keys

    def _keys(self) -> list:
        """What a captured graph depends on besides the parameters (loaded in place): the
        trainer's data, generator and divergence flag, the optimisers' state objects (a
        checkpoint load replaces them) and the tensors of their first parameter's state.
        Compared by identity before every step (a few dict lookups)."""
        tr = self.tr
        keys = [tr.data, tr.gen, tr.nonfinite]
        for opt in self.opts:
            st = opt.state.get(opt.param_groups[0]["params"][0], {})
            keys += [opt.state, st.get("exp_avg"), st.get("exp_avg_sq"), st.get("step")]
        return keys

    def reset_graph(self) -> None:
        """Drop the captured graph; the next calls warm up and capture again."""
        self._graph, self._static, self._warm = None, None, 0

    # ------------------------------------------------------------------ device side
    def _draw(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """(idx, flip, z) from the trainer's generator, in ``Trainer.train_step``'s order.
        Eager: dynamo does not trace explicit generators (the compiled region starts after)."""
        tr, cfg = self.tr, self.tr.cfg
        b = cfg.batch_size
        idx = torch.randint(len(tr.data), (b,), device=self.device, generator=tr.gen)
        flip = (torch.rand(b, device=self.device, generator=tr.gen) < 0.5) if cfg.flip else None
        z = torch.rand(b, cfg.z_dim, device=self.device, generator=tr.gen).mul_(2).sub_(1)
        return idx, flip, z

    @property
    def compiles_next(self) -> bool:
        """The next call compiles (the trainer shows a 'compiling' phase)."""
        return self._compile_pending

    def _default_mode(self) -> str | None:
        """The compile mode for ``compile=True`` and CPU auto: :data:`CPU_COMPILE_MODE` on a
        CPU with the torch backend, else inductor's default (None; the triton backend's
        custom ops are left as inductor calls them from Python)."""
        return CPU_COMPILE_MODE if self.tr.backend == "torch" and self.device.type == "cpu" else None

    def _start_compile(self, mode: str | None, why: str) -> None:
        self.compile_mode, self.compile_why = mode or "default", why
        self._forward = _compiled(self._forward_eager, mode=mode)
        self._compile_pending = True

    def _decide_compile(self) -> None:
        """--compile auto on CPU: apply :func:`autocompile.decide` to the timed eager steps
        (the first one, with its allocations, is left out)."""
        times, self._probe = sorted(self._probe[1:]), None
        self._t_eager = times[len(times) // 2]
        left = (self.steps_planned or 0) - len(times) - 1
        d = autocompile.decide(left, self._t_eager, self.tr.cfg.precision, self._config_key())
        if d.compile:
            self._start_compile(self._default_mode(), "auto: " + d.why)
            self._gain_probe = []
        else:
            self.compile_why = "auto, not compiled: " + d.why
        self.tr.log(f"torch.compile {'on' if d.compile else 'off'} ({d.why})")

    def _config_key(self) -> str:
        return autocompile.config_key(self.tr.cfg, self.device)

    def _forward_backward(self, args: tuple) -> tuple[Tensor, ...]:
        """:func:`step_forward` (compiled or eager) on ``args``, then the one backward
        (AOTAutograd's compiled backward when compiled). The first compiled call compiles
        both and is checked against the eager step (:meth:`_self_check`); if compiling
        raises, or the check fails, warn once and run this and every later step eagerly
        (the same step: the random draws are already made, and the forward changes no
        state)."""
        if self._compile_pending:
            try:
                t0 = time.perf_counter()
                out = self._forward(*args)
                out[5].backward()
                self._compile_pending = False
                # the compiling call also ran one step: count only the compilation
                self.compile_s = max(0.0, time.perf_counter() - t0 - (self._t_eager or 0.0))
                autocompile.record_compile_time(self._config_key(), self.compile_s)
            except ops.KernelFatalError:
                raise  # the GPU is unusable: not a compile problem, no eager retry
            except Exception as e:
                self._compile_pending = False
                self._drop_compile(f"failed ({e.__class__.__name__}: "
                                   f"{(str(e).strip().splitlines() or [''])[0][:200]})")
                for opt in self.opts:  # a failure inside the backward may have left grads
                    opt.zero_grad(set_to_none=True)
            else:
                return self._self_check(args)
        out = self._forward(*args)
        out[5].backward()
        return out

    def _self_check(self, args: tuple) -> tuple[Tensor, ...]:
        """Once, after the compiling step: run the eager step on the same ``args`` and
        compare every parameter's gradient with the compiled one's (relative L2 error
        ``|g_compiled - g_eager| / max(|g_eager|, |g_compiled|)``). Beyond
        :data:`SELF_CHECK_TOL` the compilation is dropped with one warning naming the torch
        version and the worst parameter, and recorded so that ``--compile auto`` does not
        compile this configuration again: a torch or inductor bug must never silently stop
        a network from learning (torch 2.11 once zeroed G's gradients, docs/design.md
        §4.2). One extra eager step and one host sync, once per run. The eager step's
        results and gradients are the ones kept."""
        named = list(self.tr.model.named_parameters())
        compiled = [None if p.grad is None else p.grad.detach().clone() for _, p in named]
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        out = self._forward_eager(*args)
        out[5].backward()
        errs = torch.stack([_grad_error(g, p.grad, self.device)
                             for g, (_, p) in zip(compiled, named)]).tolist()
        worst = max(range(len(errs)), key=lambda i: errs[i])
        self.self_check = (named[worst][0], errs[worst])
        tol = SELF_CHECK_TOL[self.tr.cfg.precision]
        if not errs[worst] <= tol:  # NaN fails too
            autocompile.record(self._config_key(), gain=-1.0, self_check_error=min(errs[worst], 1e6))
            self._drop_compile(
                f"gave gradients that differ from the eager step's: {named[worst][0]} off by "
                f"{errs[worst]:.3g} (relative L2; tolerance {tol:g}) with torch {torch.__version__}")
        return out

    def _drop_compile(self, why: str) -> None:
        """Eager forward for good, with one warning saying why."""
        warnings.warn(f"fastbegan: torch.compile of the training step (mode {self.compile_mode}) "
                      f"{why}; continuing with the eager forward", stacklevel=5)
        self._forward, self.compile_mode = self._forward_eager, None
        self.compile_why = f"dropped: {why}"
        self._gain_probe = None

    def _device_step(self, zero_grad: bool) -> dict[str, Tensor]:
        """The whole step as device work only (what the CUDA graph captures)."""
        tr, cfg = self.tr, self.tr.cfg
        if cfg.vanishing_residual:
            tr.model.set_carry((1.0 - self.step_t.double() / cfg.vanishing_residual).clamp(0.0, 1.0))
        idx, flip, z = self._draw()
        k = self.k
        if zero_grad:
            for opt in self.opts:
                opt.zero_grad(set_to_none=True)
        x, fake, losses, k_next, m_global, _, terms = self._forward_backward((tr.data, idx, flip, z, k))
        lv = losses.detach()
        tr.nonfinite.logical_or_(~torch.isfinite(lv[0] + lv[1]))  # divergence flag, no sync
        for opt in self.opts:
            opt.step()
        if getattr(tr, "g_ema", None) is not None:
            tr.g_ema.update(self.step_t)  # EMA of G's weights (device ops)
        loss_d = lv[0] - k * lv[1]
        k.copy_(remedies.k_floor(k_next, remedies.k_min_at(cfg, self.step_t)))
        self.step_t.add_(1)
        self._static_batch = {"x": x, "fake": fake.detach()}
        return {"loss_real": lv[0], "loss_fake": lv[1], "loss_d": loss_d, "k": k, "M": m_global,
                **{f"loss_{n}": v for n, v in terms.items()}}

    def _graph_step(self) -> dict[str, Tensor]:
        if self._graph is None:
            if self._warm < self.warmup:
                self._warm += 1
                cur = torch.cuda.current_stream(self.device)
                self._side.wait_stream(cur)
                with torch.cuda.stream(self._side):
                    vals = self._device_step(zero_grad=True)
                cur.wait_stream(self._side)
                return vals
            try:
                self._capture()
            except ops.KernelFatalError:
                raise
            except Exception as e:  # keep training: eager steps are the same steps
                return self._capture_failed(e)
        self._graph.replay()
        return self._static

    def _capture_failed(self, e: Exception) -> dict[str, Tensor]:
        """First failure: re-warm (``warmup`` eager steps) and capture again. Second: eager
        steps for good, with the eager rate in the warning (what the graph would have
        saved is launch overhead on top of it). Either way this call is an eager step."""
        why = f"{e.__class__.__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
        self.reset_graph()
        if not getattr(self, "_capture_retried", False):
            self._capture_retried = True
            warnings.warn(f"fastbegan: CUDA graph capture of the training step failed ({why}); "
                          f"re-warming ({self.warmup} eager steps) and capturing once more",
                          stacklevel=4)
            return self._graph_step()
        self.cuda_graph = False
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        vals = self._device_step(zero_grad=True)
        torch.cuda.synchronize(self.device)
        warnings.warn(f"fastbegan: CUDA graph capture of the training step failed twice ({why}); "
                      f"continuing with eager steps at {1 / (time.perf_counter() - t0):.1f} "
                      "steps/s", stacklevel=4)
        return vals

    def _capture(self) -> None:
        tr = self.tr
        saved = []
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)  # the graph allocates the .grad tensors itself
            for group in opt.param_groups:
                saved.append((group, group.get("capturable", False)))
                group["capturable"] = True
                group["lr"] = self.lr_t
        graph = torch.cuda.CUDAGraph()
        if hasattr(graph, "register_generator_state"):
            graph.register_generator_state(tr.gen)
        try:
            # thread_local: a background thread (checkpoint writer) cannot break the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static = self._device_step(zero_grad=False)
        finally:
            # The graph reads lr_t; eager code (and checkpoints) keep seeing float rates and
            # the capturable flag as it was (the fused kernels ignore it outside a capture).
            for group, capturable in saved:
                group["lr"], group["capturable"] = self._host_lr, capturable
        self._graph, self._static = graph, static


def step_forward(G: nn.Module, D: nn.Module, ones: Tensor, *, gamma: float, lambda_k: float,
                 device_type: str, bf16: bool, cs_alpha: float = 0.0, pt_weight: float = 0.0,
                 step_t: Tensor | None = None, pt_anneal: tuple[int, int] = (0, 0)):
    """The forward region of the fused step, as one function of device tensors (what
    ``FusedStep(compile=...)`` hands to ``torch.compile(fullgraph=True, dynamic=False)``):

    ``forward(data, idx, flip, z, k) -> (x, fake, losses, k_next, M, objective, terms)``:
    the uint8 gather ``data[idx]``, the flip and the [-1, 1] conversion, ``fake = G(z)``,
    D's per-block weight-gradient scale ``[1; -k]`` (``ones`` is the (B,) ones buffer),
    :func:`d_losses` and the enabled collapse remedies (:func:`remedies.fused_step_terms`);
    ``objective`` is the scalar the one backward starts from, ``terms`` the remedies'
    unweighted values (for the log). G and D under bf16 autocast when ``bf16`` (without
    the cast cache, as in a CUDA graph capture). No random draws (the caller makes them
    with its generator) and no state changes.
    """
    def forward(data: Tensor, idx: Tensor, flip: Tensor | None, z: Tensor, k: Tensor):
        # compiled with the rest, not folded into D's first conv: docs/design.md §4.2
        x = to_unit_range(data[idx], flip)
        # D's weight-gradient scale, per block: 1 for the real half, -k_t for the fake half
        scale = torch.stack([ones[0], k.neg()]).view(2, 1)
        # G: on the torch backend a scale of one (exact) selects the written-out conv
        # (in-place ELU, ELU' from the output, upsample convs in sub-pixel form:
        # docs/design.md §4.4); the Triton ops need no such hint
        g_scale = ones[:1].view(1, 1) if ops.get_backend() == "torch" else None
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            fake = G(z, g_scale)
            losses, k_next, m = d_losses(D, x, fake, scale, k, gamma, lambda_k)
            # annealed pulling-away weight: a function of the device step counter step_t
            pt_scale = remedies.anneal_scale(step_t, *pt_anneal) if pt_anneal[1] else None
            terms = remedies.fused_step_terms(D, fake, z, cs_alpha=cs_alpha, pt_weight=pt_weight,
                                              pt_scale=pt_scale)
        objective = losses.sum()
        for value, weight in terms.values():
            objective = objective + weight * value
        return x, fake, losses, k_next, m, objective, {n: v.detach() for n, (v, _) in terms.items()}
    return forward


def _compiled(fn, mode: str | None):
    """``torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)``, or for
    :data:`CPU_COMPILE_MODE` inductor's default mode with ``cpp_wrapper`` (inductor applies
    it to the backward too). One graph: the model's ops are custom ops (triton backend) or
    plain aten ops and autograd.Functions with written-out backwards (torch backend), none
    of which breaks the graph."""
    if mode == CPU_COMPILE_MODE:
        return torch.compile(fn, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)


def _grad_error(got: Tensor | None, want: Tensor | None, device: torch.device) -> Tensor:
    """``|got - want| / max(|want|, |got|)`` (L2, fp32, 0-d on ``device``; 0 for two
    zeros, 1 where one of them is missing or zero)."""
    if got is None or want is None:
        return torch.tensor(0.0 if got is None and want is None else 1.0, device=device)
    g, w = got.detach().float(), want.detach().float()
    return (g - w).norm() / torch.maximum(w.norm(), g.norm()).clamp_min(1e-30)


def _cpu_fused_adam() -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return "cpu" in _get_fused_kernels_supported_devices()
    except Exception:
        return False
