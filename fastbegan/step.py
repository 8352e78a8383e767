"""The two BEGAN training steps, side by side, behind one interface (docs/design.md §4).

:class:`ReferenceStep` is the definition of correctness: G(z), D over ``[x; G(z)]``, two
``autograd.grad`` calls (L_D's gradients to D, L_G's to G), any device and backend, and the
paper's two draws with ``separate_z`` (§4.1). :class:`FusedStep` is the fast one: G once, D
once over ``[x_real; G(z)]`` with its last conv fused with both L1 losses and the BEGAN
update, ONE backward in which D's weight gradients weight the fake half by -k_t per sample
(exact, §1), fused Adam, k_t and the step counter updated in place on the device, the
forward region torch.compile'd (:class:`fastbegan.autocompile.CompiledForward`) and on CUDA
the whole step captured once into a CUDA graph (:class:`fastbegan.cudagraph.GraphedStep`,
§4.2). :func:`make_step` picks one (§4.3).

A step is given what it works on explicitly, as :class:`StepInputs` (the model, both
optimisers, the data, the run's :class:`~fastbegan.state.TrainState`, the config and the
process group), never the trainer (a trainer passed to a step's constructor is replaced
by its ``step_inputs()`` at once). Both are a :class:`Step`: ``step()`` runs one step and
returns the logged scalars as 0-d device tensors, with no host synchronisation. They share
its skeleton (:meth:`Step._device_step`): the global random draws (all ranks draw the
same; each uses its rows: :class:`Draw`), the step's own forward and backward (a
:class:`ForwardBackward`), then :meth:`Step._update`: under torchrun ONE all-reduce of G's
and D's gradients and the losses (:class:`fastbegan.distributed.GradSync`), the divergence
flag, Adam, k_t and the device step counter. So the distributed path is written once for
both (§4.5).

Shapes: the data set is (N, H, W, 3) uint8 on the device; with W processes each step works
on B / W rows of the global batch B: x and G(z) are (B/W, 3, H, W) in channels_last memory;
z is (B/W, z_dim); the returned losses, k and M are 0-d device tensors.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from . import augment, distributed, ops, remedies
from .autocompile import CompiledForward
from .cudagraph import GraphedStep
from .images import to_unit_range
from .model import Conv3x3
from .state import TrainState

__all__ = ["Step", "StepInputs", "Draw", "ForwardBackward", "ReferenceStep", "FusedStep", "make_step",
           "fused_step_status", "step_forward", "StepOutputs", "d_losses"]


@dataclass
class StepInputs:
    """What a step works on. ``model`` is the BEGAN (its ``G`` and ``D`` are named apart so a
    caller can hand in wrapped ones, e.g. torch.compile'd modules); ``opt_d`` / ``opt_g``
    their Adam optimisers; ``data`` the (N, H, W, 3) uint8 data set on the device;
    ``state`` the run's device state (k_t, step, lr, generator, divergence flag); ``cfg`` a
    :class:`~fastbegan.config.TrainConfig`; ``dist`` the process group's rank and size;
    ``backend`` the ops backend in use; ``g_ema`` the EMA of G's weights (or None);
    ``log`` where a step's start-up notes go (rank 0)."""
    cfg: Any
    model: nn.Module
    G: nn.Module
    D: nn.Module
    opt_d: torch.optim.Optimizer
    opt_g: torch.optim.Optimizer
    data: Tensor
    state: TrainState
    dist: distributed.DistInfo = field(default_factory=distributed.DistInfo)
    backend: str = "torch"
    g_ema: Any = None
    log: Callable[[str], Any] = print

    @property
    def device(self) -> torch.device:
        return self.state.device

    def autocast(self):
        """bf16 autocast when the run's precision is bf16, else a no-op context."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")


@dataclass
class Draw:
    """One step's random draws, this rank's rows: ``idx`` (B/W,) int64 image indices,
    ``flip`` (B/W,) bool horizontal flips (None with ``flip`` off), ``z`` (B/W, z_dim),
    ``shift`` (B/W, 4) int64 shifts of D's inputs (:func:`fastbegan.augment.draw_shifts`;
    None with ``augment_shift`` off)."""
    idx: Tensor
    flip: Tensor | None
    z: Tensor
    shift: Tensor | None = None


@dataclass
class ForwardBackward:
    """What a step's forward and backward hand to the shared update (``.grad`` of G and D
    written): ``losses`` the 0-d losses ``{"real", "fake", <remedy term>...}`` of this
    rank's rows; ``x`` the real rows and ``fake`` G(z)'s (detached), (B/W, 3, H, W);
    ``k_next`` and ``m`` k_{t+1} and M from these losses (None: the update computes them)."""
    losses: dict[str, Tensor]
    x: Tensor
    fake: Tensor
    k_next: Tensor | None = None
    m: Tensor | None = None


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
# which step
# ----------------------------------------------------------------------------------------
def fused_step_status(inputs) -> tuple[bool, str]:
    """(use it, why): should a run take the fused step? ``inputs``: anything with ``cfg``,
    ``D``, ``backend`` and ``device`` (:class:`StepInputs`, or the trainer).

    Yes for the same-z step on every device, backend and number of processes: it was
    measured faster than the reference step at the same precision on the CPU (torch
    backend, fp32 and bf16, docs/design.md §4.4) and it is the GPU path. The reference step
    stays for ``--reference-step``, ``--separate-z`` and a D with layers the per-sample
    scale does not cover.
    """
    if inputs.cfg.reference_step:
        return False, "--reference-step"
    if inputs.cfg.separate_z:
        return False, "--separate-z needs two G passes (the fused step is the same-z step)"
    try:
        _check_scalable(inputs.D)
    except NotImplementedError as e:
        return False, str(e)
    return True, f"single-pass step, {inputs.backend} backend on {inputs.device.type}"


def make_step(inputs: StepInputs) -> "Step":
    """The step a run takes: :class:`FusedStep` where :func:`fused_step_status` allows it
    (torch.compile per ``cfg.compile_step``), else :class:`ReferenceStep`."""
    use_fused, why = fused_step_status(inputs)
    if use_fused:
        compile_arg = {"auto": "auto", "on": True, "off": False}[inputs.cfg.compile_step]
        step = FusedStep(inputs, compile=compile_arg)
    else:
        step = ReferenceStep(inputs)
    step.why = why
    return step


# ----------------------------------------------------------------------------------------
# the interface and the shared skeleton
# ----------------------------------------------------------------------------------------
class Step:
    """One BEGAN training step over :class:`StepInputs` (the interface the loop and the
    distributed code call).

    ``step()`` runs one step: global draws from the state's generator, this process's rows
    of them, the step's forward and backward (:meth:`forward_backward`, per subclass), then
    :meth:`_update` (all-reduce under torchrun, divergence flag, Adam, k_t, the device step
    counter); it advances the state's host step counter and returns ``{loss_real,
    loss_fake, loss_d, k, M, loss_<term> for each enabled remedy}`` as 0-d device tensors
    (global means). ``last_batch`` holds this process's newest real and fake rows (for the
    health monitor).

    ``kind`` ("fused" / "reference"), ``why`` (set by :func:`make_step`), ``describe()``
    (the start-up line), ``compiles_next`` (the next call compiles: the loop says so) and
    ``steps_planned`` (set by the loop: steps this run will still take) are what the loop
    reads; ``state_loaded()`` is what it calls after loading a checkpoint. ``sync``: the
    :class:`~fastbegan.distributed.GradSync` of a torchrun run, else None.
    """

    kind = "?"

    def __init__(self, inputs: StepInputs):
        if not isinstance(inputs, StepInputs):  # a Trainer: its parts (Trainer.step_inputs)
            inputs = inputs.step_inputs()
        self.inputs = inputs
        self.cfg, self.state, self.data = inputs.cfg, inputs.state, inputs.data
        self.device = inputs.device
        self.opts = (inputs.opt_d, inputs.opt_g)
        self.shard = inputs.dist.shard(self.cfg.batch_size)  # this rank's rows of each draw
        self.sync = distributed.GradSync(inputs.model.parameters()) if inputs.dist.enabled else None
        self.why = ""
        # --fm-data: the training set's pixel moments, once (the same on every rank: each holds the whole set)
        self.fm_target = remedies.pixel_moments(self.data, self.cfg.flip) if self.cfg.fm_data else None
        # --sw-weight: the training set's thumbnail projections at fixed quantiles, once (the same on every rank)
        self.sw_target = (remedies.thumbnail_quantiles(self.data, self.cfg.flip,
                                                       sides=remedies.sw_sides(self.cfg.res, self.cfg.sw_max_side))
                          if self.cfg.sw_weight else None)
        # --augment-shift: the largest shift of D's inputs in pixels (0 = off)
        self.max_shift = augment.max_shift(self.cfg.res, self.cfg.augment_shift)
        self.steps_planned: int | None = None
        self.last_batch: dict[str, Tensor] = {}

    @property
    def compiles_next(self) -> bool:
        return False

    def describe(self) -> str:
        """The start-up line: which step runs and why."""
        world = self.inputs.dist.world
        return f"{self.kind} training step ({self.why}" + (
            f"; {world} processes, one all-reduce of the gradients and losses per step)" if self.sync else ")")

    def state_loaded(self) -> None:
        """The state, parameters and optimiser state were just loaded (a checkpoint, a
        restore): nothing to do here; the fused step drops its CUDA graph."""

    def __call__(self) -> dict[str, Tensor]:
        vals = self._run()
        self.state.advance()
        return vals

    def _run(self) -> dict[str, Tensor]:
        return self._device_step(capturing=False)

    # ------------------------------------------------------------------ device side
    def sample_z(self, n: int | None = None) -> Tensor:
        """This rank's rows of a global draw of ``n`` (default: the batch) z ~ U(-1, 1)^z_dim."""
        n = n or self.cfg.batch_size
        return torch.rand(n, self.cfg.z_dim, device=self.device, generator=self.state.gen).mul_(2).sub_(1)[self.shard]

    def draw(self) -> Draw:
        """This rank's rows of the global indices, flips, z and shifts, drawn in this order from
        the state's generator (eager: dynamo does not trace explicit generators; the shifts
        come last, so a run without them draws what it drew before they existed)."""
        idx, flip = self.draw_images()
        z = self.sample_z()
        shift = (augment.draw_shifts(self.cfg.batch_size, self.max_shift, self.device, self.state.gen)[self.shard]
                 if self.max_shift else None)
        return Draw(idx, flip, z, shift)

    def draw_images(self) -> tuple[Tensor, Tensor | None]:
        """(idx, flip): this rank's rows of the global draw of image indices and flips."""
        b, gen = self.cfg.batch_size, self.state.gen
        idx = torch.randint(len(self.data), (b,), device=self.device, generator=gen)[self.shard]
        flip = (torch.rand(b, device=self.device, generator=gen) < 0.5)[self.shard] if self.cfg.flip else None
        return idx, flip

    def _device_step(self, capturing: bool) -> dict[str, Tensor]:
        """The whole step as device work only (what a CUDA graph captures; ``capturing``:
        the gradients were set to None before the capture, so the graph allocates them)."""
        if self.cfg.vanishing_residual:
            self.inputs.model.set_carry(self._carry())
        d = self.draw()
        if not capturing:
            for opt in self.opts:
                opt.zero_grad(set_to_none=True)
        fb = self.forward_backward(d.idx, d.flip, d.z, d.shift)
        self.last_batch = {"x": fb.x, "fake": fb.fake}
        return self._update(fb)

    def forward_backward(self, idx: Tensor, flip: Tensor | None, z: Tensor,
                         shift: Tensor | None = None) -> ForwardBackward:
        """This rank's forward and backward on one :class:`Draw`'s rows: ``.grad`` of G and D
        written, and what the update needs (:class:`ForwardBackward`)."""
        raise NotImplementedError

    def _update(self, fb: ForwardBackward) -> dict[str, Tensor]:
        """Shared by both steps: under torchrun one all-reduce of G's and D's gradients and
        the losses (averaged: the global batch's), then k_{t+1} and M from the averaged
        losses; the divergence flag (no sync); Adam on D and G; k_t clipped to the floor, the
        adapted gamma (``--k-target``: k_{t+1} then comes from it, not from the kernels'
        constant gamma) and the step counter, written in place into the state."""
        cfg, st = self.cfg, self.state
        names = list(fb.losses)
        lv = torch.stack([v.detach().float() for v in fb.losses.values()])
        k_next, m = fb.k_next, fb.m
        if self.sync is not None:
            lv = self.sync(lv)
            k_next = None
        k = st.k
        if cfg.k_target:  # --k-target: the update with the adapted gamma, a device tensor (not the kernels' constant)
            k_next, m = ops.reference.began_update_ref(k, lv[0], lv[1], st.gamma, cfg.lambda_k)
        elif k_next is None:
            k_next, m = ops.began_update(k, lv[0], lv[1], cfg.gamma, cfg.lambda_k)
        # the divergence flag, no sync: every loss, a remedy term's too (an infinite term
        # leaves L_real and L_fake finite this step and G's weights NaN after Adam)
        st.nonfinite.logical_or_(~torch.isfinite(lv.sum()))
        for opt in self.opts:
            opt.step()
        if self.inputs.g_ema is not None:
            self.inputs.g_ema.update(st.step_t)  # EMA of G's weights (device ops)
        loss_d = lv[0] - k * lv[1]
        k_new = remedies.k_floor(k_next, remedies.k_min_at(cfg, st.step_t))
        adapted = {}
        if cfg.k_target:
            adapted["gamma"] = remedies.adapt_gamma(st.gamma, k_new, lv[0], lv[1], cfg.k_target, cfg.lambda_gamma)
            st.gamma.copy_(adapted["gamma"])
        k.copy_(k_new)
        st.step_t.add_(1)
        return {"loss_real": lv[0], "loss_fake": lv[1], "loss_d": loss_d, "k": k_new, "M": m, **adapted,
                **{f"loss_{n}": lv[i] for i, n in enumerate(names) if i >= 2}}

    def _carry(self) -> float | Tensor:
        """The vanishing-residual carry for this step: 1 -> 0 over ``vanishing_residual`` steps."""
        return max(0.0, 1.0 - self.state.step / self.cfg.vanishing_residual)


