"""``fastbegan eval CHECKPOINT``: a quality report (JSON + Markdown + PNG) for one checkpoint.

M_global (logged and measured now with the checkpoint's D), SWD per Laplacian level, on
the embedded faces the factor score and render fidelity, k-NN precision (fidelity) and
recall (variety) in feature spaces independent of G and D, a memorisation check (nearest
training images in pixel L2 against held-out real images), the run's training-health
findings, and FID/IS only with local Inception weights. Every distance comes with a
real-vs-real baseline of the same size. The metrics: :mod:`fastbegan.metrics`,
docs/design.md §7; the report's fields: docs/evaluation.md.
"""
from __future__ import annotations

import json
import math
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from . import health
from . import metrics as Q
from .checkpoint import CheckpointError, load_checkpoint
from .images import save_grid, save_png, to_unit_range
from .model import Discriminator
from .plots import plot_run
from .runlog import read_metrics
from .sampling import generate, load_generator, sample_z, save_each


def run_dir_of(checkpoint: Path) -> Path:
    """RUN_DIR of RUN_DIR/checkpoints/ckpt_*.safetensors (else the checkpoint's folder)."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def last_logged(run_dir: Path, max_step: int | None = None) -> dict | None:
    """The last metrics.jsonl row at or before ``max_step`` (None if there is no log)."""
    try:
        rows = read_metrics(run_dir)
    except FileNotFoundError:
        return None
    rows = [r for r in rows if max_step is None or r["step"] <= max_step]
    return rows[-1] if rows else None


def health_section(run_dir: Path) -> dict:
    """The findings of :func:`fastbegan.health.diagnose_run` for the run folder, as plain
    dicts under ``signals``; a run without metrics.jsonl gives a ``note``, a failure an
    ``error``. Never fails the evaluation."""
    source = "fastbegan.health.diagnose_run"
    try:
        findings = health.diagnose_run(run_dir)
    except FileNotFoundError as e:
        return {"source": source, "note": str(e)}
    except Exception as e:  # a broken log must not break the report
        return {"source": source, "error": f"{type(e).__name__}: {e}"}
    return {"source": source,
            "signals": json.loads(json.dumps([f.as_dict() for f in findings], default=str))}


@torch.no_grad()
def measure_m(g, d, real: torch.Tensor, z: torch.Tensor, gamma: float, batch: int = 64) -> dict:
    """L_real, L_fake and M_global = L_real + |gamma L_real - L_fake| over whole sets."""
    dev = next(d.parameters()).device
    lr_sum = lf_sum = 0.0
    n = len(real)
    for i in range(0, n, batch):
        x = real[i:i + batch].to(dev).contiguous(memory_format=torch.channels_last)
        fake = g(z[i:i + batch].to(dev))
        lr_sum += float((x - d(x)).abs().mean()) * len(x)
        lf_sum += float((fake - d(fake)).abs().mean()) * len(x)
    l_real, l_fake = lr_sum / n, lf_sum / n
    return {"L_real": l_real, "L_fake": l_fake, "M_global": l_real + abs(gamma * l_real - l_fake),
            "n": n}


def nearest_neighbours(queries: torch.Tensor, train_u8: np.ndarray, k: int = 5, chunk: int = 1024
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-L2 nearest training images: (RMS distances (Q, k) on the [-1, 1] scale, indices (Q, k))."""
    q = queries.float().flatten(1)
    qn = (q * q).sum(1, keepdim=True)
    best_d = torch.full((len(q), k), math.inf)
    best_i = torch.zeros((len(q), k), dtype=torch.long)
    for s in range(0, len(train_u8), chunk):
        t = to_unit_range(train_u8[s:s + chunk]).flatten(1)
        d2 = (qn - 2 * q @ t.T + (t * t).sum(1)[None]).clamp_min(0)
        cat_d = torch.cat([best_d, d2], 1)
        cat_i = torch.cat([best_i, torch.arange(s, s + len(t)).expand(len(q), -1)], 1)
        best_d, pos = cat_d.topk(k, dim=1, largest=False)
        best_i = cat_i.gather(1, pos)
    return (best_d / q.shape[1]).sqrt(), best_i


