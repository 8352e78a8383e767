"""Benchmarks: the case runner behind ``pytest benchmarks/`` and ``fastbegan bench``.

Side by side, same model and batch (DESIGN.md section 8):

    a  fp32 eager reference: PyTorch defaults, NCHW, torch backend
    b  bf16 autocast + channels_last eager, torch backend (cudnn.benchmark on)
    c  torch.compile of (b): mode "max-autotune" on GPU; on CPU the cheap backend
       "aot_eager" (inductor's C++ build of even a tiny model takes minutes on 2 cores)
    d  fastbegan: triton backend + fused step + CUDA graph, as far as they exist (GPU only)

Workloads: the full training step (``Trainer.train_step``: batch draw, G forward, D
forward over 2B, both backward passes, two Adam steps, k_t update), D forward+backward,
G forward, and per-kernel microbenchmarks (conv+ELU, upsample+conv+ELU, L1 loss), plus a
bf16 matmul that measures the device's achievable peak.

Each case gives one row: ms per iteration (median and quartiles over timed rounds, each
round ``inner`` back-to-back iterations followed by one synchronisation), images/s,
achieved TFLOP/s (FLOPs from :mod:`fastbegan.flops`: logical 3x3 conv FLOPs), peak
memory (CUDA only). Speedups and % of peak are computed when the report is written:
over (a), over the best of (b)/(c), against the spec peak of the device (table below)
and against the measured matmul peak.

Results are written as ``<device>-<date>.json`` and ``.md`` into benchmarks/results.
``fastbegan bench`` prints the newest table, ``fastbegan bench --run`` measures a few
training-step cases now.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import gc
import importlib
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click
import torch

from . import flops as _flops
from . import ops

SCHEMA = "fastbegan-bench/1"

VARIANTS = {
    "a": "fp32 eager (NCHW, torch backend, PyTorch defaults)",
    "b": "bf16 autocast + channels_last eager (torch backend, cudnn.benchmark)",
    "c": "torch.compile of (b)",
    "d": "fastbegan (triton backend + fused step + CUDA graph, as far as they exist)",
}

WORKLOADS = {
    "matmul_peak": "bf16 matmul (measured achievable peak)",
    "train_step": "full training step (Trainer.train_step)",
    "D_fwd_bwd": "D forward + backward (L1 loss, grads of D's parameters)",
    "G_fwd": "G forward (inference)",
    "conv_elu": "conv3x3 + ELU forward (d: fused; a-c: conv + separate ELU)",
    "up_conv_elu": "nearest upsample x2 + conv3x3 + ELU forward (d: fused)",
    "l1_loss": "L1 reconstruction loss mean|x - r| forward",
}

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s.
# First matching substring of torch.cuda.get_device_name() wins (order matters).
PEAK_BF16_TFLOPS: list[tuple[str, str, float]] = [
    ("GH200", "GH200", 989.4),
    ("H200 NVL", "H200 NVL", 835.0),
    ("H200", "H200 SXM", 989.4),
    ("H100 NVL", "H100 NVL", 835.0),
    ("H100 PCIe", "H100 PCIe", 756.0),
    ("H100", "H100 SXM", 989.4),
    ("H800", "H800 SXM", 989.4),
    ("B200", "B200", 2250.0),
    ("A100", "A100", 312.0),
    ("A800", "A800", 312.0),
    ("L40S", "L40S", 362.05),
    ("L40", "L40", 181.05),
    ("L4", "L4", 121.0),
    ("A10G", "A10G", 70.0),
    ("A10", "A10", 125.0),
    ("RTX 6000 Ada", "RTX 6000 Ada", 364.2),
    ("RTX A6000", "RTX A6000", 154.8),
    ("RTX 4090", "RTX 4090", 165.2),
]

ROW_KEYS = ("workload", "variant", "case", "status", "reason", "what", "params", "ms_median", "ms_q1",
            "ms_q3", "ms_iqr", "ms_min", "rounds", "inner", "first_call_s", "images", "images_per_s",
            "flops", "tflops", "bytes", "gbps", "peak_mem_mb")


D_BACKEND = "triton"  # the backend of variant (d); the CPU tests of the (d) plumbing use "torch"


class NotAvailable(Exception):
    """The variant does not exist for this case or device (row status 'n/a')."""


class Skipped(Exception):
    """Not run by policy (time or compile budget) (row status 'skipped')."""


# =========================================================================== device / env
def peak_bf16_tflops(device_name: str) -> tuple[float | None, str | None]:
    """(spec dense bf16 TFLOP/s, matched entry) for a CUDA device name, or (None, None)."""
    for key, label, tf in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tf, label
    return None, None


def slugify(name: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return s or "unknown"


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        spec, label = peak_bf16_tflops(name)
        return {"type": "cuda", "name": name, "slug": slugify(name.replace("NVIDIA", "")),
                "capability": f"{props.major}.{props.minor}", "sms": props.multi_processor_count,
                "memory_gb": round(props.total_memory / 2 ** 30, 1),
                "peak_bf16_tflops_spec": spec, "peak_spec_entry": label}
    return {"type": "cpu", "name": _cpu_name(), "slug": "cpu",
            "threads": torch.get_num_threads(), "peak_bf16_tflops_spec": None,
            "peak_spec_entry": None}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU: " + (platform.processor() or platform.machine() or "unknown")


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def git_commit() -> dict:
    root = repo_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": sha or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def env_info() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:  # noqa: BLE001 - any broken install
        triton_version = f"not importable ({e.__class__.__name__})"
    info = {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "cuda": torch.version.cuda, "cudnn": None, "platform": platform.platform(),
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
    info.update(git_commit())
    return info


def default_results_dir() -> Path:
    env = os.environ.get("FASTBEGAN_BENCH_RESULTS")
    if env:
        return Path(env)
    cwd = Path.cwd() / "benchmarks" / "results"
    if cwd.parent.is_dir():
        return cwd
    return repo_root() / "benchmarks" / "results"


# =========================================================================== timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def own_measure(fn: Callable[[], Any], device: torch.device, inner: int, rounds: int) -> list[float]:
    """ms per iteration for each of ``rounds`` rounds of ``inner`` iterations (host timer + sync)."""
    out = []
    for _ in range(rounds):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        out.append((time.perf_counter() - t0) * 1e3 / inner)
    return out


@dataclass
class TimingPolicy:
    warmup: int = 2              # untimed calls after the first (compile / autotune) call
    target_round_ms: float = 10  # inner iterations per round so that one round lasts this long
    case_budget_s: float = 0.6   # timed rounds per case fit in this
    min_rounds: int = 5
    max_rounds: int = 30

    @classmethod
    def for_device(cls, device: torch.device, quick: bool = False) -> "TimingPolicy":
        if device.type == "cuda":
            return cls(warmup=3, target_round_ms=10, case_budget_s=0.3 if quick else 0.6, min_rounds=5,
                       max_rounds=30)
        return cls(warmup=1, target_round_ms=20, case_budget_s=0.25 if quick else 0.4, min_rounds=5,
                   max_rounds=20)


def summarize(times_ms: list[float]) -> dict:
    t = sorted(times_ms)
    if len(t) >= 2:
        q1, _, q3 = statistics.quantiles(t, n=4, method="inclusive")
    else:
        q1 = q3 = t[0]
    return {"ms_median": statistics.median(t), "ms_q1": q1, "ms_q3": q3, "ms_iqr": q3 - q1,
            "ms_min": t[0], "rounds": len(t)}


# =========================================================================== session
@dataclass
class BenchSession:
    """Rows of one run plus the budgets that keep a run inside its time slot."""
    device: torch.device
    results_dir: Path | None = None
    budget_s: float = 600.0            # no new case starts after this
    compile_budget_s: float = 120.0    # no new compiled case after this much compile time
    compile_policy: str = "auto"       # auto | all | none
    quick: bool = False
    rows: list[dict] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    compile_used_s: float = 0.0
    cpu_compiled: int = 0
    meta: dict = field(default_factory=dict)
    stem: str | None = None

    @classmethod
    def from_env(cls, device: torch.device | None = None, **kw) -> "BenchSession":
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        gpu = device.type == "cuda"
        budget = float(os.environ.get("FASTBEGAN_BENCH_BUDGET_S", 900 if gpu else 240))
        cbudget = float(os.environ.get("FASTBEGAN_BENCH_COMPILE_BUDGET_S", 240 if gpu else 60))
        policy = os.environ.get("FASTBEGAN_BENCH_COMPILE", "auto")
        if policy not in ("auto", "all", "none"):
            raise ValueError(f"FASTBEGAN_BENCH_COMPILE must be auto, all or none, got {policy!r}")
        s = cls(device=device, budget_s=budget, compile_budget_s=cbudget, compile_policy=policy, **kw)
        s.meta = {"device": device_info(device), "env": env_info(),
                  "created": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                  "budget_s": budget, "compile_budget_s": cbudget, "compile_policy": policy,
                  "variants": VARIANTS, "workloads": WORKLOADS,
                  "flops_note": "logical 3x3 conv FLOPs (2*MACs) from fastbegan.flops; backward = 2x "
                                "forward; train step = 3*(G(B) + D(2B)); sub-pixel upsample savings "
                                "not credited; fc layers not counted"}
        return s

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        if self.results_dir is not None:
            self.write()
        return row

    def write(self, complete: bool = False, exitstatus: int | None = None) -> tuple[Path, Path]:
        if self.stem is None:
            stamp = _dt.datetime.now().strftime("%Y-%m-%d-%H%M%S")
            self.stem = f"{self.meta['device']['slug']}-{stamp}"
            if self.meta["device"]["type"] == "cpu":
                prune_cpu_results(self.results_dir)
        meta = dict(self.meta, complete=complete, exitstatus=exitstatus,
                    elapsed_s=round(self.elapsed(), 1), compile_used_s=round(self.compile_used_s, 1))
        return write_results(self.rows, meta, self.results_dir, self.stem)


# =========================================================================== case plumbing
@dataclass
class Prepared:
    fn: Callable[[], Any]
    images: int | None = None
    flops: int | None = None
    bytes: int | None = None
    what: str = ""
    cleanup: Callable[[], None] | None = None


def case_name(workload: str, p: dict) -> str:
    if workload in ("train_step", "D_fwd_bwd", "G_fwd"):
        return f"res{p['res']} b{p['batch']} n{p['filters']}"
    if workload in ("conv_elu", "up_conv_elu"):
        hw = p["hw"]
        out = hw * 2 if workload == "up_conv_elu" else hw
        return f"b{p['batch']} {p['c_in']}->{p['c_out']} {hw}x{hw}->{out}x{out}"
    if workload == "l1_loss":
        return f"b{p['batch']} 3x{p['res']}x{p['res']}"
    if workload == "matmul_peak":
        return f"{p['n']}^3"
    return json.dumps(p, sort_keys=True)


@contextlib.contextmanager
def _cudnn_benchmark(on: bool):
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = prev


def _autocast(device: torch.device, on: bool):
    # cache_enabled=False: the cast-weight cache must not outlive a CUDA graph capture
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on, cache_enabled=False)


def _nchw_hooks(model: torch.nn.Module) -> None:
    """Variant (a): NCHW parameters and every conv input made NCHW (PyTorch's default layout)."""
    from .model import Conv3x3
    model.to(memory_format=torch.contiguous_format)

    def pre(_mod, args, kwargs):
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        if kwargs.get("skip") is not None:
            kwargs = dict(kwargs, skip=kwargs["skip"].contiguous())
        return args, kwargs

    for m in model.modules():
        if isinstance(m, Conv3x3):
            m.register_forward_pre_hook(pre, with_kwargs=True)


_COMPILE_MODE_OVERRIDE: str | None = None  # set for the retry without CUDA graphs


def _compile_mode(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"mode": _COMPILE_MODE_OVERRIDE or os.environ.get("FASTBEGAN_BENCH_COMPILE_MODE", "max-autotune")}
    backend = os.environ.get("FASTBEGAN_BENCH_CPU_COMPILE_BACKEND", "aot_eager")
    return {"backend": backend}


def _compile(module, device: torch.device):
    return torch.compile(module, dynamic=False, **_compile_mode(device))


def _compile_what(device: torch.device) -> str:
    m = _compile_mode(device)
    if "mode" in m:
        return f"torch.compile(mode={m['mode']!r}) of (b)"
    return f"torch.compile(backend={m['backend']!r}) of (b) [CPU: cheap backend]"


def _mark_step(device: torch.device) -> None:
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def _triton_available(device: torch.device) -> None:
    """Raise NotAvailable unless the triton backend can run real kernels here."""
    if device.type != "cuda":
        raise NotAvailable("GPU only (the Triton kernels need CUDA; tests/ runs them in the interpreter)")
    ok, why = ops.triton_status()
    if not ok:
        raise NotAvailable(f"triton backend unusable: {why}")
    try:
        importlib.import_module("fastbegan.ops.triton_ops")
    except Exception as e:  # noqa: BLE001 - not written yet, or broken
        raise NotAvailable(f"fastbegan.ops.triton_ops not available ({e.__class__.__name__}: {e})") from e


def _cuda_graph(fn: Callable[[], Any], device: torch.device, warmup: int = 3) -> Callable[[], None]:
    """Capture ``fn`` (already warmed up: autotuning done) into a CUDA graph; return replay."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn()  # noqa: F841 - kept alive with the graph
    keep = [graph, static_out]

    def replay():
        keep[0].replay()
    return replay


def _fused_step_api():
    """The fused training step of fastbegan/step.py, if there is one: ``(factory, name)``.

    Accepted shapes: a class or function taking a ``Trainer`` and returning a callable (or an
    object with ``.step()``) that runs one training step.
    """
    try:
        mod = importlib.import_module("fastbegan.step")
    except ImportError as e:
        raise NotAvailable(f"fastbegan.step not available ({e})") from e
    for name in ("FusedStep", "FusedTrainStep", "GraphedStep", "make_fused_step", "fused_step",
                 "make_step", "build_step"):
        obj = getattr(mod, name, None)
        if callable(obj):
            return obj, f"fastbegan.step.{name}"
    raise NotAvailable("fastbegan.step has none of FusedStep / make_fused_step / fused_step")


def _random_images(n: int, res: int, seed: int = 0):
    import numpy as np
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


# --------------------------------------------------------------------------- workloads
def _prepare_train_step(variant: str, p: dict, device: torch.device, session: BenchSession) -> Prepared:
    from .train import TrainConfig, Trainer
    res, batch, n = p["res"], p["batch"], p["filters"]
    fl = _flops.train_step_flops(res, n, batch)
    precision = "fp32" if variant == "a" else "bf16"
    backend = D_BACKEND if variant == "d" else "torch"
    if variant == "d":
        _triton_available(device)
    cfg = TrainConfig(res=res, filters=n, batch_size=batch, precision=precision, backend=backend,
                      device=str(device), steps=10 ** 9, log_every=10 ** 9, sample_every=10 ** 9,
                      ckpt_every=10 ** 9, out=str(Path(os.environ.get("TMPDIR", "/tmp")) / "fastbegan-bench"))
    trainer = Trainer(cfg, _random_images(max(2 * batch, 64), res), log=lambda *_: None)
    what = {"a": VARIANTS["a"], "b": VARIANTS["b"], "c": _compile_what(device)}.get(variant, "")
    if variant == "a":
        _nchw_hooks(trainer.model)
    if variant == "c":
        trainer.G = _compile(trainer.G, device)
        trainer.D = _compile(trainer.D, device)

        def fn():
            _mark_step(device)
            return trainer.train_step()
        return Prepared(fn, batch, fl, what=what)
    if variant == "d":
        try:
            factory, name = _fused_step_api()
            step = factory(trainer)
            call = step if callable(step) else step.step
            compiled = getattr(step, "compile_mode", None)
            return Prepared(call, batch, fl, what=f"triton backend + {name} (single pass, fused Adam, "
                            "CUDA graph" + (f", forward torch.compile'd ({compiled})" if compiled else "")
                            + "), bf16 autocast")
        except NotAvailable as e:
            note = str(e)
        return Prepared(trainer.train_step, batch, fl,
                        what=f"triton backend, reference Trainer step, bf16 autocast; fused step: {note}")
    return Prepared(trainer.train_step, batch, fl, what=what)


def _model_for(p: dict, device: torch.device, variant: str):
    from .model import BEGAN
    torch.manual_seed(0)
    model = BEGAN(p["res"], p["filters"]).to(device)
    if variant == "a":
        _nchw_hooks(model)
    return model


def _prepare_d_fwd_bwd(variant: str, p: dict, device: torch.device, session: BenchSession) -> Prepared:
    res, batch, n = p["res"], p["batch"], p["filters"]
    fl = _flops.forward_backward_flops(_flops.discriminator_forward_flops(res, n, batch))
    if variant == "d":
        _triton_available(device)
    model = _model_for(p, device, variant)
    D = _compile(model.D, device) if variant == "c" else model.D
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
            _mark_step(device)
        with _autocast(device, amp):
            rec = D(x)
            loss = ops.l1_recon_loss(x, rec)
        return torch.autograd.grad(loss, params)

    what = {"a": VARIANTS["a"], "b": VARIANTS["b"], "c": _compile_what(device)}.get(variant, "")
    if variant == "d":
        return _graphed_or_eager(fn, device, batch, fl, "triton backend, bf16")
    return Prepared(fn, batch, fl, what=what)


def _prepare_g_fwd(variant: str, p: dict, device: torch.device, session: BenchSession) -> Prepared:
    res, batch, n = p["res"], p["batch"], p["filters"]
    fl = _flops.generator_forward_flops(res, n, batch)
    if variant == "d":
        _triton_available(device)
    model = _model_for(p, device, variant)
    G = _compile(model.G, device) if variant == "c" else model.G
    gen = torch.Generator(device).manual_seed(0)
    z = torch.rand(batch, model.z_dim, device=device, generator=gen) * 2 - 1
    amp = variant != "a"

    def fn():
        if variant == "c":
            _mark_step(device)
        with torch.no_grad(), _autocast(device, amp):
            return G(z)

    what = {"a": VARIANTS["a"], "b": VARIANTS["b"], "c": _compile_what(device)}.get(variant, "")
    if variant == "d":
        return _graphed_or_eager(fn, device, batch, fl, "triton backend, bf16")
    return Prepared(fn, batch, fl, what=what)


def _graphed_or_eager(fn, device, images, fl, base: str) -> Prepared:
    """(d): warm up (Triton autotuning) eagerly, then capture a CUDA graph if possible."""
    try:
        for _ in range(2):
            fn()
        synchronize(device)
        replay = _cuda_graph(fn, device)
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
        _triton_available(device)
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
        cfn = torch.compile(eager, dynamic=False, **_compile_mode(device))

        def fn():
            _mark_step(device)
            return cfn()
        return Prepared(fn, b, fl, what=f"{_compile_what(device).replace(' of (b)', '')} of bf16 {pieces}")

    def fused():
        with torch.no_grad():
            return ops.conv3x3_elu(x, w, bias, upsample=upsample)
    return Prepared(fused, b, fl, what="fastbegan.ops.conv3x3_elu, triton backend, bf16 (fused"
                    + (" upsample" if upsample else "") + " conv+bias+ELU)")


def _prepare_l1(variant: str, p: dict, device: torch.device, session: BenchSession) -> Prepared:
    b, res = p["batch"], p["res"]
    if variant == "d":
        _triton_available(device)
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
        cfn = torch.compile(ref, dynamic=False, **_compile_mode(device))

        def fn():
            _mark_step(device)
            return cfn()
        return Prepared(fn, b, None, nbytes, what=f"{_compile_what(device).replace(' of (b)', '')} of bf16 L1")

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


# --------------------------------------------------------------------------- case lists
def default_cases(device: torch.device, quick: bool = False) -> list[tuple[str, str, dict]]:
    """(workload, variant, params) in run order: peak first, then eager/fused cases, then compiled."""
    gpu = device.type == "cuda"
    if gpu:
        model_shapes = [dict(res=r, batch=b, filters=128 if r >= 128 else 64)
                        for r in (128, 64, 32) for b in (16, 64)]
        conv_shapes = [dict(batch=32, c_in=128, c_out=128, hw=64), dict(batch=32, c_in=128, c_out=128, hw=128)]
        up_shapes = [dict(batch=32, c_in=128, c_out=128, hw=64)]
        l1_shapes = [dict(batch=128, res=128)]
        mm = [dict(n=8192), dict(n=4096)]
    else:
        model_shapes = [dict(res=8, batch=4, filters=8), dict(res=16, batch=4, filters=8)]
        conv_shapes = [dict(batch=2, c_in=8, c_out=8, hw=16)]
        up_shapes = [dict(batch=2, c_in=8, c_out=8, hw=8)]
        l1_shapes = [dict(batch=8, res=16)]
        mm = [dict(n=512)]
    # D fwd+bwd and G fwd: the larger batch only on GPU (the step covers both batches)
    part_shapes = [p for p in model_shapes if p["batch"] == 64] if gpu else model_shapes
    if quick:
        model_shapes = part_shapes = model_shapes[:1]
    cases = [("matmul_peak", "bf16", p) for p in mm]
    # priority order: the step, the kernels, then D and G; compiled cases last, the
    # res-128/64 step first among them (a budget cut drops the tail)
    eager, compiled = [], []
    for wl, shapes in (("train_step", model_shapes), ("conv_elu", conv_shapes), ("up_conv_elu", up_shapes),
                       ("l1_loss", l1_shapes), ("D_fwd_bwd", part_shapes), ("G_fwd", part_shapes)):
        for p in shapes:
            for v in "abcd":
                (compiled if v == "c" else eager).append((wl, v, p))
    first = [c for c in compiled if c[0] == "train_step" and c[2]["batch"] == model_shapes[0]["batch"]][:2]
    kernels = [c for c in compiled if c[0] in ("conv_elu", "up_conv_elu", "l1_loss")]
    compiled = first + kernels + [c for c in compiled if c not in first and c not in kernels]
    return cases + eager + compiled


def _case_compiles(variant: str) -> bool:
    return variant == "c"


def _compile_allowed(workload: str, session: BenchSession) -> str | None:
    """None if this compiled case may run, else why not."""
    if session.compile_policy == "none":
        return "compiled cases off (FASTBEGAN_BENCH_COMPILE=none)"
    if session.compile_used_s >= session.compile_budget_s:
        return (f"compile budget used up ({session.compile_used_s:.0f} s of "
                f"{session.compile_budget_s:.0f} s; FASTBEGAN_BENCH_COMPILE_BUDGET_S)")
    if session.device.type == "cpu" and session.compile_policy == "auto":
        if workload != "train_step" or session.cpu_compiled >= 1:
            return "CPU: one compiled case only (FASTBEGAN_BENCH_COMPILE=all for all)"
    return None


class _Alarm(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise _Alarm in the main thread after ``seconds`` (no-op elsewhere or when None)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(*_):
        raise _Alarm(f"exceeded {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _base_row(workload: str, variant: str, p: dict) -> dict:
    row = {k: None for k in ROW_KEYS}
    row.update(workload=workload, variant=variant, case=case_name(workload, p), params=dict(p),
               what=VARIANTS.get(variant, ""))
    return row


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_case(workload: str, variant: str, params: dict, session: BenchSession,
             measure: Callable[[Callable[[], Any], torch.device, int, int], list[float]] | None = None
             ) -> dict:
    """Prepare, warm up and time one case; return its row (also added to ``session``).

    ``measure(fn, device, inner, rounds)`` returns ms per iteration for each round; the
    pytest suite passes one backed by the pytest-benchmark fixture.
    """
    device = session.device
    measure = measure or own_measure
    row = _base_row(workload, variant, params)
    policy = TimingPolicy.for_device(device, session.quick)
    compiles = _case_compiles(variant)
    if session.elapsed() > session.budget_s:
        row.update(status="skipped", reason=f"time budget used up ({session.elapsed():.0f} s > "
                                            f"{session.budget_s:.0f} s; FASTBEGAN_BENCH_BUDGET_S)")
        return session.add(row)
    if compiles:
        why = _compile_allowed(workload, session)
        if why:
            row.update(status="skipped", reason=why)
            return session.add(row)
        if device.type == "cpu":
            session.cpu_compiled += 1
        torch._dynamo.reset()  # fresh caches: no recompile limit across cases
    try:
        _attempt(row, workload, variant, params, session, measure, policy, compiles)
    except NotAvailable as e:
        row.update(status="n/a", reason=str(e))
    except _Alarm as e:  # a compile that outgrew the budget: not a failure of the case
        row.update(status="skipped", reason=f"compile stopped: first call {e} (compile budget "
                                            f"{session.compile_budget_s:.0f} s; FASTBEGAN_BENCH_COMPILE_BUDGET_S)")
    except Exception as e:  # noqa: BLE001 - one broken case must not end the run
        msg = _err(e)
        retry = (compiles and device.type == "cuda" and _compile_mode(device).get("mode") == "max-autotune"
                 and _compile_allowed(workload, session) is None)
        if not retry:
            row.update(status="error", reason=msg)
        else:  # max-autotune's CUDA graphs are the usual suspect: one retry without them
            global _COMPILE_MODE_OVERRIDE
            _COMPILE_MODE_OVERRIDE = "max-autotune-no-cudagraphs"
            try:
                _attempt(row, workload, variant, params, session, measure, policy, compiles)
                row["what"] += f" [mode 'max-autotune' failed ({msg[:200]}); retried without CUDA graphs]"
            except _Alarm as e2:
                row.update(status="skipped", reason=f"max-autotune: {msg[:240]}; retry without CUDA graphs: "
                                                    f"compile stopped, first call {e2}")
            except Exception as e2:  # noqa: BLE001
                row.update(status="error", reason=f"max-autotune: {msg[:240]}; max-autotune-no-cudagraphs: "
                                                  f"{_err(e2)[:240]}")
            finally:
                _COMPILE_MODE_OVERRIDE = None
    return session.add(row)


def _err(e: BaseException) -> str:
    if isinstance(e, _Alarm):
        return f"first call (compile) {e}"
    return f"{e.__class__.__name__}: {e}"[:500]


def _attempt(row: dict, workload: str, variant: str, params: dict, session: BenchSession, measure,
             policy: TimingPolicy, compiles: bool) -> None:
    """Prepare, warm up, time; fill ``row`` (status ok) or raise."""
    device = session.device
    if compiles:
        torch._dynamo.reset()  # fresh caches: no recompile limit across cases
    _free(device)
    prev_backend = ops.get_backend()
    base_mem = 0
    if device.type == "cuda":
        base_mem = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    prep = None
    try:
        backend = D_BACKEND if variant == "d" else "torch"
        if variant == "d":
            _triton_available(device)
        with _cudnn_benchmark(variant in ("b", "c", "d")), ops.use_backend(backend):
            prep = PREPARE[workload](variant, params, device, session)
            row["what"] = prep.what or row["what"]
            # a compile may overrun the budgets by 30 s at most, then the case is an error
            remaining = min(session.budget_s - session.elapsed(), session.compile_budget_s - session.compile_used_s)
            limit = min(max(remaining, 0.0) + 30.0, 300.0) if compiles else None
            t0 = time.perf_counter()
            try:
                with _time_limit(limit):
                    prep.fn()
                    synchronize(device)
            finally:
                if compiles:
                    session.compile_used_s += time.perf_counter() - t0
            row["first_call_s"] = round(time.perf_counter() - t0, 3)
            for _ in range(policy.warmup):
                prep.fn()
            # plan: one synchronised call to size the rounds
            t1 = own_measure(prep.fn, device, 1, 1)[0]
            inner = max(1, min(1000, int(policy.target_round_ms / max(t1, 1e-3))))
            rounds = int(policy.case_budget_s * 1e3 / max(t1 * inner, 1e-3))
            rounds = max(policy.min_rounds, min(policy.max_rounds, rounds))
            times = measure(prep.fn, device, inner, rounds)
        row.update(summarize(times))
        row.update(status="ok", reason=None, inner=inner, images=prep.images, flops=prep.flops,
                   bytes=prep.bytes)
        sec = row["ms_median"] / 1e3
        if prep.images:
            row["images_per_s"] = prep.images / sec
        if prep.flops:
            row["tflops"] = prep.flops / sec / 1e12
        if prep.bytes:
            row["gbps"] = prep.bytes / sec / 1e9
        if device.type == "cuda":
            row["peak_mem_mb"] = round((torch.cuda.max_memory_allocated(device) - base_mem) / 2 ** 20, 1)
    finally:
        ops.set_backend(prev_backend)
        del prep
        if compiles:
            torch._dynamo.reset()
        _free(device)


# =========================================================================== reports
def finalize_rows(rows: list[dict], meta: dict) -> list[dict]:
    """Rows plus speedups over (a) and over the best of (b)/(c), and % of peak."""
    spec = (meta.get("device") or {}).get("peak_bf16_tflops_spec")
    measured = measured_peak(rows)
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("variant") in VARIANTS:
            by_case.setdefault((r["workload"], r["case"]), {})[r["variant"]] = r
    out = []
    for r in rows:
        r = dict(r)
        r["speedup_vs_a"] = r["speedup_vs_best_bc"] = None
        r["pct_peak_spec"] = r["pct_peak_measured"] = None
        if r.get("status") == "ok":
            group = by_case.get((r["workload"], r["case"]), {})
            t = r["ms_median"]
            if "a" in group:
                r["speedup_vs_a"] = group["a"]["ms_median"] / t
            bc = [group[v]["ms_median"] for v in "bc" if v in group]
            if bc and r["variant"] in VARIANTS:
                r["speedup_vs_best_bc"] = min(bc) / t
            if r.get("tflops"):
                if spec:
                    r["pct_peak_spec"] = 100 * r["tflops"] / spec
                if measured:
                    r["pct_peak_measured"] = 100 * r["tflops"] / measured
        out.append(r)
    return out


def measured_peak(rows: list[dict]) -> float | None:
    vals = [r["tflops"] for r in rows if r.get("workload") == "matmul_peak" and r.get("status") == "ok"
            and r.get("tflops")]
    return max(vals) if vals else None


def _fmt(v, nd=2, suffix=""):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v != 0 and abs(v) < 10 ** -nd:
            return f"{v:.2g}{suffix}"
        return f"{v:,.{nd}f}{suffix}"
    return f"{v}{suffix}"


def render_markdown(rows: list[dict], meta: dict) -> str:
    rows = finalize_rows(rows, meta)
    dev, env = meta.get("device", {}), meta.get("env", {})
    spec = dev.get("peak_bf16_tflops_spec")
    measured = measured_peak(rows)
    commit = env.get("commit") or "unknown"
    if env.get("dirty"):
        commit += " (+ uncommitted changes)"
    lines = [f"# fastbegan benchmarks: {dev.get('name', '?')}", "",
             f"- date: {meta.get('created', '?')}",
             f"- device: {dev.get('name', '?')} ({dev.get('type', '?')}"
             + (f", sm_{dev['capability'].replace('.', '')}, {dev.get('sms')} SMs, {dev.get('memory_gb')} GB"
                if dev.get("type") == "cuda" else f", {dev.get('threads')} threads") + ")",
             f"- torch {env.get('torch')}, triton {env.get('triton')}, python {env.get('python')}"
             + (f", CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}" if env.get("cuda") else ""),
             f"- git commit: {commit}",
             f"- bf16 dense peak: spec {_fmt(spec, 1)} TFLOP/s"
             + (f" ({dev.get('peak_spec_entry')})" if dev.get("peak_spec_entry") else "")
             + f"; measured (bf16 matmul in this run) {_fmt(measured, 1)} TFLOP/s",
             f"- run: {'complete' if meta.get('complete') else 'partial (written while running)'}, "
             f"{_fmt(meta.get('elapsed_s'), 0)} s, compile time {_fmt(meta.get('compile_used_s'), 0)} s",
             f"- FLOPs: {meta.get('flops_note', '')}",
             "- timing: median of rounds (each round: `inner` iterations, then one synchronisation); "
             "IQR = q3 - q1; speedups compare medians within the same case",
             "", "Variants: " + "; ".join(f"**{k}** {v}" for k, v in VARIANTS.items()), ""]
    order = list(WORKLOADS)
    workloads = sorted({r["workload"] for r in rows}, key=lambda w: order.index(w) if w in order else 99)
    for wl in workloads:
        wrows = [r for r in rows if r["workload"] == wl]
        first = {}
        for r in wrows:
            first.setdefault(r["case"], len(first))
        wrows.sort(key=lambda r: (first[r["case"]], r["variant"]))
        lines += [f"## {wl}: {WORKLOADS.get(wl, '')}", ""]
        cols = ["case", "var", "ms (median)", "IQR ms", "images/s", "vs a", "vs best(b,c)", "TFLOP/s",
                "% spec peak", "% meas. peak", "peak mem MB"]
        if wl == "l1_loss":
            cols[7:10] = ["GB/s"]
        cols.append("status / what")
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "---|" * len(cols))
        for r in wrows:
            ok = r["status"] == "ok"
            cells = [r["case"], r["variant"], _fmt(r.get("ms_median"), 3), _fmt(r.get("ms_iqr"), 3),
                     _fmt(r.get("images_per_s"), 0) if r.get("images_per_s") else "n/a",
                     _fmt(r.get("speedup_vs_a"), 2, "x"), _fmt(r.get("speedup_vs_best_bc"), 2, "x")]
            if wl == "l1_loss":
                cells.append(_fmt(r.get("gbps"), 1))
            else:
                cells += [_fmt(r.get("tflops"), 3), _fmt(r.get("pct_peak_spec"), 1),
                          _fmt(r.get("pct_peak_measured"), 1)]
            cells.append(_fmt(r.get("peak_mem_mb"), 0))
            note = r.get("what") or ""
            if not ok:
                note = f"**{r['status']}**: {r.get('reason') or ''}"
            cells.append(note.replace("|", "/").replace("\n", " "))
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_results(rows: list[dict], meta: dict, out_dir: Path, stem: str) -> tuple[Path, Path]:
    """Write ``stem.json`` and ``stem.md`` atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "meta": meta, "rows": finalize_rows(rows, meta)}
    paths = []
    for suffix, text in ((".json", json.dumps(doc, indent=1, default=str)), (".md", render_markdown(rows, meta))):
        path = out_dir / f"{stem}{suffix}"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths[0], paths[1]


