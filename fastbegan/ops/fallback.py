"""The fallback chain of the triton backend: per op and shape, the first path that works.

Every custom op of the triton backend has an ordered list of *paths* that compute the
same result, fastest first, the torch reference last::

    conv3x3_elu (forward)        tma -> ptr -> torch     (tma only where eligible)
    conv3x3_dgrad / _wgrad       triton -> torch
    conv3x3_l1_* / l1 losses     triton -> torch
    upsample_nearest2x           triton -> torch

The path is decided at the first call of each (op, shape) key and kept for the process:

- a path that raises (a Triton compile error, a launch error such as too much shared
  memory or a grid over CUDA's limits, a kernel bug surfacing as a Python error) is
  dropped;
- with verification on (:func:`set_verify`; ``fastbegan train --verify-kernels``, always
  in ``fastbegan doctor``), the first call's result is also compared with the torch
  reference, and a path whose max relative error exceeds :data:`REL_TOL` is dropped;
- on a GPU, when both the tma and the ptr forward kernels work for a shape, the faster
  one (each already autotuned by Triton) goes first ("race", timed once per shape).

Each dropped path costs one warning line (:class:`KernelFallbackWarning`) naming the op,
the shape, the path and the error; the call returns the next path's result, so training
goes on, slower. A *sticky* CUDA error (an illegal address, a launch failure: the CUDA
context is unusable afterwards) cannot be absorbed: :class:`KernelFatalError` ends the
run with a message saying so (the trainer writes checkpoints only from healthy states, so
the last one is intact).

Some drops outlive the process. A sticky CUDA error cannot be absorbed in-process, and
every later process would pick the same path and die the same way; a path that computes
a wrong result on this GPU will do so again. Both are recorded on a GPU in
``$FASTBEGAN_CACHE/dropped_paths.json``, keyed by the GPU, the Triton version and a hash
of the kernel sources, per op, path and *variant* (the key's flags and dtypes, not its
sizes: the doctor's batch is not the trainer's). Every later process skips such a path
with one warning per key, so the doctor's findings carry into the training run, and a
stage that died of a sticky error runs the next path when it is started again
(``benchmarks/gpu_suite.sh`` does that once). ``fastbegan doctor --retest`` forgets this
GPU's records and checks every path afresh. The tests (strict mode) skip a path recorded
for a sticky error only; a path recorded for a wrong result is run and verified, so the
test fails if it is still wrong (tests/conftest.py gives the test session its own cache,
carrying over the sticky records only).

Inside a CUDA graph capture nothing is tried, verified or autotuned (no synchronisation
is allowed there): a key first seen inside a capture raises, and the training step, which
decides every key in its eager warm-up steps, re-warms and captures again.
"""
from __future__ import annotations

import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

__all__ = ["KernelFallbackWarning", "KernelFatalError", "KernelPathDropped", "set_verify",
           "verify_enabled", "set_strict", "run", "decisions", "reset", "max_rel_error",
           "shape_key", "describe", "REL_TOL", "record_dropped", "recorded_drops",
           "forget_recorded", "records_path", "variant", "is_sticky_record"]

# max |got - want| / max |want| accepted when verifying a path against the reference, per
# compute dtype: bf16 has 8 mantissa bits (outputs rounded: 2**-9 relative, plus a
# different summation order over K up to 9 * 1024 products); fp32 dots run in TF32 on
# a GPU (10 mantissa bits) like cuDNN's default. A wrong kernel is off by O(1).
REL_TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-2, torch.float64: 1e-6}

_verify = os.environ.get("FASTBEGAN_VERIFY_KERNELS") == "1"
_strict = False                         # tests: no fallback, errors and mismatches raise
_chosen: dict[tuple, str] = {}          # (op, key) -> path in use
_events: list[dict] = []                # what was dropped, and why (doctor reports them)
_records: dict[str, dict] = {}          # env key -> {variant: {path: why}} (read once)
_warned: set[tuple[str, str]] = set()   # (variant, path) skipped with a warning already


class KernelFallbackWarning(RuntimeWarning):
    """A kernel path was dropped for an (op, shape); a slower path is used instead."""


class KernelFatalError(RuntimeError):
    """A sticky CUDA error inside a kernel: the CUDA context cannot be used any more."""


STICKY_PREFIX = "sticky CUDA error: "  # how a sticky error's record starts (is_sticky_record)


class KernelPathDropped(RuntimeError):
    """Strict mode (tests): the path under test died of a sticky CUDA error on this GPU in
    an earlier process (recorded); running it would take the CUDA context down, so tests
    report it as a skip. A path recorded for a wrong result is run and checked instead."""