def _real_sets(cfg: dict, data: str | None, n: int, seed: int, log):
    """(training set uint8, reference set, baseline set or None, held_out: bool, source)."""
    from .data import load_dataset, procedural_faces
    data = data if data is not None else cfg.get("data")
    res = cfg["res"]
    train, report = load_dataset(data, res, n_procedural=cfg.get("n_procedural", 4096),
                                 seed=cfg.get("seed", 0))
    if data is None:
        # fresh faces from the same law, not in the training set (seeds far from the run's)
        ref, _ = procedural_faces(n, res, seed=1_000_003 + seed)
        base, _ = procedural_faces(n, res, seed=2_000_003 + seed)
        return train, ref, base, True, report.source
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(train))
    ref = train[perm[:n]]
    base = train[perm[n:2 * n]] if len(train) >= 2 * n else None
    if base is None:
        log(f"only {len(train)} training images: no real-vs-real baseline (needs {2 * n}); "
            "lower --n to get one")
    return train, ref, base, False, report.source


def evaluate(checkpoint: str | Path, out_dir: str | Path | None = None, *, n: int = 512, seed: int = 0,
             device: str = "cpu", data: str | None = None, fid_weights: str | None = None,
             swd_patches: int = 64, swd_dirs: int = 512, factors: bool = True, nn_rows: int = 8,
             truncate: float = 1.0, raw: bool = False, log=print) -> dict:
    """Write report.json, report.md, samples.png, nearest_neighbours.png (+ metrics.png) and return the report.

    G's EMA weights when the checkpoint holds them (``--ema-decay``) unless ``raw``; samples
    with z ~ U(-truncate, truncate)."""
    t0 = time.perf_counter()
    checkpoint = Path(checkpoint)
    _check_options(n, fid_weights)
    tensors, cfg, _ = load_checkpoint(checkpoint, "cpu")
    step = int(tensors["state.step"]) if "state.step" in tensors else None
    run_dir = run_dir_of(checkpoint)
    out = Path(out_dir) if out_dir else run_dir / "eval" / checkpoint.stem
    out.mkdir(parents=True, exist_ok=True)
    g = load_generator(checkpoint, map_location=device, raw=raw)
    d = Discriminator.from_checkpoint_tensors(tensors, cfg).to(device)
    report: dict = {
        "checkpoint": str(checkpoint), "step": step, "run_dir": str(run_dir),
        "config": {k: cfg.get(k) for k in ("res", "filters", "z_dim", "h", "gamma", "batch_size",
                                           "data", "n_procedural", "seed", "precision")},
        "n": n, "seed": seed, "weights": g.weights, "truncate": truncate,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }
    row = last_logged(run_dir, step)
    report["logged"] = None if row is None else {
        k: row.get(k) for k in ("step", "M", "k", "loss_real", "loss_fake", "lr", "steps_per_s")}
    log(f"{checkpoint.name}: step {step}, res {cfg['res']}; drawing {n} samples and {n} real images")

    train, ref, base, held_out, source = _real_sets(cfg, data, n, seed, log)
    report["real_data"] = {"source": source, "training_images": int(len(train)),
                           "reference": "fresh procedural faces (not in the training set)" if held_out
                           else "random training images"}
    z = sample_z(n, cfg["z_dim"], seed, truncate)
    fake = generate(g, z)
    # M_global measured now, with the checkpoint's D, on up to 128 training images
    x_m = to_unit_range(train[np.random.default_rng(seed + 1).choice(len(train), min(n, 128, len(train)),
                                                                      replace=False)])
    report["measured"] = measure_m(g, d, x_m, z[:len(x_m)], cfg.get("gamma", 0.5))
    report["measured"]["k_checkpoint"] = float(tensors["state.k"]) if "state.k" in tensors else None
    report.update(_swd_section(ref, fake, base, swd_patches, swd_dirs, seed, log))
    report.update(_factor_section(cfg["res"], ref, fake, base, factors, held_out, log))
    report["fidelity"] = fidelity_section(cfg["res"], ref, fake, base, factors and held_out, log)
    report["memorisation"], nn_index = _memorisation(fake, ref, train, held_out)
    report.update(_write_images(out, fake, train, nn_index, min(nn_rows, n), run_dir if row is not None else None))
    report["health"] = health_section(run_dir)
    if fid_weights is not None:
        report["fid_is"] = _fid_is(fake, ref, fid_weights)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    (out / "report.md").write_text(markdown(report))
    report["out"] = str(out)
    log(f"report in {out} ({report['seconds']}s)")
    return report


