"""Factor coverage on the embedded procedural faces (docs/evaluation.md): :class:`FactorEstimator`,
a small CNN that estimates the 8 known factors (fastbegan.data.FACTORS) of generated and
real images, and :func:`factor_score`: per-factor coverage and W1, precision/recall in
factor space, render fidelity."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..data import FACTORS
from ..images import to_unit_range
from .inputs import as_float_images
from .knn import knn_precision_recall
from .pyramid import _gauss

CIRCULAR_FACTORS = ("bg_hue",)


# --------------------------------------------------------------------------- factor estimation

class FactorNet(nn.Module):
    """Small CNN: (N, 3, r, r) in [-1, 1] -> 9 outputs (7 linear factors, cos/sin of bg hue)."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, stride=2), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(4 * w * 16, 128), nn.ReLU(), nn.Linear(128, len(FACTORS) + 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def _factor_targets(factors: dict[str, np.ndarray]) -> Tensor:
    cols = []
    for name in FACTORS:
        v = np.asarray(factors[name], np.float64)
        if name in CIRCULAR_FACTORS:
            cols += [np.cos(2 * np.pi * v), np.sin(2 * np.pi * v)]
        else:
            cols.append(v)
    return torch.tensor(np.stack(cols, 1), dtype=torch.float32)


def _decode(out: Tensor) -> np.ndarray:
    """Net outputs -> (N, len(FACTORS)) factor estimates in [0, 1]."""
    out = out.detach().float().cpu()
    cols, j = [], 0
    for name in FACTORS:
        if name in CIRCULAR_FACTORS:
            ang = torch.atan2(out[:, j + 1], out[:, j]) / (2 * math.pi)
            cols.append(ang % 1.0)
            j += 2
        else:
            cols.append(out[:, j].clamp(0, 1))
            j += 1
    return torch.stack(cols, 1).numpy().astype(np.float64)


def _flip_targets(t: Tensor) -> Tensor:
    """A mirrored face has pose_x -> 1 - pose_x and tilt -> 1 - tilt (the rest is symmetric)."""
    t = t.clone()
    for name in ("pose_x", "tilt"):
        j = _target_index(name)
        t[:, j] = 1 - t[:, j]
    return t


def _target_index(name: str) -> int:
    j = 0
    for f in FACTORS:
        if f == name:
            return j
        j += 2 if f in CIRCULAR_FACTORS else 1
    raise KeyError(name)


