"""Which cases a run measures, in priority order, and their display names."""
from __future__ import annotations

import json
import os

import torch

# `pytest benchmarks/` on a CPU times tiny shapes (a smoke test of the plumbing); with this
# set to 1 it times the real training step instead (res 32 and 64, n 64, batch 16), each
# case in its own process (bench/isolated.py): the CPU evidence in benchmarks/results.
CPU_REAL_ENV = "FASTBEGAN_BENCH_CPU_REAL"
CPU_REAL_SHAPES = [dict(res=32, batch=16, filters=64), dict(res=64, batch=16, filters=64)]
STEP_VARIANTS = "pabcde"  # the training step: the port baseline and fastbegan without compile too
# The CPU real shapes run every variant this many times, interleaved (all variants, then all
# again), each time in a new process; a row is the median of its processes' medians. A
# shared VM's speed drifts by tens of percent within minutes, so variants measured minutes
# apart, once each, compare the machine's moods as much as the steps.
CPU_REAL_REPEATS_ENV = "FASTBEGAN_BENCH_CPU_REPEATS"


def cpu_real_shapes() -> bool:
    return os.environ.get(CPU_REAL_ENV) == "1"


def cpu_real_repeats() -> int:
    return max(1, int(os.environ.get(CPU_REAL_REPEATS_ENV, 3)))


def case_name(workload: str, p: dict) -> str:
    if workload in ("train_step", "D_fwd_bwd", "G_fwd"):
        world = f" torchrun x{p['world']}" if "world" in p else ""
        return f"res{p['res']} b{p['batch']} n{p['filters']}{world}"
    if workload in ("conv_elu", "up_conv_elu"):
        hw = p["hw"]
        out = hw * 2 if workload == "up_conv_elu" else hw
        return f"b{p['batch']} {p['c_in']}->{p['c_out']} {hw}x{hw}->{out}x{out}"
    if workload == "l1_loss":
        return f"b{p['batch']} 3x{p['res']}x{p['res']}"
    if workload == "matmul_peak":
        return f"{p['n']}^3"
    return json.dumps(p, sort_keys=True)


def default_cases(device: torch.device, quick: bool = False) -> list[tuple[str, str, dict]]:
    """(workload, variant, params) in run order: peak first, then eager/fused cases, then compiled."""
    gpu = device.type == "cuda"
    if not gpu and cpu_real_shapes():
        steps = [("train_step", v, dict(p, repeat=i)) for i in range(cpu_real_repeats())
                 for p in CPU_REAL_SHAPES for v in STEP_VARIANTS]
        return [("matmul_peak", "bf16", dict(n=2048))] + steps
    if gpu:
        model_shapes = [dict(res=r, batch=b, filters=128 if r >= 128 else 64)
                        for r in (128, 64, 32) for b in (16, 64)]
        conv_shapes = [dict(batch=32, c_in=128, c_out=128, hw=64), dict(batch=32, c_in=128, c_out=128, hw=128)]
        up_shapes = [dict(batch=32, c_in=128, c_out=128, hw=64)]
        l1_shapes = [dict(batch=128, res=128)]
        mm = [dict(n=8192), dict(n=4096)]
    else:
        model_shapes = [dict(res=8, batch=4, filters=8), dict(res=16, batch=4, filters=8)]
        conv_shapes = [dict(batch=2, c_in=8, c_out=8, hw=16)]
        up_shapes = [dict(batch=2, c_in=8, c_out=8, hw=8)]
        l1_shapes = [dict(batch=8, res=16)]
        mm = [dict(n=512)]
    # D fwd+bwd and G fwd: the larger batch only on GPU (the step covers both batches)
    part_shapes = [p for p in model_shapes if p["batch"] == 64] if gpu else model_shapes
    if quick:
        model_shapes = part_shapes = model_shapes[:1]
    cases = [("matmul_peak", "bf16", p) for p in mm]
    # priority order: the step, the kernels, then D and G; compiled cases last, the
    # res-128/64 step first among them (a budget cut drops the tail)
    eager, compiled = [], []
    for wl, shapes in (("train_step", model_shapes), ("conv_elu", conv_shapes), ("up_conv_elu", up_shapes),
                       ("l1_loss", l1_shapes), ("D_fwd_bwd", part_shapes), ("G_fwd", part_shapes)):
        for p in shapes:
            for v in STEP_VARIANTS if wl == "train_step" else "abcd":
                (compiled if v == "c" or (v == "d" and not gpu) else eager).append((wl, v, p))
    first = [c for c in compiled if c[0] == "train_step" and c[2]["batch"] == model_shapes[0]["batch"]][:2]
    kernels = [c for c in compiled if c[0] in ("conv_elu", "up_conv_elu", "l1_loss")]
    compiled = first + kernels + [c for c in compiled if c not in first and c not in kernels]
    return cases + eager + compiled
