"""Variety and BEGAN's equilibrium: why k_t sits on its floor, and which lever makes it act (issue 31).

The time-to-quality study (quality_study.py) left every run with k_t on its floor (0.05) and one
background colour on the faces. This study first diagnoses, then compares levers. Every run is
``fastbegan train`` from scratch with the lever's flags (same seed, res 32 unless --res), a
checkpoint every ``--every`` steps. Each checkpoint is scored on:

- D's reconstruction error (the BEGAN loss L, mean |v - D(v)|) on three sets: training images,
  held-out real images and G's samples. ``heldout/train`` above 1 means D has learnt its training
  images rather than the data (then even perfect fakes have L_fake / L_real above 1);
  ``fake/heldout`` is what the equilibrium sees of G beyond that.
- the equilibrium: k_t at the checkpoint, the share of logged steps with k_t on its floor
  (within 1e-3 of --k-min, or 0), and the median L_fake / L_real of the last 500 steps (while it
  is above gamma the paper's update drives k_t down);
- variety and fidelity: k-NN precision / recall (the quality study's feature spaces), SWD,
  factor coverage (faces) or kinds of digit, and on the faces the background hue: how many of 12
  hue bins hold at least 2% of 512 samples, and the entropy of the bins (1 = as even as the data).

    python benchmarks/variety_study.py --levers settle eq --steps 1500 --datasets faces
    python benchmarks/variety_study.py --report-only
    python benchmarks/variety_study.py --plan --work runs/variety   # the whole results file, one run at a time

Runs are resumed and scored rows are kept in the results JSON, so the study runs in stages.
Writes benchmarks/results/variety-<cpu>-<date>.json / .md and grids in
benchmarks/results/variety-<date>/. Needs scikit-learn (digits).
"""
from __future__ import annotations

import argparse
import colorsys
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
from quality_study import copy_grid, logged_losses, loss_ratio  # noqa: E402