def _check_options(n: int, fid_weights: str | None) -> None:
    """Refuse what cannot give a meaningful report, before any work."""
    if n < 16:
        raise ValueError(f"--n must be >= 16 for meaningful statistics, got {n}")
    if fid_weights is not None:
        Q.fid_backend(fid_weights)


def _swd_section(ref, fake, base, patches: int, dirs: int, seed: int, log) -> dict:
    """``swd`` and, with a baseline set, ``swd_real_baseline`` (real vs real)."""
    ts = time.perf_counter()
    r_swd = Q.swd(ref, fake, patches_per_image=patches, n_dirs=dirs, seed=seed)
    out = {"swd": r_swd.as_dict()}
    if base is not None:
        out["swd_real_baseline"] = Q.swd(ref, base, patches_per_image=patches, n_dirs=dirs,
                                         seed=seed).as_dict()
    log(f"SWD x1e3 mean {r_swd.mean:.1f}" + (f" (real-vs-real {out['swd_real_baseline']['swd_x1e3_mean']:.1f})"
                                               if base is not None else "")
        + f" [{time.perf_counter() - ts:.1f}s]")
    return out


def _factor_section(res: int, ref, fake, base, factors: bool, held_out: bool, log) -> dict:
    """The factor score of the fakes and of the real baseline (embedded faces only)."""
    if not (factors and held_out):
        return {"factors": None,
                "factors_note": ("the factor score needs the embedded procedural data set (a run without "
                                 "--data)" if not held_out else "skipped (--no-factors)")}
    tf = time.perf_counter()
    est = Q.FactorEstimator.load_or_train(res, log=log)
    fr, fb = Q.factor_score(est, ref, fake), Q.factor_score(est, ref, base)
    log(f"factor score {fr['factor_score']:.3f} (real-vs-real {fb['factor_score']:.3f}), recall "
        f"{fr['recall']:.3f} ({fb['recall']:.3f}), render fidelity {fr['render_fidelity']:.3f} "
        f"({fb['render_fidelity']:.3f}) [{time.perf_counter() - tf:.1f}s]")
    return {"factors": fr, "factors_real_baseline": fb}


def fidelity_spaces(faces: bool) -> list[str]:
    """The feature spaces of the fidelity section, the primary one first: on the embedded
    faces the factor regressor's (and the random CNN's), on other data the random CNN's."""
    return ["factor-regressor", "random-cnn"] if faces else ["random-cnn"]


def fidelity_section(res: int, ref, fake, base, faces: bool, log, k: int = 3) -> dict:
    """k-NN precision/recall of the fakes against ``ref`` per feature space
    (:func:`fastbegan.metrics.fidelity`), each with the real-vs-real baseline (``base`` in
    the generator's place) when there is one; ``primary`` names the headline space."""
    tf = time.perf_counter()
    out = {"primary": fidelity_spaces(faces)[0], "spaces": {}}
    for space in fidelity_spaces(faces):
        feats = Q.feature_extractor(space, res, log=log)
        row = {**Q.fidelity(ref, fake, feats, k), "about": Q.FEATURE_SPACES[space]}
        row["real_baseline"] = Q.fidelity(ref, base, feats, k) if base is not None else None
        out["spaces"][space] = row
    p = out["spaces"][out["primary"]]
    b = p["real_baseline"] or {}
    log(f"precision {p['precision']:.3f} ({_f(b.get('precision'), '{:.3f}')}), recall {p['recall']:.3f} "
        f"({_f(b.get('recall'), '{:.3f}')}) in {out['primary']} features [{time.perf_counter() - tf:.1f}s]")
    return out


