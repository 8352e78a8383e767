"""BEGAN's early one-image collapse and its remedies, measured side by side (issue 17).

Every variant trains with the same seed, data and step budget (``fastbegan train``, the
default CPU fast path), on the embedded procedural faces and on a real image set that a
package ships (scikit-learn's 1,797 handwritten digits, 8x8 grey, upscaled to 32x32 and
split into 1,500 training and 297 held-out images). Checkpoints at several steps are
scored with the project's own metrics:

- diversity ratio: the health monitor's mean pairwise distance of 256 generated images
  over that of 256 real ones (fastbegan.health.batch_diversity), and the monitor's own
  logged value (16-image batches) averaged over the last 500 steps;
- faces: factor coverage (mean over the reliably read factors = factor score) and render
  fidelity (fastbegan.metrics), SWD against fresh faces, nearest-neighbour ratio;
- digits: SWD and the nearest-neighbour ratio against the held-out images, and the spread
  over the ten kinds of digit (entropy of the class histogram a classifier trained on the
  real 8x8 digits gives 512 generated images; ln 10 = 2.30 for an even spread).

    python benchmarks/collapse_study.py --steps 5000 --work runs/collapse

writes benchmarks/results/collapse-<cpu>-<date>.json / .md and the final sample grids
(benchmarks/results/collapse-<date>/<data>-<variant>.png). Needs scikit-learn (digits,
classifier): ``pip install scikit-learn``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from studylib import (RES, RESULTS, _fmt, load_data, logged_diversity, logged_k,  # noqa: E402
                      real_baselines, score, train_cli, train_seconds)

VARIANTS = {  # name -> extra `fastbegan train` flags, on top of BEGAN (BASE)
    "began": [],
    "cs": ["--cs-alpha", "0.1"],          # BEGAN-CS, alpha as in the authors' code
    "pt": ["--pt-weight", "0.1"],         # EBGAN's pulling-away term, lambda_PT as in EBGAN
    "kinit": ["--k-init", "0.1"],         # start k_t at 0.1 instead of 0
    "kinit+pt": ["--k-init", "0.1", "--pt-weight", "0.1"],  # both (the best of the 1,500-step pilots)
    "kmin": ["--k-init", "0.1", "--k-min", "0.05"],       # start at 0.1 and never below 0.05
    "kmin+pt": ["--k-init", "0.1", "--k-min", "0.05", "--pt-weight", "0.1"],
}
BASE = ["--variant", "began"]  # explicit: `fastbegan train`'s own default is --variant escape


# ------------------------------------------------------------------------- training
def train_run(out: Path, variant: str, data: str | None, steps: int, every: int, threads: int,
              seed: int) -> None:
    train_cli(out, [*BASE, *VARIANTS[variant]], data, steps, every, threads, seed)


# ------------------------------------------------------------------------- report
COLUMNS = [("k_t", "k"), ("diversity_ratio", "div. ratio (256)"), ("logged_diversity", "div. ratio (monitor)"),
           ("factor_coverage", "factor coverage"), ("render_fidelity", "render fidelity"),
           ("class_entropy", "class entropy"), ("classes_2pct", "kinds >= 2%"),
           ("swd_x1e3", "SWD x1e3"), ("nn_ratio", "NN ratio"), ("precision", "precision"), ("recall", "recall")]


def markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"# BEGAN's early collapse and its remedies ({m['device']})", "",
             f"- date {m['created']}, git {m['commit']}, torch {m['torch']}",
             f"- res {RES}, batch 16, n 64, seed {m['seed']}, {m['steps']} steps per run, same for every variant",
             "- variants: " + "; ".join(f"**{k}** `{' '.join(v) or '(paper)'}`" for k, v in m["variants"].items()),
             "- every run is `fastbegan train --variant began` plus its variant's flags; **kmin+pt** is "
             "`--variant escape`, `fastbegan train`'s default",
             "- diversity ratio: mean pairwise distance of generated / real images (health monitor's "
             "measure; 256 images; monitor: its 16-image value averaged over the last 500 steps)",
             "- faces: factor coverage (factor score) and render fidelity; digits: class entropy (ln 10 = 2.30 "
             "is an even spread over the 10 kinds; logistic regression on the 8x8 digits, held-out accuracy "
             f"{_fmt(m.get('digit_classifier_heldout_accuracy'))}) and kinds with >= 2% of the samples; SWD and "
             "NN ratio against held-out real images (NN ratio well below 1: memorisation)",
             "- real images row: what real images score in the generator's place (faces: 512 fresh faces; "
             "digits: training images; NN ratio: one half of the held-out images against the other)",
             "- train s: seconds spent in the training steps of each run (from its metrics.jsonl; "
             "2 runs at a time, 1 thread each, on a machine shared with other work: not a speed comparison)", ""]
    for ds in doc["datasets"]:
        cols = [c for c in COLUMNS if any(c[0] in r for r in doc["rows"] if r["dataset"] == ds)
                or c[0] in ("k_t", "logged_diversity")]
        lines += [f"## {ds}", "", "| variant | step | " + " | ".join(h for _, h in cols) + " |",
                  "|---|---|" + "---|" * len(cols)]
        base = doc["real_baselines"].get(ds, {})
        lines.append("| real images | - | " + " | ".join(_fmt(base.get(k)) for k, _ in cols) + " |")
        for r in [r for r in doc["rows"] if r["dataset"] == ds]:
            lines.append(f"| {r['variant']} | {r['step']} | " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |")
        secs = {k.split("-", 1)[1]: v for k, v in m.get("train_seconds", {}).items() if k.startswith(ds + "-")}
        if secs:
            lines += ["", "train s: " + ", ".join(f"{v} {t:.0f}" for v, t in secs.items())]
        lines.append("")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- main
def order_of(jobs: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
    return {job: i for i, job in enumerate(jobs)}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--eval-steps", type=int, nargs="*", default=None,
                    help="checkpoints to score (default: 500, 1000, 2000, 3000, --steps)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--datasets", nargs="*", default=["faces", "digits"])
    ap.add_argument("--skip", nargs="*", default=[], help="runs to leave out, as DATASET-VARIANT")
    ap.add_argument("--work", default="runs/collapse", help="run folders (resumed if present)")
    ap.add_argument("--jobs", type=int, default=2, help="runs trained at once")
    ap.add_argument("--threads", type=int, default=1, help="threads per run")
    ap.add_argument("--n", type=int, default=512, help="images scored per checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: rewrite the results files from their scored rows")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    evals = sorted(set(args.eval_steps or [s for s in (500, 1000, 2000, 3000) if s < args.steps] + [args.steps]))
    every = math.gcd(*evals)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = load_data(args.datasets, work, args.seed)

    # variant-major: the faithful BEGAN and each remedy on both data sets before the next
    jobs = [(ds, v) for v in args.variants for ds in args.datasets if f"{ds}-{v}" not in args.skip]
    seconds, rows, lock = {}, [], threading.Lock()
    baselines = {ds: real_baselines(ds, d["ref"], d["other"], d["train"], args.n, d["clf"])
                 for ds, d in data.items()}
    from fastbegan.bench.device import device_info, git_commit, slugify
    dev = device_info(torch.device("cpu"))["name"]
    slug = slugify(dev.replace("CPU: ", ""))
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    results = Path(args.results)
    grids = results / f"collapse-{stamp}"
    stem = results / f"collapse-cpu-{slug}-{stamp}"

    def write() -> None:
        """The results so far (after every run: a study cut short still leaves its rows)."""
        meta = {"created": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "device": dev,
                "commit": git_commit()["commit"], "torch": torch.__version__, "seed": args.seed,
                "steps": args.steps, "variants": {v: VARIANTS[v] for v in args.variants},
                "train_seconds": dict(seconds), "n_scored": args.n,
                "digit_classifier_heldout_accuracy": data.get("digits", {}).get("accuracy")}
        order = order_of(jobs)
        done = sorted(rows, key=lambda r: (r["dataset"], order[(r["dataset"], r["variant"])], r["step"]))
        doc = {"meta": meta, "datasets": args.datasets, "rows": done, "real_baselines": baselines}
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(doc))

    if args.report_only:  # e.g. after a change to the baselines or the report's layout
        rows.extend(r for r in json.loads(stem.with_suffix(".json").read_text())["rows"]
                    if (r["dataset"], r["variant"]) in order_of(jobs))
        for ds, v in {(r["dataset"], r["variant"]) for r in rows}:
            if (work / f"{ds}-{v}" / "metrics.jsonl").exists():
                seconds[f"{ds}-{v}"] = round(train_seconds(work / f"{ds}-{v}"), 1)
        write()
        print(f"rewrote {stem}.json / .md")
        return

    def run(job):
        ds, v = job
        run_dir, d = work / f"{ds}-{v}", data[ds]
        train_run(run_dir, v, d["path"], args.steps, every, args.threads, args.seed)
        seconds[f"{ds}-{v}"] = round(train_seconds(run_dir), 1)
        new = [score_checkpoint(run_dir, ds, v, s, d, args.n) for s in evals]
        grids.mkdir(parents=True, exist_ok=True)
        src = run_dir / "samples" / f"fake_{args.steps:08d}.png"
        if src.exists():
            shutil.copy(src, grids / f"{ds}-{v}.png")
        with lock:
            rows.extend(new)
            write()
        print(f"{ds}-{v}: trained in {seconds[f'{ds}-{v}']:.0f} s, scored", flush=True)

    torch.set_num_threads(max(1, args.threads))
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(run, jobs))
    print(f"wrote {stem}.json / .md and {grids}/")


def score_checkpoint(run_dir: Path, ds: str, variant: str, step: int, d: dict, n: int) -> dict:
    """One scored row: the checkpoint at ``step`` of a run, with k_t and diversity from its log."""
    r = {"dataset": ds, "variant": variant, "step": step, "k_t": logged_k(run_dir, step),
         "logged_diversity": logged_diversity(run_dir, step)}
    r.update(score(run_dir / "checkpoints" / f"ckpt_{step:08d}.safetensors", ds, d["ref"], d["train"], n, d["clf"]))
    return r

if __name__ == "__main__":
    main()
