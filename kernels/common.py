"""What the kernel launchers share: dot precision, NHWC layout, int32 and grid limits,
autotune settings.

Grid limits (CUDA): axis 0 up to 2**31 - 1 programs, axes 1 and 2 up to 65,535. Every
launcher puts its large tile count on axis 0 (folding several counts into it when it
has more than one) and keeps axes 1 and 2 for small counts (phases, halves, split-K);
:func:`check_grid` raises a clear error before a launch that would break the limits
(tests/test_kernel_launch.py checks every grid function at batch 256, res 256).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch
import triton
import triton.language as tl

from . import interpreting

MAX_GRID = (2**31 - 1, 65535, 65535)
INT32_MAX = 2**31 - 1


def check_grid(grid: tuple, what: str) -> tuple:
    """``grid`` itself, after checking each axis against CUDA's limits (ValueError)."""
    for axis, (n, lim) in enumerate(zip(grid, MAX_GRID)):
        if n > lim:
            raise ValueError(f"{what}: launch grid {tuple(grid)} exceeds CUDA's limit of {lim} "
                             f"programs on axis {axis} (a smaller batch or resolution fits)")
    return grid


def check_int32(what: str, *ts) -> None:
    """Kernels index with int32 offsets: every tensor must have fewer than 2**31 elements."""
    for t in ts:
        if t is not None and t.numel() > INT32_MAX:
            raise ValueError(f"{what}: tensors of 2**31 or more elements are not supported "
                             "(int32 offsets)")


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """The same logical NCHW tensor, dense channels_last (NHWC); no copy if it already is."""
    return t.contiguous(memory_format=torch.channels_last)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: fp32 operands use TF32 when PyTorch allows it for
    convolutions (cuDNN's default), IEEE otherwise, under the interpreter and for fp64
    (gradcheck); 16-bit operands ignore it."""
    if dtype == torch.float64 or interpreting():
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return "tf32"


def acc_dtype(dtype: torch.dtype):
    """Accumulator / partial-sum precision: fp32, or fp64 for fp64 tensors (gradcheck)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 under the interpreter (fewest programs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def device_guard(device: torch.device):
    """``torch.cuda.device(device)`` for a CUDA device (Triton launches on the *current*
    device and the descriptor allocator allocates there), a no-op context otherwise.
    Every custom op of :mod:`fastbegan.ops` runs its launches inside it, so ``cuda:1``
    tensors are computed on GPU 1 whatever the current device is."""
    if isinstance(device, torch.Tensor):
        device = device.device
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# Autotune results cached on disk (Triton's cache dir) where this Triton has the option
# (``cache_results``, Triton >= 3.3; a cold start tunes ~350 configs otherwise). It is a
# no-op under the interpreter (Triton ignores it there) and for configs with pre-hooks.
AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(
    triton.autotune).parameters else {}


# FASTBEGAN_AUTOTUNE_MAX=N (0: no cap) keeps, per tuning key, the first N configs that fit
# the shape. Every config list is written best-first for an H100 (the largest tiles that
# fit first), so the cap keeps the biggest tiles; benchmarks/gpu_suite.sh uses it to fit
# a cold start (compile + autotune of every layer) into its time budget.
AUTOTUNE_MAX = int(os.environ.get("FASTBEGAN_AUTOTUNE_MAX", "0") or 0)


def cap(configs: list) -> list:
    """The first :data:`AUTOTUNE_MAX` of ``configs`` (all of them when it is 0)."""
    return configs[:AUTOTUNE_MAX] if AUTOTUNE_MAX > 0 else configs


def autotune(configs, key, **kwargs):
    """``triton.autotune`` with the results cached on disk when this Triton supports it,
    and the guards of :func:`_guarded_autotuner`."""
    make = triton.autotune(configs=configs, key=key, **AUTOTUNE_CACHE, **kwargs)

    def decorator(fn):
        tuner = make(fn)
        tuner.__class__ = _guarded_autotuner(type(tuner))
        return tuner
    return decorator


@functools.lru_cache(maxsize=None)
def _guarded_autotuner(cls):
    """``cls`` (Triton's Autotuner) with three guards, the same on Triton 3.6 to 3.9:

    - a config that fails to build or run for any reason is timed as infinitely slow, so
      one bad config cannot take the whole kernel path down (Triton itself forgives only
      resource and compile-assertion errors; if every config fails, the launch after
      tuning raises and the fallback chain drops the path). A sticky CUDA error is not
      forgiven: the context is gone, and the fallback chain ends the run;
    - a single config left after pruning is not benchmarked (Triton 3.6 benchmarks it);
    - nothing is benchmarked inside a CUDA graph capture (it raises instead): every shape
      must be tuned in the eager warm-up steps before the step is captured.
    """
    class GuardedAutotuner(cls):
        def prune_configs(self, kwargs):
            pruned = super().prune_configs(kwargs)
            self._single_config = len(pruned) == 1
            return pruned

        def _bench(self, *args, config, **meta):
            if getattr(self, "_single_config", False):
                return [0.0, 0.0, 0.0]
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"fastbegan: {self.base_fn.__name__} would be autotuned inside a "
                                   "CUDA graph capture: run every shape in eager steps first")
            try:
                return super()._bench(*args, config=config, **meta)
            except Exception:
                if not _cuda_context_alive():
                    raise
                return [float("inf")] * 3

    GuardedAutotuner.__name__ = GuardedAutotuner.__qualname__ = f"Guarded{cls.__name__}"
    return GuardedAutotuner


def _cuda_context_alive() -> bool:
    """False after a sticky CUDA error (the context cannot run anything any more)."""
    if not torch.cuda.is_available():
        return True
    try:
        torch.cuda.synchronize()
        return True
    except Exception:
        return False
