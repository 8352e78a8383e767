"""Time to quality: which lever makes BEGAN's samples sharp and on the data, fast (issue 25).

The collapse study (collapse_study.py; the data, training and scoring both use: studylib.py)
found the escape that gives variety; this one asks what then gives fidelity, and how soon. Every
run is ``fastbegan train --variant escape --ema-decay 0.999`` (today's default plus an EMA of
G's weights, which does not change training) with the same seed, res 32, on the embedded
faces and on scikit-learn's digits. A lever that acts from step S on is a *fork*: its run
starts from the escape run's checkpoint at S (the same trajectory up to there; a run from
scratch with the same flags is that trajectory) and continues with its flags.

Each checkpoint is scored in several *views* of the same run: the trained weights (raw) and
their EMA, each with z ~ U(-1, 1) and truncated to U(-t, t) at sample time. Per view:
k-NN precision and recall (fastbegan.metrics.fidelity; faces: the factor regressor's
features, digits: a fixed random CNN's), SWD, diversity ratio, kinds of digit covered
(faces: factor coverage, render fidelity). Time to quality: the training seconds (from the
run's metrics.jsonl, evaluation excluded) until the first checkpoint with precision >= 0.5
and recall >= 0.5, or the best min(precision, recall) reached.

    python benchmarks/quality_study.py --datasets digits --levers escape anneal --steps 4000
    python benchmarks/quality_study.py --levers escape pt-anneal --steps 10000   # finalists

Runs are resumed, and scored rows are kept in the results JSON (a row is scored once), so
the study can be run in stages: pilots to 4,000 steps, then finalists to 10,000.
Writes benchmarks/results/quality-<cpu>-<date>.json / .md and sample grids in
benchmarks/results/quality-<date>/. Needs scikit-learn.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from studylib import (RES, RESULTS, _fmt, load_data, logged_k, open_results, real_baselines, score,  # noqa: E402
                      train_cli, train_seconds, write_results)

BASE = ["--variant", "escape", "--ema-decay", "0.999"]
# name -> (flags on top of BASE, (parent run, step it forks from) or None)
LEVERS = {
    "escape": ([], None),                                              # today's default
    "anneal": (["--pt-anneal", "2000", "3000", "--k-min-anneal", "2000", "3000"], ("escape", 2000)),
    "pt-anneal": (["--pt-anneal", "2000", "3000"], ("escape", 2000)),  # the floor stays
    "lr-decay": (["--lr-half-every", "2000"], ("escape", 1500)),       # lr halved at 2k, 4k, ... (min 2e-5)
    "pt-0.05": (["--pt-anneal", "2000", "2500", "--pt-final", "0.05"], ("escape", 2000)),  # a weaker escape
    "pt-0.025": (["--pt-anneal", "2000", "2500", "--pt-final", "0.025"], ("escape", 2000)),
    "pt-0.3": (["--pt-anneal", "2000", "2500", "--pt-final", "0.3"], ("escape", 2000)),  # a stronger one
    "kmin-0.15": (["--k-min", "0.15"], ("escape", 2000)),  # D pushes back harder from step 2,000 on
    "gamma-0.3": (["--gamma", "0.3"], ("escape", 2000)),  # the paper: lower gamma, sharper, less varied
}
VIEWS = {"raw": dict(raw=True, truncate=1.0), "ema": dict(raw=False, truncate=1.0),
         "raw-t0.5": dict(raw=True, truncate=0.5), "ema-t0.5": dict(raw=False, truncate=0.5)}
TARGET = 0.5  # precision and recall both at least this: "quality reached"


def eval_steps(steps: int) -> list[int]:
    """Every 500 steps to 4,000, then every 1,000."""
    return [s for s in list(range(500, 4001, 500)) + list(range(5000, 100_001, 1000)) if s <= steps]


def fork(parent: Path, child: Path, step: int) -> None:
    """Start ``child`` from ``parent``'s checkpoint at ``step`` and its log up to there."""
    if (child / "checkpoints").is_dir():
        return
    src = parent / "checkpoints" / f"ckpt_{step:08d}.safetensors"
    if not src.exists():
        raise FileNotFoundError(f"{src} (train {parent.name} to step {step} first)")
    (child / "checkpoints").mkdir(parents=True)
    shutil.copy(src, child / "checkpoints" / src.name)
    rows = [line for line in (parent / "metrics.jsonl").read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    (child / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))


