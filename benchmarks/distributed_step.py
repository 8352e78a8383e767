"""The training step in one process and under torchrun, and the all-reduce's share of it.

    python benchmarks/distributed_step.py             # CPU: ~30 minutes on 2 cores; run it alone
    python benchmarks/distributed_step.py --tiny      # the plumbing at res 8 (a minute; git-ignored file)
    python benchmarks/distributed_step.py --device cuda   # GPU: the all-reduce's cost inside the graph

Writes ``benchmarks/results/<device>-distributed-<date>.json`` / ``.md`` (or into
``$FASTBEGAN_BENCH_RESULTS``), a results file of the benchmark suite's schema
(benchmarks/README.md), every case in its own processes (``fastbegan.bench.isolated``),
all of them ``--repeats`` times, interleaved, each row the median of its processes' medians.

CPU (res 32 and 64, n 64, global batch 16): the reference step (b: bf16 eager, what
``--reference-step`` runs) and the fused step (d: bf16, torch.compile'd, what a long
``fastbegan train`` runs), each in one process with the machine's threads and under
torchrun with 2 processes of 1 thread (case ``... torchrun x2``: 8 rows each). In the
torchrun cases "vs best(b,c)" of row d is the fused step over the reference step, both
under torchrun, and the note gives the host time of the all-reduce and its share of the
step (gloo: the collective itself, waiting for the slower rank included).

GPU: the fused step (d: triton kernels, compiled, CUDA graph) plain and in a process group
of one process (``torchrun x1``), whose step all-reduces its gradients inside the captured
graph: the difference is the collective's cost at world size 1.
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys

import torch

from fastbegan.bench.device import default_results_dir, slugify
from fastbegan.bench.isolated import run_in_subprocess
from fastbegan.bench.session import BenchSession
from fastbegan.model import default_filters


def plan(device: str, repeats: int, tiny: bool, res: list[int] | None = None) -> list[tuple[str, dict]]:
    """(variant, params) in run order: all cases, then all again (interleaved repeats)."""
    if tiny:
        res = [8]
    res = res or ([64, 128] if device == "cuda" else [32, 64])
    shapes = [dict(res=r, batch=4 if tiny else 16, filters=4 if tiny else default_filters(r)) for r in res]
    if device == "cuda":
        runs = [("d", {}), ("d", {"world": 1})]
    else:
        fused = "e" if tiny else "d"  # --tiny: no inductor build, the plumbing only
        runs = [("b", {}), (fused, {}), ("b", {"world": 2}), (fused, {"world": 2})]
    return [(v, dict(p, **w, device=device, repeat=i)) for i in range(repeats) for p in shapes for v, w in runs]


def summary(rows: list[dict]) -> list[str]:
    """The file's conclusions, one line per shape: under torchrun x2, the fused step over the
    reference step and the all-reduce's share of the fused step; under torchrun x1 (GPU),
    what the process group and its all-reduce add to the plain fused step."""
    ms: dict[tuple, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            ms.setdefault((r["case"], r["variant"]), []).append(r)

    def median(case, variant):
        return statistics.median(r["ms_median"] for r in ms[(case, variant)])
    out = []
    for case, variant in sorted(ms):
        if variant not in "de" or "torchrun" not in case:
            continue
        t = median(case, variant)
        if (case, "b") in ms:
            shares = [r["allreduce_ms"] / r["ms_median"] for r in ms[(case, variant)] if r.get("allreduce_ms")]
            out.append(f"{case}: fused step ({variant}) {t:.1f} ms, reference step (b) {median(case, 'b'):.1f} ms: "
                       f"{median(case, 'b') / t:.2f}x" + (f"; the all-reduce is {statistics.median(shares):.1%} "
                                                         "of the fused step" if shares else ""))
        plain = case.split(" torchrun")[0]
        if case.endswith("torchrun x1") and (plain, variant) in ms:
            base = median(plain, variant)
            out.append(f"{plain}: fused step ({variant}) {base:.3f} ms in one process, {t:.3f} ms in a process "
                       f"group of one (its all-reduce inside the CUDA graph): {t - base:+.3f} ms ({t / base - 1:+.1%})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--res", type=int, action="append", help="resolutions (repeatable; default: CPU 32 and "
                    "64, GPU 64 and 128; n is the model's default for each)")
    ap.add_argument("--tiny", action="store_true", help="res 8, n 4, batch 4, no compile: the plumbing")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    args = ap.parse_args()
    session = BenchSession.from_env(torch.device(args.device), results_dir=default_results_dir())
    dev = session.meta["device"]
    slug = dev["slug"] if args.device == "cuda" else (
        "cpu-smoke" if args.tiny else "cpu-" + slugify(dev["name"].removeprefix("CPU: ")))
    session.stem = f"{slug}-distributed-{dt.datetime.now().strftime('%Y-%m-%d-%H%M%S')}"
    session.meta["script"] = "benchmarks/distributed_step.py " + " ".join(sys.argv[1:])
    for variant, params in plan(args.device, args.repeats, args.tiny, args.res):
        row = run_in_subprocess("train_step", variant, params, session, timeout_s=args.timeout)
        print(f"{row['case']:<28} {variant}  {row['status']:<6} "
              f"{row['ms_median'] or 0:9.1f} ms  {row.get('reason') or ''}"[:200], flush=True)
    session.meta["notes"] = summary(session.rows)
    json_path, md_path = session.write(complete=True)
    print("\n".join(session.meta["notes"]) + f"\n{json_path}\n{md_path}")


if __name__ == "__main__":
    main()