def _memorisation(fake: torch.Tensor, ref, train: np.ndarray, held_out: bool) -> tuple[dict, torch.Tensor]:
    """(the memorisation check, the indices of each fake's 5 nearest training images)."""
    d_fake, i_fake = nearest_neighbours(fake, train, k=5)
    mem = {"nn_rms_generated_median": float(d_fake[:, 0].median())}
    if held_out:
        d_real, _ = nearest_neighbours(to_unit_range(ref), train, k=1)
        mem["nn_rms_heldout_real_median"] = float(d_real[:, 0].median())
        mem["ratio"] = mem["nn_rms_generated_median"] / max(mem["nn_rms_heldout_real_median"], 1e-12)
        mem["note"] = ("ratio = median NN distance of generated images / of real images not in the "
                       "training set; well below 1 suggests memorisation")
    return mem, i_fake


def _write_images(out: Path, fake: torch.Tensor, train: np.ndarray, nn_index: torch.Tensor, rows: int,
                  run_dir: Path | None) -> dict:
    """samples.png, nearest_neighbours.png and (with a logged ``run_dir``) metrics.png."""
    res = fake.shape[-1]
    save_grid(fake[:64], out / "samples.png", nrow=8)
    nn_imgs = to_unit_range(train[nn_index[:rows].flatten().numpy()]).reshape(rows, 5, 3, res, res)
    save_grid(torch.cat([fake[:rows, None], nn_imgs], 1).flatten(0, 1), out / "nearest_neighbours.png", nrow=6)
    report = {"files": {"samples": "samples.png", "nearest_neighbours": "nearest_neighbours.png"}}
    if run_dir is not None:
        try:
            plot_run(run_dir, out / "metrics.png")
            report["files"]["curves"] = "metrics.png"
        except Exception as e:  # no matplotlib, or an unreadable log: the report says so
            report["curves_note"] = str(e)
    return report


def _fid_is(fake: torch.Tensor, ref: np.ndarray, fid_weights: str) -> dict:
    """FID / IS by torch-fidelity on the same images, written to a temporary folder."""
    tmp = Path(tempfile.mkdtemp(prefix="fastbegan-fid-"))
    try:
        save_each(fake, tmp / "fake")
        (tmp / "real").mkdir()
        for i, a in enumerate(ref):
            save_png(a, tmp / "real" / f"real_{i:06d}.png")
        out = Q.fid_is(str(tmp / "real"), str(tmp / "fake"), fid_weights, cuda=torch.cuda.is_available())
        out["weights"] = str(fid_weights)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _weights(r: dict) -> str:
    w = "EMA weights" if r.get("weights") == "ema" else "trained weights"
    t = r.get("truncate", 1.0)
    return w + ("" if t == 1.0 else f", z ~ U(-{t:g}, {t:g})")


def _f(v, fmt="{:.4f}") -> str:
    return "n/a" if v is None else fmt.format(v)


