"""One benchmark run: its rows, its metadata and the budgets that keep it inside its time slot."""
from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .device import device_info, env_info, slugify
from .results import prune_cpu_results, write_results
from .schema import VARIANTS, WORKLOADS

def file_slug(device: dict) -> str:
    """Results-file prefix: the GPU's name; on a CPU ``cpu-<model>`` for the real shapes
    (committed evidence) and ``cpu-smoke`` for the tiny ones (git-ignored)."""
    from .cases import cpu_real_shapes
    if device["type"] != "cpu":
        return device["slug"]
    if not cpu_real_shapes():
        return "cpu-smoke"
    return "cpu-" + slugify(device["name"].removeprefix("CPU: "))


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
            self.stem = f"{file_slug(self.meta['device'])}-{stamp}"
            if self.meta["device"]["type"] == "cpu":
                prune_cpu_results(self.results_dir)
        meta = dict(self.meta, complete=complete, exitstatus=exitstatus,
                    elapsed_s=round(self.elapsed(), 1), compile_used_s=round(self.compile_used_s, 1))
        return write_results(self.rows, meta, self.results_dir, self.stem)
