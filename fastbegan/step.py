"""The fused single-pass BEGAN training step (DESIGN 1 "same-z global step", 3.2, 3.3, 4).

One step, all on the device, no host synchronisation::

    idx, flip ~ gen;  x = uint8 data[idx] (flipped) -> [-1, 1]     (device gather)
    z ~ U(-1, 1);     fake = G(z)                                   (G forward, once)
    s = [1]*B + [-k_t]*B                                            (device tensor)
    h = D.features(x, s, x2=fake)                                   (D forward over 2B, once,
    L_real, L_fake, k_next, M, rec = conv3x3_l1_pair_began(h, ...)   its last conv fused with
                                                                    both L1 losses + BEGAN update)
    (L_real + L_fake).backward()                                    (ONE backward; the L1
                                                                    gradient is formed inside
                                                                    the last conv's kernels)
    Adam(D); Adam(G)                                                (fused, capturable)
    k_t <- k_next;  step_t += 1                                     (in place, on the device)

Why one backward is exact. D has no cross-sample operation (no batch norm), so sample
n's activation gradients inside D come from its own loss term only: L_real for the real
half, L_fake for the fake half. D's weight (and bias) gradients are per-sample sums
weighted by ``s``: ``dL_real/dtheta_D - k_t * dL_fake/dtheta_D = dL_D/dtheta_D``. The
activation gradients are *not* scaled, so the gradient reaching ``fake`` (through D's
input and as the target of the L1) is the full ``dL_fake/dfake``, and G (whose layers
get no scale) receives exactly ``dL_G/dtheta_G`` with ``L_G = L_fake``. L_real does not
depend on ``fake``. The tests check every gradient against ``Trainer.compute_grads``.

Every parametrised layer of D takes ``wgrad_scale``: the convolutions
(``ops.conv3x3_elu``) and the two fc layers (``ops.linear``); without it the fc weight
gradients would be those of ``L_real + L_fake``. :class:`FusedStep` refuses a D with any
other parametrised layer.

Data: the trainer's data set is one uint8 (N, H, W, 3) tensor on the device; indices,
flips (done on the uint8 batch) and z come from the trainer's device generator in the
same order as ``Trainer.train_step``, so both paths see the same batches. The uint8 ->
[-1, 1] conversion is compiled with the rest of the forward (inductor fuses the gather,
flip and conversion into one kernel); D's first conv reads the real batch and G(z) as
two halves (:func:`ops.conv3x3_elu_pair`: no concatenated copy, and no input gradient
computed for the real half, which only G's half needs). The conversion is *not* folded
into the first conv's load, a decision, not a gap: the converted real batch has four
readers, D's first conv (forward and weight gradient) and the L1 loss (forward and the
last conv's backward), so folding it into one of them saves nothing, and folding it into
all four gives each a uint8, gathered and flipped source, to save at res 128, batch 16
the write and re-read of a 0.8 MB bf16 and a 3.1 MB fp32 batch, where one
full-resolution activation of D is 32 x 128 x 128 x 128 bf16 = 134 MB.

torch.compile (``compile``; default on CUDA: mode ``"max-autotune-no-cudagraphs"``, off
on CPU, where inductor's C++ build costs more than it saves): what our kernels do not
cover is compiled, as one graph (``fullgraph=True, dynamic=False``). The compiled
function is :func:`step_forward`: ``(data, idx, flip, z, k) -> (x, fake, losses,
k_next, M)``, i.e. the uint8 gather, flip and [-1, 1] conversion, ``G(z)``, the scale
vector ``[1]*B + [-k_t]*B``, D and the loss/BEGAN op (:func:`d_losses`), under the
trainer's autocast. Our kernels stay opaque custom ops in that graph; inductor fuses
and schedules the glue between them (conversion, concatenations, skip/residual
arithmetic, the fc GEMMs' surroundings). The one backward then runs AOTAutograd's
compiled backward. Outside the compiled region, eager: the random draws (indices, flip
mask and z: ``torch.randint``/``torch.rand`` with the trainer's explicit
``torch.Generator``, which dynamo cannot put in a graph (fullgraph=True fails on it), and
inductor would replace eager's random streams by its own; drawn eagerly, the stream and
its order are the reference step's, so both paths see the same batches and z, and the
generator state stays what checkpoints save), the vanishing-residual ``set_carry``
(an in-place buffer update before the forward), ``zero_grad``, fused Adam, the
divergence flag and the in-place k_t / step updates. "no-cudagraphs": the step captures
its own CUDA graph around all of this (forward, backward, Adam), so inductor's cudagraph
trees must not be used inside it. Compilation happens in the first (warm-up) step; if it
raises (an op or a torch version dynamo cannot handle), the step warns once with the
reason and uses the eager forward for good (that step included: same draws, same step).

On CUDA the whole step is captured once into a CUDA graph and replayed (``cuda_graph``,
default on CUDA): ``warmup`` eager steps run on a side stream first (Triton autotuning,
Adam state creation), the next call captures and replays. Every call is one real
training step, so eager and graph runs follow the same trajectory. Static state: k_t,
the step counter and the learning rate are device tensors updated in place; the host
values of the trainer (``trainer.k``, ``trainer.step``, ``trainer.lr``) are mirrored into
them before each step only when they changed (after a checkpoint load or an lr
halving: a ``fill_``/``copy_`` launch, no sync). A checkpoint load that replaces the
optimisers' state makes the step give the loaded moments their parameters' memory layout
(:func:`match_state_layout`: fused Adam needs it) and drop its graph to capture a new one.

Divergence guard: ``~isfinite(L_real + L_fake)`` is OR-ed into ``trainer.nonfinite`` on
the device, as in the reference step.

Adam: the trainer's two optimisers, switched to the fused implementation (CUDA, and CPU
where torch has it) and, for the capture, ``capturable=True`` with the learning rate as
a device tensor. Logging: the step returns device scalars; the trainer reads them every
``log_every`` steps only. In graph mode the returned tensors are static buffers that the
next replay overwrites (read them before the next step, as ``Trainer.fit`` does).
"""
from __future__ import annotations

