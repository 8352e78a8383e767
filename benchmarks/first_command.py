"""The README's first command, timed and scored: what a new user sees.

    python benchmarks/first_command.py        # run it alone on the machine (~5 minutes)
    python benchmarks/first_command.py --only "default (this version)" "bf16 forced" "fp32 forced"

Runs ``fastbegan train --res 32 --steps 300`` (the README's first command, data cache
warm, no record of earlier compiled runs: a new user's ``--compile auto``) in a fresh run
folder and, for comparison, the same with the other ``--variant`` (BEGAN as published, or
the collapse escape: docs/training.md), with each ``--precision`` forced (what auto chose
between) and with the step this project shipped before its
CPU work (``--precision fp32 --reference-step --compile off``).
For each: the training time (first step to the last, from the run's own log; start-up,
data and the final samples/plot are reported apart), steps/s, and the variety of the
samples it wrote: the health monitor's diversity ratio (256 generated vs 256 real images)
and the factor coverage of fastbegan.metrics (faces' known factors).
Writes benchmarks/results/cpu-<model>-first-command-<date>.json / .md.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
COMMAND = ["--res", "32", "--steps", "300"]

def runs() -> dict[str, list[str]]:
    """The default, the other --variant, each precision forced (what --precision auto chose
    between on this CPU), and the step shipped before the CPU work."""
    from fastbegan.remedies import DEFAULT_VARIANT
    other = "escape" if DEFAULT_VARIANT == "began" else "began"
    return {"default (this version)": [],
            f"--variant {other}": ["--variant", other],
            "bf16 forced": ["--precision", "bf16"],
            "fp32 forced": ["--precision", "fp32"],
            "before: reference step, fp32, not compiled": ["--precision", "fp32", "--reference-step",
                                                            "--compile", "off"]}


def run(extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "fastbegan", "train", *COMMAND, *extra, "--out", str(out), "--no-progress"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(p.stderr[-2000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # steps/s of each logged interval -> time spent in steps (the first interval includes
    # the first, possibly compiling, step)
    step_s, prev = 0.0, 0
    for r in rows:
        step_s += (r["step"] - prev) / r["steps_per_s"]
        prev = r["step"]
    starts = ("fused", "reference", "device", "variant", "torch.compile")
    lines = [line for line in p.stderr.splitlines() if line.startswith(starts)]
    return {"command": "fastbegan train " + " ".join(COMMAND + extra), "wall_s": wall, "train_s": step_s,
            "steps_per_s": 300 / step_s, "startup_lines": lines, **score(out)}


def score(out: Path) -> dict:
    from fastbegan import metrics as Q
    from fastbegan.checkpoint import latest_checkpoint
    from fastbegan.data import procedural_faces
    from fastbegan.health import batch_diversity
    from fastbegan.images import to_unit_range
    from fastbegan.model import Generator
    from fastbegan.sampling import generate, sample_z
    g = Generator.from_checkpoint(str(latest_checkpoint(out)))
    fake = generate(g, sample_z(512, g.fc.in_features, 1234))
    real = procedural_faces(512, 32, seed=10_000)[0]
    est = Q.FactorEstimator.load_or_train(32, log=lambda *_: None)
    f = Q.factor_score(est, real, fake)
    return {"diversity_ratio": float(batch_diversity(fake[:256]) / batch_diversity(to_unit_range(real[:256]))),
            "factor_coverage": f["factor_score"], "render_fidelity": f["render_fidelity"]}


@contextlib.contextmanager
def no_compile_records():
    """A new user's machine holds no record of earlier compiled runs (fastbegan.autocompile),
    so ``--compile auto`` decides from its defaults: this machine's records are moved aside
    for the measurement and put back afterwards (the measured runs' own are dropped)."""
    from fastbegan.autocompile import records_path
    path = records_path()
    aside = path.with_name(path.name + ".aside")
    if path.exists():
        os.replace(path, aside)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        if aside.exists():
            os.replace(aside, path)


def main() -> None:
    import argparse
    from fastbegan.bench.device import device_info, git_commit, slugify
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="RUN", choices=list(runs()),
                    help="only these runs (names as in the table), e.g. --only 'bf16 forced' 'fp32 forced'")
    ap.add_argument("--note", default=None, help="a line for the results file (e.g. what else the machine ran)")
    args = ap.parse_args()
    dev = device_info(torch.device("cpu"))["name"]
    subprocess.run([sys.executable, "-m", "fastbegan", "train", "--res", "32", "--steps", "1", "--out",
                    tempfile.mkdtemp(), "--no-progress"], capture_output=True, timeout=600)  # data cache
    rows = {}
    with no_compile_records():
        for name, extra in runs().items():
            if args.only and name not in args.only:
                continue
            with tempfile.TemporaryDirectory(prefix="fastbegan-first-") as d:
                rows[name] = run(extra, Path(d) / "run")
            print(name, json.dumps(rows[name]), flush=True)
    doc = {"meta": {"created": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "device": dev,
                    "commit": git_commit()["commit"], "torch": torch.__version__, "note": args.note}, "runs": rows}
    stem = RESULTS / f"cpu-{slugify(dev.removeprefix('CPU: '))}-first-command-{dt.date.today()}"
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    L = [f"# The README's first command on {dev}", "", f"- {doc['meta']['created']}, git {doc['meta']['commit']}, "
         f"torch {doc['meta']['torch']}; samples scored: 512 generated vs fresh procedural faces",
         *([f"- {args.note}"] if args.note else []), "",
         "| run | training s (300 steps) | steps/s | whole command s | diversity ratio | factor coverage | "
         "render fidelity |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        L.append(f"| {name}: `{r['command']}` | {r['train_s']:.1f} | {r['steps_per_s']:.2f} | {r['wall_s']:.1f} | "
                 f"{r['diversity_ratio']:.3f} | {r['factor_coverage']:.3f} | {r['render_fidelity']:.3f} |")
    for name, r in rows.items():
        L += ["", f"Start-up lines of the run '{name}':", ""] + [f"    {x}" for x in r["startup_lines"]]
    stem.with_suffix(".md").write_text("\n".join(L) + "\n")
    print(f"wrote {stem}.json / .md")


if __name__ == "__main__":
    main()
