"""Run one case: budgets, warm-up, timing, and one row whatever happens (ok, n/a, skipped, error)."""
from __future__ import annotations

import gc
import time
from typing import Any, Callable

import torch

from .. import distributed, ops
from . import timing, variants, workloads
from .cases import case_name
from .results import set_rates
from .schema import ROW_KEYS, VARIANTS
from .session import BenchSession


def _case_compiles(workload: str, variant: str, device: torch.device) -> bool:
    """(c) compiles G and D; on a CPU the (d) training step is fastbegan's compiled step (on
    a GPU its compilation is part of the product's warm-up and is not budgeted)."""
    return variant == "c" or (variant == "d" and workload == "train_step" and device.type == "cpu")


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


def base_row(workload: str, variant: str, p: dict) -> dict:
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
    measure = measure or timing.own_measure
    row = base_row(workload, variant, params)
    policy = timing.TimingPolicy.for_device(device, session.quick)
    compiles = _case_compiles(workload, variant, device)
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
    except variants.NotAvailable as e:
        row.update(status="n/a", reason=str(e))
    except timing.TimeLimitExceeded as e:  # a compile that outgrew the budget: not a failure of the case
        row.update(status="skipped", reason=f"compile stopped: first call {e} (compile budget "
                                            f"{session.compile_budget_s:.0f} s; FASTBEGAN_BENCH_COMPILE_BUDGET_S)")
    except Exception as e:  # noqa: BLE001 - one broken case must not end the run
        msg = _err(e)
        retry = (compiles and device.type == "cuda"
                 and variants.compile_kwargs(device).get("mode") == "max-autotune"
                 and _compile_allowed(workload, session) is None)
        if not retry:
            row.update(status="error", reason=msg)
        else:  # max-autotune's CUDA graphs are the usual suspect: one retry without them
            _retry_without_cudagraphs(row, msg, workload, variant, params, session, measure, policy)
    return session.add(row)


def _retry_without_cudagraphs(row: dict, msg: str, workload: str, variant: str, params: dict,
                              session: BenchSession, measure, policy: timing.TimingPolicy) -> None:
    try:
        with variants.compile_mode_override("max-autotune-no-cudagraphs"):
            _attempt(row, workload, variant, params, session, measure, policy, True)
        row["what"] += f" [mode 'max-autotune' failed ({msg[:200]}); retried without CUDA graphs]"
    except timing.TimeLimitExceeded as e2:
        row.update(status="skipped", reason=f"max-autotune: {msg[:240]}; retry without CUDA graphs: "
                                            f"compile stopped, first call {e2}")
    except Exception as e2:  # noqa: BLE001
        row.update(status="error", reason=f"max-autotune: {msg[:240]}; max-autotune-no-cudagraphs: "
                                          f"{_err(e2)[:240]}")


def _err(e: BaseException) -> str:
    if isinstance(e, timing.TimeLimitExceeded):
        return f"first call (compile) {e}"
    return f"{e.__class__.__name__}: {e}"[:500]


def _attempt(row: dict, workload: str, variant: str, params: dict, session: BenchSession, measure,
             policy: timing.TimingPolicy, compiles: bool) -> None:
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
        # fastbegan's variants run its kernels on a GPU; on a CPU its torch backend (the
        # workloads that exist only as kernels say n/a there themselves)
        gpu_kernels = variant in ("d", "e") and device.type == "cuda"
        backend = variants.D_BACKEND if gpu_kernels else "torch"
        if gpu_kernels:
            variants.require_triton(device)
        with variants.cudnn_benchmark(variant in ("b", "c", "d")), ops.use_backend(backend):
            prep = workloads.PREPARE[workload](variant, params, device, session)
            row["what"] = prep.what or row["what"]
            # a compile may overrun the budgets by 30 s at most, then the case is an error
            remaining = min(session.budget_s - session.elapsed(), session.compile_budget_s - session.compile_used_s)
            limit = min(max(remaining, 0.0) + 30.0, 300.0) if compiles else None
            t0 = time.perf_counter()
            try:
                with timing.time_limit(limit):
                    prep.fn()
                    timing.synchronize(device)
            finally:
                if compiles:
                    session.compile_used_s += time.perf_counter() - t0
            row["first_call_s"] = round(time.perf_counter() - t0, 3)
            for _ in range(policy.warmup):
                prep.fn()
            # plan: one synchronised call to size the rounds
            t1 = timing.own_measure(prep.fn, device, 1, 1)[0]
            inner = max(1, min(1000, int(policy.target_round_ms / max(t1, 1e-3))))
            rounds = int(policy.case_budget_s * 1e3 / max(t1 * inner, 1e-3))
            rounds = max(policy.min_rounds, min(policy.max_rounds, rounds))
            # under torchrun every rank must call the step as often as rank 0
            inner, rounds = (int(v) for v in distributed.values_from_rank0([inner, rounds], device))
            if prep.timed is not None:
                prep.timed(True)
            times = measure(prep.fn, device, inner, rounds)
            if prep.timed is not None:
                row.update(prep.timed(False) or {})
        row.update(timing.summarize(times))
        row.update(status="ok", reason=None, inner=inner, images=prep.images, flops=prep.flops,
                   bytes=prep.bytes)
        set_rates(row)
        if device.type == "cuda":
            row["peak_mem_mb"] = round((torch.cuda.max_memory_allocated(device) - base_mem) / 2 ** 20, 1)
    finally:
        ops.set_backend(prev_backend)
        del prep
        if compiles:
            torch._dynamo.reset()
        _free(device)
