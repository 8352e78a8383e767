"""What the machine offers a training run: bf16 compute and CPU threads.

``resolve_precision("auto", device)`` picks bf16 autocast (fp32 master weights, fp32
losses and k_t) where the hardware computes in bf16 natively (on a CPU: and where a bf16
convolution of the run's shape is measured faster than fp32; a Xeon with AVX512-BF16 but no
AMX ran it slower, docs/design.md §4.4), fp32 elsewhere, and says why;
``configure_threads()`` sizes torch's intra-op pool to the cores this process may run on.
Both answer with a phrase for the trainer's start-up line.
"""
from __future__ import annotations

import os

import torch

PRECISIONS = ("auto", "fp32", "bf16")


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """(native bf16, what was found) for ``device``.

    CUDA: bf16 tensor cores (compute capability >= 8.0). CPU: AMX-BF16 or AVX512-BF16,
    as torch's own CPU feature probes report them (oneDNN then runs bf16 convolutions
    on those units: ~5.6x the fp32 rate on the project's 2-core Xeon, docs/design.md).
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major >= 8:
            return True, f"sm_{major}{minor} has bf16 tensor cores"
        return False, f"sm_{major}{minor} has no bf16 tensor cores"
    if device.type == "cpu":
        found = cpu_bf16_units()
        if not found:
            return False, "CPU has neither AMX-BF16 nor AVX512-BF16"
        if not onednn_bf16():
            return False, f"CPU has {' and '.join(found)}, but this torch's oneDNN has no bf16 kernels for it"
        return True, f"CPU has {' and '.join(found)}"
    return False, f"{device.type} is neither a CUDA GPU nor a CPU"


def cpu_bf16_units() -> list[str]:
    """The CPU's bf16 units by torch's own probes: ``AMX-BF16``, ``AVX512-BF16``, or none."""
    probes = (("AMX-BF16", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    return [name for name, fn in probes if getattr(torch.cpu, fn, lambda: False)()]


def onednn_bf16() -> bool:
    """Whether this torch's oneDNN runs bf16 on this CPU (it also checks the CPU's units)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# a CPU's bf16 conv must beat fp32 by this much: the step also pays the casts around each
# conv, so its bf16 slowdown is worse than the conv's (docs/design.md §4.4)
BF16_MIN_SPEEDUP = 1.2
PROBE_SIDE = 32  # the probe conv's spatial size at most (the rate is the same beyond; startup stays short)


def bf16_conv_speedup(shape: tuple[int, int, int, int], reps: int = 5) -> float:
    """fp32 time / bf16 time of one 3x3 convolution (C -> C channels, channels_last, this
    process's threads) on an (N, C, H, W) input: best of ``reps`` after a warm-up each."""
    import time
    n, c, h, w = shape
    best = {}
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, c, h, w).to(dtype=dtype, memory_format=torch.channels_last)
        wt = torch.randn(c, c, 3, 3).to(dtype=dtype, memory_format=torch.channels_last)
        with torch.no_grad():
            torch.nn.functional.conv2d(x, wt, padding=1)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                torch.nn.functional.conv2d(x, wt, padding=1)
                times.append(time.perf_counter() - t0)
        best[dtype] = min(times)
    return best[torch.float32] / best[torch.bfloat16]


def resolve_precision(name: str, device: torch.device,
                      conv_shape: tuple[int, int, int, int] | None = None) -> tuple[str, str]:
    """``auto|fp32|bf16`` -> (``fp32`` or ``bf16``, why). bf16 means autocast with fp32
    master weights, optimiser state, losses and k_t. ``conv_shape`` (N, C, H, W): on a CPU
    with bf16 units, auto times a conv of this shape (H, W capped at :data:`PROBE_SIDE`) in
    both precisions and keeps fp32 unless bf16 is :data:`BF16_MIN_SPEEDUP` x faster."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        return name, "--precision " + name
    native, why = bf16_support(device)
    if native and device.type == "cpu" and conv_shape is not None:
        n, c, h, w = conv_shape
        speedup = bf16_conv_speedup((n, c, min(h, PROBE_SIDE), min(w, PROBE_SIDE)))
        if speedup < BF16_MIN_SPEEDUP:
            return "fp32", (f"auto: {why}, but a bf16 conv ran {speedup:.2f}x fp32's speed here "
                            f"(bf16 needs {BF16_MIN_SPEEDUP:g}x; --precision bf16 forces it)")
        why += f", a bf16 conv ran {speedup:.1f}x fp32's speed here"
    return ("bf16" if native else "fp32"), f"auto: {why}"


def configure_threads(processes: int = 1) -> str:
    """Use one intra-op thread per core this process may run on (its CPU affinity, e.g.
    under ``taskset`` or a container's cpuset), unless OMP_NUM_THREADS is set, which
    torch has already applied; ``processes`` on one machine (torchrun) share the cores.
    Returns a description for the start-up line."""
    try:
        cores = len(os.sched_getaffinity(0))
        where = "cores in this process's CPU affinity"
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
        where = "cores"
    if cores == 1:
        where = where.replace("cores", "core")
    omp = os.environ.get("OMP_NUM_THREADS")
    if omp:
        return f"{_threads()} (OMP_NUM_THREADS={omp}; {cores} {where})"
    share = max(1, cores // max(1, processes))
    if torch.get_num_threads() != share:
        torch.set_num_threads(share)
    per = f", shared by {processes} processes" if processes > 1 else ""
    return f"{_threads()} ({cores} {where}{per})"


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n != 1 else ''}"


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_cpu_allocator() -> str:
    """Keep freed activation memory in the heap for the next step (glibc malloc).

    By default glibc serves blocks above its (dynamic) mmap threshold with fresh mmap'd
    pages and returns freed memory to the kernel, so every training step on a CPU
    page-faults its activations in again: ~17,000 minor faults per res-32 step here, a
    fifth of the step time (docs/design.md, "CPU step"). Raising the mmap and trim
    thresholds makes the heap keep and reuse that memory (1 fault per step). A no-op
    where the C library is not glibc. Returns what was done, for the start-up line.
    """
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator: unchanged (not glibc)"
    # the largest mmap threshold glibc accepts (its cap depends on the version: 32 MB+)
    ok = any(mallopt(_M_MMAP_THRESHOLD, mb << 20) == 1 for mb in (512, 128, 32))
    ok = ok and mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    return "allocator: glibc heap keeps freed blocks" if ok else "allocator: unchanged (mallopt refused)"
