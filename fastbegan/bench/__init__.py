"""Benchmarks: the case runner behind ``pytest benchmarks/`` and ``fastbegan bench``.

Variants (a) fp32 eager, (b) bf16 + channels_last eager, (c) torch.compile of (b),
(d) fastbegan, side by side on the same model and batch; workloads: the training step,
D forward+backward, G forward, the fused kernels and a bf16 matmul for the measured peak.
One row per case; results go to ``benchmarks/results/<device>-<date>.json`` and ``.md``.
How the suite is run and read: benchmarks/README.md.

    schema     results-file schema, VARIANTS, WORKLOADS, ROW_KEYS
    device     device name and spec peak, versions, git commit
    timing     rounds, one synchronisation each; their summary; time limits
    session    BenchSession: the rows of one run and its budgets
    variants   how (a)-(d) are set up     workloads  PREPARE: one callable per case
    cases      the default case list      runner     run_case: one row, whatever happens
    results    speedups, % of peak, the Markdown table, reading and writing files
    cli        ``fastbegan bench``
"""
from .cases import case_name, default_cases
from .device import device_info, env_info, peak_bf16_tflops
from .results import finalize_rows, measured_peak, newest_results, render_markdown, validate_results, write_results
from .runner import run_case
from .schema import ROW_KEYS, SCHEMA, VARIANTS, WORKLOADS
from .session import BenchSession
from .timing import TimingPolicy, own_measure, summarize, synchronize

__all__ = ["case_name", "default_cases", "device_info", "env_info", "peak_bf16_tflops", "finalize_rows",
           "measured_peak", "newest_results", "render_markdown", "validate_results", "write_results",
           "run_case", "ROW_KEYS", "SCHEMA", "VARIANTS", "WORKLOADS", "BenchSession", "TimingPolicy",
           "own_measure", "summarize", "synchronize"]