# name -> `fastbegan train` flags. A lever is one change against its baseline (named in the
# comment), so a difference in the table is that change's.
LEVERS = {
    "settle": ["--variant", "settle"],  # the default when this study began
    # the equilibrium allowed to act: gamma where the measured loss ratio lies, k_t 10x faster,
    # no pulling-away term (it lifts L_fake / L_real above 1: shared/DESIGN.md §7)
    "eq": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01"],
    # eq plus a direct force for variety on G: MSGAN's mode-seeking term (pixels) ...
    "eqms": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--ms-weight", "0.2"],
    "eqms02": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--ms-weight", "0.02"],
    # ... or the pulling-away term on mean-centred codes (D's code space)
    "eqptc": ["--variant", "escape", "--pt-weight", "0.1", "--pt-centred", "--gamma", "1.0", "--lambda-k", "0.01"],
    # eq plus BEGAN-CS (D's encoder maps G(z) back to z; the authors' alpha), or a lower learning rate
    "eqcs": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--cs-alpha", "0.1"],
    "eqlr": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--lr", "5e-5"],
    # eq plus a batch statistic in D (ProGAN's minibatch stddev, real and fake groups apart):
    # groups of 4 (ProGAN's) or the whole half of 16
    "eqmb": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--mbstd-group", "4"],
    # eq plus two learning rates (TTUR: D 4x faster than G, SAGAN's ratio)
    "eqttur": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--lr-d", "4e-4"],
    # eq plus feature matching on D's codes (mean and spread of the fake batch's against the real's)
    "eqfm": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--fm-weight", "0.1"],
    "eqfm03": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--fm-weight", "0.03"],
    # ... or on the pixels: each pixel's batch mean and spread (a background of one colour has none)
    "eqfmpx": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--fm-weight", "0.1",
               "--fm-pixels"],
    "eqfmpx1": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--fm-weight", "1.0",
                "--fm-pixels"],
    "eqfmpx03": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--fm-weight", "0.3",
                 "--fm-pixels"],
    # the default (settle) plus feature matching: the lever on top of what `fastbegan train` does now
    "settlefm": ["--variant", "settle", "--fm-weight", "0.1"],
    "settlefmpx": ["--variant", "settle", "--fm-weight", "0.1", "--fm-pixels"],
    "eqmb16": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01", "--mbstd-group", "16"],
    # two phases: eqfmpx03 (pixel feature matching at 0.3 spreads the backgrounds by step 250),
    # then on from its step-250 checkpoint at 0.1 (which keeps faces): does the spread hold?
    "eqfmpx03to01": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01",
                     "--fm-weight", "0.1", "--fm-pixels"],
    # eqfmpx03 against the training set's pixel moments instead of the real batch's (no sampling noise
    # in the target: with 16 reals, each pixel's target mean and spread jump from step to step)
    "eqfmpxd03": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01",
                  "--fm-weight", "0.3", "--fm-pixels", "--fm-data"],
    "eqfmpxd01": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.0", "--lambda-k", "0.01",
                  "--fm-weight", "0.1", "--fm-pixels", "--fm-data"],
    # eqfmpxd03 with gamma where its L_fake / L_real settles (1.7-2.0), so k_t can act beside the term
    "eqfmpxd03g2": ["--variant", "escape", "--pt-weight", "0", "--gamma", "2.0", "--lambda-k", "0.01",
                    "--fm-weight", "0.3", "--fm-pixels", "--fm-data"],
    # the default plus the data-moment matching: settle's EMA of G and late pulling-away weight
    # (the digits' precision) beside eqfmpxd03's term (the faces' variety)
    "settlefmpxd03": ["--variant", "settle", "--fm-weight", "0.3", "--fm-pixels", "--fm-data"],
    # gamma 2.0 swung k_t (0.05-0.64) and lost the variety: gamma inside the ratio's range
    # (faces 1.3-2.0, digits ~1.4) with k_t 3x slower than there
    "eqfmpxd03g15": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.5", "--lambda-k", "0.003",
                     "--fm-weight", "0.3", "--fm-pixels", "--fm-data"],
    # eqfmpxd03g15 with gamma adapted (from 1.5) to hold k_t near 0.1, where g15's ratio drift
    # (faces 1.5 -> 2.0) took k_t onto its floor by step 2,500
    "eqfmpxd03kt10": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.5", "--lambda-k", "0.003",
                      "--fm-weight", "0.3", "--fm-pixels", "--fm-data", "--k-target", "0.1"],
    # eqfmpxd03kt10's samples put the faces' backgrounds on red and cyan: each channel's mean and
    # spread match the data's ring of hues (what --fm-pixels sees), their joint law does not. Sliced
    # Wasserstein distances on a pyramid of thumbnails (1x1 to 8x8) against the training set see it
    "eqfmpxd03kt10swp1": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.5", "--lambda-k", "0.003",
                          "--fm-weight", "0.3", "--fm-pixels", "--fm-data", "--k-target", "0.1", "--sw-weight", "1"],
    # swp1's factor coverage fell from 0.85-0.88 (to step 6,000) to 0.82-0.85 as its precision rose,
    # pose_x the factor missed most: samples from an EMA of G (training unchanged: the same run,
    # other weights sampled), or the sliced Wasserstein term 3x stronger
    "eqfmpxd03kt10swp1e": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.5", "--lambda-k", "0.003",
                           "--fm-weight", "0.3", "--fm-pixels", "--fm-data", "--k-target", "0.1", "--sw-weight", "1",
                           "--ema-decay", "0.999"],
    "eqfmpxd03kt10swp3": ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.5", "--lambda-k", "0.003",
                          "--fm-weight", "0.3", "--fm-pixels", "--fm-data", "--k-target", "0.1", "--sw-weight", "3"],
    # the default (swp1e) lost digits recall after step 9,000 while D's loss on held-out digits rose
    # to 1.44x its loss on the training digits (D learns the small set by heart): D's inputs, real
    # and fake, shifted by up to 1/8 of the side (DiffAugment's translation)
    "matchsh": ["--variant", "match", "--augment-shift", "0.125"],
    # matchsh traded precision for recall on the digits (0.44 / 0.69 at step 10,000 against the
    # default's 0.64 / 0.49): half the shift (2 pixels at res 32)
    "matchsh16": ["--variant", "match", "--augment-shift", "0.0625"],
    # the default's faces factor coverage at step 10,000: 0.84 at res 32 (target 0.85), pose_x
    # the factor missed most (a face moves by at most 0.08 of the side: under a pixel of the 8x8
    # thumbnails at res 32). The pyramid up to 16x16, or the term 3x stronger (swp3 reached 0.85
    # with trained-weight samples), with the EMA's samples
    "matchsws16": ["--variant", "match", "--sw-max-side", "16"],
    "matchsw3": ["--variant", "match", "--sw-weight", "3"],
}
# levers whose rows a results file keeps but whose code is gone -> the commit that trained them
# (the flags alone no longer reproduce them): the first, PI form of --k-target
RETIRED = {"eqfmpxd03kt10pi": ("56d366a", ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.5", "--lambda-k",
                                           "0.003", "--fm-weight", "0.3", "--fm-pixels", "--fm-data", "--k-target",
                                           "0.1", "(PI form of --k-target, gamma += 0.005 (0.1 - k') + 5 (k - k'))"]),
           # the first form of --sw-weight: 8x8 thumbnails only (the hue barely moved its distance)
           **{f"eqfmpxd03kt10sw{w}": ("f32c5d2", ["--variant", "escape", "--pt-weight", "0", "--gamma", "1.5",
                                                  "--lambda-k", "0.003", "--fm-weight", "0.3", "--fm-pixels", "--fm-data",
                                                  "--k-target", "0.1", "--sw-weight", w, "(8x8 thumbnails only)"])
              for w in ("1", "3")}}