def _augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random blur (sigma up to ~1 px of the net's input) and noise: GAN samples are soft."""
    n = x.shape[0]
    blur = _gauss(x)
    alpha = torch.rand(n, 1, 1, 1, generator=gen)
    x = x + alpha * (blur - x)
    return x + torch.randn(x.shape, generator=gen) * (0.06 * torch.rand(n, 1, 1, 1, generator=gen))


class FactorEstimator:
    """Estimates the procedural faces' factors from images: a small CNN on 16x16 pooled
    images, trained once per resolution on fresh procedural faces with blur/noise/flip
    augmentation (so that it reads soft GAN samples), cached in FASTBEGAN_CACHE."""

    VERSION = 2

    def __init__(self, res: int, net: FactorNet, r2: dict[str, float]):
        self.res, self.net, self.r2 = res, net.eval(), r2

    NET_RES = 16  # images are average-pooled to 16x16 first: the coarse factors need no more

    @property
    def net_res(self) -> int:
        return min(self.res, self.NET_RES)

    def _prep(self, images) -> Tensor:
        x = as_float_images(images)
        if x.shape[-1] != self.res:
            raise ValueError(f"the factor estimator was trained at {self.res}x{self.res}, got {x.shape[-1]}")
        if self.res > self.net_res:
            x = F.adaptive_avg_pool2d(x, self.net_res)
        return x

    @torch.no_grad()
    def predict(self, images, batch: int = 256) -> np.ndarray:
        """-> (N, len(FACTORS)) estimates in [0, 1], columns in FACTORS order."""
        x = self._prep(images)
        return np.concatenate([_decode(self.net(x[i:i + batch])) for i in range(0, len(x), batch)])

    @torch.no_grad()
    def features(self, images, batch: int = 256) -> Tensor:
        """-> (N, 128) float32: the net's penultimate layer (the last hidden ReLU), a feature
        space for k-NN precision/recall (:func:`fidelity`)."""
        x = self._prep(images)
        hidden = self.net.body[:-1]
        return torch.cat([hidden(x[i:i + batch]).float() for i in range(0, len(x), batch)])

    @classmethod
    def train(cls, res: int, n_train: int = 2048, n_val: int = 512, epochs: int = 8, seed: int = 1234,
              width: int = 16, log=None) -> "FactorEstimator":
        """Fit on freshly drawn procedural faces (seeds distinct from training/eval sets)."""
        from ..data import procedural_faces
        t0 = time.perf_counter()
        imgs, fac = procedural_faces(n_train + n_val, res, seed=seed)
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        net = FactorNet(width)
        est = cls(res, net, {})
        x_all = est._prep(imgs)
        t_all = _factor_targets(fac)
        x, t = x_all[:n_train], t_all[:n_train]
        xv = x_all[n_train:]
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        steps = epochs * math.ceil(n_train / 64)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(n_train, generator=gen)
            for i in range(0, n_train, 64):
                idx = perm[i:i + 64]
                xb, tb = x[idx], t[idx]
                flip = torch.rand(len(idx), generator=gen) < 0.5
                xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(3), xb)
                tb = torch.where(flip.view(-1, 1), _flip_targets(tb), tb)
                loss = F.mse_loss(net(_augment(xb, gen)), tb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        pred = est.predict(imgs[n_train:])
        truth = np.stack([fac[f][n_train:] for f in FACTORS], 1)
        est.r2 = {f: _r2(pred[:, j], truth[:, j], f in CIRCULAR_FACTORS) for j, f in enumerate(FACTORS)}
        if log:
            log(f"factor regressor trained at {res}x{res} in {time.perf_counter() - t0:.1f}s; held-out R^2: "
                + ", ".join(f"{k} {v:.2f}" for k, v in est.r2.items()))
        return est

    # cached, so that repeated evaluations do not retrain
    @classmethod
    def cache_path(cls, res: int, cache_dir=None) -> Path:
        from ..data import default_cache_dir
        return Path(cache_dir or default_cache_dir()) / f"factor-regressor-v{cls.VERSION}-{res}.safetensors"

    def save(self, path) -> Path:
        import json

        from safetensors.torch import save_file
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        width = self.net.body[0].out_channels
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp),
                  metadata={"r2": json.dumps(self.r2), "res": str(self.res), "width": str(width)})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path) -> "FactorEstimator":
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        net = FactorNet(int(meta["width"]))
        net.load_state_dict(load_file(str(path)))
        return cls(int(meta["res"]), net, json.loads(meta["r2"]))

    @classmethod
    def load_or_train(cls, res: int, cache_dir=None, log=None) -> "FactorEstimator":
        """The cached regressor for ``res`` (FASTBEGAN_CACHE or ~/.cache/fastbegan), trained once if absent."""
        path = cls.cache_path(res, cache_dir)
        if path.exists():
            try:
                est = cls.load(path)
                if est.res == res:
                    return est
            except Exception:  # damaged cache: retrain
                pass
            path.unlink(missing_ok=True)
        if log:
            log(f"training the factor regressor for {res}x{res} once (cached in {path.parent})...")
        est = cls.train(res, log=log)
        try:
            est.save(path)
        except OSError:
            pass
        return est


def _r2(pred: np.ndarray, truth: np.ndarray, circular: bool) -> float:
    if circular:
        d = (pred - truth + 0.5) % 1.0 - 0.5
        var = 1.0 / 12.0  # variance of a uniform on a unit circle's length, the truth's law
        return float(1.0 - np.mean(d ** 2) / var)
    return float(1.0 - np.mean((pred - truth) ** 2) / max(np.var(truth), 1e-12))


# --------------------------------------------------------------------------- comparing factor sets

