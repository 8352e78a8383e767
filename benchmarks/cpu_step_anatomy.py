"""Where the CPU training step's time goes, and the numbers behind fastbegan's CPU choices.

    python benchmarks/cpu_step_anatomy.py            # ~10 minutes on 2 cores; run it alone

Writes benchmarks/results/cpu-<model>-anatomy-<date>.json / .md with, on this CPU:

1. torch.compile of the fused step (res 32 and 64, n 64, batch 16; bf16 and fp32): eager
   and compiled ms per step, the first compiled call with an empty inductor cache (cold)
   and again in a new process with the cache filled (warm). fastbegan.autocompile's
   constants (CPU_GAIN, CPU_COLD_COMPILE_S) are read off this table.
2. The glibc allocator setting (fastbegan.hardware.tune_cpu_allocator): minor page faults
   and ms per eager fused step without and with it.
3. Inductor's wrapper (res 32 and 64, bf16): the compiled step with the Python wrapper
   (inductor's default) and with the C++ wrapper (``fastbegan.autocompile.CPU_COMPILE_MODE``),
   both in one process, steps interleaved.
4. Single ops at the res-32 discriminator's largest layer (batch 32, 64 -> 64 channels,
   32x32, bf16, channels_last), each the slow and the fast form the torch backend chose
   between: ELU's derivative, the input gradient call and the upsample adjoint.

Each measurement of 1, 2 and 3 runs in its own process (no state carried between them).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

STEP_CHILD = r"""
import json, os, resource, sys, time
import numpy as np, torch
cfg_kw = json.loads(sys.argv[1])
if cfg_kw.pop("tune_allocator", False):
    from fastbegan.hardware import tune_cpu_allocator
    tune_cpu_allocator()
compile_ = cfg_kw.pop("compile")
steps = cfg_kw.pop("steps")
from fastbegan.step import FusedStep
from fastbegan.train import Trainer, TrainConfig
data = np.random.default_rng(0).integers(0, 256, (256, cfg_kw["res"], cfg_kw["res"], 3), dtype=np.uint8)
cfg = TrainConfig(batch_size=16, filters=64, backend="torch", device="cpu", out="/tmp/fastbegan-anatomy",
                  health_patience=0, reference_step=True, **cfg_kw)
t = Trainer(cfg, data, log=lambda *_: None)
step = FusedStep(t, compile=compile_)
t0 = time.perf_counter(); step(); first = time.perf_counter() - t0
step(); step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
times = []
for _ in range(steps):
    t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps
