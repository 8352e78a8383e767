"""The two BEGAN training steps, side by side, behind one interface (docs/design.md §4).

:class:`ReferenceStep` is the definition of correctness: G(z), D over ``[x; G(z)]``, two
``autograd.grad`` calls (L_D's gradients to D, L_G's to G), any device and backend, and the
paper's two draws with ``separate_z`` (§4.1). :class:`FusedStep` is the fast one: G once, D
once over ``[x_real; G(z)]`` with its last conv fused with both L1 losses and the BEGAN
update, ONE backward in which D's weight gradients weight the fake half by -k_t per sample
(exact, §1), fused Adam, k_t and the step counter updated in place on the device, the
forward region torch.compile'd (:class:`fastbegan.autocompile.CompiledForward`) and on CUDA
the whole step captured once into a CUDA graph (§4.2). :func:`make_step` picks one (§4.3).

Both are a :class:`Step`: ``step()`` runs one step on the trainer's state and returns the
logged scalars as 0-d device tensors, with no host synchronisation. They share its
skeleton (:meth:`Step._device_step`): the global random draws (all ranks draw the same;
each uses its rows), the step's own forward and backward, then :meth:`Step._update`:
under torchrun ONE all-reduce of G's and D's gradients and the losses
(:class:`fastbegan.distributed.GradSync`), the divergence flag, Adam, k_t. So the
distributed path is written once for both (§4.5).

Shapes: the data set is (N, H, W, 3) uint8 on the device; with W processes each step works
on B / W rows of the global batch B: x and G(z) are (B/W, 3, H, W) in channels_last memory;
z is (B/W, z_dim); the returned losses, k and M are 0-d device tensors.
"""
from __future__ import annotations

import time
import warnings
from typing import NamedTuple

import torch
import torch.nn as nn
from torch import Tensor

from . import distributed, ops, remedies
from .autocompile import CompiledForward
from .checkpoint import match_state_layout
from .images import to_unit_range
from .model import Conv3x3

__all__ = ["Step", "ReferenceStep", "FusedStep", "make_step", "fused_step_status", "step_forward",
           "StepOutputs", "d_losses"]


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
def fused_step_status(trainer) -> tuple[bool, str]:
    """(use it, why): should ``trainer`` take the fused step?

    Yes for the same-z step on every device, backend and number of processes: it was
    measured faster than the reference step at the same precision on the CPU (torch
    backend, fp32 and bf16, docs/design.md §4.4) and it is the GPU path. The reference step
    stays for ``--reference-step``, ``--separate-z`` and a D with layers the per-sample
    scale does not cover.
    """
    if trainer.cfg.reference_step:
        return False, "--reference-step"
    if trainer.cfg.separate_z:
        return False, "--separate-z needs two G passes (the fused step is the same-z step)"
    try:
        _check_scalable(trainer.D)
    except NotImplementedError as e:
        return False, str(e)
    return True, f"single-pass step, {trainer.backend} backend on {trainer.device.type}"


def make_step(trainer) -> "Step":
    """The step ``trainer`` runs: :class:`FusedStep` where :func:`fused_step_status` allows
    it (torch.compile per ``cfg.compile_step``), else :class:`ReferenceStep`."""
    use_fused, why = fused_step_status(trainer)
    if use_fused:
        compile_arg = {"auto": "auto", "on": True, "off": False}[trainer.cfg.compile_step]
        step = FusedStep(trainer, compile=compile_arg)
    else:
        step = ReferenceStep(trainer)
    step.why = why
    return step


