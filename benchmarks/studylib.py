"""What the studies share (collapse_study.py, quality_study.py, fidelity_spaces.py): the data
(the embedded faces; scikit-learn's handwritten digits at 32x32 and a classifier of their
kinds), training through ``fastbegan train``, reading a run's log, and scoring a checkpoint
with the project's own metrics (diversity ratio, factor score, SWD, nearest-neighbour ratio,
k-NN precision/recall) next to real-vs-real baselines.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

RES = 32
RESULTS = Path(__file__).resolve().parent / "results"


def digits_arrays(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train, held_out) as (N, 32, 32, 3) uint8, and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.images))
    imgs = (d.images[order] * (255.0 / 16.0)).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((RES, RES), Image.LANCZOS)) for im in imgs])
    rgb = np.repeat(big[..., None], 3, axis=3)
    labels = d.target[order]
    return rgb[:1500], rgb[1500:], labels[:1500], labels[1500:]


def digit_classifier(train: np.ndarray, labels: np.ndarray):
    """Logistic regression on the 8x8 grey digits (as load_digits gives them)."""
    from sklearn.linear_model import LogisticRegression
    return LogisticRegression(max_iter=2000).fit(to_digit_features(train), labels)


def to_digit_features(images_u8: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) uint8 -> (N, 64) on load_digits' 0..16 scale (4x4 average pooling)."""
    g = images_u8.astype(np.float32).mean(3)
    g = g.reshape(len(g), 8, 4, 8, 4).mean((2, 4)).reshape(len(g), 64)
    return g * (16.0 / 255.0)


def train_cli(out: Path, flags: list[str], data: str | None, steps: int, every: int, threads: int,
              seed: int, res: int = RES) -> None:
    """``fastbegan train`` to ``steps`` with ``flags``, a checkpoint and a sample grid every
    ``every`` steps (all kept), resumed if ``out`` holds checkpoints; output in OUT.log."""
    cmd = [sys.executable, "-m", "fastbegan", "train", "--res", str(res), "--steps", str(steps),
           "--seed", str(seed), "--log-every", "50", "--ckpt-every", str(every), "--keep-ckpts", "1000",
           "--sample-every", str(every), "--no-progress", "--out", str(out), *flags]
    if data:
        cmd += ["--data", data]
    if (out / "checkpoints").is_dir():
        cmd.append("--resume")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with open(out.parent / f"{out.name}.log", "a") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=log)


def train_seconds(run: Path, upto: int | None = None) -> float:
    """Seconds spent in steps (up to step ``upto``), from the run's own log (resumed runs included)."""
    total, prev = 0.0, 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if upto is not None and r["step"] > upto:
            break
        if r["step"] > prev and r.get("steps_per_s"):
            total += (r["step"] - prev) / r["steps_per_s"]
            prev = r["step"]
    return total


def logged_diversity(run: Path, step: int, window: int = 500) -> float | None:
    from fastbegan.health import read_metrics
    vals = [r["diversity_ratio"] for r in read_metrics(run / "metrics.jsonl")
            if step - window < r["step"] <= step and isinstance(r.get("diversity_ratio"), (int, float))
            and math.isfinite(r["diversity_ratio"])]
    return float(np.mean(vals)) if vals else None


def logged_k(run: Path, step: int, key: str = "k") -> float | None:
    """The run's newest logged ``key`` (k_t; or ``gamma``, adapted with --k-target) at or before ``step``."""
    from fastbegan.health import read_metrics
    rows = [r for r in read_metrics(run / "metrics.jsonl") if r["step"] <= step]
    return rows[-1].get(key) if rows else None


def score(ckpt: Path, dataset: str, real_ref: np.ndarray, train: np.ndarray, n: int, clf=None, *,
          raw: bool = True, truncate: float = 1.0, full: bool = True) -> dict:
    """The metrics of ``n`` samples of a checkpoint's G (``raw`` weights or its EMA; z drawn
    from U(-truncate, truncate)); ``full=False`` leaves out the NN ratio and the factor score."""
    from fastbegan import metrics as Q
    from fastbegan.evaluate import nearest_neighbours
    from fastbegan.health import batch_diversity
    from fastbegan.images import to_unit_range
    from fastbegan.sampling import generate, load_generator, sample_z
    g = load_generator(ckpt, raw=raw)
    fake = generate(g, sample_z(n, g.fc.in_features, 1234, truncate))
    ref = to_unit_range(real_ref[:n])
    out = {"weights": g.weights, "diversity_ratio": float(batch_diversity(fake[:256]) / batch_diversity(ref[:256]))}
    out["swd_x1e3"] = Q.swd(real_ref[:n], fake, seed=0).mean
    out.update(fidelity_scores(dataset, real_ref, fake))
    if full:
        d_fake, _ = nearest_neighbours(fake, train, k=1)
        d_real, _ = nearest_neighbours(ref, train, k=1)
        out["nn_ratio"] = float(d_fake[:, 0].median() / d_real[:, 0].median())
    if dataset == "faces" and full:
        est = Q.FactorEstimator.load_or_train(real_ref.shape[1], log=lambda *_: None)
        f = Q.factor_score(est, real_ref[:n], fake)
        out["factor_coverage"] = f["factor_score"]
        out["render_fidelity"] = f["render_fidelity"]
        out["factor_recall"] = f["recall"]
    elif dataset != "faces":
        out.update(digit_kinds(fake, clf))
    return out