def set_verify(on: bool = True) -> None:
    """Compare the first call of every (op, shape) with the torch reference."""
    global _verify
    _verify = bool(on)


def verify_enabled() -> bool:
    return _verify


def set_strict(on: bool = True) -> None:
    """Strict mode (the test suite's default): only the first path runs, its errors
    propagate and, with verification on, a mismatch raises instead of falling back. Tests
    of the kernels must not pass on the torch path."""
    global _strict
    _strict = bool(on)


def reset() -> None:
    """Forget every decision (the next call of each key tries its paths again) and reread
    the records of earlier processes at the next call."""
    _chosen.clear()
    _events.clear()
    _records.clear()
    _warned.clear()


def decisions() -> dict:
    """``{"op shape": path}`` for every key decided so far, and the dropped paths."""
    return {"chosen": {f"{op} {describe(key)}": p for (op, key), p in _chosen.items()},
            "dropped": list(_events)}


def shape_key(**parts) -> tuple:
    """The key of an op's call: tensors as (shape, dtype), flags that are set, other values
    as they are. A tuple (cheap: it is built on every eager call); :func:`describe` makes
    it readable."""
    key = []
    for k, v in parts.items():
        if v is None or v is False:
            continue
        if isinstance(v, torch.Tensor):
            v = (tuple(v.shape), v.dtype)
        key.append((k, v))
    return tuple(key)


def describe(key) -> str:
    """``x=2x8x4x4:float32 weight=... upsample device=cpu`` for a :func:`shape_key`."""
    if not isinstance(key, tuple):
        return str(key)
    out = []
    for k, v in key:
        if v is True:
            out.append(k)
        elif isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], torch.dtype):
            out.append(f"{k}={'x'.join(map(str, v[0]))}:{str(v[1]).replace('torch.', '')}")
        else:
            out.append(f"{k}={v}")
    return " ".join(out)


def max_rel_error(got, want) -> float:
    """max |got - want| / max |want| over tensors (or sequences of tensors; None skipped)."""
    if isinstance(got, torch.Tensor) or got is None:
        got, want = [got], [want]
    err, scale = 0.0, 0.0
    for g, w in zip(got, want):
        if g is None or w is None or g.numel() == 0:
            continue
        if g.shape != w.shape:
            return float("inf")
        w64 = w.detach().double()
        err = max(err, (g.detach().double() - w64).abs().max().item())
        scale = max(scale, w64.abs().max().item())
    return err / max(scale, 1e-12)