def markdown(r: dict) -> str:
    """The human-readable report.md."""
    L = [f"# fastbegan evaluation: step {r['step']}", "",
         f"Checkpoint `{r['checkpoint']}` (G's {_weights(r)}); {r['n']} generated vs {r['n']} real images "
         f"({r['real_data']['reference']}; data: {r['real_data']['source']}), seed {r['seed']}.", "",
         "| metric | value | real-vs-real baseline | meaning |", "|---|---|---|---|"]
    lg, ms = r.get("logged") or {}, r["measured"]
    L.append(f"| M_global (last logged, step {lg.get('step', 'n/a')}) | {_f(lg.get('M'))} | | "
             "convergence measure; lower is better |")
    L.append(f"| M_global (measured on {ms['n']} images) | {_f(ms['M_global'])} | | L_real {_f(ms['L_real'])}, "
             f"L_fake {_f(ms['L_fake'])}, k_t {_f(ms.get('k_checkpoint'))} |")
    base = r.get("swd_real_baseline")
    L.append(f"| SWD x1e3 (mean over levels) | {_f(r['swd']['swd_x1e3_mean'], '{:.1f}')} | "
             f"{_f(base['swd_x1e3_mean'], '{:.1f}') if base else 'n/a'} | patch statistics; lower is better |")
    for res_, v in r["swd"]["swd_x1e3_per_level"].items():
        b = base["swd_x1e3_per_level"][res_] if base else None
        L.append(f"| SWD x1e3 at {res_}px | {v:.1f} | {_f(b, '{:.1f}')} | |")
    f, fb = r.get("factors"), r.get("factors_real_baseline")
    if f:
        L.append(f"| factor score (mean coverage) | {f['factor_score']:.3f} | {fb['factor_score']:.3f} | "
                 "1 = known factors spread like real faces; 0.1 = collapsed |")
        L.append(f"| render fidelity | {f['render_fidelity']:.3f} | {fb['render_fidelity']:.3f} | share of "
                 "samples the face renderer re-creates from their estimated factors as well as 95% of real "
                 "faces; near 0 = not face-like |")
        L.append(f"| factor precision | {f['precision']:.3f} | {fb['precision']:.3f} | estimated factor "
                 "combinations that occur in real faces (blind to realism: see render fidelity) |")
        L.append(f"| factor recall | {f['recall']:.3f} | {fb['recall']:.3f} | real factor combinations "
                 "the generator covers |")
    for space, v in (r.get("fidelity") or {}).get("spaces", {}).items():
        b = v.get("real_baseline") or {}
        L.append(f"| precision ({space} features, {v['k']}-NN) | {v['precision']:.3f} | "
                 f"{_f(b.get('precision'), '{:.3f}')} | share of samples inside the real images' manifold "
                 "(fidelity) |")
        L.append(f"| recall ({space} features, {v['k']}-NN) | {v['recall']:.3f} | {_f(b.get('recall'), '{:.3f}')} "
                 "| share of real images inside the samples' manifold (variety) |")
    mem = r["memorisation"]
    L.append(f"| NN distance, generated -> train (RMS) | {mem['nn_rms_generated_median']:.4f} | "
             f"{_f(mem.get('nn_rms_heldout_real_median'))} (held-out real -> train) | ratio "
             f"{_f(mem.get('ratio'), '{:.2f}')}; well below 1 = memorising |")
    if r.get("fid_is"):
        L.append(f"| FID | {r['fid_is']['fid']:.2f} | | Inception features (torch-fidelity) |")
        L.append(f"| IS | {r['fid_is']['is_mean']:.2f} +- {r['fid_is']['is_std']:.2f} | | |")
    if f:
        L += ["", "## Factors", "", "| factor | coverage | baseline | W1 | baseline | regressor R^2 |",
              "|---|---|---|---|---|---|"]
        for name, v in f["per_factor"].items():
            b = fb["per_factor"][name]
            used = "" if name in f["factors_used"] else " (not used: R^2 < 0.5)"
            L.append(f"| {name} | {v['coverage']:.3f} | {b['coverage']:.3f} | {v['w1']:.4f} | {b['w1']:.4f} | "
                     f"{_f(v.get('regressor_r2'), '{:.2f}')}{used} |")
    elif r.get("factors_note"):
        L += ["", f"Factor score: {r['factors_note']}."]
    h = r.get("health") or {}
    L += ["", "## Training health", ""]
    sig = h.get("signals")
    if isinstance(sig, list):
        L.append("No problems found in metrics.jsonl." if not sig else
                 "\n".join(f"- step {f.get('step')}: {f.get('message', f)}" if isinstance(f, dict) else f"- {f}"
                           for f in sig))
    elif sig is not None:
        L.append("```json")
        L.append(json.dumps(sig, indent=2))
        L.append("```")
    else:
        L.append(h.get("error") or h.get("note") or "not available")
    L += ["", "## Images", "", "Samples:", "", "![samples](samples.png)", "",
          "Nearest neighbours (left: generated; right: the 5 closest training images in pixel L2):", "",
          "![nearest neighbours](nearest_neighbours.png)", ""]
    if "curves" in r.get("files", {}):
        L += ["Training curves:", "", "![curves](metrics.png)", ""]
    elif r.get("curves_note"):
        L += [f"Training curves: {r['curves_note']}", ""]
    L.append(f"Evaluated in {r.get('seconds', '?')}s.")
    return "\n".join(L) + "\n"


__all__ = ["evaluate", "markdown", "health_section", "fidelity_section", "fidelity_spaces", "nearest_neighbours", "measure_m", "CheckpointError"]
