"""The benchmark session shared by benchmarks/conftest.py and the benchmark tests.

(Not in conftest.py: tests/ has a conftest too, and ``from conftest import`` would pick
whichever was imported first when both folders run in one pytest.)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from fastbegan import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RESULTS_DIR = Path(os.environ.get("FASTBEGAN_BENCH_RESULTS") or Path(__file__).parent / "results")
_session: bench.BenchSession | None = None


def get_session() -> bench.BenchSession:
    global _session
    if _session is None:
        if DEVICE.type == "cpu":
            # Tiny CPU cases on shared cores time far more steadily on one thread (CPU numbers
            # are a smoke test, not performance evidence). FASTBEGAN_BENCH_CPU_THREADS overrides.
            torch.set_num_threads(int(os.environ.get("FASTBEGAN_BENCH_CPU_THREADS", 1)))
        _session = bench.BenchSession.from_env(DEVICE, results_dir=RESULTS_DIR)
    return _session