def _dtype_of(out) -> torch.dtype:
    t = out if isinstance(out, torch.Tensor) else next(o for o in out if o is not None)
    return t.dtype


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _sticky_cuda_error(device: torch.device) -> str | None:
    """None if the CUDA context still works after an exception, else the error."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.empty(1, device=device).add_(1).item()
    except Exception as e:  # noqa: BLE001 - any failure here means the context is gone
        return f"{e.__class__.__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}"
    return None


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{e.__class__.__name__}: {lines[-1][:200] if lines else ''}"


def _drop(op: str, key, path: str, why: str, next_path: str | None) -> None:
    _events.append({"op": op, "shape": describe(key), "path": path, "error": why})
    warnings.warn(f"fastbegan: {op} {describe(key)}: dropped the {path} path ({why}); using "
                  f"{next_path or 'nothing'}", KernelFallbackWarning, stacklevel=4)


# ------------------------------------------------------------------ drops that outlive the process
def records_path() -> Path:
    """``$FASTBEGAN_CACHE/dropped_paths.json``."""
    from fastbegan.data import default_cache_dir
    return default_cache_dir() / "dropped_paths.json"


@functools.lru_cache(maxsize=1)
def _kernel_source_hash() -> str:
    """A short hash of the kernel sources (kernels/*.py): a fixed kernel is tried again."""
    from fastbegan import kernels
    h = hashlib.sha1()
    for f in sorted(Path(kernels.__file__).parent.glob("*.py")):
        h.update(f.read_bytes())
    return h.hexdigest()[:10]


def _persists(device: torch.device) -> bool:
    """Drops are recorded on CUDA devices only (the interpreter's are the tests' own)."""
    return device.type == "cuda"


def env_key(device: torch.device) -> str:
    """What a record is valid for: the GPU, the Triton version and the kernel sources."""
    import triton
    if device.type == "cuda":
        cc = "".join(map(str, torch.cuda.get_device_capability(device)))
        where = f"{torch.cuda.get_device_name(device)} sm_{cc}"
    else:
        where = device.type
    return f"{where}|triton {triton.__version__}|kernels {_kernel_source_hash()}"


def variant(op: str, key) -> str:
    """``op`` and the flags and dtypes of a :func:`shape_key`, without sizes: what a record
    covers (``conv3x3_elu x:bfloat16 weight:float32 upsample elu stride=1``)."""
    parts = [op]
    for k, v in key:
        if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], torch.dtype):
            parts.append(f"{k}:{str(v[1]).replace('torch.', '')}")
        elif isinstance(v, torch.device):
            continue  # the env key names the GPU
        elif isinstance(v, int) and not isinstance(v, bool) and k != "stride":
            if v:
                parts.append(k)  # an offset or a size (the skip's channel offset): set or not
        else:
            parts.append(k if v is True else f"{k}={v}")
    return " ".join(parts)


def _read_table() -> dict:
    from fastbegan.data import read_json_table
    return read_json_table(records_path())


def recorded_drops(device: torch.device) -> dict[str, dict[str, str]]:
    """``{variant: {path: why}}`` recorded for this device by earlier processes (read once
    per process; :func:`reset` rereads)."""
    env = env_key(device)
    if env not in _records:
        entry = _read_table().get(env)
        _records[env] = entry if isinstance(entry, dict) else {}
    return _records[env]


def record_dropped(op: str, key, path: str, why: str, device: torch.device) -> None:
    """Record that ``path`` must not run for ``op``'s variant of ``key`` on this device
    (merged into the file atomically; an unwritable cache only loses the record)."""
    if not _persists(device) or path == "torch":
        return
    from fastbegan.data import write_json_atomic
    env, var = env_key(device), variant(op, key)
    recorded_drops(device).setdefault(var, {})[path] = why
    table = _read_table()
    table.setdefault(env, {}).setdefault(var, {})[path] = why
    write_json_atomic(records_path(), table)


def forget_recorded(device: torch.device) -> int:
    """Delete this device's records (``fastbegan doctor --retest``); returns how many."""
    from fastbegan.data import write_json_atomic
    env = env_key(device)
    table = _read_table()
    gone = table.pop(env, {})
    _records.pop(env, None)
    if gone:
        write_json_atomic(records_path(), table)
    return sum(len(v) for v in gone.values())


def _skip_recorded(op, key, paths, device) -> list:
    """``paths`` without those an earlier process recorded as dropped (one warning each)."""
    if not _persists(device):
        return list(paths)
    dropped = recorded_drops(device).get(variant(op, key), {})
    kept = [(n, f) for n, f in paths if n not in dropped or n == "torch"]
    for name in dropped:
        if any(n == name for n, _ in paths):
            why = f"recorded by an earlier process: {dropped[name]}"
            if (variant(op, key), name) in _warned:  # one line per variant, not per shape
                _events.append({"op": op, "shape": describe(key), "path": name, "error": why})
            else:
                _warned.add((variant(op, key), name))
                _drop(op, key, name, why, next((n for n, _ in kept), None))
    return kept


def _fatal(op, key, name, e, sticky, device) -> KernelFatalError:
    """Record the path and make the error that ends the run."""
    record_dropped(op, key, name, f"{STICKY_PREFIX}{_one_line(e)}", device)
    return KernelFatalError(
        f"fastbegan: {op} {describe(key)}: the {name} path hit a CUDA error that "
        f"leaves the GPU unusable ({_one_line(e)}; then {sticky}). The run stops here; the last "
        "checkpoint is intact. The path is recorded as dropped on this GPU, so running the "
        "same command again takes the next one (`fastbegan doctor --retest` forgets it); "
        "please report it with the output of `fastbegan doctor`.")


def _try(op, key, name, fn, ref, device, verify, dtype):
    """(result, None) or (None, why) for one path's first call."""
    try:
        out = fn()
        if verify and name != "torch":
            want = ref()
            err = max_rel_error(out, want)
            tol = REL_TOL.get(dtype or _dtype_of(want), 1e-2)
            if not err <= tol:     # also catches NaN
                why = f"max relative error {err:.3g} > {tol:g} against the reference"
                record_dropped(op, key, name, why, device)
                return None, why
        elif device.type == "cuda" and not _capturing():
            torch.cuda.synchronize(device)   # surface an asynchronous launch error here
        return out, None
    except KernelFatalError:
        raise
    except Exception as e:  # noqa: BLE001 - a compile/launch error or a kernel bug
        sticky = _sticky_cuda_error(device)
        if sticky is not None:
            raise _fatal(op, key, name, e, sticky, device) from e
        return None, _one_line(e)


def _race(paths, device) -> list:
    """The first two paths (tma, ptr) ordered by measured time on a GPU."""
    import triton.testing
    timed = []
    for name, fn in paths[:2]:
        try:
            fn()                                         # compile + autotune
            timed.append((triton.testing.do_bench(fn, warmup=5, rep=20), name, fn))
        except Exception:  # noqa: BLE001 - the chain below drops it with its reason
            return paths
    timed.sort(key=lambda t: t[0])
    return [(n, f) for _, n, f in timed] + list(paths[2:])


def run(op: str, key: tuple, paths: Sequence[tuple[str, Callable]], device: torch.device,
        race: bool = False, reference: Callable | None = None, dtype: torch.dtype | None = None):
    """The result of the path in use for ``(op, key)``, deciding it on the first call.

    ``paths``: ``[(name, thunk), ...]`` fastest first, the last one the torch reference
    ("torch"). ``reference``: a thunk returning the reference result in fresh tensors, to
    verify against (default: the last path). ``race``: on a CUDA device, time the first
    two paths and put the faster first (when both run). ``dtype``: the compute dtype
    whose :data:`REL_TOL` applies (default: the result's; weight gradients come back in
    the weights' fp32 but are computed from bf16 activations).
    """
    device = torch.device(device)
    chosen = _chosen.get((op, key))
    if chosen is not None:
        for name, fn in paths:
            if name == chosen:
                return fn()
    if _capturing():
        raise RuntimeError(f"fastbegan: {op} {describe(key)} was first called inside a CUDA graph "
                           "capture, where no kernel path can be tried or autotuned: run every "
                           "shape in eager warm-up steps before capturing")
    ref = reference or paths[-1][1]
    if _strict:
        return _run_strict(op, key, paths, device, ref, dtype)
    paths = _skip_recorded(op, key, paths, device)
    if race and device.type == "cuda" and len(paths) > 2:
        paths = _race(list(paths), device)
    for i, (name, fn) in enumerate(paths):
        out, why = _try(op, key, name, fn, ref, device, _verify, dtype)
        if why is None:
            _chosen[(op, key)] = name
            return out
        _drop(op, key, name, why, paths[i + 1][0] if i + 1 < len(paths) else None)
    raise RuntimeError(f"fastbegan: {op} {describe(key)}: every path failed, the torch reference "
                       f"included ({_events[-1]['error']})")


def is_sticky_record(why: str) -> bool:
    """A recorded drop that came from a sticky CUDA error (running the path again would
    take the CUDA context down), not from a wrong result (which can be checked again)."""
    return why.startswith(STICKY_PREFIX)


def _run_strict(op, key, paths, device, ref, dtype):
    """Strict mode (tests): the first path only; its errors propagate (a sticky one as
    :class:`KernelFatalError`, recorded) and, with verification on, a mismatch raises. A
    first path recorded by an earlier process as dying of a sticky CUDA error raises
    :class:`KernelPathDropped` (the tests report a skip); one recorded as giving a wrong
    result is run and verified against the reference here, whatever :func:`set_verify`
    says: a test must not be skipped because one borderline doctor run disagreed."""
    name, fn = paths[0]
    recorded = None
    if _persists(device) and name != "torch":
        recorded = recorded_drops(device).get(variant(op, key), {}).get(name)
        if recorded is not None and is_sticky_record(recorded):
            raise KernelPathDropped(f"{op} {describe(key)}: the {name} path was dropped on this GPU "
                                    f"by an earlier process ({recorded}); `fastbegan doctor --retest` "
                                    "checks it again")
    try:
        out = fn()
    except Exception as e:
        sticky = _sticky_cuda_error(device)
        if sticky is not None:
            raise _fatal(op, key, name, e, sticky, device) from e
        raise
    if (_verify or recorded is not None) and name != "torch":
        err, tol = max_rel_error(out, ref()), REL_TOL.get(dtype or _dtype_of(out), 1e-2)
        if not err <= tol:
            seen = f" (recorded by an earlier process too: {recorded})" if recorded is not None else ""
            raise AssertionError(f"{op} {describe(key)}: {name} path: max relative "
                                 f"error {err:.3g} > {tol:g} against the reference{seen}")
    _chosen[(op, key)] = name  # decided: a CUDA graph capture may call it now
    return out
