"""Sample quality without pretrained weights (docs/design.md §7).

- :func:`swd`: sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al.
  2018), per level (x1e3, finest first) and their mean. ``normalize="real"`` (default)
  normalises both sets with the real set's statistics, so a global colour cast of the
  generated set stays visible; ``"per_set"`` is Karras's.
- :class:`FactorEstimator` and :func:`factor_score`: on the embedded procedural faces, a
  small CNN estimates the 8 known factors (fastbegan.data.FACTORS) of generated and real
  images; per-factor coverage and W1, precision/recall in factor space, render fidelity.
- :func:`fidelity`: k-NN precision (fidelity) and recall (variety) of generated against
  real images (Kynkaenniemi et al. 2019) in a feature space independent of G and D
  (:data:`FEATURE_SPACES`: the factor regressor's or a fixed random CNN's).
- :func:`fid_is`: FID and IS through torch-fidelity, with local Inception weights only.

Images everywhere: (N, H, W, 3) uint8 numpy arrays or (N, 3, H, W) float tensors in
[-1, 1] (a generator's output).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .data import FACTORS
from .images import to_unit_range

CIRCULAR_FACTORS = ("bg_hue",)


# --------------------------------------------------------------------------- inputs

def as_float_images(images) -> Tensor:
    """uint8 NHWC array/tensor or float NCHW tensor in [-1, 1] -> contiguous float32 NCHW in [-1, 1]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got {tuple(images.shape)}")
        return to_unit_range(images).contiguous()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"float images must be (N, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
    return images.detach().float().cpu().contiguous()


# --------------------------------------------------------------------------- Laplacian pyramid

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _gauss(x: Tensor, kernel_scale: float = 1.0) -> Tensor:
    k = (_BINOMIAL[:, None] * _BINOMIAL[None, :] * kernel_scale).to(x)
    w = k.expand(x.shape[1], 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), w, groups=x.shape[1])


def pyr_down(x: Tensor) -> Tensor:
    return _gauss(x)[:, :, ::2, ::2]


def pyr_up(x: Tensor) -> Tensor:
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[:, :, ::2, ::2] = x
    return _gauss(up, 4.0)


def laplacian_pyramid(x: Tensor, min_res: int = 16) -> list[Tensor]:
    """Band-pass levels from full resolution down to ``min_res`` (the last is the low-pass)."""
    levels = [x]
    while levels[-1].shape[-1] // 2 >= min_res and levels[-1].shape[-1] % 2 == 0:
        levels.append(pyr_down(levels[-1]))
    return [levels[i] - pyr_up(levels[i + 1]) for i in range(len(levels) - 1)] + [levels[-1]]


def pyramid_resolutions(res: int, min_res: int = 16) -> list[int]:
    out = [res]
    while out[-1] // 2 >= min_res:
        out.append(out[-1] // 2)
    return out


# --------------------------------------------------------------------------- SWD

def patch_descriptors(level: Tensor, patches_per_image: int, patch: int, gen: torch.Generator) -> Tensor:
    """(N, C, H, W) -> (N * patches_per_image, C, patch, patch) random patches."""
    n, c, h, w = level.shape
    p = min(patch, h, w)
    ys = torch.randint(0, h - p + 1, (n, patches_per_image), generator=gen)
    xs = torch.randint(0, w - p + 1, (n, patches_per_image), generator=gen)
    ar = torch.arange(p)
    rows = (ys[..., None] + ar).view(n, patches_per_image, p, 1).expand(n, patches_per_image, p, p)
    cols = (xs[..., None] + ar).view(n, patches_per_image, 1, p).expand(n, patches_per_image, p, p)
    img = torch.arange(n).view(n, 1, 1, 1).expand_as(rows)
    out = level.permute(0, 2, 3, 1)[img, rows, cols]          # (n, P, p, p, C)
    return out.permute(0, 1, 4, 2, 3).reshape(n * patches_per_image, c, p, p)


def _channel_stats(desc: Tensor) -> tuple[Tensor, Tensor]:
    mean = desc.mean(dim=(0, 2, 3), keepdim=True)
    std = desc.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-8)
    return mean, std