def prune_cpu_results(results_dir: Path | None, keep: int = 4) -> None:
    """Delete all but the newest ``keep`` cpu-* results (git-ignored smoke-test output)."""
    if results_dir is None or not Path(results_dir).is_dir():
        return
    stems = sorted({p.stem for p in Path(results_dir).glob("cpu-*.json")})
    for stem in stems[:-keep] if keep else stems:
        for suffix in (".json", ".md"):
            (Path(results_dir) / f"{stem}{suffix}").unlink(missing_ok=True)


def validate_results(doc: dict) -> list[str]:
    """Problems with a results document (empty list = well formed)."""
    errs = []
    if doc.get("schema") != SCHEMA:
        errs.append(f"schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    meta = doc.get("meta") or {}
    for key in ("device", "env", "created"):
        if key not in meta:
            errs.append(f"meta.{key} missing")
    for key in ("name", "type", "slug"):
        if key not in meta.get("device", {}):
            errs.append(f"meta.device.{key} missing")
    for key in ("torch", "triton", "commit"):
        if key not in meta.get("env", {}):
            errs.append(f"meta.env.{key} missing")
    rows = doc.get("rows")
    if not isinstance(rows, list) or not rows:
        errs.append("rows missing or empty")
        return errs
    for i, r in enumerate(rows):
        missing = [k for k in ROW_KEYS + ("speedup_vs_a", "speedup_vs_best_bc", "pct_peak_spec",
                                          "pct_peak_measured") if k not in r]
        if missing:
            errs.append(f"row {i}: keys missing: {missing}")
            continue
        if r["status"] not in ("ok", "n/a", "skipped", "error"):
            errs.append(f"row {i}: bad status {r['status']!r}")
        if r["status"] == "ok":
            for k in ("ms_median", "ms_q1", "ms_q3", "ms_min"):
                if not (isinstance(r[k], (int, float)) and r[k] > 0 and math.isfinite(r[k])):
                    errs.append(f"row {i} ({r['workload']}/{r['variant']}): {k} = {r[k]!r}")
            if isinstance(r["ms_q1"], (int, float)) and isinstance(r["ms_q3"], (int, float)) \
                    and not r["ms_q1"] <= r["ms_median"] <= r["ms_q3"]:
                errs.append(f"row {i}: median outside [q1, q3]")
        elif not r.get("reason"):
            errs.append(f"row {i}: status {r['status']} without a reason")
    return errs


def newest_results(results_dir: Path) -> Path | None:
    files = [p for p in Path(results_dir).glob("*.json") if not p.name.startswith(".")]
    if not files:
        return None
    return max(files, key=lambda p: (json.loads(p.read_text()).get("meta", {}).get("created", ""),
                                     p.stat().st_mtime) if _is_results(p) else ("", 0))


def _is_results(p: Path) -> bool:
    try:
        return json.loads(p.read_text()).get("schema") == SCHEMA
    except (OSError, ValueError):
        return False


# =========================================================================== CLI
@click.command("bench")
@click.option("--run", "run_now", is_flag=True, help="Measure now (training step, a few cases) instead "
              "of printing the newest saved table.")
@click.option("--results", "results_dir", type=click.Path(file_okay=False), default=None,
              help="Results folder (default: benchmarks/results, or $FASTBEGAN_BENCH_RESULTS).")
@click.option("--res", "res_list", type=int, multiple=True, help="With --run: resolutions "
              "(default 64 on GPU, 8 on CPU). Repeatable.")
@click.option("--batch-size", type=int, default=None, help="With --run: batch (default 16 on GPU, 4 on CPU).")
@click.option("--filters", type=int, default=None, help="With --run: n (default: the model's default on "
              "GPU, 8 on CPU).")
@click.option("--variants", default="abd", show_default=True, help="With --run: which of a, b, c "
              "(torch.compile: slow to compile), d.")
@click.option("--save", is_flag=True, help="With --run: also write <device>-<date>.json/.md into the results folder.")
@click.option("--device", default="auto", show_default=True)
def bench(run_now, results_dir, res_list, batch_size, filters, variants, save, device):
    """Print the newest benchmark table (from `pytest benchmarks/`), or measure a few cases with --run."""
    results = Path(results_dir) if results_dir else default_results_dir()
    if not run_now:
        path = newest_results(results) if results.is_dir() else None
        if path is None or not _is_results(path):
            raise click.ClickException(f"no benchmark results in {results}: run `pytest benchmarks/` "
                                       "(or `fastbegan bench --run`)")
        doc = json.loads(path.read_text())
        click.echo(f"{path}\n")
        click.echo(render_markdown(doc["rows"], doc["meta"]))
        return
    from .train import resolve_device
    dev = resolve_device(device)
    bad = set(variants) - set(VARIANTS)
    if bad or not variants:
        raise click.ClickException(f"--variants takes letters from abcd, got {variants!r}")
    gpu = dev.type == "cuda"
    res_list = res_list or ((64,) if gpu else (8,))
    b = batch_size or (16 if gpu else 4)
    session = BenchSession.from_env(dev, results_dir=results if save else None, quick=True)
    session.compile_policy = "all" if "c" in variants else "none"
    cases = [("matmul_peak", "bf16", dict(n=8192 if gpu else 512))]
    for r in res_list:
        from .model import check_resolution, default_filters
        check_resolution(r)
        n = filters or (default_filters(r) if gpu else 8)
        cases += [("train_step", v, dict(res=r, batch=b, filters=n)) for v in variants]
    for wl, v, p in cases:
        row = run_case(wl, v, p, session)
        status = f"{row['ms_median']:.3f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
        click.echo(f"  {wl} {row['case']} ({v}): {status}", err=True)
    if save:
        j, m = session.write(complete=True)
        click.echo(f"wrote {j} and {m}", err=True)
    click.echo(render_markdown(session.rows, dict(session.meta, complete=True,
                                                   elapsed_s=round(session.elapsed(), 1),
                                                   compile_used_s=round(session.compile_used_s, 1))))