print(json.dumps({"first_s": first, "ms": sorted(times)[len(times) // 2] * 1e3, "faults_per_step": faults}))
"""


# Two compiled steps in one process. Each forward is wrapped in its own function (its own
# code object): dynamo caches compiled code per code object, and its guards check the
# modules' structure, not their identity, so a second torch.compile of the same step
# function would silently reuse the first one's compilation, whatever its options.
WRAPPER_CHILD = r"""
import json, sys, time
import numpy as np, torch
from fastbegan.hardware import tune_cpu_allocator
tune_cpu_allocator()
from fastbegan import autocompile, step as step_mod
from fastbegan.train import Trainer, TrainConfig
res, steps = json.loads(sys.argv[1])
data = np.random.default_rng(0).integers(0, 256, (256, res, res, 3), dtype=np.uint8)

def python_wrapper(f):
    def forward_a(*a):
        return f(*a)
    return forward_a

def cpp_wrapper(f):
    def forward_b(*a):
        return f(*a)
    return forward_b

runs = {}
for name, mode, wrap in (("python", None, python_wrapper), ("cpp", autocompile.CPU_COMPILE_MODE, cpp_wrapper)):
    cfg = TrainConfig(res=res, batch_size=16, filters=64, backend="torch", device="cpu",
                      out="/tmp/fastbegan-anatomy", health_patience=0, precision="bf16")
    s = step_mod.FusedStep(Trainer(cfg, data, log=lambda *_: None), compile=False)
    f = s.forward
    f.fn, f.mode, f.pending = autocompile._compiled(wrap(f.eager), mode), mode or "default", True
    for _ in range(3):
        s()
    runs[name] = (s, [])
for _ in range(steps):
    for s, times in runs.values():
        t0 = time.perf_counter(); s(); times.append(time.perf_counter() - t0)
print(json.dumps({k: sorted(v)[len(v) // 2] * 1e3 for k, (_, v) in runs.items()}))
"""


def step_child(res: int, precision: str, compile_: bool, steps: int = 15, tune_allocator: bool = True,
               cache: str | None = None) -> dict:
    env = dict(os.environ)
    if cache:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
    job = dict(res=res, precision=precision, compile=compile_, steps=steps, tune_allocator=tune_allocator)
    out = subprocess.run([sys.executable, "-c", STEP_CHILD, json.dumps(job)], capture_output=True, text=True,
                         env=env, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def wrapper_table() -> list[dict]:
    rows = []
    for res, steps in ((32, 60), (64, 24)):
        out = subprocess.run([sys.executable, "-c", WRAPPER_CHILD, json.dumps([res, steps])], capture_output=True,
                             text=True, timeout=1800)
        if out.returncode:
            raise RuntimeError(out.stderr[-2000:])
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append({"res": res, "steps": steps, "python_ms": r["python"], "cpp_ms": r["cpp"],
                     "gain": 1 - r["cpp"] / r["python"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def compile_table() -> list[dict]:
    rows = []
    for res, precision in ((32, "bf16"), (64, "bf16"), (32, "fp32")):
        eager = step_child(res, precision, False)
        with tempfile.TemporaryDirectory(prefix="fastbegan-inductor-") as cache:
            cold = step_child(res, precision, True, cache=cache)
            warm = step_child(res, precision, True, cache=cache)
        rows.append({"res": res, "precision": precision, "eager_ms": eager["ms"], "compiled_ms": cold["ms"],
                     "gain": 1 - cold["ms"] / eager["ms"],
                     "compile_cold_s": cold["first_s"] - eager["ms"] / 1e3,
                     "compile_warm_s": warm["first_s"] - eager["ms"] / 1e3})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def allocator_table() -> list[dict]:
    rows = []
    for tuned in (False, True):
        r = step_child(32, "bf16", False, tune_allocator=tuned)
        rows.append({"allocator": "tuned" if tuned else "glibc defaults", "ms": r["ms"],
                     "faults_per_step": r["faults_per_step"]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _time(fn, n: int = 20) -> float:
    fn(), fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def op_table() -> list[dict]:
    import torch.nn.functional as F
    cl = torch.channels_last
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 64, 32, 32, generator=g).to(torch.bfloat16).contiguous(memory_format=cl)
    y = F.elu(x)
    dy = torch.randn(32, 64, 32, 32, generator=g).to(torch.bfloat16).contiguous(memory_format=cl)
    w = (torch.randn(64, 64, 3, 3, generator=g) * 0.05).to(torch.bfloat16).contiguous(memory_format=cl)
    geom = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)

    pairs = [
        ("ELU' from the output", "where(y > 0, dy, dy * (y + 1))", lambda: torch.where(y > 0, dy, dy * (y + 1)),
         "aten.elu_backward (one pass)", lambda: torch.ops.aten.elu_backward(dy, 1.0, 1, 1, True, y)),
        ("input gradient", "torch.nn.grad.conv2d_input", lambda: torch.nn.grad.conv2d_input(x.shape, w, dy, padding=1),
         "aten.convolution_backward", lambda: torch.ops.aten.convolution_backward(dy, x, w, None, *geom,
                                                                               [True, False, False])),
        ("upsample adjoint (2x2 block sums)", "reshape + sum",
         lambda: dy.unflatten(3, (16, 2)).unflatten(2, (16, 2)).sum((3, 5)),
         "aten.upsample_nearest2d_backward",
         lambda: torch.ops.aten.upsample_nearest2d_backward(dy, [32, 32], [32, 64, 16, 16], None, None)),
    ]
    rows = []
    for what, slow_name, slow, fast_name, fast in pairs:
        rows.append({"op": what, "slow": slow_name, "slow_ms": _time(slow), "fast": fast_name,
                     "fast_ms": _time(fast)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(doc: dict) -> str:
    m = doc["meta"]
    L = [f"# The CPU training step, measured ({m['device']})", "",
         f"- {m['created']}, git {m['commit']}, torch {m['torch']}, {m['threads']} threads",
         "- fused single-pass step, torch backend, n 64, batch 16; medians; each step measurement in "
         "its own process", "", f"## torch.compile of the fused step (mode {m.get('compile_mode', 'default')})", "",
         "| res | precision | eager ms | compiled ms | gain | first compile, cold cache (s) | "
         "again, warm cache (s) |", "|---|---|---|---|---|---|---|"]
    for r in doc["compile"]:
        L.append(f"| {r['res']} | {r['precision']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | "
                 f"{r['gain']:.0%} | {r['compile_cold_s']:.1f} | {r['compile_warm_s']:.1f} |")
    L += ["", "## glibc allocator (res 32, bf16, eager)", "", "| allocator | ms per step | minor page faults "
          "per step |", "|---|---|---|"]
    for r in doc["allocator"]:
        L.append(f"| {r['allocator']} | {r['ms']:.1f} | {r['faults_per_step']:.0f} |")
    L += ["", "## Inductor's wrapper (bf16; both compiled steps in one process, steps interleaved)", "",
          "| res | steps each | Python wrapper ms | C++ wrapper ms | gain |", "|---|---|---|---|---|"]
    for r in doc.get("wrapper", []):
        L.append(f"| {r['res']} | {r['steps']} | {r['python_ms']:.1f} | {r['cpp_ms']:.1f} | {r['gain']:.1%} |")
    L += ["", "## Single ops (batch 32, 64 -> 64 channels, 32x32, bf16, channels_last)", "",
          "| op | slow form | ms | fast form | ms |", "|---|---|---|---|---|"]
    for r in doc["ops"]:
        L.append(f"| {r['op']} | {r['slow']} | {r['slow_ms']:.2f} | {r['fast']} | {r['fast_ms']:.2f} |")
    return "\n".join(L) + "\n"


def main() -> None:
    from fastbegan.bench.device import device_info, git_commit, slugify
    from fastbegan.hardware import configure_threads, tune_cpu_allocator
    from fastbegan.autocompile import CPU_COMPILE_MODE
    configure_threads()
    dev = device_info(torch.device("cpu"))["name"]
    doc = {"meta": {"created": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "device": dev,
                    "commit": git_commit()["commit"], "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "compile_mode": CPU_COMPILE_MODE}}
    doc["allocator"] = allocator_table()
    doc["compile"] = compile_table()
    doc["wrapper"] = wrapper_table()
    tune_cpu_allocator()
    doc["ops"] = op_table()
    stem = RESULTS / f"cpu-{slugify(dev.removeprefix('CPU: '))}-anatomy-{dt.date.today()}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
    print(f"wrote {stem}.json / .md")


if __name__ == "__main__":
    main()
