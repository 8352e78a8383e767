"""One case in a fresh process: ``python -m fastbegan.bench.isolated '<json>'``.

The real-shape CPU cases run this way (cases.CPU_REAL_ENV): each variant starts from
PyTorch's defaults (threads, allocator, no compiled code in memory), so a setting one
variant makes, such as fastbegan's allocator tuning, cannot speed up the next, and the
process's peak resident memory is the case's peak memory (reported as ``peak_mem_mb``:
peak RSS minus the RSS before the case was prepared).

A case whose params hold ``world`` runs under torchrun with that many processes (one
thread each on a CPU, torchrun's default), in a process group even for ``world`` 1, so the
step's all-reduce runs and its cost is measured (benchmarks/distributed_step.py); rank 0
reports the row. ``device`` in the params picks the device (default: the CPU).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import torch

from .. import distributed
from .runner import base_row, run_case
from .session import BenchSession


def run_in_subprocess(workload: str, variant: str, params: dict, session: BenchSession,
                      timeout_s: float = 900.0) -> dict:
    """The row of ``run_case`` run in a fresh interpreter (added to ``session``)."""
    job = {"workload": workload, "variant": variant, "params": params}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                 str(params["world"])] if "world" in params else [sys.executable])
    try:
        out = subprocess.run([*launcher, "-m", "fastbegan.bench.isolated", json.dumps(job)],
                             capture_output=True, text=True, timeout=timeout_s)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            raise RuntimeError(f"exit {out.returncode}: {(out.stderr.strip().splitlines() or ['?'])[-1][:300]}")
        row = json.loads(lines[-1])
    except (subprocess.TimeoutExpired, RuntimeError, ValueError) as e:
        row = base_row(workload, variant, params)
        row.update(status="error", reason=f"isolated run failed: {e}"[:500])
    if variant in ("c", "d") and row.get("first_call_s"):
        session.compile_used_s += row["first_call_s"]
    return session.add(row)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    job = json.loads(sys.argv[1])
    params = job["params"]
    device = torch.device(params.get("device", "cpu"))
    di = distributed.init_from_env(str(device), force="world" in params)
    if device.type == "cuda":
        device = distributed.local_device(device, di)
        if device.index is not None:
            torch.cuda.set_device(device)
    session = BenchSession.from_env(device)
    session.compile_policy, session.budget_s, session.compile_budget_s = "all", 1e9, 1e9
    base = _rss_bytes()
    row = run_case(job["workload"], job["variant"], params, session)
    if row["status"] == "ok":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        if device.type == "cpu":
            row["peak_mem_mb"] = round(max(peak - base, 0) / 2 ** 20, 1)
        row["what"] = (row.get("what") or "") + _where(di, row)
    if di.is_main:
        print(json.dumps(row, default=str), flush=True)
    distributed.cleanup(barrier=True)


def _where(di, row: dict) -> str:
    """The note on how the case ran: its own process, or torchrun (with the all-reduce's share)."""
    threads = torch.get_num_threads()
    if not di.enabled:
        return f" [own process, {threads} threads]"
    share = (f"; all-reduce {row['allreduce_ms']:.1f} ms = {row['allreduce_ms'] / row['ms_median']:.0%} of the step"
             if row.get("allreduce_ms") is not None else "")
    return (f" [torchrun, {di.world} process{'es' if di.world > 1 else ''} x {threads} "
            f"thread{'s' if threads > 1 else ''}{share}]")


if __name__ == "__main__":
    main()
