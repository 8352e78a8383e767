"""Published remedies for BEGAN's early one-image collapse (off in ``--variant began``).

With k_0 = 0 and lambda_k = 0.001, k_t can sit at 0 for thousands of steps: D then
ignores the fakes and G settles on the one image D reconstructs best (docs/design.md,
"Early collapse"). Each remedy is one term, added where its paper adds it:

- BEGAN-CS (Chang, Chang and Chen, ECCV 2018, "Escaping from collapsing modes in a
  constrained space"): ``alpha * mean|Enc(G(z)) - z|`` added to D's loss. D's encoder
  learns to map a generated image back to its z, so different z must give images D can
  tell apart. Needs h = z_dim; G's loss is unchanged (the image is detached).
- EBGAN's pulling-away term (Zhao, Mathieu and LeCun, ICLR 2017): the mean squared
  cosine similarity between the codes D's encoder gives the fake batch, added with
  weight beta to G's loss; D's parameters receive none of its gradient.

- ``k_init``: k_0 above the paper's 0, so that D pushes back on the fakes from the first
  step instead of waiting thousands of steps for k_t to grow (it decays on its own as the
  equilibrium control takes over).
- ``k_min``: a floor under k_t (the paper clips to [0, 1]; this clips to [k_min, 1] after
  the paper's update), so D never stops pushing back on the fakes entirely.

BEGAN-CS and the pulling-away term act on the encoder's codes ``(B, h)`` of the fake batch.
``--variant`` presets: ``began`` (none of them: the paper), ``escape`` (the setting the
collapse study measured best, docs/training.md "Early collapse"), ``settle`` (the escape,
then the pulling-away weight lowered and samples from an EMA of G: the quality study's
winner, docs/training.md "Fidelity after the escape") and ``match`` (an equilibrium that acts
and G matched to the training set's pixel statistics: the variety study's winner and
`fastbegan train`'s default, :data:`DEFAULT_VARIANT`; docs/training.md "Variety and the
equilibrium").
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# every option a variant sets, with the paper's value (a remedy's is "off")
PAPER = {"gamma": 0.5, "lambda_k": 0.001, "cs_alpha": 0.0, "pt_weight": 0.0, "k_init": 0.0, "k_min": 0.0,
         "pt_anneal_start": 0, "pt_anneal_end": 0, "pt_final": 0.0, "k_min_anneal_start": 0, "k_min_anneal_end": 0,
         "ema_decay": 0.0, "pt_centred": False, "ms_weight": 0.0, "fm_weight": 0.0, "fm_pixels": False, "fm_data": False,
         "sw_weight": 0.0, "k_target": 0.0}
VARIANT_PRESETS = {
    "began": dict(PAPER),
    "escape": {**PAPER, "pt_weight": 0.1, "k_init": 0.1, "k_min": 0.05},
}
# escape, then settle: once variety is there (step 2,000) the pulling-away weight falls to
# half (0.1 -> 0.05 by step 2,500) and G's samples come from an EMA of its weights. The
# time-to-quality study's winner (benchmarks/results/quality-*.md, docs/training.md).
VARIANT_PRESETS["settle"] = {**VARIANT_PRESETS["escape"], "pt_anneal_start": 2000, "pt_anneal_end": 2500,
                             "pt_final": 0.05, "ema_decay": 0.999}
# match: the variety study's winner (benchmarks/results/variety-*.md, docs/training.md "Variety
# and the equilibrium"). The escape's warm start without its pulling-away term; an equilibrium
# that acts (gamma adapted from 1.5 to hold k_t near 0.1, k_t 3x faster than the paper's); and G
# matched to the training set: each pixel's mean and spread (0.3) and sliced Wasserstein
# distances on a pyramid of thumbnails (1), the colour's joint law that the moments miss.
# Samples from an EMA of G (the same training; on the faces a little more precision and
# factor coverage at most checkpoints).
VARIANT_PRESETS["match"] = {**VARIANT_PRESETS["escape"], "pt_weight": 0.0, "gamma": 1.5, "lambda_k": 0.003,
                            "k_target": 0.1, "fm_weight": 0.3, "fm_pixels": True, "fm_data": True,
                            "sw_weight": 1.0, "ema_decay": 0.999}
# what each variant does, in words (the start-up line and --help)
VARIANT_SUMMARY = {
    "began": "the paper's BEGAN",
    "escape": "BEGAN plus the remedies measured best against its early one-image collapse",
    "settle": "escape, then the pulling-away weight halved and samples from an EMA of G",
    "match": "k_t held near 0.1 by an adapted gamma, G matched to the training set's pixel moments and "
             "thumbnails, samples from an EMA of G",
}
# `fastbegan train`'s default. TrainConfig itself stays the paper's.
DEFAULT_VARIANT = "match"


def variant_flags(variant: str) -> str:
    """The preset as command-line options, e.g. ``--pt-weight 0.1 --k-init 0.1 --k-min 0.05``
    (an anneal window as ``--pt-anneal START END``)."""
    return lever_flags(VARIANT_PRESETS[variant])


def lever_flags(preset: dict) -> str:
    """The options of :data:`PAPER` in ``preset`` that differ from the paper's, as command-line
    options."""
    flags = []
    for k, v in preset.items():
        if v == PAPER.get(k, 0) or k.endswith("_anneal_start"):
            continue
        if k.endswith("_anneal_end"):
            name = k[: -len("_end")]
            flags.append(f"--{name.replace('_', '-')} {preset[name + '_start']} {v}")
        elif isinstance(v, bool):  # a switch: its flag alone
            flags.append(f"--{k.replace('_', '-')}")
        else:
            flags.append(f"--{k.replace('_', '-')} {v:g}")
    return " ".join(flags)


def resumed_variant_options(ckpt_config: dict, **given: float | None) -> dict:
    """TrainConfig fields for resuming a run without ``--variant``: the remedies the run was
    started with (its checkpoint's config; options a checkpoint predates are off, so one
    from before the remedies existed is the paper's BEGAN), with the options given on the
    command line on top."""
    base = {k: type(off)(ckpt_config.get(k, off)) for k, off in PAPER.items()}
    return _given_on_top(base, ckpt_config.get("variant", "began"), given)


def variant_options(variant: str, **given: float | None) -> dict:
    """TrainConfig fields for ``variant``: its preset, with the options the user gave on top,
    and ``variant`` itself ("custom" once a given option changes the preset)."""
    if variant not in VARIANT_PRESETS:
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(sorted(VARIANT_PRESETS))}")
    return _given_on_top(VARIANT_PRESETS[variant], variant, given)


def _given_on_top(base: dict, name: str, given: dict) -> dict:
    """``base`` with the given (not None) options on top, named ``name`` unless they change it:
    then the preset they now equal (``--variant escape`` with match's options is match), or
    "custom"."""
    opts = {**base, **{k: v for k, v in given.items() if v is not None}}
    if opts != base:
        name = next((v for v, preset in VARIANT_PRESETS.items() if preset == opts), "custom")
    return {**opts, "variant": name}


def k_floor(k_next: Tensor, k_min: float | Tensor) -> Tensor:
    """``k_next`` clipped to [k_min, 1] (a device op, no host sync); unchanged for k_min 0.
    ``k_min`` may be a 0-d device tensor (an annealed floor, :func:`k_min_at`)."""
    if isinstance(k_min, Tensor):
        return torch.maximum(k_next, k_min.to(k_next.dtype))
    return k_next.clamp(min=k_min) if k_min > 0 else k_next


# ------------------------------------------------------------------ an equilibrium that acts
# --k-target: gamma follows the measured loss ratio so that k_t holds near a target instead of
# drifting to its floor (L_fake / L_real rises during training, past any fixed gamma:
# docs/design.md §7). GAMMA_GAIN: how far gamma sits above the ratio per unit of k_t below
# its target (the pull that brings k_t back); GAMMA_RANGE: the bounds of the adapted gamma.
# The upper bound was 4 until the digits' ratio passed it at step 10,000 under the sliced
# Wasserstein term (L_fake / L_real 4.5, k_t leaving its target): the control holds k_t at any
# ratio (the update is lambda_k L_real GAMMA_GAIN (k_target - k) once gamma has caught up),
# so the bound is only a guard against a runaway loss ratio, set well above what was measured.
GAMMA_GAIN = 10.0
GAMMA_RANGE = (0.25, 16.0)


def adapt_gamma(gamma: Tensor, k_next: Tensor, loss_real: Tensor, loss_fake: Tensor, k_target: float,
                rate: float) -> Tensor:
    """The next gamma of ``--k-target``: an exponential moving average (weight ``rate`` on
    the new value) of ``L_fake / L_real + GAMMA_GAIN (k_target - k_next)``, clipped to
    :data:`GAMMA_RANGE`. gamma stays where the loss ratio is, so the paper's update
    ``k += lambda_k (gamma L_real - L_fake)`` no longer drifts, plus an offset that lifts a
    k_t below its target (and lowers one above): k_t settles near ``k_target`` with the time
    constant ``1 / (lambda_k L_real GAMMA_GAIN)``. 0-d fp32 device tensors in and out (no
    host sync)."""
    wanted = loss_fake / loss_real.clamp(min=1e-8) + GAMMA_GAIN * (k_target - k_next)
    return (gamma + rate * (wanted - gamma)).clamp(*GAMMA_RANGE)


# ------------------------------------------------------------------ ending the escape
def anneal_scale(step: Tensor, start: int, end: int, to: float = 0.0) -> Tensor:
    """The factor an annealed term is multiplied by at step ``step`` (the 0-based counter of
    the step being taken, an int64 0-d device tensor): 1 up to ``start``, then falling
    linearly to ``to`` at ``end`` (``to + (1 - to) (end - step) / (end - start)``), ``to``
    from there on; with ``end <= start`` it drops from 1 to ``to`` at ``end``. fp32 0-d,
    device ops only."""
    t = step.double()
    if end <= start:
        frac = (t < end).double()
    else:
        frac = ((end - t) / float(end - start)).clamp(0.0, 1.0)
    return (to + (1.0 - to) * frac).float() if to else frac.float()


def pt_anneal_window(cfg) -> tuple[int, int, float]:
    """(start, end, final weight / weight) of the pulling-away weight's anneal
    (``--pt-anneal START END``, ``--pt-final``); end 0: not annealed."""
    to = cfg.pt_final / cfg.pt_weight if cfg.pt_weight else 0.0
    return cfg.pt_anneal_start, cfg.pt_anneal_end, to


def pt_scale_at(cfg, step: Tensor | None) -> Tensor | None:
    """The pulling-away weight's anneal factor at ``step`` (None: not annealed)."""
    if step is None or not cfg.pt_anneal_end:
        return None
    return anneal_scale(step, *pt_anneal_window(cfg))


def k_min_at(cfg, step: Tensor) -> float | Tensor:
    """The floor under k_t at ``step``: ``cfg.k_min``, or with ``--k-min-anneal`` a 0-d device
    tensor ``k_min * anneal_scale``."""
    if not (cfg.k_min and cfg.k_min_anneal_end):
        return cfg.k_min
    return cfg.k_min * anneal_scale(step, cfg.k_min_anneal_start, cfg.k_min_anneal_end)


def check_anneal(cfg) -> None:
    """ValueError for an anneal window that cannot be meant (negative, or end before start)."""
    for name in ("pt", "k_min"):
        start, end = getattr(cfg, f"{name}_anneal_start"), getattr(cfg, f"{name}_anneal_end")
        if start < 0 or end < 0 or (end and end < start):
            raise ValueError(f"--{name.replace('_', '-')}-anneal START END needs 0 <= START <= END "
                             f"(END 0 = off), got {start} {end}")
    if cfg.pt_final < 0 or (cfg.pt_final and not cfg.pt_anneal_end):
        raise ValueError(f"--pt-final is the pulling-away weight after --pt-anneal: >= 0, with --pt-anneal "
                         f"(got {cfg.pt_final})")


# ------------------------------------------------------------------ EMA of G's weights
def ema_rate(step: Tensor, decay: float) -> Tensor:
    """The weight of the new parameters in the EMA update after step ``step`` (0-based, int64
    0-d device tensor): ``1 - min(decay, (1 + step) / (10 + step))`` (the warm-up of
    TensorFlow's ExponentialMovingAverage with num_updates, so early weights do not linger)."""
    t = step.double()
    return (1.0 - torch.clamp((1.0 + t) / (10.0 + t), max=decay)).float()


class GeneratorEMA:
    """An exponential moving average of G's parameters (Yazici et al. 2019), for sampling.

    ``update(step)`` after each optimiser step: ``ema += rate * (p - ema)`` with
    :func:`ema_rate`, as foreach device ops (no host sync; inside the CUDA graph). The
    averages start as copies of G's parameters (same memory format) and are kept in
    checkpoints as ``G_ema.<name>`` (:meth:`state_tensors`); :meth:`load` copies them in place
    (a captured graph keeps pointing at them).
    """

    PREFIX = "G_ema."

    def __init__(self, g: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay must be in (0, 1) (0 = off), got {decay}")
        self.decay = decay
        named = list(g.named_parameters())
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: Tensor) -> None:
        diffs = torch._foreach_sub([p.detach() for p in self.params], self.shadow)
        torch._foreach_mul_(diffs, ema_rate(step, self.decay))  # the Tensor overload: no .item()
        torch._foreach_add_(self.shadow, diffs)

    def state_tensors(self) -> dict[str, Tensor]:
        return {self.PREFIX + n: s for n, s in zip(self.names, self.shadow)}

    @torch.no_grad()
    def generate(self, g: torch.nn.Module, z: Tensor) -> Tensor:
        """G(z) with the averaged weights in place of the trained ones (G's buffers as they
        are; nothing of G is changed): what ``fastbegan sample`` draws from a checkpoint."""
        return torch.func.functional_call(g, dict(zip(self.names, self.shadow)), (z,))

    @torch.no_grad()
    def load(self, tensors: dict[str, Tensor]) -> bool:
        """Copy ``G_ema.*`` from checkpoint tensors in place; a checkpoint without them (a run
        started without the EMA) starts the averages from G's current parameters. Returns
        whether the checkpoint had them."""
        have = all(self.PREFIX + n in tensors for n in self.names)
        for n, s, p in zip(self.names, self.shadow, self.params):
            s.copy_(tensors[self.PREFIX + n] if have else p.detach())
        return have


def constrained_space_loss(codes: Tensor, z: Tensor) -> Tensor:
    """BEGAN-CS: ``mean |codes - z|`` for codes (B, h) of G(z) and z (B, z_dim = h); fp32."""
    if codes.shape != z.shape:
        raise ValueError(f"BEGAN-CS needs D's code size h equal to z_dim, got codes {tuple(codes.shape)} "
                         f"for z {tuple(z.shape)}: pass --h equal to --z-dim")
    return (codes.float() - z.float()).abs().mean()


def pulling_away(codes: Tensor, centred: bool = False) -> Tensor:
    """EBGAN's f_PT: ``1 / (B (B-1)) * sum_{i != j} cos(s_i, s_j)^2`` over the rows of
    ``codes`` (B, h), B >= 2; fp32. ``centred``: of the codes minus their batch mean, so that a
    component every code shares (large on D's codes: the cosines of raw codes sit near 1 and
    hide the differences, e.g. of hue) does not count as similarity."""
    s = codes.float()
    if centred:
        s = s - s.mean(0, keepdim=True)
    s = s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos2 = (s @ s.t()).square()
    b = s.shape[0]
    return (cos2.sum() - cos2.diagonal().sum()) / (b * (b - 1))


def mode_seeking(images: Tensor, z: Tensor, eps: float = 1e-5) -> Tensor:
    """MSGAN's mode-seeking term (Mao, Lee, Tseng, Ma and Yang, CVPR 2019), over the batch
    split into halves a and b (B >= 2; an odd last row is left out)::

        1 / (mean|G(z_a) - G(z_b)| / mean|z_a - z_b| + eps)

    ``images`` (B, C, H, W) = G(z), ``z`` (B, z_dim); fp32. Added to G's loss, it grows when two
    different z give similar images: G pays for mapping z to one image, whatever D says of it."""
    h = images.shape[0] // 2
    d_img = (images[:h].float() - images[h:2 * h].float()).abs().mean()
    d_z = (z[:h].float() - z[h:2 * h].float()).abs().mean()
    return 1.0 / (d_img / d_z + eps)


def batch_moments(t: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """(mean, sd) of each column of ``t`` (B, F) across the batch, fp32 (sd: population, + eps
    under the root so its gradient is finite at 0)."""
    t = t.float()
    return t.mean(0), (t.var(0, unbiased=False) + eps).sqrt()


# the least spread a pixel target is divided by: one 8-bit level in [-1, 1]. A training set
# whose images are all alike (one image, or flat colours) has none, and the terms would be
# 1e8x (feature matching) or infinite (sliced Wasserstein) on the first step.
PIXEL_SPREAD_FLOOR = 2.0 / 255.0


def moment_gap(fake: Tensor, mean_real: Tensor, sd_real: Tensor, eps: float = 1e-8, floor: float = 0.0) -> Tensor:
    """``(mean_j |mu_j(fake) - mean_real_j| + mean_j |sd_j(fake) - sd_real_j|) / mean_j sd_real_j``
    for ``fake`` (B, F) against target moments (F,): :func:`feature_matching`'s gap. The
    divisor is at least ``floor`` (and ``eps`` above 0)."""
    mu_f, sd_f = batch_moments(fake, eps)
    gap = (mu_f - mean_real).abs().mean() + (sd_f - sd_real).abs().mean()
    return gap / (sd_real.mean().clamp_min(floor) + eps)


def _unit_range_chunks(images_u8: Tensor, flip: bool, chunk: int):
    """A training set (N, H, W, 3) uint8 as (n, 3, H, W) [-1, 1] chunks of at most ``chunk``
    images, and with ``flip`` their mirror images after them (what the training draws see)."""
    from .images import to_unit_range
    for mirror in ((False, True) if flip else (False,)):
        for i in range(0, len(images_u8), chunk):
            part = images_u8[i:i + chunk]
            yield to_unit_range(part.flip(2) if mirror else part)


@torch.no_grad()
def pixel_moments(images_u8: Tensor, flip: bool, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Each pixel's mean and spread over a whole training set (``--fm-data``): ``images_u8``
    (N, H, W, 3) uint8 -> (mean, sd), each (3*H*W,) fp32 in the layout of
    ``images.flatten(1)`` for (N, 3, H, W) images in [-1, 1]. With ``flip`` the set is taken
    with its mirror images too (what the training draws see). Sums in fp64, in chunks."""
    s1 = s2 = 0.0
    n = 0
    for part in _unit_range_chunks(images_u8, flip, chunk):
        x = part.flatten(1).double()
        s1, s2, n = s1 + x.sum(0), s2 + x.square().sum(0), n + len(x)
    mean = s1 / n
    return mean.float(), (s2 / n - mean.square()).clamp_min(0).sqrt().float()


def pixel_feature_matching(fake: Tensor, x: Tensor, target: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``--fm-pixels``: :func:`moment_gap` of the fake images ``fake`` (B, 3, H, W) against the
    real batch ``x``'s pixel moments, or against ``target`` (the training set's,
    :func:`pixel_moments`, with ``--fm-data``). The one home of the choice for both steps."""
    return moment_gap(fake.flatten(1), *(batch_moments(x.flatten(1)) if target is None else target),
                      floor=PIXEL_SPREAD_FLOOR)


# --sw-weight: sliced Wasserstein distances on thumbnails. Per-pixel moments (--fm-pixels) are
# met by a red / cyan mix of backgrounds as well as by the data's ring of hues (each channel has
# the same mean and spread; only the channels' joint law differs), and the faces' samples settle
# there (docs/design.md §7). 1-D Wasserstein distances along many directions of a thumbnail
# see the joint law of the colours and of where things sit. One distance per scale of a
# pyramid: at 8x8 alone the layout's spread dominates every direction and the background's
# hue barely moves the distance (the first pilots); at 1x1 (an image's mean colour) and 2x2
# it is most of it.
SW_MAX_SIDE = 8         # thumbnails 1x1, 2x2, 4x4, 8x8: every image average-pooled to side x side, per scale
SW_DIRECTIONS = 128      # fixed random unit directions per scale (seeded with the side): the same every run
SW_GRID = 1024           # the training set's projections kept at this many quantiles


def thumbnails(images: Tensor, side: int) -> Tensor:
    """(N, 3, H, W) -> (N, 3 * side * side) fp32: the images average-pooled to side x side
    (H a power of two >= side: exact block means), flattened."""
    return F.adaptive_avg_pool2d(images.float(), side).flatten(1)


def sw_sides(res: int, max_side: int = SW_MAX_SIDE) -> tuple[int, ...]:
    """The pyramid's sides for images of side ``res``: 1, 2, 4, ... up to ``max_side``
    (``--sw-max-side``, a power of two) and ``res``."""
    return tuple(1 << i for i in range(min(res, max_side).bit_length()))


@torch.no_grad()
def thumbnail_quantiles(images_u8: Tensor, flip: bool, *, sides: tuple[int, ...] | None = None,
                        directions: int = SW_DIRECTIONS, grid: int = SW_GRID, max_images: int = 16384,
                        chunk: int = 4096) -> tuple[tuple[Tensor, Tensor, Tensor], ...]:
    """``--sw-weight``'s target, once per run: per scale ``(dirs, quantiles, scale)``.

    ``images_u8`` (N, H, W, 3) uint8, the training set (every ceil(N / max_images)-th image;
    with ``flip`` their mirror images too); ``sides`` default :func:`sw_sides`. Per side:
    ``dirs`` (3 * side**2, directions), unit vectors drawn with seed ``side`` (the same on
    every rank and run); ``quantiles`` (grid, directions): the set's projections
    :func:`thumbnails` @ ``dirs`` at the quantiles (i + 0.5) / grid (order statistics, no
    interpolation); ``scale`` (0-d): the projections' mean standard deviation (at least
    :data:`PIXEL_SPREAD_FLOOR`), so that one weight means the same at every scale and on
    every data set. fp32 on ``images_u8``'s device."""
    sides = sides or sw_sides(images_u8.shape[1])
    subset = images_u8[::max(1, -(-len(images_u8) // max_images))]
    thumbs = {side: [] for side in sides}
    for part in _unit_range_chunks(subset, flip, chunk):
        for side in sides:
            thumbs[side].append(thumbnails(part, side).double())
    out = []
    for side in sides:
        gen = torch.Generator().manual_seed(side)
        dirs = torch.randn(3 * side * side, directions, generator=gen, dtype=torch.float64)
        dirs = (dirs / dirs.norm(dim=0)).to(images_u8.device)
        proj = (torch.cat(thumbs[side]) @ dirs).sort(0).values
        rows = ((torch.arange(grid, dtype=torch.float64) + 0.5) * (len(proj) / grid)).long()
        scale = proj.std(0).mean().clamp_min(PIXEL_SPREAD_FLOOR)
        out.append((dirs.float(), proj[rows.to(proj.device)].float(), scale.float()))
    return tuple(out)


def sliced_wasserstein(fake: Tensor, target: tuple[tuple[Tensor, Tensor, Tensor], ...]) -> Tensor:
    """Sliced 1-Wasserstein distances (Deshpande, Zhang and Schwing, CVPR 2018) between the
    batch ``fake`` (B, 3, H, W) and the training set, on :func:`thumbnails` at each scale of
    ``target`` (:func:`thumbnail_quantiles`), averaged over the scales::

        mean_{i, d} |sort_i(thumb(fake) @ dir_d)_i - Q_d((i + 0.5) / B)| / scale

    The i-th smallest of the B projections is compared with the set's (i + 0.5) / B quantile:
    the W1 distance between the batch and the set along each direction. fp32 (outside
    autocast: sorted differences are small). Added to G's loss, it grows when G's samples
    bunch where the data spread, in any direction of the thumbnails' spaces."""
    b = fake.shape[0]
    with torch.autocast(fake.device.type, enabled=False):
        total = 0.0
        for dirs, quantiles, scale in target:
            side = math.isqrt(dirs.shape[0] // 3)
            proj = thumbnails(fake, side) @ dirs
            rows = ((torch.arange(b, device=fake.device) + 0.5) * (quantiles.shape[0] / b)).long()
            total = total + (proj.sort(0).values - quantiles[rows]).abs().mean() / scale
        return total / len(target)


def feature_matching(codes_fake: Tensor, codes_real: Tensor, eps: float = 1e-8) -> Tensor:
    """Feature matching on D's codes (Salimans et al., NeurIPS 2016: the mean; with the
    standard deviation too, as McGAN matches second moments)::

        (mean_j |mu_j(fake) - mu_j(real)| + mean_j |sd_j(fake) - sd_j(real)|) / mean_j sd_j(real)

    over the h code dimensions, the moments taken across each batch (B, h), B >= 2; fp32.
    ``codes_real`` is a target (pass it detached). Divided by the reals' spread, so one
    weight means the same whatever scale D's codes grow to as D trains. Added to G's loss, it
    grows when G's samples cluster where the reals spread (faces of one background colour
    spread less than real faces). The same on images flattened
    to (B, C*H*W) matches each pixel's mean and spread (``--fm-pixels``); against the whole
    training set's pixel moments (:func:`pixel_moments`, ``--fm-data``) see :func:`moment_gap`."""
    return moment_gap(codes_fake, *batch_moments(codes_real, eps), eps)


def fused_step_terms(d, fake: Tensor, z: Tensor, *, cs_alpha: float, pt_weight: float,
                     pt_scale: Tensor | None = None, pt_centred: bool = False,
                     ms_weight: float = 0.0, fm_weight: float = 0.0, fm_pixels: bool = False,
                     x: Tensor | None = None,
                     fm_target: tuple[Tensor, Tensor] | None = None, sw_weight: float = 0.0,
                     sw_target: tuple[tuple[Tensor, Tensor, Tensor], ...] | None = None,
                     d_view: tuple[Tensor, Tensor] | None = None) -> dict[str, tuple[Tensor, float | Tensor]]:
    """The enabled terms for the single-pass step, as ``{name: (value, weight)}``.

    The step's one backward scales D's weight gradients of the fake half by -k_t, which
    would be wrong for these terms, so each runs D's encoder once more on the fake batch
    (B images, encoder only): BEGAN-CS on ``fake.detach()`` (its gradient reaches D's
    encoder with weight +alpha and not G); the pulling-away term with D's encoder weights
    detached (its gradient reaches G through the encoder; D's parameters get none, and no
    weight-gradient work is done). Its zero per-sample scale only selects the torch
    backend's written-out conv backward (in-place ELU, ELU' from the output). ``pt_scale``
    (a 0-d device tensor, :func:`pt_scale_at`) multiplies the pulling-away weight. The
    mode-seeking term needs no pass of D: it reads G(z) and z only, so its gradient reaches G
    alone through ``fake``. Feature matching reads the same frozen codes of the fakes and the
    codes of the real batch ``x`` (one more encoder pass, without gradients: a target), or
    with ``fm_pixels`` the images themselves (no pass of D); ``fm_target`` (the training set's
    pixel moments, :func:`pixel_moments`) replaces the real batch's as the pixels' target.
    The sliced Wasserstein term reads ``fake`` and its fixed target ``sw_target``
    (:func:`thumbnail_quantiles`) only: its gradient reaches G alone. ``d_view``: D's view
    ``(x_d, fake_d)`` of the real batch and the fakes (shifted with ``--augment-shift``),
    which the terms on D's codes read (the pixel terms read ``x`` and ``fake``); default
    ``(x, fake)``.
    """
    terms = {}
    x_d, fake_d = (x, fake) if d_view is None else d_view
    if cs_alpha:
        terms["cs"] = (constrained_space_loss(d.encoder(fake_d.detach()), z), cs_alpha)
    if pt_weight or (fm_weight and not fm_pixels):
        frozen = {name: p.detach() for name, p in d.encoder.named_parameters()}
        zero = torch.zeros(fake.shape[0], device=fake.device)
        codes = torch.func.functional_call(d.encoder, frozen, (fake_d, zero))
    if pt_weight:
        weight = pt_weight if pt_scale is None else pt_weight * pt_scale
        terms["pt"] = (pulling_away(codes, pt_centred), weight)
    if fm_weight and fm_pixels:
        terms["fm"] = (pixel_feature_matching(fake, x, fm_target), fm_weight)
    elif fm_weight:
        with torch.no_grad():
            codes_real = d.encoder(x_d)
        terms["fm"] = (feature_matching(codes, codes_real), fm_weight)
    if ms_weight:
        terms["ms"] = (mode_seeking(fake, z), ms_weight)
    if sw_weight:
        terms["sw"] = (sliced_wasserstein(fake, sw_target), sw_weight)
    return terms