def wasserstein_1d(a: np.ndarray, b: np.ndarray, circular: bool = False, grid: int = 1000) -> float:
    """W1 between two samples on [0, 1] (on the unit circle if ``circular``), via the CDFs."""
    t = (np.arange(grid) + 0.5) / grid
    fa = np.searchsorted(np.sort(a), t, side="right") / len(a)
    fb = np.searchsorted(np.sort(b), t, side="right") / len(b)
    d = fa - fb
    if circular:
        d = d - np.median(d)  # Rabin et al. 2011: W1 on the circle = min_c mean|F - G - c|
    return float(np.mean(np.abs(d)))


def decile_coverage(real: np.ndarray, fake: np.ndarray, bins: int = 10) -> float:
    """Histogram intersection over the real sample's quantile bins: 1 = same spread, 1/bins = collapsed."""
    edges = np.quantile(real, np.linspace(0, 1, bins + 1))
    edges[0], edges[-1] = -np.inf, np.inf
    pr = np.histogram(real, edges)[0] / len(real)
    pf = np.histogram(fake, edges)[0] / len(fake)
    return float(np.minimum(pr, pf).sum())


def _embed(f: np.ndarray) -> np.ndarray:
    cols = []
    for j, name in enumerate(FACTORS):
        if name in CIRCULAR_FACTORS:
            ang = 2 * np.pi * f[:, j]
            cols += [np.cos(ang) / (2 * np.pi), np.sin(ang) / (2 * np.pi)]
        else:
            cols.append(f[:, j])
    return np.stack(cols, 1)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision/recall (Kynkaenniemi et al. 2019) with k-NN balls in factor space."""
    return knn_precision_recall(torch.tensor(_embed(real)), torch.tensor(_embed(fake)), k)


def compare_factors(real: np.ndarray, fake: np.ndarray, r2: dict[str, float] | None = None,
                    min_r2: float = 0.5) -> dict:
    """Per-factor W1 and coverage, joint precision/recall and the summary ``factor_score``."""
    per = {}
    for j, name in enumerate(FACTORS):
        per[name] = {"w1": wasserstein_1d(real[:, j], fake[:, j], name in CIRCULAR_FACTORS),
                     "coverage": decile_coverage(real[:, j], fake[:, j])}
        if r2 is not None:
            per[name]["regressor_r2"] = r2.get(name)
    used = [n for n in FACTORS if r2 is None or (r2.get(n) or 0) >= min_r2] or list(FACTORS)
    prec, rec = precision_recall(real, fake)
    return {"factor_score": float(np.mean([per[n]["coverage"] for n in used])),
            "factor_w1_mean": float(np.mean([per[n]["w1"] for n in used])),
            "precision": prec, "recall": rec, "factors_used": used, "per_factor": per,
            "n_real": int(len(real)), "n_fake": int(len(fake))}


def render_errors(images, factors: np.ndarray) -> np.ndarray:
    """Analysis by synthesis: RMS difference ([-1, 1] scale) between each image and the face
    that fastbegan.data.draw_face renders from the image's estimated factors."""
    from ..data import draw_face
    x = as_float_images(images)
    res = x.shape[-1]
    out = np.empty(len(x))
    for i in range(len(x)):
        face = draw_face({name: float(factors[i, j]) for j, name in enumerate(FACTORS)}, res)
        r = to_unit_range(face[None])[0]
        out[i] = float((x[i] - r).pow(2).mean().sqrt())
    return out


def factor_score(estimator: FactorEstimator, real, fake, quantile: float = 0.95) -> dict:
    """Estimate the factors of both image sets and compare them (:func:`compare_factors`), plus
    the render fidelity: the share of ``fake`` images that the renderer re-creates from their
    estimated factors at least as well as it re-creates ``quantile`` of the real images. A set of
    real faces scores ~``quantile``; blobs and broken faces score near 0 even when their
    estimated factors look plausible (which is all that factor precision can see)."""
    pr, pf = estimator.predict(real), estimator.predict(fake)
    out = compare_factors(pr, pf, estimator.r2)
    er, ef = render_errors(real, pr), render_errors(fake, pf)
    out["render_fidelity"] = float(np.mean(ef <= np.quantile(er, quantile)))
    out["render_rms_median"] = float(np.median(ef))
    out["render_rms_median_real"] = float(np.median(er))
    return out