# lever -> (parent lever, step): the run starts from the parent's checkpoint at that step (its
# logged rows up to there included), so the table's rows after it are the second phase's
STARTS = {"eqfmpx03to01": ("eqfmpx03", 250)}
BG_BINS = 12  # background-hue bins


def listed_flags(lever: str) -> list[str]:
    """The lever's flags as the results file lists them (a second phase names where it starts)."""
    parent, start = STARTS.get(lever, (None, 0))
    return LEVERS[lever] + ([f"(from {parent}'s step {start})"] if parent else [])


def eval_steps(steps: int, every: int) -> list[int]:
    return list(range(every, steps + 1, every))


# what the results files hold, in one command (--plan): lever -> {dataset: steps}, in order
# (a two-phase lever after its parent). Checkpoints every 250 steps, scored on plan_steps.
PLAN = {
    "settle": {"faces": 250, "digits": 250},
    "eq": {"faces": 1000, "digits": 1000},
    "eqms": {"faces": 500, "digits": 500},
    "eqms02": {"faces": 750},
    "eqptc": {"faces": 750},
    "eqcs": {"faces": 750},
    "eqlr": {"faces": 750},
    "eqmb": {"faces": 1000, "digits": 1000},
    "eqttur": {"faces": 1000, "digits": 1000},
    "eqfm": {"faces": 1000, "digits": 1000},
    "eqfmpx": {"faces": 1000, "digits": 1000},
    "eqfmpx1": {"faces": 1000},
    "eqfmpx03": {"faces": 500},
    "settlefm": {"digits": 1000},
    "settlefmpx": {"faces": 500},
    "eqfmpx03to01": {"faces": 1000},
    "eqmb16": {"faces": 1000},
    "eqfmpxd03": {"faces": 10000, "digits": 3000},
    "eqfmpxd01": {"faces": 1000},
    "eqfmpxd03g2": {"faces": 1000},
    "eqfmpxd03g15": {"faces": 10000, "digits": 3000},
    "settlefmpxd03": {"faces": 2000, "digits": 2000},
    "eqfmpxd03kt10": {"faces": 10000, "digits": 4000},
    "eqfmpxd03kt10swp1": {"faces": 10000, "digits": 10000},
    "eqfmpxd03kt10swp1e": {"faces": 50000, "digits": 50000},  # the long runs (in progress)
    "eqfmpxd03kt10swp3": {"faces": 10000},
    "matchsh": {"digits": 10000, "faces": 10000},
    "matchsh16": {"digits": 10000},
    "matchsws16": {"faces": 10000},
    "matchsw3": {"faces": 10000},
}