def sliced_wasserstein(a: Tensor, b: Tensor, n_dirs: int = 512, gen: torch.Generator | None = None,
                       chunk: int = 128) -> float:
    """Sliced W1 between two equal-size point sets (rows): mean over random unit directions."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(a.shape)} vs {tuple(b.shape)}")
    dirs = torch.randn(a.shape[1], n_dirs, generator=gen)
    dirs /= dirs.norm(dim=0, keepdim=True)
    total = 0.0
    for i in range(0, n_dirs, chunk):
        d = dirs[:, i:i + chunk]
        # numpy's SIMD sort along contiguous rows is ~5x faster than torch.sort on CPU
        pa = np.sort((d.T @ a.T).numpy(), axis=1)
        pb = np.sort((d.T @ b.T).numpy(), axis=1)
        total += float(np.abs(pa - pb).mean(1, dtype=np.float64).sum())
    return total / n_dirs


@dataclass
class SWDResult:
    per_level: list[float]          # x1e3, finest level first
    resolutions: list[int]
    mean: float                     # x1e3
    n_images: int
    patches_per_image: int

    def as_dict(self) -> dict:
        return {"swd_x1e3_mean": self.mean,
                "swd_x1e3_per_level": {str(r): v for r, v in zip(self.resolutions, self.per_level)},
                "n_images": self.n_images, "patches_per_image": self.patches_per_image}


def swd(real, fake, *, patches_per_image: int = 64, patch: int = 7, n_dirs: int = 512,
        min_res: int = 16, seed: int = 0, normalize: str = "real") -> SWDResult:
    """SWD (x1e3) per Laplacian level between two image sets of the same size and resolution.

    The same random patch positions and projection directions are used for both sets
    (seeded), so identical sets give exactly 0. ``normalize``: "real" (default) or
    "per_set" (Karras et al.). Each image is split into a Laplacian pyramid (5-tap binomial
    filter) down to ``min_res``; per level, ``patches_per_image`` random ``patch``x``patch``
    patches are normalised per colour channel and compared by projecting them on ``n_dirs``
    random unit directions (1-D Wasserstein distances, averaged).
    """
    if normalize not in ("real", "per_set"):
        raise ValueError(f"normalize must be 'real' or 'per_set', got {normalize!r}")
    x, y = as_float_images(real), as_float_images(fake)
    if x.shape != y.shape:
        n = min(len(x), len(y))
        if x.shape[1:] != y.shape[1:]:
            raise ValueError(f"image sets differ in shape: {tuple(x.shape[1:])} vs {tuple(y.shape[1:])}")
        x, y = x[:n], y[:n]
    min_res = min(min_res, x.shape[-1])
    px, py = laplacian_pyramid(x, min_res), laplacian_pyramid(y, min_res)
    per_level = []
    for li, (lx, ly) in enumerate(zip(px, py)):
        gen = torch.Generator().manual_seed(seed * 1000 + li)
        state = gen.get_state()
        da = patch_descriptors(lx, patches_per_image, patch, gen)
        gen.set_state(state)
        db = patch_descriptors(ly, patches_per_image, patch, gen)
        ma, sa = _channel_stats(da)
        mb, sb = (ma, sa) if normalize == "real" else _channel_stats(db)
        da = ((da - ma) / sa).flatten(1)
        db = ((db - mb) / sb).flatten(1)
        per_level.append(1e3 * sliced_wasserstein(da, db, n_dirs, gen))
    return SWDResult(per_level, [t.shape[-1] for t in px], float(np.mean(per_level)), len(x),
                     patches_per_image)


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
        from .data import procedural_faces
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
        from .data import default_cache_dir
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
    from .data import draw_face
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


# --------------------------------------------------------------------------- fidelity: k-NN precision / recall

def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019) of two feature sets (rows).

    Each point's k-NN ball has the radius of the distance to its k-th nearest other point of
    its own set. Precision: the share of ``fake`` points inside at least one ``real`` ball
    (fidelity); recall: the share of ``real`` points inside at least one ``fake`` ball
    (variety). Both sets should have the same size (the radii shrink as a set grows).
    """
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"k-NN precision/recall with k={k} needs more than {k} points per set, "
                         f"got {len(real)} real and {len(fake)} generated")
    r, f = real.double(), fake.double()

    def radii(x: Tensor) -> Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # +1: the point itself

    d = torch.cdist(f, r)                                         # (n_fake, n_real)
    precision = (d <= radii(r)[None, :]).any(1).double().mean().item()
    recall = (d.T <= radii(f)[None, :]).any(1).double().mean().item()
    return precision, recall