def run_dir(work: Path, ds: str, lever: str, res: int) -> Path:
    """A lever's run folder: DATASET-LEVER at res 32, DATASET<res>-LEVER at another res."""
    return work / f"{ds}{'' if res == RES else res}-{lever}"


def train_lever(work: Path, ds: str, lever: str, data: dict, steps: int, threads: int, seed: int,
                res: int = RES) -> Path:
    """Train (or resume) a lever's run to ``steps``: forked from its parent's run at the fork
    step, unless the run already exists (e.g. trained straight through with the same flags,
    which up to the fork are the parent's)."""
    flags, parent = LEVERS[lever]
    run = run_dir(work, ds, lever, res)
    if parent is not None and not (run / "checkpoints").is_dir():
        train_lever(work, ds, parent[0], data, max(parent[1], 500), threads, seed, res)
        fork(run_dir(work, ds, parent[0], res), run, parent[1])
    done = (run / "checkpoints" / f"ckpt_{steps:08d}.safetensors").exists()
    if not done:
        train_cli(run, [*BASE, *flags], data["path"], steps, 500, threads, seed, res=res)
    return run


def first_own_step(lever: str, run: Path) -> int:
    """The first evaluated step at which ``lever``'s run can differ from its parent's (0 for a
    run trained straight through: it has checkpoints before the fork step)."""
    parent = LEVERS[lever][1]
    if parent is None or any(int(c.stem.split("_")[1]) < parent[1] for c in (run / "checkpoints").glob("ckpt_*")):
        return 0
    return parent[1] + 1


def score_run(run: Path, ds: str, lever: str, d: dict, steps: int, n: int, done: set,
              views: list[str] = list(VIEWS)) -> list[dict]:
    """Rows for every evaluated checkpoint and view of ``run`` not scored yet (``done``)."""
    rows = []
    for s in [s for s in eval_steps(steps) if s >= first_own_step(lever, run)]:
        ckpt = run / "checkpoints" / f"ckpt_{s:08d}.safetensors"
        for view, kw in [(v, VIEWS[v]) for v in views]:
            if (ds, lever, s, view) in done or not ckpt.exists():
                continue
            r = {"dataset": ds, "lever": lever, "view": view, "step": s, "k_t": logged_k(run, s),
                 "loss_ratio": loss_ratio(run, s), "train_s": round(train_seconds(run, s), 1)}
            r.update(score(ckpt, ds, d["ref"], d["train"], n, d["clf"], full=kw["truncate"] == 1.0, **kw))
            rows.append(r)
            print(f"{ds}-{lever} step {s} {view}: P {r['precision']:.3f} R {r['recall']:.3f} "
                  f"SWD {r['swd_x1e3']:.1f}", flush=True)
    return rows


def logged_losses(run: Path, step: int, window: int = 500) -> list[tuple[float, float]]:
    """(L_real, L_fake) of the run's logged rows in (step - window, step]."""
    from fastbegan.health import read_metrics
    return [(r["loss_real"], r["loss_fake"]) for r in read_metrics(run / "metrics.jsonl")
            if step - window < r["step"] <= step and r.get("loss_real")]


def loss_ratio(run: Path, step: int, window: int = 500) -> float | None:
    """Median L_fake / L_real of the logged rows in (step - window, step]: where it is above
    gamma, the paper's k_t update is negative (k_t sits on the floor)."""
    vals = [fake / real for real, fake in logged_losses(run, step, window)]
    return float(np.median(vals)) if vals else None


# ------------------------------------------------------------------------- summary
def lineage(rows: list[dict], ds: str, lever: str, view: str) -> list[dict]:
    """A lever's rows of one view by step, its parent's rows up to the fork included."""
    own = {r["step"]: r for r in rows if (r["dataset"], r["lever"], r["view"]) == (ds, lever, view)}
    parent = LEVERS.get(lever, ([], None))[1]
    if parent is not None:
        for r in lineage(rows, ds, parent[0], view):
            if r["step"] <= parent[1]:
                own.setdefault(r["step"], r)
    return [own[s] for s in sorted(own)]