def digit_kinds(images, clf) -> dict:
    """Spread over the ten kinds: class entropy and kinds with >= 2% of the images (float
    NCHW in [-1, 1] or uint8 NHWC), classified by ``clf`` (:func:`digit_classifier`)."""
    if torch.is_tensor(images):
        images = ((images.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    p = np.bincount(clf.predict(to_digit_features(images)), minlength=10) / len(images)
    return {"class_entropy": float(-(p[p > 0] * np.log(p[p > 0])).sum()), "classes_2pct": int((p >= 0.02).sum())}


def fidelity_scores(dataset: str, real_ref: np.ndarray, fake) -> dict:
    """k-NN precision/recall (k 3) of ``fake`` against ``real_ref`` in ``fastbegan eval``'s
    feature spaces: ``precision``/``recall`` in the primary one (faces: the factor
    regressor's; digits: the random CNN's), ``precision_rcnn``/``recall_rcnn`` in the random
    CNN's on the faces as well."""
    from fastbegan import metrics as Q
    from fastbegan.evaluate import fidelity_spaces
    out = {}
    for i, space in enumerate(fidelity_spaces(dataset == "faces")):
        f = Q.fidelity(real_ref, fake, Q.feature_extractor(space, real_ref.shape[1]))
        suffix = "" if i == 0 else "_rcnn"
        out[f"precision{suffix}"], out[f"recall{suffix}"] = f["precision"], f["recall"]
    return out


def real_baselines(dataset: str, real_ref: np.ndarray, real_other: np.ndarray, train: np.ndarray,
                   n: int, clf=None) -> dict:
    """The same metrics for real images against real images: the best reachable values.

    ``real_other`` stands in for the generator: fresh faces, or for the digits (297 held-out
    images only) training images; the NN ratio compares two halves of ``real_ref``.
    """
    from fastbegan import metrics as Q
    from fastbegan.evaluate import nearest_neighbours
    from fastbegan.health import batch_diversity
    from fastbegan.images import to_unit_range
    a, b = to_unit_range(real_ref[:n]), to_unit_range(real_other[:n])
    out = {"diversity_ratio": float(batch_diversity(b[:256]) / batch_diversity(a[:256])),
           "swd_x1e3": Q.swd(real_ref[:n], real_other[:n], seed=0).mean}
    # NN ratio from two halves of the held-out images (never training images: those would
    # give ~0, the value of a generator that memorised its data)
    half = min(n, len(real_ref)) // 2
    out["nn_ratio"] = float(nearest_neighbours(a[half:2 * half], train, k=1)[0][:, 0].median()
                            / nearest_neighbours(a[:half], train, k=1)[0][:, 0].median())
    out.update(fidelity_scores(dataset, real_ref[:n], real_other[:n]))
    if dataset == "faces":
        est = Q.FactorEstimator.load_or_train(real_ref.shape[1], log=lambda *_: None)
        f = Q.factor_score(est, real_ref[:n], real_other[:n])
        out.update(factor_coverage=f["factor_score"], render_fidelity=f["render_fidelity"],
                   factor_recall=f["recall"])
    else:
        out.update(digit_kinds(real_other[:n], clf))
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    v = v + 0.0  # no "-0.0000"
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def load_data(datasets: list[str], work: Path, seed: int, res: int = RES) -> dict:
    """Per data set: the training images (digits: saved as a .npy for ``--data``; faces: the
    embedded set), held-out reference images, a second real sample, and the digit classifier.
    NHWC uint8 at ``res`` (the digits only at RES: they are 8x8 images scaled up)."""
    data = {}
    if "digits" in datasets:
        if res != RES:
            raise ValueError(f"the digits are studied at res {RES} only (8x8 images scaled up), not {res}")
        tr, ho, ytr, yho = digits_arrays(seed)
        np.save(work / "digits32-train.npy", tr)
        clf = digit_classifier(tr, ytr)
        data["digits"] = dict(path=str(work / "digits32-train.npy"), train=tr, ref=ho, other=tr[-len(ho):],
                              clf=clf, accuracy=float((clf.predict(to_digit_features(ho)) == yho).mean()))
    if "faces" in datasets:
        from fastbegan.data import procedural_faces
        train = procedural_faces(4096, res, seed=seed)[0]
        fresh = procedural_faces(1024, res, seed=seed + 10_000)[0]
        data["faces"] = dict(path=None, train=train, ref=fresh[:512], other=fresh[512:], clf=None)
    return data


# ------------------------------------------------------------------------- results files
def open_results(results: str | Path, stem: str | None, prefix: str) -> tuple[Path, dict, str]:
    """A study's results file, to be resumed: (stem path without suffix, the JSON written so
    far or {}, this CPU's name). Default stem ``<prefix>-cpu-<cpu>-<date>`` in ``results``."""
    import datetime as dt

    from fastbegan.bench.device import device_info, slugify
    dev = device_info(torch.device("cpu"))["name"]
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    path = Path(results) / (stem or f"{prefix}-cpu-{slugify(dev.replace('CPU: ', ''))}-{stamp}")
    old = json.loads(path.with_suffix(".json").read_text()) if path.with_suffix(".json").exists() else {}
    return path, old, dev


def write_results(stem: Path, markdown, dev: str, args, old: dict, datasets: list, rows: list, baselines: dict,
                  **meta) -> None:
    """Write a study's ``stem``.json (meta, data sets, scored rows, real baselines) and its
    ``markdown(doc)`` report; the meta has the date, device, commit, torch, seed, res and note
    (the one given, else the file's), and ``meta`` on top."""
    import datetime as dt

    from fastbegan.bench.device import git_commit
    meta = {"created": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "device": dev,
            "commit": git_commit()["commit"], "torch": torch.__version__, "seed": args.seed, "res": args.res,
            "note": args.note or old.get("meta", {}).get("note"), **meta}
    doc = {"meta": meta, "datasets": datasets, "rows": rows, "real_baselines": baselines}
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(doc))