class RandomFeatures:
    """A fixed, randomly initialised CNN as a feature space that needs no weights and that no
    GAN trains against: three 3x3 conv + ReLU stages (widths w, 2w, 4w; 2x2 average pooling
    after the first two), then 4x4 adaptive average pooling -> 64 w features (2,048 at w 32).
    Weights are He-normal draws from a seeded CPU generator and biases are 0, so the space is
    the same on every machine. Blur, noise and in-between images leave it, unlike pixel space
    (docs/evaluation.md has the checks)."""

    def __init__(self, width: int = 32, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        chans = [3, width, 2 * width, 4 * width]
        self.weights = [torch.randn(co, ci, 3, 3, generator=gen) * math.sqrt(2.0 / (9 * ci))
                        for ci, co in zip(chans[:-1], chans[1:])]

    @torch.no_grad()
    def __call__(self, images, batch: int = 256) -> Tensor:
        """Images (uint8 NHWC or float NCHW in [-1, 1]) -> (N, 64 w) float32 features."""
        x = as_float_images(images)
        out = []
        for i in range(0, len(x), batch):
            h = x[i:i + batch]
            for j, w in enumerate(self.weights):
                h = F.relu(F.conv2d(h, w, padding=1))
                if j < len(self.weights) - 1:
                    h = F.avg_pool2d(h, 2) if h.shape[-1] >= 2 else h
            out.append(F.adaptive_avg_pool2d(h, 4).flatten(1))
        return torch.cat(out)


# name -> what the report says about it
FEATURE_SPACES = {
    "factor-regressor": "the factor regressor's penultimate layer (128 ReLU features of the 16x16-pooled "
                        "image; trained on procedural faces only, blur-tolerant by its augmentation)",
    "random-cnn": "a fixed random CNN (quality.RandomFeatures: 3 conv+ReLU stages, 2,048 features; "
                  "never trained)",
}


def feature_extractor(space: str, res: int, log=None):
    """``images -> (N, d) features`` for a name of :data:`FEATURE_SPACES`."""
    if space == "factor-regressor":
        return FactorEstimator.load_or_train(res, log=log).features
    if space == "random-cnn":
        return RandomFeatures()
    raise ValueError(f"unknown feature space {space!r}: one of {', '.join(FEATURE_SPACES)}")


def fidelity(real, fake, features, k: int = 3, n: int | None = None) -> dict:
    """k-NN precision (samples inside the real images' manifold) and recall (real images
    inside the samples') of ``fake`` against ``real`` in the space ``features`` (a callable
    of :func:`feature_extractor`); the first ``n`` (default: the smaller set's size) of each."""
    n = min(len(real), len(fake)) if n is None else min(n, len(real), len(fake))
    p, r = knn_precision_recall(features(real[:n]).float(), features(fake[:n]).float(), k)
    return {"precision": p, "recall": r, "k": k, "n": n}


# --------------------------------------------------------------------------- FID / IS (optional)

def fid_backend(weights: str):
    """The ``torch_fidelity`` module, after checking that ``weights`` (a local Inception
    file) exists; a clear error otherwise. Called before any work by ``fastbegan eval``."""
    if not Path(weights).is_file():
        raise ValueError(f"--fid-weights {weights!r} does not exist: pass the path of a local "
                         "Inception weights file (fastbegan never downloads it)")
    try:
        import torch_fidelity
    except ImportError:
        raise RuntimeError("FID/IS need torch-fidelity, which is not installed: `pip install "
                           "torch-fidelity` (fastbegan does not depend on it)") from None
    return torch_fidelity


def fid_is(real_dir: str, fake_dir: str, weights: str, cuda: bool = False) -> dict:
    """FID and IS through torch-fidelity with *local* Inception weights (never downloaded).

    ``weights``: the torch-fidelity / pytorch-fid Inception file
    (e.g. ``weights-inception-2015-12-05-6726825d.pth``). Raises RuntimeError with the
    fix if torch-fidelity is not installed, ValueError if the file is missing.
    """
    torch_fidelity = fid_backend(weights)
    m = torch_fidelity.calculate_metrics(
        input1=str(fake_dir), input2=str(real_dir), fid=True, isc=True, cuda=cuda, verbose=False,
        cache=False, feature_extractor="inception-v3-compat",
        feature_extractor_weights_path=str(weights))
    return {"fid": float(m["frechet_inception_distance"]), "is_mean": float(m["inception_score_mean"]),
            "is_std": float(m["inception_score_std"])}