def time_to_quality(series: list[dict], target: float = TARGET) -> dict:
    """The first row with precision and recall >= target (``reached``), else the best
    min(precision, recall) row: its step, training seconds, precision and recall."""
    if not series:
        return {}
    hit = next((r for r in series if r["precision"] >= target and r["recall"] >= target), None)
    best = hit or max(series, key=lambda r: min(r["precision"], r["recall"]))
    return {"reached": hit is not None, "step": best["step"], "train_s": best["train_s"],
            "precision": best["precision"], "recall": best["recall"]}


def summary(rows: list[dict], ds: str, at=(2000, 5000, 10000)) -> list[dict]:
    out = []
    levers = list(dict.fromkeys(r["lever"] for r in rows if r["dataset"] == ds))
    for lever in levers:
        for view in VIEWS:
            series = lineage(rows, ds, lever, view)
            if not series:
                continue
            by_step = {r["step"]: r for r in series}
            out.append({"lever": lever, "view": view, "at": {s: by_step[s] for s in at if s in by_step},
                        "last": series[-1], "ttq": time_to_quality(series)})
    return out


# ------------------------------------------------------------------------- report
def _cell(r: dict | None, ds: str) -> str:
    """precision / recall / SWD / diversity / kinds (faces: factor coverage) of one row."""
    if r is None:
        return "-"
    kinds = r.get("classes_2pct") if ds == "digits" else r.get("factor_coverage")
    return " / ".join(_fmt(v) for v in (r["precision"], r["recall"], r["swd_x1e3"], r["diversity_ratio"], kinds))


def _ttq(t: dict) -> str:
    if not t:
        return "-"
    what = "reached" if t["reached"] else "best"
    return (f"{t['train_s']:.0f} s (step {t['step']}, {what}: P {t['precision']:.2f} R {t['recall']:.2f})")


def markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"# Time to quality: levers on top of the escape ({m['device']})", "",
             f"- date {m['created']}, git {m['commit']}, torch {m['torch']}; res {m.get('res', RES)}, batch 16, n 64, "
             f"seed {m['seed']}, {m['threads']} thread(s) per run, one run at a time, on a machine shared with "
             "other work (train s: seconds in training steps from each run's metrics.jsonl, evaluation excluded; "
             "compare them loosely)",
             *([f"- {m['note']}"] if m.get("note") else []),
             "- every run: `fastbegan train " + " ".join(BASE) + "` plus its lever's flags; the EMA (decay "
             "0.999) does not change training, so **escape** raw is `--variant escape` (the default before this "
             "study) exactly, and **pt-0.05** ema is `--variant settle` (the default chosen from it)",
             "- levers: " + "; ".join(f"**{k}** `{' '.join(v[0]) or '(none)'}`"
                                      + (f" (forked from {v[1][0]} at step {v[1][1]})" if v[1] else "")
                                      for k, v in m["levers"].items()),
             "- views: " + ", ".join(f"**{k}** ({'trained weights' if v['raw'] else 'EMA of the weights'}, "
                                     f"z ~ U(-{v['truncate']:g}, {v['truncate']:g}))" for k, v in VIEWS.items()),
             "- cells: k-NN precision / recall (k 3; faces: factor regressor's features, 512 vs 512 fresh faces; "
             "digits: fixed random CNN's features, 297 samples vs the 297 held-out digits) / SWD x1e3 / "
             "diversity ratio / kinds of digit with >= 2% of 512 samples (faces: factor coverage)",
             "- details: k_t logged at the checkpoint; L_f/L_r (loss_ratio): median L_fake / L_real of the rows "
             "logged in the 500 steps up to it (while it is above gamma, the paper's k_t update is negative)",
             f"- time to quality: training seconds until precision >= {TARGET} and recall >= {TARGET} first "
             "(checkpoints every 500 steps to 4,000, then every 1,000), or the best min(P, R) reached", ""]
    for ds in doc["datasets"]:
        base = doc["real_baselines"].get(ds, {})
        lines += [f"## {ds}", "", "| lever | view | step 2,000 | step 5,000 | step 10,000 | last scored | "
                  "time to quality |", "|---|---|---|---|---|---|---|",
                  f"| real images | - | {_cell(base, ds) if base else '-'} | | | | |"]
        for s in summary(doc["rows"], ds):
            last = s["last"]
            lines.append(f"| {s['lever']} | {s['view']} | " + " | ".join(_cell(s["at"].get(t), ds)
                                                                    for t in (2000, 5000, 10000))
                         + f" | {_cell(last, ds)} (step {last['step']}) | {_ttq(s['ttq'])} |")
        lines += ["", details(doc["rows"], ds), ""]
    return "\n".join(lines) + "\n"