def plan_steps(steps: int) -> list[int]:
    """The checkpoints a planned run is scored at: every 250 steps to 1,000, every 500 to
    4,000, then every 1,000 (a long run's curve without scoring every checkpoint)."""
    marks = list(range(250, 1001, 250)) + list(range(1500, 4001, 500)) + list(range(5000, 10 ** 7, 1000))
    return [s for s in marks if s <= steps]


def jobs(args) -> list[tuple[str, str, int, list[int]]]:
    """(dataset, lever, steps, steps scored) for each run this call makes: the plan's (--plan,
    on --datasets), else every --levers x --datasets to --steps."""
    if args.plan:
        return [(ds, lever, steps, plan_steps(steps)) for lever, per_ds in PLAN.items()
                for ds, steps in per_ds.items() if ds in args.datasets]
    scored = eval_steps(args.steps, args.score_every or args.every)
    return [(ds, lever, args.steps, scored) for ds in args.datasets for lever in args.levers]


# ------------------------------------------------------------------------- measures
def to_tensor(u8: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@torch.no_grad()
def recon_error(d, images: torch.Tensor, batch: int = 128) -> float:
    """BEGAN's L: mean |v - D(v)| over a set of images (N, 3, H, W) in [-1, 1]."""
    errs = [(images[i:i + batch] - d(images[i:i + batch])).abs().flatten(1).mean(1)
            for i in range(0, len(images), batch)]
    return float(torch.cat(errs).mean())


def equilibrium_diagnosis(ckpt: Path, train: np.ndarray, held_out: np.ndarray, n: int = 512) -> dict:
    """D's L on training images, held-out images and G's samples (raw weights) of a checkpoint."""
    from fastbegan.checkpoint import load_checkpoint
    from fastbegan.model import Discriminator, Generator, load_trained
    tensors, cfg, _ = load_checkpoint(ckpt)
    g = load_trained(Generator(cfg["res"], cfg["filters"], cfg["z_dim"], skip=cfg.get("skip", False)),
                     tensors, "G.", cfg)
    d = Discriminator.from_checkpoint_tensors(tensors, cfg)
    z = torch.rand(n, cfg["z_dim"], generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        fake = g(z).float()
    m = min(n, len(held_out))
    l_train, l_held, l_fake = (recon_error(d, to_tensor(train[:m])), recon_error(d, to_tensor(held_out[:m])),
                               recon_error(d, fake))
    return {"L_train": l_train, "L_heldout": l_held, "L_fake": l_fake, "heldout_over_train": l_held / l_train,
            "fake_over_train": l_fake / l_train, "fake_over_heldout": l_fake / l_held}


def hue_bins(images: np.ndarray | torch.Tensor, bins: int = BG_BINS) -> np.ndarray:
    """Each face's background-hue bin: the hue of the mean of the two bottom corners' 2x2
    pixels (background in every embedded face), in ``bins`` equal bins (0: red)."""
    if torch.is_tensor(images):
        images = ((images.permute(0, 2, 3, 1).clamp(-1, 1) + 1) * 127.5).cpu().numpy()
    x = np.asarray(images, dtype=np.float64) / 255.0
    corners = np.concatenate([x[:, -2:, :2], x[:, -2:, -2:]], axis=1).reshape(len(x), -1, 3).mean(1)
    hues = np.array([colorsys.rgb_to_hsv(*c)[0] for c in corners])
    return np.minimum((hues * bins).astype(int), bins - 1)


def background_hues(images: np.ndarray | torch.Tensor, bins: int = BG_BINS) -> dict:
    """The faces' background colour (:func:`hue_bins`): how many bins hold at least 2% of the
    images, the bins' entropy over ln(bins) (1: even), and the fullest bin."""
    p = np.bincount(hue_bins(images, bins), minlength=bins) / len(images)
    return {"bg_bins": int((p >= 0.02).sum()),
            "bg_entropy": float(-(p[p > 0] * np.log(p[p > 0])).sum() / np.log(bins)),
            "bg_top_bin": int(p.argmax())}


def factor_coverages(fake, ref: np.ndarray) -> dict:
    """Which factor the samples miss: the factor coverage (fastbegan.metrics.compare_factors,
    the factors the regressor estimates) of the background hue, and the lowest of the others
    with its name. ``fake`` float NCHW in [-1, 1], ``ref`` the fresh faces (NHWC uint8)."""
    from fastbegan import metrics as Q
    est = Q.FactorEstimator.load_or_train(ref.shape[1], log=lambda *_: None)
    f = Q.compare_factors(est.predict(ref), est.predict(fake), est.r2)
    cov = {k: f["per_factor"][k]["coverage"] for k in f["factors_used"]}
    others = {k: v for k, v in cov.items() if k != "bg_hue"}
    worst = min(others, key=others.get)
    return {"bg_hue_cov": cov.get("bg_hue"), "other_cov_min": others[worst], "other_cov_worst": worst}


def recon_by_hue(d, images: np.ndarray, bins: int = BG_BINS) -> dict:
    """D's L (mean |v - D(v)|) on real faces grouped by background-hue bin (bins with >= 10
    images): which background D reconstructs best, i.e. where G's loss pulls every sample."""
    t = to_tensor(images)
    with torch.no_grad():
        err = torch.cat([(t[i:i + 128] - d(t[i:i + 128])).abs().flatten(1).mean(1)
                         for i in range(0, len(t), 128)]).numpy()
    b = hue_bins(images, bins)
    by = {int(k): float(err[b == k].mean()) for k in range(bins) if (b == k).sum() >= 10}
    easiest = min(by, key=by.get)
    return {"L_by_hue": by, "hue_easiest": easiest, "hue_L_spread": max(by.values()) / by[easiest]}


def top_bin_rank(row: dict) -> int | None:
    """Where the samples' fullest background bin stands among the bins of real faces ordered
    by D's L (0: the one D reconstructs best); None without both measures."""
    by = {int(k): v for k, v in (row.get("L_by_hue") or {}).items()}
    top = row.get("bg_top_bin")
    return sorted(by, key=by.get).index(top) if top in by else None


def load_d(ckpt: Path):
    from fastbegan.checkpoint import load_checkpoint
    from fastbegan.model import Discriminator
    tensors, cfg, _ = load_checkpoint(ckpt)
    return Discriminator.from_checkpoint_tensors(tensors, cfg)


def k_summary(run: Path, upto: int, k_min: float) -> dict:
    """The equilibrium over the logged rows up to ``upto``: the share of them with k_t on its floor
    (within 1e-3 of k_min) and k_t's median and largest value after the first 500 steps."""
    from fastbegan.health import read_metrics
    logged = [r for r in read_metrics(run / "metrics.jsonl") if r["step"] <= upto]
    ks = [r["k"] for r in logged]
    late = [r["k"] for r in logged if r["step"] > 500] or ks
    return {"k_on_floor": float(np.mean([k <= k_min + 1e-3 for k in ks])) if ks else None,
            "k_median": float(np.median(late)) if late else None, "k_max": float(max(late)) if late else None}


def fake_easier(run: Path, step: int, window: int = 500) -> float | None:
    """The share of logged rows in (step - window, step] with L_fake < L_real: the steps where
    a margin at the real loss (MAGAN's, in place of k_t) would have D push the fakes' L up. At
    0 such a margin never acts and D only autoencodes the reals, as with k_t = 0."""
    vals = [fake < real for real, fake in logged_losses(run, step, window)]
    return float(np.mean(vals)) if vals else None


def add_log_measures(rows: list[dict], work: Path) -> None:
    """Fill the measures read from a run's log alone (:func:`fake_easier`, an adapted gamma)
    into rows scored before they existed, where the run folder is still in ``work``."""
    for r in rows:
        run = work / f"{r['dataset']}-{r['lever']}"
        if not (run / "metrics.jsonl").exists():
            continue
        if "fake_easier" not in r:
            r["fake_easier"] = fake_easier(run, r["step"])
        adapted = logged_k(run, r["step"], "gamma")  # --k-target: the gamma of that step, not the start's
        if adapted is not None:
            r["gamma"] = adapted


def seed_from_parent(run: Path, parent: Path, step: int) -> None:
    """Start ``run`` from ``parent``'s checkpoint at ``step``: copy it and the parent's logged
    rows up to ``step`` (``fastbegan train --resume`` then goes on from there with its own flags;
    only the model's shape must match)."""
    ckpt = parent / "checkpoints" / f"ckpt_{step:08d}.safetensors"
    if not ckpt.exists():
        raise SystemExit(f"{run.name} starts from {ckpt}, which does not exist: run the lever "
                         f"{parent.name.split('-', 1)[1]} to step {step} first")
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy2(ckpt, run / "checkpoints" / ckpt.name)
    rows = [ln for ln in (parent / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= step]
    (run / "metrics.jsonl").write_text("".join(ln + "\n" for ln in rows))


def run_config(run: Path) -> dict:
    from fastbegan.checkpoint import list_checkpoints, read_config
    return read_config(list_checkpoints(run)[-1])


# ------------------------------------------------------------------------- scoring
def score_checkpoint(run: Path, ds: str, step: int, d: dict, n: int) -> dict:
    ckpt = run / "checkpoints" / f"ckpt_{step:08d}.safetensors"
    cfg = run_config(run)
    ema = bool(cfg.get("ema_decay"))
    row = {"dataset": ds, "lever": run.name.split("-", 1)[1], "step": step, "k_t": logged_k(run, step),
           "loss_ratio": loss_ratio(run, step), "fake_easier": fake_easier(run, step),
           "gamma": logged_k(run, step, "gamma") or cfg["gamma"], "train_s": round(train_seconds(run, step), 1),
           "view": "ema" if ema else "raw"}
    row.update(k_summary(run, step, cfg.get("k_min", 0.0)))
    row.update(equilibrium_diagnosis(ckpt, d["train"], d["ref"]))
    row.update(score(ckpt, ds, d["ref"], d["train"], n, d["clf"], raw=not ema))
    if ds == "faces":
        from fastbegan.sampling import generate, load_generator, sample_z
        g = load_generator(ckpt, raw=not ema)
        fake = generate(g, sample_z(n, g.fc.in_features, 1234, 1.0))
        row.update(background_hues(fake))
        row.update(factor_coverages(fake, d["ref"][:n]))
        row.update(recon_by_hue(load_d(ckpt), d["ref"][:n]))
    return row


def add_hue_diagnosis(rows: list[dict], work: Path, data: dict, n: int) -> None:
    """Fill the hue and per-factor measures into faces rows scored before they existed (their
    checkpoints are still in ``work``)."""
    from fastbegan.sampling import generate, load_generator, sample_z
    for r in rows:
        ckpt = work / f"faces-{r['lever']}" / "checkpoints" / f"ckpt_{r['step']:08d}.safetensors"
        if r["dataset"] != "faces" or ("hue_easiest" in r and "bg_hue_cov" in r) or not ckpt.exists():
            continue
        g = load_generator(ckpt, raw=r.get("view") != "ema")
        fake = generate(g, sample_z(n, g.fc.in_features, 1234, 1.0))
        r.update(background_hues(fake))
        r.update(factor_coverages(fake, data["ref"][:n]))
        r.update(recon_by_hue(load_d(ckpt), data["ref"][:n]))


# ------------------------------------------------------------------------- report
COLS = ["k_t", "k_on_floor", "k_median", "gamma", "loss_ratio", "fake_easier", "heldout_over_train", "fake_over_heldout", "precision",
        "recall", "swd_x1e3"]
FACE_COLS = ["factor_coverage", "bg_hue_cov", "other_cov_min", "other_cov_worst", "bg_bins", "bg_entropy", "bg_top_bin", "hue_easiest", "bg_top_rank", "hue_L_spread"]
DIGIT_COLS = ["classes_2pct", "class_entropy"]


def markdown(doc: dict) -> str:
    m = doc["meta"]
    lines = [f"# Variety and the equilibrium ({m['device']})", "",
             f"- date {m['created']}, git {m['commit']} (runs trained from the study worktree's commit: "
             f"{m.get('train_commit') or 'see note'}), torch {m['torch']}; res {m['res']}, batch 16, n 64, seed "
             f"{m['seed']}; 1 thread per run, two runs at a time, on a machine shared with other work",
             *([f"- {m['note']}"] if m.get("note") else []),
             "- levers (each `fastbegan train` from scratch, or from another lever's checkpoint where named, with): " + "; ".join(
                 f"**{k}** `{' '.join(v)}`" for k, v in m["levers"].items()),
             "- k on floor: share of logged steps (every 50) with k_t within 1e-3 of its floor; k med / max: "
             "after step 500; L_f/L_r: median L_fake / L_real over the 500 steps up to the checkpoint; fake easier: the share of those logged "
             "steps with L_fake < L_real (where MAGAN's margin at the real loss would make D push on the fakes; "
             "at 0 it never would, and D only autoencodes the reals)",
             "- gamma: the run's, or with --k-target the adapted gamma logged at the checkpoint",
             "- D's L on held-out real images over its L on training images (heldout/train), and on 512 of G's "
             "samples over held-out (fake/heldout)",
             "- precision / recall: k-NN (k 3; faces: factor regressor's features vs 512 fresh faces; digits: "
             "random CNN's vs the 297 held-out digits); samples from the EMA of G where the run keeps one",
             f"- faces: bg bins = background-hue bins (of {BG_BINS}) with >= 2% of 512 samples, bg entropy = "
             "their entropy / ln 12, bg top bin = the samples' fullest bin (0 = red, 11 = magenta); hue easiest = "
             "the bin of real faces D reconstructs best (lowest L), bg top rank = the samples' fullest bin's place "
             "among the bins ordered by D's L (0 = D's easiest), hue L spread = D's worst bin's L over its best; "
             "bg hue cov = the background hue's factor coverage (histogram intersection over the fresh faces' "
             "deciles), other cov min / worst = the lowest coverage of the other estimated factors and its name",
             ""]
    for ds in doc["datasets"]:
        extra = FACE_COLS if ds == "faces" else DIGIT_COLS
        cols = COLS + extra
        base = doc["real_baselines"].get(ds, {})
        lines += [f"## {ds}", "", "| lever | step | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols),
                  "| real images | - | " + " | ".join(_fmt(base.get(c)) for c in cols) + " |"]
        for r in sorted((r for r in doc["rows"] if r["dataset"] == ds), key=lambda r: (r["lever"], r["step"])):
            lines.append(f"| {r['lever']} | {r['step']} | " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------- main
def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", action="store_true",
                    help="run and score what the results file holds (PLAN: each lever to its steps, in order)")
    ap.add_argument("--steps", type=int, default=1500, help="train every lever's run to this step")
    ap.add_argument("--every", type=int, default=250, help="checkpoint (and score) every this many steps")
    ap.add_argument("--levers", nargs="*", default=list(LEVERS))
    ap.add_argument("--datasets", nargs="*", default=["faces", "digits"])
    ap.add_argument("--work", default="runs/variety", help="run folders (resumed if present)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n", type=int, default=512, help="images scored per checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--res", type=int, default=RES)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="every run's --precision (fp32 where this CPU's bf16 is slower: docs/training.md)")
    ap.add_argument("--score-every", type=int, default=None, help="score only every this many steps")
    ap.add_argument("--no-train", action="store_true", help="score the checkpoints that exist, train nothing")
    ap.add_argument("--note", default=None)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--stem", default=None)
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                    help="add the rows (and real baselines) of these results files, e.g. of runs made in parallel "
                         "with their own --results, to the results file (--results / --stem); trains nothing")
    ap.add_argument("--add-hues", action="store_true",
                    help="fill the background-hue measures into faces rows scored before they existed")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    stamp = dt.datetime.now().strftime("%Y-%m-%d")
    results = Path(args.results)
    stem, old, dev = open_results(results, args.stem, "variety")
    rows, baselines = old.get("rows", []), old.get("real_baselines", {})
    datasets = list(dict.fromkeys(old.get("datasets", []) + ([] if args.merge else args.datasets)))
    levers = {**old.get("meta", {}).get("levers", {}), **{k: listed_flags(k) for k in args.levers if k in LEVERS}}
    precision = old.get("meta", {}).get("precision") if args.report_only or args.merge else args.precision
    for path in args.merge or []:
        other = json.loads(Path(path).read_text())
        precision = precision or other.get("meta", {}).get("precision")
        have = {(r["dataset"], r["lever"], r["step"]) for r in rows}
        rows += [r for r in other["rows"] if (r["dataset"], r["lever"], r["step"]) not in have]
        for ds, base in other.get("real_baselines", {}).items():
            baselines.setdefault(ds, base)
        datasets += [ds for ds in other.get("datasets", []) if ds not in datasets]
        levers.update(other.get("meta", {}).get("levers", {}))
    # a retired lever is listed with what its flags meant then and the commit that trained it
    levers.update({k: flags + [f"(commit {commit})"] for k, (commit, flags) in RETIRED.items() if k in levers})
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    add_log_measures(rows, work)
    torch.set_num_threads(max(1, args.threads))

    def write() -> None:
        for r in rows:
            if r["dataset"] == "faces" and top_bin_rank(r) is not None:
                r["bg_top_rank"] = top_bin_rank(r)
        ran = {r["lever"] for r in rows}  # the levers with scored rows (not every one defined)
        write_results(stem, markdown, dev, args, old, datasets, rows, baselines,
                      levers={k: v for k, v in levers.items() if k in ran},
                      train_commit=old.get("meta", {}).get("train_commit"),
                      precision=precision)

    if not (args.report_only or args.merge):
        data = load_data(args.datasets, work, args.seed, args.res)
        for ds, d in data.items():
            if ds not in baselines:
                baselines[ds] = real_baselines(ds, d["ref"], d["other"], d["train"], args.n, d["clf"])
                if ds == "faces":
                    baselines[ds].update(background_hues(d["other"][:args.n]))
            if ds == "faces" and "bg_hue_cov" not in baselines[ds]:
                baselines[ds].update(factor_coverages(to_tensor(d["other"][:args.n]), d["ref"][:args.n]))
        if args.add_hues and "faces" in data:
            add_hue_diagnosis(rows, work, data["faces"], args.n)
            write()
        for ds, lever, steps, scored in ([] if args.add_hues else jobs(args)):
            run = work / f"{ds}-{lever}"
            parent, start = STARTS.get(lever, (None, 0))
            if parent and not args.no_train and not (run / "checkpoints").is_dir():
                seed_from_parent(run, work / f"{ds}-{parent}", start)
            if not args.no_train:
                train_cli(run, LEVERS[lever] + ["--precision", args.precision], data[ds]["path"], steps,
                          250 if args.plan else args.every, args.threads, args.seed, res=args.res)
            done = {(r["dataset"], r["lever"], r["step"]) for r in rows}
            for s in scored:
                if s <= start or (ds, lever, s) in done or not (run / "checkpoints" / f"ckpt_{s:08d}.safetensors").exists():
                    continue
                rows.append(score_checkpoint(run, ds, s, data[ds], args.n))
                r = rows[-1]
                print(f"{ds}-{lever} {s}: k {r['k_t']:.3f} floor {r['k_on_floor']:.2f} Lf/Lr {r['loss_ratio']:.2f} "
                      f"held/train {r['heldout_over_train']:.2f} P {r['precision']:.2f} R {r['recall']:.2f}",
                      flush=True)
                write()
            copy_grid(run, results / f"variety-{stamp}", run.name, steps)
    write()
    print(f"wrote {stem}.json / .md")


if __name__ == "__main__":
    main()
