"""How each variant runs a workload: (p) the PyTorch port's step, (a) fp32 NCHW eager,
(b) bf16 channels_last eager, (c) torch.compile of (b), (d)/(e) fastbegan (schema.VARIANTS)."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable

import torch

from .. import ops
from ..model import Conv3x3

D_BACKEND = "triton"  # the backend of variant (d); the CPU tests of the (d) plumbing use "torch"


class NotAvailable(Exception):
    """The variant does not exist for this case or device (row status 'n/a')."""


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    prev = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = prev


def autocast(device: torch.device, on: bool):
    # cache_enabled=False: the cast-weight cache must not outlive a CUDA graph capture
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on, cache_enabled=False)


def nchw_hooks(model: torch.nn.Module) -> None:
    """Variant (a): NCHW parameters and every conv input made NCHW (PyTorch's default layout)."""
    model.to(memory_format=torch.contiguous_format)

    def pre(_mod, args, kwargs):
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        if kwargs.get("skip") is not None:
            kwargs = dict(kwargs, skip=kwargs["skip"].contiguous())
        return args, kwargs

    for m in model.modules():
        if isinstance(m, Conv3x3):
            m.register_forward_pre_hook(pre, with_kwargs=True)


# ------------------------------------------------------------------ (c): torch.compile
_compile_mode_override: str | None = None  # set for the retry without CUDA graphs


@contextlib.contextmanager
def compile_mode_override(mode: str):
    """Compile (c) cases with ``mode`` inside the block (the retry without CUDA graphs)."""
    global _compile_mode_override
    _compile_mode_override = mode
    try:
        yield
    finally:
        _compile_mode_override = None


def compile_kwargs(device: torch.device) -> dict:
    """torch.compile's mode on a GPU; on a CPU inductor for the real shapes and a cheap
    backend for the tiny smoke-test shapes (inductor's C++ build is a minute per case)."""
    if device.type == "cuda":
        return {"mode": _compile_mode_override or os.environ.get("FASTBEGAN_BENCH_COMPILE_MODE", "max-autotune")}
    from .cases import cpu_real_shapes
    default = "inductor" if cpu_real_shapes() else "aot_eager"
    return {"backend": os.environ.get("FASTBEGAN_BENCH_CPU_COMPILE_BACKEND", default)}


def compile_module(module, device: torch.device):
    return torch.compile(module, dynamic=False, **compile_kwargs(device))


def compile_what(device: torch.device) -> str:
    m = compile_kwargs(device)
    if "mode" in m:
        return f"torch.compile(mode={m['mode']!r}) of (b)"
    cheap = "" if m["backend"] == "inductor" else " [CPU smoke test: cheap backend]"
    return f"torch.compile(backend={m['backend']!r}) of G and D in (b){cheap}"


def mark_step(device: torch.device) -> None:
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


# ------------------------------------------------------------------ (d): fastbegan
def require_triton(device: torch.device) -> None:
    """Raise NotAvailable unless the triton backend can run real kernels here."""
    if device.type != "cuda":
        raise NotAvailable("GPU only (the Triton kernels need CUDA; tests/ runs them in the interpreter)")
    ok, why = ops.triton_status()
    if not ok:
        raise NotAvailable(f"triton backend unusable: {why}")
    try:
        from ..ops import triton_ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a broken install
        raise NotAvailable(f"fastbegan.ops.triton_ops not available ({e.__class__.__name__}: {e})") from e


def capture_cuda_graph(fn: Callable[[], Any], device: torch.device, warmup: int = 3) -> Callable[[], None]:
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


# ------------------------------------------------------------------ (p): the port's step
def port_step(trainer) -> Callable[[], Any]:
    """benchmarks/port_step.py's PortStep on ``trainer`` (it lives beside the benchmarks,
    not in the package: a checkout is needed)."""
    import importlib.util
    from .device import repo_root
    path = repo_root() / "benchmarks" / "port_step.py"
    if not path.is_file():
        raise NotAvailable(f"{path} not found: the port baseline runs from a checkout of fastbegan")
    spec = importlib.util.spec_from_file_location("fastbegan_port_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PortStep(trainer)
