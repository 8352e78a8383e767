"""Timing: rounds of back-to-back calls, each ended by one synchronisation; their summary."""
from __future__ import annotations

import contextlib
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

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


class TimeLimitExceeded(Exception):
    """Raised by :func:`time_limit` (a compile that outgrew its budget)."""


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise TimeLimitExceeded in the main thread after ``seconds`` (no-op elsewhere or when None)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def handler(*_):
        raise TimeLimitExceeded(f"exceeded {seconds:.0f} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
