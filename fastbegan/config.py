"""A run's configuration: :class:`TrainConfig`, every option that defines a run, checked
when it is made (saved in every checkpoint; docs/training.md lists the options)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import augment, ops, remedies
from .hardware import PRECISIONS
from .model import check_resolution, default_filters

COMPILE_CHOICES = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Everything that defines a run (saved in every checkpoint)."""
    res: int = 64
    filters: int | None = None          # n; default 128 at res >= 128, else 64
    z_dim: int = 64
    h: int = 64
    batch_size: int = 16
    steps: int = 10_000
    lr: float = 1e-4
    lr_d: float | None = None           # D's learning rate (TTUR); None = lr. The lr rules keep the ratio
    lr_min: float = 2e-5
    lr_half_every: int = 100_000
    lr_stall: int = 0                   # halve lr after this many steps without M improving (0 = off)
    beta1: float = 0.5
    beta2: float = 0.999
    gamma: float = 0.5
    lambda_k: float = 0.001
    k_target: float = 0.0               # > 0: gamma follows the loss ratio to hold k_t near this (0 = fixed gamma)
    lambda_gamma: float = 0.01          # the adapted gamma's EMA rate (remedies.adapt_gamma)
    separate_z: bool = False
    cs_alpha: float = 0.0               # BEGAN-CS constrained-space term in D's loss (0 = off)
    pt_weight: float = 0.0              # EBGAN pulling-away term in G's loss (0 = off)
    k_init: float = 0.0                 # k_0 (the paper: 0); > 0 makes D push back on fakes from step 1
    k_min: float = 0.0                  # floor under k_t (the paper: 0)
    variant: str = "began"              # the preset the four options above came from (or "custom")
    pt_anneal_start: int = 0            # pt_weight falls linearly to pt_final from this step ...
    pt_anneal_end: int = 0              # ... to this one (0 = not annealed); remedies.anneal_scale
    pt_final: float = 0.0               # the pulling-away weight the anneal ends at
    k_min_anneal_start: int = 0         # the same for the floor k_min
    k_min_anneal_end: int = 0
    pt_centred: bool = False            # the pulling-away term on mean-centred codes
    ms_weight: float = 0.0              # MSGAN's mode-seeking term in G's loss (0 = off); remedies.mode_seeking
    fm_weight: float = 0.0              # feature matching on D's codes in G's loss (0 = off); remedies.feature_matching
    fm_pixels: bool = False             # feature matching on the images' pixels instead of D's codes
    fm_data: bool = False               # ... against the training set's pixel moments, not the real batch's
    sw_weight: float = 0.0              # sliced Wasserstein on thumbnails vs the training set, in G's loss; remedies.sliced_wasserstein
    sw_max_side: int = remedies.SW_MAX_SIDE  # ... on thumbnails of side 1, 2, 4, ... up to this; remedies.sw_sides
    mbstd_group: int = 0                # D's encoder sees the minibatch stddev over groups of this size (0 = off)
    augment_shift: float = 0.0          # D's inputs, real and fake, shifted by up to this fraction of the side (0 = off); fastbegan.augment
    ema_decay: float = 0.0              # EMA of G's weights for sampling (0 = off); remedies.GeneratorEMA
    skip: bool = False
    vanishing_residual: int = 0         # steps over which the carry goes 1 -> 0 (0 = option off)
    precision: str = "auto"             # auto | fp32 | bf16 (autocast); auto: bf16 where the hardware has it
    backend: str = "auto"               # auto | torch | triton
    device: str = "auto"
    seed: int = 0
    data: str | None = None             # None = embedded procedural faces
    n_procedural: int = 4096
    flip: bool = True
    out: str = "runs/began"
    sample_every: int = 500
    ckpt_every: int = 1000
    log_every: int = 50
    keep_ckpts: int = 3
    max_restores: int = 3               # divergence guard: restores before giving up
    on_collapse: str = "warn"           # health monitor on a suspected mode collapse: warn | stop | restore
    health_patience: int = 200          # steps a health condition must hold before a message (0 = monitor off)
    compile_step: str = "auto"          # fused step: torch.compile its forward: auto | on | off
    dist_timeout: float = 300.0         # torchrun: a rank whose step does not finish in this many s ends the run
    reference_step: bool = False        # the reference two-backward step instead of the fused one

    def __post_init__(self):
        check_resolution(self.res)
        if self.filters is None:
            self.filters = default_filters(self.res)
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.compile_step, bool):  # configs written before auto existed
            self.compile_step = "auto" if self.compile_step else "off"
        if self.compile_step not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, got {self.compile_step!r}")
        if self.backend not in ops.BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}: choose one of {', '.join(ops.BACKENDS)}")
        for name in ("sample_every", "ckpt_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_restores < 0:
            raise ValueError(f"max_restores must be >= 0, got {self.max_restores}")
        if self.on_collapse not in ("warn", "stop", "restore"):
            raise ValueError(f"on_collapse must be warn, stop or restore, got {self.on_collapse!r}")
        if min(self.cs_alpha, self.pt_weight, self.ms_weight, self.fm_weight, self.sw_weight) < 0:
            raise ValueError("--cs-alpha, --pt-weight, --ms-weight, --fm-weight and --sw-weight must be >= 0")
        if not 0.0 <= self.k_init <= 1.0:
            raise ValueError(f"--k-init must be in [0, 1] (k_t is clipped there), got {self.k_init}")
        if not 0.0 <= self.k_min <= 1.0:
            raise ValueError(f"--k-min must be in [0, 1] (k_t is clipped there), got {self.k_min}")
        if not 0.0 <= self.k_target < 1.0 or (self.k_target and self.k_target <= self.k_min):
            raise ValueError(f"--k-target is the k_t that the adapted gamma holds: in (--k-min, 1), or 0 for a "
                             f"fixed gamma (got {self.k_target}, --k-min {self.k_min})")
        if self.k_target and not 0 < self.lambda_gamma <= 1:
            raise ValueError(f"--lambda-gamma is how fast gamma follows the loss ratio (an EMA's rate): in (0, 1], "
                             f"got {self.lambda_gamma}")
        if self.k_target and not remedies.GAMMA_RANGE[0] <= self.gamma <= remedies.GAMMA_RANGE[1]:
            raise ValueError(f"with --k-target, --gamma is where the adapted gamma starts: in "
                             f"{list(remedies.GAMMA_RANGE)}, got {self.gamma}")
        if self.cs_alpha and self.h != self.z_dim:
            raise ValueError(f"BEGAN-CS (--cs-alpha) maps D's codes back to z, so --h must equal --z-dim "
                             f"(got h={self.h}, z_dim={self.z_dim})")
        remedies.check_anneal(self)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"--ema-decay must be in [0, 1) (0 = off), got {self.ema_decay}")
        if (self.pt_weight or self.ms_weight or self.fm_weight or self.sw_weight) and self.batch_size < 2:
            raise ValueError("the pulling-away (--pt-weight), mode-seeking (--ms-weight), feature-matching "
                             "(--fm-weight) and sliced Wasserstein (--sw-weight) terms compare samples: use "
                             "--batch-size >= 2")
        if self.sw_max_side < 1 or self.sw_max_side & (self.sw_max_side - 1):
            raise ValueError(f"--sw-max-side is the largest thumbnail side of the sliced Wasserstein term: a power "
                             f"of two >= 1 (default {remedies.SW_MAX_SIDE}), got {self.sw_max_side}")
        if self.fm_data and not (self.fm_weight and self.fm_pixels):
            raise ValueError("--fm-data sets the target of pixel feature matching: use it with --fm-weight > 0 "
                             "and --fm-pixels (D's codes change as D trains, so they have no fixed target)")
        if self.lr <= 0 or (self.lr_d is not None and self.lr_d <= 0):
            raise ValueError(f"learning rates must be > 0, got --lr {self.lr} --lr-d {self.lr_d}")
        if self.mbstd_group < 0 or (self.mbstd_group and self.batch_size % self.mbstd_group):
            raise ValueError(f"--mbstd-group must be 0 (off) or divide --batch-size {self.batch_size} (the "
                             f"statistic is taken over groups of the real and of the fake batch), got {self.mbstd_group}")
        if not 0.0 <= self.augment_shift < augment.MAX_FRACTION:
            raise ValueError(f"--augment-shift is the largest shift of D's inputs as a fraction of the side: in "
                             f"[0, {augment.MAX_FRACTION}) (0 = off; DiffAugment uses 0.125), got {self.augment_shift}")
        if self.dist_timeout <= 0:
            raise ValueError(f"--dist-timeout must be > 0 seconds, got {self.dist_timeout}")
        if self.health_patience < 0:
            raise ValueError(f"health_patience must be >= 0, got {self.health_patience}")

    @property
    def lr_d_ratio(self) -> float:
        """D's learning rate over G's (1 without --lr-d); the lr rules keep it."""
        return 1.0 if self.lr_d is None else self.lr_d / self.lr

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["vanishing_residual_on"] = self.vanishing_residual > 0
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