# ----------------------------------------------------------------------------------------
# the interface and the shared skeleton
# ----------------------------------------------------------------------------------------
class Step:
    """One BEGAN training step of a :class:`fastbegan.train.Trainer` (the interface the
    loop and the distributed code call).

    ``step()`` runs one step: global draws from the trainer's generator, this process's rows
    of them, the step's forward and backward (:meth:`forward_backward`, per subclass), then
    :meth:`_update` (all-reduce under torchrun, divergence flag, Adam, k_t); it advances the
    trainer's step counter and lr schedule and returns ``{loss_real, loss_fake, loss_d, k,
    M, loss_<term> for each enabled remedy}`` as 0-d device tensors (global means). The
    trainer's ``last_batch`` gets this process's real and fake rows (for the health monitor).

    ``kind`` ("fused" / "reference"), ``why`` (set by :func:`make_step`), ``describe()``
    (the start-up line), ``compiles_next`` (the next call compiles: the loop says so) and
    ``steps_planned`` (set by the loop: steps this run will still take) are what the loop
    reads. ``sync``: the :class:`~fastbegan.distributed.GradSync` of a torchrun run, else None.
    """

    kind = "?"

    def __init__(self, trainer):
        self.tr = trainer
        self.device = trainer.device
        self.opts = (trainer.opt_d, trainer.opt_g)
        self.shard = trainer.dist.shard(trainer.cfg.batch_size)  # this rank's rows of each draw
        self.sync = distributed.GradSync(trainer.model.parameters()) if trainer.dist.enabled else None
        self.why = ""
        self.steps_planned: int | None = None
        self._batch: dict[str, Tensor] = {}

    @property
    def compiles_next(self) -> bool:
        return False

    def describe(self) -> str:
        """The start-up line: which step runs and why."""
        world = self.tr.dist.world
        return f"{self.kind} training step ({self.why}" + (
            f"; {world} processes, one all-reduce of the gradients and losses per step)" if self.sync else ")")

    def __call__(self) -> dict[str, Tensor]:
        vals = self._run()
        tr = self.tr
        tr.step += 1
        tr._schedule_lr()
        tr.last_batch = dict(self._batch)
        return vals

    def _run(self) -> dict[str, Tensor]:
        return self._device_step(zero_grad=True)

    # ------------------------------------------------------------------ device side
    def sample_z(self, n: int | None = None) -> Tensor:
        """This rank's rows of a global draw of ``n`` (default: the batch) z ~ U(-1, 1)^z_dim."""
        tr = self.tr
        n = n or tr.cfg.batch_size
        return torch.rand(n, tr.cfg.z_dim, device=self.device, generator=tr.gen).mul_(2).sub_(1)[self.shard]

    def draw(self) -> tuple[Tensor, Tensor | None, Tensor]:
        """(idx, flip, z): this rank's rows of the global indices, flips and z, drawn in this
        order from the trainer's generator (eager: dynamo does not trace explicit generators)."""
        idx, flip = self.draw_images()
        return idx, flip, self.sample_z()

    def draw_images(self) -> tuple[Tensor, Tensor | None]:
        """(idx, flip): this rank's rows of the global draw of image indices and flips."""
        tr, cfg = self.tr, self.tr.cfg
        b = cfg.batch_size
        idx = torch.randint(len(tr.data), (b,), device=self.device, generator=tr.gen)[self.shard]
        flip = (torch.rand(b, device=self.device, generator=tr.gen) < 0.5)[self.shard] if cfg.flip else None
        return idx, flip

    def _device_step(self, zero_grad: bool) -> dict[str, Tensor]:
        """The whole step as device work only (what a CUDA graph captures)."""
        cfg = self.tr.cfg
        if cfg.vanishing_residual:
            self.tr.model.set_carry(self._carry())
        idx, flip, z = self.draw()
        if zero_grad:
            for opt in self.opts:
                opt.zero_grad(set_to_none=True)
        losses, k_next, m = self.forward_backward(idx, flip, z)
        return self._update(losses, k_next, m)

    def forward_backward(self, idx: Tensor, flip: Tensor | None, z: Tensor
                         ) -> tuple[dict[str, Tensor], Tensor | None, Tensor | None]:
        """This rank's forward and backward: ``.grad`` of G and D written, and ``(losses,
        k_next, M)``: the 0-d losses ``{"real", "fake", <remedy term>...}`` of these rows,
        and k_{t+1} and M from them (None: :meth:`_update` computes them). Sets ``_batch``."""
        raise NotImplementedError

    def _update(self, losses: dict[str, Tensor], k_next: Tensor | None, m: Tensor | None
                ) -> dict[str, Tensor]:
        """Shared by both steps: under torchrun one all-reduce of G's and D's gradients and
        the losses (averaged: the global batch's), then k_{t+1} and M from the averaged
        losses; the divergence flag (no sync); Adam on D and G; k_t clipped to the floor."""
        tr, cfg = self.tr, self.tr.cfg
        names = list(losses)
        lv = torch.stack([v.detach().float() for v in losses.values()])
        if self.sync is not None:
            lv = self.sync(lv)
            k_next = None
        k = tr.k
        if k_next is None:
            k_next, m = ops.began_update(k, lv[0], lv[1], cfg.gamma, cfg.lambda_k)
        tr.nonfinite.logical_or_(~torch.isfinite(lv[0] + lv[1]))  # divergence flag, no sync
        for opt in self.opts:
            opt.step()
        step_t = self._step_tensor()
        if getattr(tr, "g_ema", None) is not None:
            tr.g_ema.update(step_t)  # EMA of G's weights (device ops)
        loss_d = lv[0] - k * lv[1]
        k_new = self._store_k(remedies.k_floor(k_next, remedies.k_min_at(cfg, step_t)))
        return {"loss_real": lv[0], "loss_fake": lv[1], "loss_d": loss_d, "k": k_new, "M": m,
                **{f"loss_{n}": lv[i] for i, n in enumerate(names) if i >= 2}}

    def _carry(self) -> float | Tensor:
        """The vanishing-residual carry for this step: 1 -> 0 over ``vanishing_residual`` steps."""
        return max(0.0, 1.0 - self.tr.step / self.tr.cfg.vanishing_residual)

    def _step_tensor(self) -> Tensor:
        """The step counter (before this step) as a 0-d int64 device tensor."""
        return torch.full((), self.tr.step, device=self.device, dtype=torch.int64)

    def _store_k(self, k_new: Tensor) -> Tensor:
        self.tr.k = k_new
        return k_new


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
        return to_unit_range(self.tr.data[idx], flip).contiguous(memory_format=torch.channels_last)

    def forward_backward(self, idx, flip, z):
        z_g = self.sample_z() if self.tr.cfg.separate_z else None
        loss_real, loss_fake = self.compute_grads(self._images(idx, flip), z, z_g)
        return {"real": loss_real, "fake": loss_fake, **self.terms}, None, None

    def compute_grads(self, x: Tensor, z_d: Tensor, z_g: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Losses for one step, with D's and G's gradients written to ``.grad``; x (N, 3, H, W),
        z_d and z_g (N, z_dim). Same-z step when ``z_g`` is None. Returns (L_real,
        L_fake_for_k) as 0-d fp32 tensors; the remedies' values go to ``terms``."""
        tr = self.tr
        self.terms = {}
        g_params, d_params = list(tr.G.parameters()), list(tr.D.parameters())
        b = x.shape[0]
        with tr.autocast():
            if z_g is None:
                fake = tr.G(z_d)
                codes = tr.D.encoder(torch.cat([x, fake]))
                rec = tr.D.decoder(codes)
                loss_real = ops.l1_recon_loss(x, rec[:b])
                loss_fake = ops.l1_recon_loss(fake, rec[b:])
                loss_d = loss_real - tr.k * loss_fake + self._cs_term(codes[b:], z_d)
                loss_g = loss_fake + self._pt_term(codes[b:])
                grads_d = torch.autograd.grad(loss_d, d_params, retain_graph=True)
                grads_g = torch.autograd.grad(loss_g, g_params)
            else:
                with torch.no_grad():
                    fake_d = tr.G(z_d)
                codes = tr.D.encoder(torch.cat([x, fake_d]))
                rec = tr.D.decoder(codes)
                loss_real = ops.l1_recon_loss(x, rec[:b])
                loss_d = (loss_real - tr.k * ops.l1_recon_loss(fake_d, rec[b:])
                          + self._cs_term(codes[b:], z_d))
                grads_d = torch.autograd.grad(loss_d, d_params)
                fake = tr.G(z_g)
                codes_g = tr.D.encoder(fake)
                loss_fake = ops.l1_recon_loss(fake, tr.D.decoder(codes_g))
                loss_g = loss_fake + self._pt_term(codes_g)
                grads_g = torch.autograd.grad(loss_g, g_params)
        self._batch = {"x": x, "fake": fake.detach()}
        for p, g in zip(d_params, grads_d):
            p.grad = g
        for p, g in zip(g_params, grads_g):
            p.grad = g
        return loss_real.float(), loss_fake.float()

    def _cs_term(self, codes: Tensor, z: Tensor):
        """BEGAN-CS's term of L_D (0 when off); autograd.grad takes it to D's parameters only."""
        if not self.tr.cfg.cs_alpha:
            return 0.0
        self.terms["cs"] = value = remedies.constrained_space_loss(codes, z)
        return self.tr.cfg.cs_alpha * value

    def _pt_term(self, codes: Tensor):
        """The pulling-away term of L_G (0 when off); autograd.grad takes it to G's only."""
        cfg = self.tr.cfg
        if not cfg.pt_weight:
            return 0.0
        self.terms["pt"] = value = remedies.pulling_away(codes)
        scale = remedies.pt_scale_at(cfg, self._step_tensor())
        return cfg.pt_weight * value if scale is None else cfg.pt_weight * scale * value


# ----------------------------------------------------------------------------------------
# the fused step
# ----------------------------------------------------------------------------------------
class FusedStep(Step):
    """The single-pass global step (docs/design.md §4.2).

    ``FusedStep(trainer)()`` does what :class:`ReferenceStep` does (same batches, losses,
    gradients, Adam updates and k_t up to float rounding). In graph mode the returned
    scalars are static buffers that the next replay overwrites: read them before the next
    step, as ``Trainer.fit`` does.

    cuda_graph: capture the step into a CUDA graph after ``warmup`` eager steps (default:
    on CUDA); under torchrun the all-reduce is captured with it. compile: how the forward
    region (:func:`step_forward`: batch gather/conversion, G, D, losses; the random draws and
    Adam stay eager) is compiled, :class:`~fastbegan.autocompile.CompiledForward` (False,
    True, a mode, or ``"auto"``); ``forward.mode`` says what is in use, ``forward.why``
    why. fused_adam: switch the trainer's Adam optimisers to the fused implementation (on
    CPU too, where it removes the ``.item()`` the for-each Adam does on its step counters).
    """

    kind = "fused"

    def __init__(self, trainer, *, cuda_graph: bool | None = None, warmup: int = 2,
                 compile: bool | str | None = "auto", fused_adam: bool = True):
        cfg = trainer.cfg
        if cfg.separate_z:
            raise ValueError("the fused step is the same-z step: it does not support separate_z")
        _check_scalable(trainer.D)
        super().__init__(trainer)
        dev = self.device
        if cuda_graph is None:
            cuda_graph = dev.type == "cuda"
        if cuda_graph and dev.type != "cuda":
            raise ValueError("cuda_graph=True needs a CUDA device")
        self.cuda_graph, self.warmup = cuda_graph, max(1, int(warmup))
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
        def forward(bf16: bool):
            return step_forward(trainer.G, trainer.D, torch.ones(1, device=dev), gamma=cfg.gamma,
                                lambda_k=cfg.lambda_k, device_type=dev.type, bf16=bf16,
                                cs_alpha=cfg.cs_alpha, pt_weight=cfg.pt_weight, step_t=self.step_t,
                                pt_anneal=remedies.pt_anneal_window(cfg))
        bf16 = cfg.precision == "bf16"
        # the compile self-check's noise floor in bf16: the same eager step in fp32
        self.forward = CompiledForward(forward(bf16), trainer.model, cfg, device=dev,
                                       backend=trainer.backend, compile=compile, log=trainer.log,
                                       main=trainer.dist.is_main, reference=forward(False) if bf16 else None)
        self._graph = None
        self._static: dict[str, Tensor] | None = None
        self._state_keys = self._keys()
        self._warm = 0
        self._side = torch.cuda.Stream(dev) if cuda_graph else None

    def describe(self) -> str:
        f = self.forward
        return super().describe() + (f"; torch.compile {f.mode} ({f.why}; the first step compiles)"
                                     if f.mode else f"; torch.compile {f.why}")

    @property
    def compiles_next(self) -> bool:
        return self.forward.pending

    # ------------------------------------------------------------------ host side
    def __call__(self) -> dict[str, Tensor]:
        vals = super().__call__()
        self._host_step = self.tr.step
        return vals

    def _run(self) -> dict[str, Tensor]:
        self._sync_host_state()
        t0 = time.perf_counter()
        vals = self._graph_step() if self.cuda_graph else self._device_step(zero_grad=True)
        self.forward.observe(time.perf_counter() - t0, self.steps_planned)  # --compile auto (CPU)
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
    def forward_backward(self, idx, flip, z):
        out = self.forward((self.tr.data, idx, flip, z, self.k))
        self._batch = {"x": out.x, "fake": out.fake.detach()}
        return {"real": out.losses[0], "fake": out.losses[1], **out.terms}, out.k_next, out.M

    def _carry(self) -> Tensor:
        return (1.0 - self.step_t.double() / self.tr.cfg.vanishing_residual).clamp(0.0, 1.0)

    def _step_tensor(self) -> Tensor:
        return self.step_t

    def _store_k(self, k_new: Tensor) -> Tensor:
        self.k.copy_(k_new)
        self.step_t.add_(1)
        return self.k

    # ------------------------------------------------------------------ CUDA graph
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
                          stacklevel=5)
            return self._graph_step()
        self.cuda_graph = False
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        vals = self._device_step(zero_grad=True)
        torch.cuda.synchronize(self.device)
        warnings.warn(f"fastbegan: CUDA graph capture of the training step failed twice ({why}); "
                      f"continuing with eager steps at {1 / (time.perf_counter() - t0):.1f} "
                      "steps/s", stacklevel=5)
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
            # thread_local: a background thread (checkpoint writer, NCCL's watchdog, ours)
            # cannot break the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                static = self._device_step(zero_grad=False)
        finally:
            # The graph reads lr_t; eager code (and checkpoints) keep seeing float rates and
            # the capturable flag as it was (the fused kernels ignore it outside a capture).
            for group, capturable in saved:
                group["lr"], group["capturable"] = self._host_lr, capturable
        self._graph, self._static = graph, static


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
                 step_t: Tensor | None = None, pt_anneal: tuple = (0, 0)):
    """The forward region of the fused step, as one function of device tensors (what
    :class:`~fastbegan.autocompile.CompiledForward` hands to ``torch.compile(fullgraph=True,
    dynamic=False)``):

    ``forward(data, idx, flip, z, k) -> StepOutputs(x, fake, losses, k_next, M, objective, terms)``:
    the uint8 gather ``data[idx]``, the flip and the [-1, 1] conversion, ``fake = G(z)``,
    D's per-block weight-gradient scale ``[1; -k]`` (``ones`` is a (1,) ones buffer),
    :func:`d_losses` and the enabled collapse remedies (:func:`remedies.fused_step_terms`);
    ``objective`` is the scalar the one backward starts from, ``terms`` the remedies'
    unweighted values (for the log). G and D under bf16 autocast when ``bf16`` (without
    the cast cache, as in a CUDA graph capture). No random draws (the caller makes them
    with its generator) and no state changes. ``step_t`` (0-d int64 device step counter)
    drives an annealed pulling-away weight (``pt_anneal``: start, end[, final fraction]; end 0 = off).
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
        values = {n: v.detach() for n, (v, _) in terms.items()}
        return StepOutputs(x, fake, losses, k_next, m, objective, values)
    return forward


def _cpu_fused_adam() -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return "cpu" in _get_fused_kernels_supported_devices()
    except Exception:
        return False
