"""The workloads: for each, ``prepare(variant, params, device, session) -> Prepared``, a
callable that runs one iteration, with its images, FLOPs and bytes (:data:`PREPARE`)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import flops as _flops
from .. import ops
from . import variants
from .schema import VARIANTS
from .session import BenchSession
from .timing import synchronize


@dataclass
class Prepared:
    fn: Callable[[], Any]
    images: int | None = None
    flops: int | None = None
    bytes: int | None = None
    what: str = ""
    cleanup: Callable[[], None] | None = None
    # called with True just before the timed rounds and with False after them; what the
    # second call returns is added to the row (the all-reduce's time under torchrun)
    timed: Callable[[bool], dict | None] | None = None


def _random_images(n: int, res: int, seed: int = 0):
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


def _prepare_train_step(variant: str, p: dict, device: torch.device, session: BenchSession) -> Prepared:
    """The whole training step of each variant on the same model, data and batch."""
    from ..step import FusedStep, make_step
    from ..train import TrainConfig, Trainer
    res, batch, n = p["res"], p["batch"], p["filters"]
    fl = _flops.train_step_flops(res, n, batch)
    fastbegan = variant in ("d", "e")
    gpu = device.type == "cuda"
    if fastbegan and gpu:
        variants.require_triton(device)
    precision = {"p": "fp32", "a": "fp32", "b": "bf16", "c": "bf16"}.get(variant, "bf16" if gpu else "auto")
    backend = variants.D_BACKEND if fastbegan and gpu else "torch"
    if fastbegan and not gpu:
        from ..hardware import tune_cpu_allocator
        tune_cpu_allocator()  # what `fastbegan train` does on a CPU (process-wide: bench/isolated.py)
    cfg = TrainConfig(res=res, filters=n, batch_size=batch, precision=precision, backend=backend,
                      device=str(device), steps=10 ** 9, log_every=10 ** 9, sample_every=10 ** 9,
                      ckpt_every=10 ** 9, reference_step=not fastbegan,
                      out=str(Path(os.environ.get("TMPDIR", "/tmp")) / "fastbegan-bench"))
    trainer = Trainer(cfg, _random_images(max(2 * batch, 64), res), log=lambda *_: None)
    if variant in ("p", "a"):
        variants.nchw_hooks(trainer.model)
    if variant == "p":
        return Prepared(variants.port_step(trainer), batch, fl, what=VARIANTS["p"])
    if variant == "c":
        trainer.G = variants.compile_module(trainer.G, device)
        trainer.D = variants.compile_module(trainer.D, device)
        trainer.stepper = make_step(trainer.step_inputs())  # a step holds the G and D it was given

        def fn():
            variants.mark_step(device)
            return trainer.train_step()
        return Prepared(fn, batch, fl, what=variants.compile_what(device))
    if fastbegan:
        step = FusedStep(trainer, compile="auto" if gpu else variant == "d")
        return Prepared(step, batch, fl, what=f"{backend} backend, fastbegan.step.FusedStep (single pass, "
                        f"fused Adam{', CUDA graph' if step.cuda_graph else ''}"
                        + (f", forward torch.compile'd ({step.forward.mode})" if step.forward.mode else "")
                        + f"), {cfg.precision}" + ("" if gpu else ", glibc allocator tuned"),
                        timed=_allreduce_time(step))
    return Prepared(trainer.train_step, batch, fl, what=VARIANTS[variant], timed=_allreduce_time(trainer.stepper))


def _allreduce_time(step):
    """Under torchrun: the ranks and the host time per step spent in the step's all-reduce
    (``GradSync``) during the timed rounds (on a CPU the all-reduce itself, waiting for the
    slowest rank included; on CUDA only its launch). None in one process."""
    sync = step.sync
    if sync is None:
        return None

    def timed(start: bool) -> dict | None:
        if start:
            sync.seconds, sync.calls = 0.0, 0
            return None
        # replays of a CUDA graph run no Python: the all-reduce's time is then in ms_median only
        return {"world": sync.world, "allreduce_ms": 1e3 * sync.seconds / sync.calls if sync.calls else None}
    return timed


def _model_for(p: dict, device: torch.device, variant: str):
    from ..model import BEGAN
    torch.manual_seed(0)
    model = BEGAN(p["res"], p["filters"]).to(device)
    if variant == "a":
        variants.nchw_hooks(model)
    return model


def _prepare_d_fwd_bwd(variant: str, p: dict, device: torch.device, session: BenchSession) -> Prepared:
    res, batch, n = p["res"], p["batch"], p["filters"]
    fl = _flops.forward_backward_flops(_flops.discriminator_forward_flops(res, n, batch))
    if variant == "d":
        variants.require_triton(device)
    model = _model_for(p, device, variant)
    D = variants.compile_module(model.D, device) if variant == "c" else model.D
    params = list(model.D.parameters())
    gen = torch.Generator(device).manual_seed(0)
    x = torch.rand(batch, 3, res, res, device=device, generator=gen) * 2 - 1
    if variant == "a":
        x = x.contiguous()
    else:
        x = x.contiguous(memory_format=torch.channels_last)
    if variant == "d":
        x = x.to(torch.bfloat16)
    amp = variant != "a"

    def fn():
        if variant == "c":
            variants.mark_step(device)
        with variants.autocast(device, amp):
            rec = D(x)
            loss = ops.l1_recon_loss(x, rec)
        return torch.autograd.grad(loss, params)

    what = {"a": VARIANTS["a"], "b": VARIANTS["b"], "c": variants.compile_what(device)}.get(variant, "")
    if variant == "d":
        return _graphed_or_eager(fn, device, batch, fl, "triton backend, bf16")
    return Prepared(fn, batch, fl, what=what)


def _prepare_g_fwd(variant: str, p: dict, device: torch.device, session: BenchSession) -> Prepared:
    res, batch, n = p["res"], p["batch"], p["filters"]
    fl = _flops.generator_forward_flops(res, n, batch)
    if variant == "d":
        variants.require_triton(device)
    model = _model_for(p, device, variant)
    G = variants.compile_module(model.G, device) if variant == "c" else model.G
    gen = torch.Generator(device).manual_seed(0)
    z = torch.rand(batch, model.z_dim, device=device, generator=gen) * 2 - 1
    amp = variant != "a"

    def fn():
        if variant == "c":
            variants.mark_step(device)
        with torch.no_grad(), variants.autocast(device, amp):
            return G(z)

    what = {"a": VARIANTS["a"], "b": VARIANTS["b"], "c": variants.compile_what(device)}.get(variant, "")
    if variant == "d":
        return _graphed_or_eager(fn, device, batch, fl, "triton backend, bf16")
    return Prepared(fn, batch, fl, what=what)


def _graphed_or_eager(fn, device, images, fl, base: str) -> Prepared:
    """(d): warm up (Triton autotuning) eagerly, then capture a CUDA graph if possible."""
    try:
        for _ in range(2):
            fn()
        synchronize(device)
        replay = variants.capture_cuda_graph(fn, device)
        return Prepared(replay, images, fl, what=f"{base} + CUDA graph (captured by the benchmark)")
    except Exception as e:  # noqa: BLE001 - report and fall back to eager
        synchronize(device)
        msg = f"{e.__class__.__name__}: {e}".splitlines()[0][:160]
        return Prepared(fn, images, fl, what=f"{base}, eager (CUDA graph capture failed: {msg})")


def _prepare_conv(variant: str, p: dict, device: torch.device, session: BenchSession,
                  upsample: bool) -> Prepared:
    import torch.nn.functional as F
    b, ci, co, hw = p["batch"], p["c_in"], p["c_out"], p["hw"]
    ho = hw * 2 if upsample else hw
    fl = _flops.conv3x3_flops(ci, co, ho, ho, b)
    if variant == "d":
        variants.require_triton(device)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(b, ci, hw, hw, device=device, generator=gen)
    w = torch.randn(co, ci, 3, 3, device=device, generator=gen) / math.sqrt(9 * ci)
    bias = torch.randn(co, device=device, generator=gen) * 0.1
    if variant == "a":
        pass  # fp32 NCHW
    else:
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        w = w.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        bias = bias.to(torch.bfloat16)

    def eager():
        with torch.no_grad():
            xi = F.interpolate(x, scale_factor=2, mode="nearest") if upsample else x
            return F.elu(F.conv2d(xi, w, bias, padding=1))

    pieces = ("upsample + " if upsample else "") + ("cuDNN " if device.type == "cuda" else "") \
        + "conv + separate ELU"
    if variant == "a":
        return Prepared(eager, b, fl, what=f"fp32 NCHW {pieces}")
    if variant == "b":
        return Prepared(eager, b, fl, what=f"bf16 channels_last {pieces}")
    if variant == "c":
        cfn = torch.compile(eager, dynamic=False, **variants.compile_kwargs(device))

        def fn():
            variants.mark_step(device)
            return cfn()
        return Prepared(fn, b, fl, what=f"{variants.compile_what(device).replace(' of (b)', '')} of bf16 {pieces}")

    def fused():
        with torch.no_grad():
            return ops.conv3x3_elu(x, w, bias, upsample=upsample)
    return Prepared(fused, b, fl, what="fastbegan.ops.conv3x3_elu, triton backend, bf16 (fused"
                    + (" upsample" if upsample else "") + " conv+bias+ELU)")


def _prepare_l1(variant: str, p: dict, device: torch.device, session: BenchSession) -> Prepared:
    b, res = p["batch"], p["res"]
    if variant == "d":
        variants.require_triton(device)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.rand(b, 3, res, res, device=device, generator=gen) * 2 - 1
    r = torch.rand(b, 3, res, res, device=device, generator=gen) * 2 - 1
    if variant != "a":
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        r = r.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    nbytes = 2 * x.numel() * x.element_size()

    def ref():
        with torch.no_grad():
            return (x.float() - r.float()).abs().mean()
    if variant in ("a", "b"):
        return Prepared(ref, b, None, nbytes, what=f"{'fp32' if variant == 'a' else 'bf16'} "
                        "(x.float() - r.float()).abs().mean()")
    if variant == "c":
        cfn = torch.compile(ref, dynamic=False, **variants.compile_kwargs(device))

        def fn():
            variants.mark_step(device)
            return cfn()
        return Prepared(fn, b, None, nbytes, what=f"{variants.compile_what(device).replace(' of (b)', '')} of bf16 L1")

    def fused():
        with torch.no_grad():
            return ops.l1_recon_loss(x, r)
    return Prepared(fused, b, None, nbytes, what="fastbegan.ops.l1_recon_loss, triton backend, bf16")


def _prepare_matmul(variant: str, p: dict, device: torch.device, session: BenchSession) -> Prepared:
    n = p["n"]
    gen = torch.Generator(device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
    b = torch.randn(n, n, device=device, generator=gen).to(torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)

    def fn():
        return torch.matmul(a, b, out=out)
    return Prepared(fn, None, 2 * n ** 3, what="torch.matmul bf16 (cuBLAS)" if device.type == "cuda"
                    else "torch.matmul bf16")


PREPARE = {
    "train_step": _prepare_train_step,
    "D_fwd_bwd": _prepare_d_fwd_bwd,
    "G_fwd": _prepare_g_fwd,
    "conv_elu": lambda v, p, d, s: _prepare_conv(v, p, d, s, upsample=False),
    "up_conv_elu": lambda v, p, d, s: _prepare_conv(v, p, d, s, upsample=True),
    "l1_loss": _prepare_l1,
    "matmul_peak": _prepare_matmul,
}