import time
import warnings

import torch
import torch.nn as nn
from torch import Tensor

from . import ops
from .checkpoint import match_state_layout
from .model import Conv3x3

__all__ = ["FusedStep", "fused_step_status", "step_forward", "d_losses", "match_state_layout",
           "DEFAULT_COMPILE_MODE"]

# torch.compile mode of the step's forward on CUDA: no CUDA graphs of inductor's own (the
# step captures its own graph around the whole step; cudagraph trees must not nest in it).
DEFAULT_COMPILE_MODE = "max-autotune-no-cudagraphs"


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

    Yes on a CUDA device with the triton backend and the same-z step; otherwise the
    reference step (the fused step also runs on the torch backend and on CPU, when asked
    for explicitly: ``FusedStep(trainer)``).
    """
    if trainer.cfg.separate_z:
        return False, "--separate-z needs two G passes (the fused step is the same-z step)"
    if getattr(getattr(trainer, "dist", None), "enabled", False):
        return False, "several processes (torchrun): the reference step all-reduces the gradients"
    if trainer.device.type != "cuda":
        return False, f"device is {trainer.device.type}, not a CUDA GPU"
    if trainer.backend != "triton":
        return False, f"backend is {trainer.backend}, not triton"
    try:
        _check_scalable(trainer.D)
    except NotImplementedError as e:
        return False, str(e)
    return True, "CUDA GPU with the triton backend: fused single-pass step"


class FusedStep:
    """The single-pass global step for a :class:`fastbegan.train.Trainer`.

    ``FusedStep(trainer)()`` does what ``trainer.train_step()`` does (same batches, same
    losses, gradients, Adam updates and k_t up to float rounding; step counter and lr
    schedule advanced) and returns the same dict of device scalars
    (loss_real, loss_fake, loss_d, k, M).

    cuda_graph: capture the step into a CUDA graph after ``warmup`` eager steps (default:
    on CUDA). compile: ``torch.compile`` the step's forward region (:func:`step_forward`:
    batch gather/conversion, G, D, losses; the random draws and Adam stay eager); False,
    True (inductor's default mode) or a mode string; None (default):
    :data:`DEFAULT_COMPILE_MODE` on CUDA, False on CPU. ``compile_mode`` says what is in
    use (None: eager, also after a failed compilation fell back). fused_adam: switch the
    trainer's Adam optimisers to the fused implementation (on CPU too, where it removes
    the ``.item()`` the for-each Adam does on its step counters).
    """

    def __init__(self, trainer, *, cuda_graph: bool | None = None, warmup: int = 2,
                 compile: bool | str | None = None, fused_adam: bool = True):
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
        if compile is None:
            compile = DEFAULT_COMPILE_MODE if dev.type == "cuda" else False
        self.compile_mode: str | None = None  # None: eager forward (also after a fallback)
        self._forward_eager = step_forward(trainer.G, trainer.D, self._ones, gamma=cfg.gamma,
                                           lambda_k=cfg.lambda_k, device_type=dev.type,
                                           bf16=cfg.precision == "bf16")
        self._forward = self._forward_eager
        self._compile_pending = False  # compiled, first call (compilation) not done yet
        if compile:
            self.compile_mode = compile if isinstance(compile, str) else "default"
            self._forward = _compiled(self._forward_eager,
                                      mode=compile if isinstance(compile, str) else None)
            self._compile_pending = True
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
        if self.cuda_graph:
            vals = self._graph_step()
        else:
            vals = self._device_step(zero_grad=True)
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

    def _forward_backward(self, args: tuple) -> tuple[Tensor, ...]:
        """:func:`step_forward` (compiled or eager) on ``args``, then the one backward
        (AOTAutograd's compiled backward when compiled). The first compiled call compiles
        both; if that raises, warn once and run this and every later step eagerly (the same
        step: the random draws are already made, and the forward changes no state)."""
        if self._compile_pending:
            try:
                out = self._forward(*args)
                out[2].sum().backward()
                self._compile_pending = False
                return out
            except ops.KernelFatalError:
                raise  # the GPU is unusable: not a compile problem, no eager retry
            except Exception as e:
                self._forward, self._compile_pending = self._forward_eager, False
                warnings.warn(f"fastbegan: torch.compile of the training step's forward (mode "
                              f"{self.compile_mode}) failed ({e.__class__.__name__}: "
                              f"{(str(e).strip().splitlines() or [''])[0][:200]}); "
                              "continuing with the eager forward", stacklevel=4)
                self.compile_mode = None
                for opt in self.opts:  # a failure inside the backward may have left grads
                    opt.zero_grad(set_to_none=True)
        out = self._forward(*args)
        out[2].sum().backward()
        return out

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
        x, fake, losses, k_next, m_global = self._forward_backward((tr.data, idx, flip, z, k))
        lv = losses.detach()
        tr.nonfinite.logical_or_(~torch.isfinite(lv[0] + lv[1]))  # divergence flag, no sync
        for opt in self.opts:
            opt.step()
        loss_d = lv[0] - k * lv[1]
        k.copy_(k_next)
        self.step_t.add_(1)
        self._static_batch = {"x": x, "fake": fake.detach()}
        return {"loss_real": lv[0], "loss_fake": lv[1], "loss_d": loss_d, "k": k, "M": m_global}

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
                 device_type: str, bf16: bool):
    """The forward region of the fused step, as one function of device tensors (what
    ``FusedStep(compile=...)`` hands to ``torch.compile(fullgraph=True, dynamic=False)``):

    ``forward(data, idx, flip, z, k) -> (x, fake, losses, k_next, M)``: the uint8 gather
    ``data[idx]``, the flip and the [-1, 1] conversion, ``fake = G(z)``, the scale vector
    ``[1]*B + [-k]*B`` (``ones`` is the (B,) ones buffer) and :func:`d_losses`; G and D
    under bf16 autocast when ``bf16`` (without the cast cache, as in a CUDA graph capture).
    No random draws (the caller makes them with its generator) and no state changes.
    """
    def forward(data: Tensor, idx: Tensor, flip: Tensor | None, z: Tensor, k: Tensor):
        x = _to_unit_range_flipped(data[idx], flip)
        scale = torch.cat([ones, k.neg().expand(ones.shape[0])])
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=False):
            fake = G(z)
            losses, k_next, m = d_losses(D, x, fake, scale, k, gamma, lambda_k)
        return x, fake, losses, k_next, m
    return forward


def _compiled(fn, mode: str | None):
    """``torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)``. One graph: the
    model's ops are custom ops (triton backend) or plain aten ops and autograd.Functions
    with written-out backwards (torch backend), none of which breaks the graph."""
    return torch.compile(fn, fullgraph=True, dynamic=False, mode=mode)


def _to_unit_range_flipped(batch_u8: Tensor, flip: Tensor | None) -> Tensor:
    """(B, H, W, 3) uint8, optional (B,) bool -> (B, 3, H, W) in [-1, 1], channels_last.

    The flip (of the width axis) is applied to the uint8 batch, which gives the same
    values as ``Trainer.real_batch`` (which flips after the conversion).
    """
    if flip is not None:
        batch_u8 = torch.where(flip.view(-1, 1, 1, 1), batch_u8.flip(2), batch_u8)
    return batch_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _cpu_fused_adam() -> bool:
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        return "cpu" in _get_fused_kernels_supported_devices()
    except Exception:
        return False