# ----------------------------------------------------------------------------------------
# the reference step
# ----------------------------------------------------------------------------------------
class ReferenceStep(Step):
    """The reference two-backward step (docs/design.md §4.1): any device and backend, and the
    paper's two draws with ``separate_z``. ``compute_grads`` is the definition the fused
    step and the kernels are tested against."""

    kind = "reference"

    def real_batch(self) -> Tensor:
        """This rank's rows of a global draw of real images: (B/W, 3, H, W) in [-1, 1]."""
        return self._images(*self.draw_images())

    def _images(self, idx: Tensor, flip: Tensor | None) -> Tensor:
        return to_unit_range(self.data[idx], flip).contiguous(memory_format=torch.channels_last)

    def forward_backward(self, idx, flip, z, shift=None):
        z_g = self.sample_z() if self.cfg.separate_z else None
        x = self._images(idx, flip)
        loss_real, loss_fake = self.compute_grads(x, z, z_g, shift)
        return ForwardBackward({"real": loss_real, "fake": loss_fake, **self.terms}, x, self._fake)

    def compute_grads(self, x: Tensor, z_d: Tensor, z_g: Tensor | None = None,
                      shift: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Losses for one step, with D's and G's gradients written to ``.grad``; x (N, 3, H, W),
        z_d and z_g (N, z_dim). Same-z step when ``z_g`` is None. With ``shift`` (N, 4) D
        sees shifted reals and fakes (:func:`fastbegan.augment.d_view`: its losses and the
        code terms read those; the pixel terms read G(z) as it is). Returns (L_real,
        L_fake_for_k) as 0-d fp32 tensors; the remedies' values go to ``terms``."""
        G, D, k = self.inputs.G, self.inputs.D, self.state.k
        self.terms = {}
        g_params, d_params = list(G.parameters()), list(D.parameters())
        b = x.shape[0]
        with self.inputs.autocast():
            if z_g is None:
                fake = G(z_d)
                x_d, fake_d = augment.d_view(x, fake, shift)
                codes = D.encoder(torch.cat([x_d, fake_d]))
                rec = D.decoder(codes)
                loss_real = ops.l1_recon_loss(x_d, rec[:b])
                loss_fake = ops.l1_recon_loss(fake_d, rec[b:])
                loss_d = loss_real - k * loss_fake + self._cs_term(codes[b:], z_d)
                loss_g = (loss_fake + self._pt_term(codes[b:]) + self._ms_term(fake, z_d)
                          + self._fm_term(codes[b:], codes[:b], fake, x) + self._sw_term(fake))
                grads_d = torch.autograd.grad(loss_d, d_params, retain_graph=True)
                grads_g = torch.autograd.grad(loss_g, g_params)
            else:
                with torch.no_grad():
                    x_d, fake_d = augment.d_view(x, G(z_d), shift)
                codes = D.encoder(torch.cat([x_d, fake_d]))
                rec = D.decoder(codes)
                loss_real = ops.l1_recon_loss(x_d, rec[:b])
                loss_d = (loss_real - k * ops.l1_recon_loss(fake_d, rec[b:])
                          + self._cs_term(codes[b:], z_d))
                grads_d = torch.autograd.grad(loss_d, d_params)
                fake = G(z_g)
                fake_g = fake if shift is None else augment.translate(fake, shift[:, 2:])
                codes_g = D.encoder(fake_g)
                loss_fake = ops.l1_recon_loss(fake_g, D.decoder(codes_g))
                loss_g = (loss_fake + self._pt_term(codes_g) + self._ms_term(fake, z_g)
                          + self._fm_term(codes_g, codes[:b], fake, x) + self._sw_term(fake))
                grads_g = torch.autograd.grad(loss_g, g_params)
        self._fake = fake.detach()
        for p, g in zip(d_params, grads_d):
            p.grad = g
        for p, g in zip(g_params, grads_g):
            p.grad = g
        return loss_real.float(), loss_fake.float()

    def _cs_term(self, codes: Tensor, z: Tensor):
        """BEGAN-CS's term of L_D (0 when off); autograd.grad takes it to D's parameters only."""
        if not self.cfg.cs_alpha:
            return 0.0
        self.terms["cs"] = value = remedies.constrained_space_loss(codes, z)
        return self.cfg.cs_alpha * value

    def _pt_term(self, codes: Tensor):
        """The pulling-away term of L_G (0 when off); autograd.grad takes it to G's only."""
        cfg = self.cfg
        if not cfg.pt_weight:
            return 0.0
        self.terms["pt"] = value = remedies.pulling_away(codes, cfg.pt_centred)
        scale = remedies.pt_scale_at(cfg, self.state.step_t)
        return cfg.pt_weight * value if scale is None else cfg.pt_weight * scale * value

    def _fm_term(self, codes_fake: Tensor, codes_real: Tensor, fake: Tensor, x: Tensor):
        """Feature matching in L_G (0 when off): the fakes' codes against the reals' (a
        detached target), or with ``fm_pixels`` the images (against the real batch's pixel
        moments, or with ``fm_data`` the training set's); autograd.grad takes it to G's
        parameters only."""
        if not self.cfg.fm_weight:
            return 0.0
        if self.cfg.fm_pixels:
            value = remedies.pixel_feature_matching(fake, x, self.fm_target)
        else:
            value = remedies.feature_matching(codes_fake, codes_real.detach())
        self.terms["fm"] = value
        return self.cfg.fm_weight * value

    def _ms_term(self, fake: Tensor, z: Tensor):
        """MSGAN's mode-seeking term of L_G (0 when off): a function of G(z) and z only."""
        if not self.cfg.ms_weight:
            return 0.0
        self.terms["ms"] = value = remedies.mode_seeking(fake, z)
        return self.cfg.ms_weight * value

    def _sw_term(self, fake: Tensor):
        """The sliced Wasserstein term of L_G (0 when off): G(z) against the training set's
        thumbnail quantiles (a fixed target)."""
        if not self.cfg.sw_weight:
            return 0.0
        self.terms["sw"] = value = remedies.sliced_wasserstein(fake, self.sw_target)
        return self.cfg.sw_weight * value


# ----------------------------------------------------------------------------------------
# the fused step
# ----------------------------------------------------------------------------------------
class FusedStep(Step):
    """The single-pass global step (docs/design.md §4.2).

    ``FusedStep(inputs)()`` does what :class:`ReferenceStep` does (same batches, losses,
    gradients, Adam updates and k_t up to float rounding). In graph mode the returned
    scalars are static buffers that the next replay overwrites: read them before the next
    step, as ``Trainer.fit`` does.

    cuda_graph: capture the step into a CUDA graph after ``warmup`` eager steps (default:
    on CUDA; :class:`~fastbegan.cudagraph.GraphedStep`, ``graphed``); under torchrun the
    all-reduce is captured with it. compile: how the forward region (:func:`step_forward`:
    batch gather/conversion, G, D, losses; the random draws and Adam stay eager) is
    compiled, :class:`~fastbegan.autocompile.CompiledForward` (False, True, a mode, or
    ``"auto"``); ``forward.mode`` says what is in use, ``forward.why`` why. fused_adam:
    switch the Adam optimisers to the fused implementation (on CPU too, where it removes
    the ``.item()`` the for-each Adam does on its step counters).
    """

    kind = "fused"

    def __init__(self, inputs: StepInputs, *, cuda_graph: bool | None = None, warmup: int = 2,
                 compile: bool | str | None = "auto", fused_adam: bool = True):
        super().__init__(inputs)
        inputs, cfg = self.inputs, self.cfg
        if cfg.separate_z:
            raise ValueError("the fused step is the same-z step: it does not support separate_z")
        _check_scalable(inputs.D)
        dev = self.device
        if cuda_graph is None:
            cuda_graph = dev.type == "cuda"
        if cuda_graph and dev.type != "cuda":
            raise ValueError("cuda_graph=True needs a CUDA device")
        if fused_adam and (dev.type == "cuda" or _cpu_fused_adam()):
            for opt in self.opts:
                for group in opt.param_groups:
                    group["fused"], group["foreach"] = True, False
        def forward(bf16: bool):
            return step_forward(inputs.G, inputs.D, torch.ones(1, device=dev), gamma=cfg.gamma,
                                lambda_k=cfg.lambda_k, device_type=dev.type, bf16=bf16,
                                cs_alpha=cfg.cs_alpha, pt_weight=cfg.pt_weight, step_t=self.state.step_t,
                                pt_anneal=remedies.pt_anneal_window(cfg), pt_centred=cfg.pt_centred,
                                ms_weight=cfg.ms_weight, fm_weight=cfg.fm_weight, fm_pixels=cfg.fm_pixels,
                                fm_target=self.fm_target, sw_weight=cfg.sw_weight, sw_target=self.sw_target)
        bf16 = cfg.precision == "bf16"
        # the compile self-check's noise floor in bf16: the same eager step in fp32
        self.forward = CompiledForward(forward(bf16), inputs.model, cfg, device=dev,
                                       backend=inputs.backend, compile=compile, log=inputs.log,
                                       main=inputs.dist.is_main, reference=forward(False) if bf16 else None)
        self.graphed = (GraphedStep(self._device_step, dev, warmup=warmup, generators=(self.state.gen,),
                                    capture_context=self._capture_context) if cuda_graph else None)

    def describe(self) -> str:
        f = self.forward
        return super().describe() + (f"; torch.compile {f.mode} ({f.why}; the first step compiles)"
                                     if f.mode else f"; torch.compile {f.why}")

    @property
    def compiles_next(self) -> bool:
        return self.forward.pending

    @property
    def cuda_graph(self) -> bool:
        """The step runs from a CUDA graph (False after a capture failed twice)."""
        return self.graphed is not None and self.graphed.enabled

    def state_loaded(self) -> None:
        if self.graphed is not None:
            self.graphed.reset()  # the optimisers' state tensors are new ones: capture again

    def _run(self) -> dict[str, Tensor]:
        t0 = time.perf_counter()
        vals = self.graphed() if self.graphed is not None else self._device_step(capturing=False)
        self.forward.observe(time.perf_counter() - t0, self.steps_planned)  # --compile auto (CPU)
        return vals

    @contextlib.contextmanager
    def _capture_context(self):
        """Around the capture: no gradients (the graph allocates the .grad tensors itself),
        Adam capturable and reading the device rates ``state.lr_d_t`` (D) and ``state.lr_t``
        (G); after it, eager code (and
        checkpoints) see float rates and the capturable flag as it was (the fused kernels
        ignore it outside a capture)."""
        saved = []
        st = self.state
        # self.opts is (D's Adam, G's Adam): each reads its own device rate
        for opt, rate_t, rate in zip(self.opts, (st.lr_d_t, st.lr_t), ("lr_d", "lr")):
            opt.zero_grad(set_to_none=True)
            for group in opt.param_groups:
                saved.append((group, rate, group.get("capturable", False)))
                group["capturable"] = True
                group["lr"] = rate_t
        try:
            yield
        finally:
            for group, rate, capturable in saved:
                group["lr"], group["capturable"] = getattr(st, rate), capturable

    # ------------------------------------------------------------------ device side
    def forward_backward(self, idx, flip, z, shift=None):
        out = self.forward((self.data, idx, flip, z, self.state.k, shift))
        return ForwardBackward({"real": out.losses[0], "fake": out.losses[1], **out.terms}, out.x,
                               out.fake.detach(), out.k_next, out.M)

    def _carry(self) -> Tensor:
        return (1.0 - self.state.step_t.double() / self.cfg.vanishing_residual).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------------------
# the fused step's forward region
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


class StepOutputs(NamedTuple):
    """What :func:`step_forward` returns (a NamedTuple: dynamo returns it from a
    ``fullgraph=True`` graph as it is). ``x``: the real batch (B, 3, H, W), [-1, 1];
    ``fake``: G(z), same shape (bf16 under autocast); ``losses``: (2,) fp32, L_real and
    L_fake; ``k_next``, ``M``: 0-d fp32; ``objective``: the 0-d scalar the one
    backward starts from; ``terms``: the remedies' unweighted 0-d values by name (detached)."""
    x: Tensor
    fake: Tensor
    losses: Tensor
    k_next: Tensor
    M: Tensor
    objective: Tensor
    terms: dict[str, Tensor]


def step_forward(G: nn.Module, D: nn.Module, ones: Tensor, *, gamma: float, lambda_k: float,
                 device_type: str, bf16: bool, cs_alpha: float = 0.0, pt_weight: float = 0.0,
                 step_t: Tensor | None = None, pt_anneal: tuple = (0, 0), pt_centred: bool = False,
                 ms_weight: float = 0.0, fm_weight: float = 0.0, fm_pixels: bool = False,
                 fm_target: tuple[Tensor, Tensor] | None = None, sw_weight: float = 0.0,
                 sw_target: tuple[tuple[Tensor, Tensor, Tensor], ...] | None = None):
    """The forward region of the fused step, as one function of device tensors (what
    :class:`~fastbegan.autocompile.CompiledForward` hands to ``torch.compile(fullgraph=True,
    dynamic=False)``):

    ``forward(data, idx, flip, z, k, shift=None) -> StepOutputs(x, fake, losses, k_next, M, objective, terms)``:
    the uint8 gather ``data[idx]``, the flip and the [-1, 1] conversion, ``fake = G(z)``,
    D's view of both (shifted by ``shift`` (B, 4) when given: :func:`fastbegan.augment.d_view`),
    D's per-block weight-gradient scale ``[1; -k]`` (``ones`` is a (1,) ones buffer),
    :func:`d_losses` and the enabled collapse remedies (:func:`remedies.fused_step_terms`);
    ``objective`` is the scalar the one backward starts from, ``terms`` the remedies'
    unweighted values (for the log). G and D under bf16 autocast when ``bf16`` (without
    the cast cache, as in a CUDA graph capture). No random draws (the caller makes them
    with its generator) and no state changes. ``step_t`` (0-d int64 device step counter)
    drives an annealed pulling-away weight (``pt_anneal``: start, end[, final fraction]; end 0 = off);
    ``pt_centred``, ``ms_weight``, ``fm_weight``, ``fm_pixels``, ``fm_target``, ``sw_weight`` and
    ``sw_target`` (device tensors, constant for the run) as in :func:`remedies.fused_step_terms`.
    """
    def forward(data: Tensor, idx: Tensor, flip: Tensor | None, z: Tensor, k: Tensor, shift: Tensor | None = None):
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
            x_d, fake_d = augment.d_view(x, fake, shift)  # --augment-shift (the pixel terms read fake)
            losses, k_next, m = d_losses(D, x_d, fake_d, scale, k, gamma, lambda_k)
            # annealed pulling-away weight: a function of the device step counter step_t
            pt_scale = remedies.anneal_scale(step_t, *pt_anneal) if pt_anneal[1] else None
            terms = remedies.fused_step_terms(D, fake, z, cs_alpha=cs_alpha, pt_weight=pt_weight,
                                              pt_scale=pt_scale, pt_centred=pt_centred, ms_weight=ms_weight,
                                              fm_weight=fm_weight, fm_pixels=fm_pixels, x=x,
                                              fm_target=fm_target, sw_weight=sw_weight, sw_target=sw_target,
                                              d_view=(x_d, fake_d))
        objective = losses.sum()
        for value, weight in terms.values():
            objective = objective + weight * value
        values = {n: v.detach() for n, (v, _) in terms.items()}
        return StepOutputs(x, fake, losses, k_next, m, objective, values)
    return forward


def _cpu_fused_adam() -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return "cpu" in _get_fused_kernels_supported_devices()
    except Exception:
        return False