def details(rows: list[dict], ds: str) -> str:
    """Every scored row of the trained weights' view (all metrics), by lever and step."""
    cols = ["k_t", "loss_ratio", "train_s", "precision", "recall", "swd_x1e3", "diversity_ratio", "nn_ratio"]
    cols += (["factor_coverage", "render_fidelity", "precision_rcnn", "recall_rcnn"] if ds == "faces"
             else ["class_entropy", "classes_2pct"])
    out = [f"<details><summary>{ds}: every scored checkpoint, trained weights (raw)</summary>", "",
           "| lever | step | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in sorted((r for r in rows if r["dataset"] == ds and r["view"] == "raw"),
                    key=lambda r: (r["lever"], r["step"])):
        out.append(f"| {r['lever']} | {r['step']} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(out + ["", "</details>"])


# ------------------------------------------------------------------------- main
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4000, help="train every lever's run to this step")
    ap.add_argument("--levers", nargs="*", default=list(LEVERS))
    ap.add_argument("--datasets", nargs="*", default=["digits", "faces"])
    ap.add_argument("--work", default="runs/quality", help="run folders (resumed if present)")
    ap.add_argument("--threads", type=int, default=1, help="threads per run (one run at a time)")
    ap.add_argument("--n", type=int, default=512, help="images scored per checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--res", type=int, default=RES, help="resolution (the digits: 32 only)")
    ap.add_argument("--views", nargs="*", default=list(VIEWS), choices=list(VIEWS), help="views scored")
    ap.add_argument("--note", default=None, help="a line for the report's header (e.g. how the runs were trained)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--stem", default=None, help="results file stem (default quality-cpu-<cpu>-<date>)")
    ap.add_argument("--report-only", action="store_true", help="train and score nothing: rewrite the .md")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    results = Path(args.results)
    stem, old, dev = open_results(results, args.stem, "quality")
    rows, baselines = old.get("rows", []), old.get("real_baselines", {})
    datasets = list(dict.fromkeys(old.get("datasets", []) + args.datasets))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, args.threads))

    def write() -> None:
        write_results(stem, markdown, dev, args, old, datasets, rows, baselines, threads=args.threads,
                      n_scored=args.n, levers=LEVERS, views=VIEWS, target=TARGET)

    if not args.report_only:
        data = load_data(args.datasets, work, args.seed, args.res)
        for ds, d in data.items():
            if ds not in baselines:
                baselines[ds] = real_baselines(ds, d["ref"], d["other"], d["train"], args.n, d["clf"])
        for ds in args.datasets:
            for lever in args.levers:
                run = train_lever(work, ds, lever, data[ds], args.steps, args.threads, args.seed, args.res)
                done = {(r["dataset"], r["lever"], r["step"], r["view"]) for r in rows}
                rows.extend(score_run(run, ds, lever, data[ds], args.steps, args.n, done, args.views))
                copy_grid(run, results / f"quality-{stamp}", run.name, args.steps)
                write()
    write()
    print(f"wrote {stem}.json / .md")


def copy_grid(run: Path, dest: Path, name: str, step: int) -> None:
    src = run / "samples" / f"fake_{step:08d}.png"
    if src.exists():
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest / f"{name}-{step}.png")


if __name__ == "__main__":
    main()
