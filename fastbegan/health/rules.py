"""Training health, the rules: BEGAN's common failures found in metrics rows, live or after the fact.

BEGAN runs go wrong in a few known ways: the generator collapses to one mode, k_t sticks
at 0 (or 1, or on its --k-min floor), the losses blow up (or turn NaN/Inf), or M_global
stops improving or rises. :class:`HealthTracker` is fed one metrics row at a time and
reports a condition once it has held for ``patience`` steps; the live monitor
(:mod:`fastbegan.health.monitor`) feeds it the trainer's rows at log intervals, and
:func:`diagnose_run` a finished run's metrics.jsonl. Nothing here touches a trainer or a
device. The messages and what to do: docs/health.md.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import checkpoint as ckpt
from ..remedies import DEFAULT_VARIANT, variant_flags
from ..runlog import read_metrics

# Defaults, measured on the embedded faces on CPU (fake/real diversity "div", fake/real
# contrast "con", both on 4x-pooled batches):
# - a fresh G is nearly constant (div 0.01-0.02 at step 10);
# - a young default G makes flat, alike blobs for hundreds of steps: res 16, 64 filters:
#   div 0.02-0.05 with con 0.2-0.4 up to step 1500; res 32 at step 300: div 0.14, con 0.54;
# - a small model that really collapsed (res 16, 16 filters, z 16: one face for every z,
#   con ~1 from step ~1500 on): div 0.054-0.10;
# - a single image repeated: div 0, con 1.
# So a collapse is div < 0.1 while con >= 0.5, for `patience` steps after a 100-step warmup.
# But a default res-32 run also drew one face for every z from step ~400 to 2500 at least
# (div 0.09 falling to 0.04, con 0.7-0.8; k_t ~0 from 1350): whether that is BEGAN's early
# phase or a real collapse, the samples are all alike, so it is reported, with a hint that
# early in a run it may pass.
DEFAULT_PATIENCE = 200      # steps a condition must hold before it is reported
COLLAPSE_RATIO = 0.1        # fake diversity below this x real's ...
MIN_CONTRAST = 0.5          # ... while each fake has at least this x the real images' contrast
WARMUP = 100                # steps before the collapse detector starts (a fresh G is nearly constant)
STALL_FACTOR = 5            # M "stalled" after STALL_FACTOR * patience steps without a 1% gain
RISE_TOL = 0.3              # M "rising" when its smoothed value is 30% above its best
K_EDGE = 1e-4               # k_t "at 0" below this (it bounces off 0 by ~1e-6), "at 1" above 1 - this
FLOOR_TOL = 1e-3            # k_t "on its floor" (--k-min > 0) within this of it (one step moves k_t by
                            # lambda_k |gamma L_real - L_fake| ~ 1e-4, so a k_t that leaves it shows)
EARLY = 5000                # a collapse that starts before this step may be BEGAN's early one-face phase
# the variant measured best against the collapse and for variety (fastbegan train's default)
REMEDY_FLAGS = f"--variant {DEFAULT_VARIANT} ({variant_flags(DEFAULT_VARIANT)})"
REMEDY_TERMS = ("loss_pt", "loss_cs", "loss_ms", "loss_fm", "loss_sw")  # logged when a run uses a remedy term
BLOWUP_LOSS = 1.0           # an L1 loss above this on images in [-1, 1] = blown up (normal: < 0.5)


@dataclass
class Finding:
    """One health problem: what, since when, the numbers behind it, and a message."""
    kind: str            # mode_collapse | k_zero | k_floor | k_one | blowup | m_rising | m_stalled | non_finite
    step: int            # step at which it was reported
    since: int           # first logged step at which the condition held
    message: str
    values: dict = field(default_factory=dict)
    ongoing: bool = True  # still holding at the last row seen

    def __str__(self) -> str:
        return self.message

    def as_dict(self) -> dict:
        return {"kind": self.kind, "step": self.step, "since": self.since, "message": self.message,
                "values": self.values, "ongoing": self.ongoing}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _fmt_lr(lr) -> str:
    return f"{lr:.3g}" if _finite(lr) else "?"


def floor_at(k_min: float, anneal: tuple[int, int], step: int) -> float:
    """The floor under k_t at logged ``step``: ``k_min``, or falling linearly to 0 over
    ``anneal`` = (start, end) (end 0: off; fastbegan.remedies.k_min_at, on the host)."""
    start, end = anneal
    if not (k_min and end):
        return k_min
    frac = float(step < end) if end <= start else min(max((end - step) / (end - start), 0.0), 1.0)
    return k_min * frac


def _floor_message(floor, step, since, lreal, lfake, g, lr) -> str:
    ratio = lfake / lreal if _finite(lfake) and _finite(lreal) and lreal > 0 else float("nan")
    said = (f"L_fake / L_real = {ratio:.2f} stays above gamma {g:g}" if math.isfinite(ratio)
            else f"L_fake stays above gamma {g:g} x L_real")
    wanted = f"the loss ratio says about {ratio:.2f}, " if math.isfinite(ratio) else ""
    return (f"k_t has sat on its floor (k_min {floor:g}) for {step - since} steps (since step {since}): "
            f"D's equilibrium is not acting ({said}), so each update pushes k_t down and only the floor "
            f"holds it; the balance BEGAN trains towards is not reached and variety suffers. Try a "
            f"higher --gamma ({wanted}now {g:g}), a gamma that follows the ratio (--k-target 0.1, "
            f"docs/training.md) or a lower --lr (now {_fmt_lr(lr)}); a faster --lambda-k lifts k_t off "
            f"the floor sooner once the ratio falls below gamma")


class HealthTracker:
    """Host-side detectors fed one metrics row at a time (live or from metrics.jsonl).

    A row needs ``step``, ``k``, ``M``, ``loss_real``, ``loss_fake`` and, for the collapse
    detector, ``diversity_ratio``; ``lr`` is used in messages. ``update(row)`` returns the
    findings newly reported at that row (a condition is reported once per episode, when it
    has held at every logged row for at least ``patience`` steps; non-finite values at once).
    ``k_min`` and ``k_min_anneal`` (start, end; end 0: off) are the run's floor under k_t.
    """

    def __init__(self, gamma: float = 0.5, patience: int = DEFAULT_PATIENCE,
                 collapse_ratio: float = COLLAPSE_RATIO, warmup: int | None = None,
                 min_contrast: float = MIN_CONTRAST,
                 stall: int | None = None, rise_tol: float = RISE_TOL, report_stall: bool = True,
                 k_min: float = 0.0, k_min_anneal: tuple[int, int] = (0, 0)):
        self.gamma = gamma
        self.k_min, self.k_min_anneal = float(k_min or 0.0), tuple(k_min_anneal)
        self.patience = max(int(patience), 1)
        self.collapse_ratio = collapse_ratio
        self.min_contrast = min_contrast
        # a fresh generator is nearly constant: diversity is judged only after warmup steps
        self.warmup = WARMUP if warmup is None else warmup
        self.stall = STALL_FACTOR * self.patience if stall is None else stall
        self.rise_tol = rise_tol
        self.report_stall = report_stall
        self.findings: list[Finding] = []
        self.reset()

    def reset(self) -> None:
        """Forget streaks and the M trend (after a restore, or a step going back in a log)."""
        for f in getattr(self, "reported", {}).values():
            if f is not None:
                f.ongoing = False
        streaks = ("mode_collapse", "k_zero", "k_floor", "k_one", "blowup", "m_rising")
        self.since: dict[str, int | None] = {k: None for k in streaks}
        self.reported: dict[str, Finding | None] = {k: None for k in streaks + ("m_stalled", "non_finite")}
        self.m_smooth: float | None = None
        self.best_m, self.best_step = math.inf, None

    # ------------------------------------------------------------------ detectors
    # Which way to turn gamma, from k_{t+1} = clip(k_t + lambda_k (gamma L_real - L_fake), 0, 1):
    # k_t pinned at 0 means L_fake > gamma L_real even with D ignoring the fakes, so a *higher*
    # gamma asks less of G; pinned at 1, a lower gamma (or lr) lets D catch up. For a collapse,
    # gamma is the diversity ratio: higher gives more diverse samples (BEGAN paper, §3.1).
    def update(self, row: dict) -> list[Finding]:
        step = int(row["step"])
        vals = {k: row.get(k) for k in ("loss_real", "loss_fake", "k", "M")}
        bad = [k for k, v in vals.items() if v is not None and not _finite(v)]
        if row.get("fake_nonfinite"):
            bad.append("generator output")
        if bad:  # reported at once; nothing else is meaningful on NaN rows
            new = [] if self.reported["non_finite"] else [self._non_finite(step, bad, vals, row.get("lr"))]
            return self._finish(new, step, held={"non_finite"})
        self._clear("non_finite")
        held: set[str] = set()
        new: list[Finding] = []
        for detect in (self._blowup, self._k_zero, self._k_floor, self._k_one, self._mode_collapse,
                       self._m_trend):
            new += detect(row, step, held)
        return self._finish(new, step, held)

    def _due(self, kind: str, step: int, held: set[str]) -> int | None:
        """The condition ``kind`` holds at ``step``: its first step if it is now to be
        reported (held for ``patience`` steps, not reported yet), else None."""
        since = self._held(kind, step)
        held.add(kind)
        return since if step - since >= self.patience and self.reported[kind] is None else None

    def _non_finite(self, step: int, bad: list[str], vals: dict, lr) -> Finding:
        shown = ", ".join(f"{k}={vals[k]}" if k in vals else f"{k} has NaN/Inf" for k in bad)
        return self._report("non_finite", step, step, {"bad": bad},
                            f"non-finite values at step {step} ({shown}): training diverged; go back to "
                            f"an earlier checkpoint and train with a lower lr (now {_fmt_lr(lr)})")

    def _blowup(self, row: dict, step: int, held: set[str]) -> list[Finding]:
        """Losses finite but far beyond what images in [-1, 1] give."""
        lreal, lfake, lr = row.get("loss_real"), row.get("loss_fake"), row.get("lr")
        if not (_finite(lreal) and _finite(lfake) and max(lreal, lfake) > BLOWUP_LOSS):
            return []
        since = self._due("blowup", step, held)
        if since is None:
            return []
        amax = row.get("fake_absmax")
        out = (f"; generator outputs reach {amax:.3g} (images are in [-1, 1])" if _finite(amax) else "")
        return [self._report("blowup", step, since,
                             {"loss_real": lreal, "loss_fake": lfake, "fake_absmax": amax, "lr": lr},
                             f"losses blown up since step {since}: L_real {lreal:.3g}, L_fake {lfake:.3g} "
                             f"(normally below 0.5){out}; the lr is too high for this model: try a lower "
                             f"--lr (now {_fmt_lr(lr)})")]

    def _k_zero(self, row: dict, step: int, held: set[str]) -> list[Finding]:
        """k_t pinned at 0: L_fake > gamma * L_real at every step."""
        k, lreal, lfake, lr, g = row.get("k"), row.get("loss_real"), row.get("loss_fake"), row.get("lr"), self._gamma(row)
        if not (_finite(k) and k < K_EDGE):
            return []
        since = self._due("k_zero", step, held)
        if since is None:
            return []
        hint = "; 0.3-0.7 is usual" if g < 0.3 else ""
        advice = (f"try a higher --gamma (now {g:g}{hint}) or a lower --lr (now {_fmt_lr(lr)})"
                  if lfake <= BLOWUP_LOSS else
                  f"here L_fake itself is blown up: lower the --lr (now {_fmt_lr(lr)}) first")
        return [self._report("k_zero", step, since, {"k": k, "loss_real": lreal, "loss_fake": lfake, "gamma": g},
                             f"k_t has been 0 for {step - since} steps (since step {since}): the fakes' "
                             f"reconstruction loss stays above gamma x the real images' (L_fake {lfake:.4f} > "
                             f"gamma*L_real {g * lreal:.4f}, gamma {g:g}), so D wins even while ignoring the "
                             f"fakes and G cannot reach the balance; {advice}" + self._remedy_hint(row))]

    def _gamma(self, row: dict) -> float:
        """The gamma of a logged step: the adapted one where the row has it (--k-target), else the run's."""
        return row.get("gamma", self.gamma)

    def _k_floor(self, row: dict, step: int, held: set[str]) -> list[Finding]:
        """k_t pinned on its --k-min floor (> 0): L_fake > gamma * L_real at every step, the
        update pushes k_t down and only the floor holds it (k_zero's case, with a floor)."""
        k, lreal, lfake, lr, g = row.get("k"), row.get("loss_real"), row.get("loss_fake"), row.get("lr"), self._gamma(row)
        floor = floor_at(self.k_min, self.k_min_anneal, step)
        if not (floor > K_EDGE and _finite(k) and abs(k - floor) <= FLOOR_TOL):
            return []
        since = self._due("k_floor", step, held)
        if since is None:
            return []
        return [self._report("k_floor", step, since,
                             {"k": k, "k_min": floor, "loss_real": lreal, "loss_fake": lfake, "gamma": g},
                             _floor_message(floor, step, since, lreal, lfake, g, lr))]

    def _k_one(self, row: dict, step: int, held: set[str]) -> list[Finding]:
        """k_t pinned at 1: L_fake < gamma * L_real even with D pushing fakes away fully."""
        k, lreal, lfake, lr, g = row.get("k"), row.get("loss_real"), row.get("loss_fake"), row.get("lr"), self._gamma(row)
        if not (_finite(k) and k > 1 - K_EDGE):
            return []
        since = self._due("k_one", step, held)
        if since is None:
            return []
        return [self._report("k_one", step, since, {"k": k, "loss_real": lreal, "loss_fake": lfake, "gamma": g},
                             f"k_t has been 1 for {step - since} steps (since step {since}): the fakes are "
                             f"reconstructed better than gamma x the real images even with D pushing them "
                             f"away at full strength (L_fake {lfake:.4f} < gamma*L_real {g * lreal:.4f}), so G "
                             f"wins (D has stopped keeping up, or G makes flat, easy images); try a lower "
                             f"--gamma (now {g:g}) or a lower --lr (now {_fmt_lr(lr)})")]

    def _mode_collapse(self, row: dict, step: int, held: set[str]) -> list[Finding]:
        """The fake batch much less diverse than the real one."""
        ratio, contrast, lr, g = row.get("diversity_ratio"), row.get("contrast_ratio"), row.get("lr"), self._gamma(row)
        # a young G's outputs are flat blobs, alike because nothing is learnt yet (normal):
        # a collapse is image-like fakes (contrast like the real images') that are all alike
        image_like = not _finite(contrast) or contrast >= self.min_contrast
        if not (_finite(ratio) and step >= self.warmup and ratio < self.collapse_ratio and image_like):
            return []
        since = self._due("mode_collapse", step, held)
        if since is None:
            return []
        df, dr = row.get("diversity_fake"), row.get("diversity_real")
        nums = (f"; mean pairwise distance {df:.4f} vs {dr:.4f} on 4x-downsampled batches"
                if _finite(df) and _finite(dr) else "")
        if _finite(contrast):
            nums += f", while each fake has {contrast:.2f}x the real images' contrast"
        return [self._report("mode_collapse", step, since,
                             {"diversity_ratio": ratio, "diversity_fake": df, "diversity_real": dr,
                              "contrast_ratio": contrast, "gamma": g, "lr": lr},
                             f"mode collapse suspected since step {since}: fake diversity is {ratio:.2f}x "
                             f"real (below {self.collapse_ratio:g}x for {step - since} steps{nums}); "
                             f"try a higher --gamma (now {g:g}) or a lower --lr (now {_fmt_lr(lr)})"
                             + ("; early in a run this can also be a phase that passes (look at the "
                                "samples again in a few thousand steps)" if since < EARLY else "")
                             + self._remedy_hint(row))]

    @staticmethod
    def _remedy_hint(row: dict) -> str:
        """BEGAN's early one-image collapse (k_t at 0, D ignoring the fakes) has options that
        escape it (fastbegan.remedies, measured in docs/training.md); name them unless the
        run already uses a remedy term (the logged rows carry its loss then)."""
        if any(k in row for k in REMEDY_TERMS):
            return ""
        return (f"; to escape BEGAN's early one-image collapse, start a run with {REMEDY_FLAGS} "
                "(docs/training.md, Variety and the equilibrium)")

    def _m_trend(self, row: dict, step: int, held: set[str]) -> list[Finding]:
        """M_global stalled or rising, on a smoothed M (one batch's M is noisy)."""
        m = row.get("M")
        if not _finite(m):
            return []
        new = []
        self.m_smooth = m if self.m_smooth is None else 0.7 * self.m_smooth + 0.3 * m
        ms = self.m_smooth
        if ms < self.best_m * 0.99:
            self.best_m, self.best_step = ms, step
            self._clear("m_stalled")
        elif (self.report_stall and step - self.best_step >= self.stall
              and self.reported["m_stalled"] is None):
            held.add("m_stalled")
            new.append(self._report("m_stalled", step, self.best_step,
                                    {"M": ms, "best_M": self.best_m, "best_step": self.best_step},
                                    f"M_global stalled for {step - self.best_step} steps: best {self.best_m:.4f} "
                                    f"at step {self.best_step}, now {ms:.4f} (smoothed; no 1% improvement); if "
                                    f"the samples still look wrong, lower the lr (--lr-stall halves it "
                                    f"automatically), else the run has converged"))
        elif self.reported["m_stalled"] is not None:
            held.add("m_stalled")
        if ms > self.best_m * (1 + self.rise_tol):
            since = self._due("m_rising", step, held)
            if since is not None:
                new.append(self._report("m_rising", step, since,
                                        {"M": ms, "best_M": self.best_m, "best_step": self.best_step},
                                        f"M_global rising since step {since}: {ms:.4f} now (smoothed) vs best "
                                        f"{self.best_m:.4f} at step {self.best_step} "
                                        f"(+{100 * (ms / self.best_m - 1):.0f}%): training is becoming unstable; "
                                        f"try a lower --lr (now {_fmt_lr(row.get('lr'))})"))
        return new

    # ------------------------------------------------------------------ bookkeeping
    def _held(self, kind: str, step: int) -> int:
        if self.since[kind] is None:
            self.since[kind] = step
        return self.since[kind]

    def _clear(self, kind: str) -> None:
        f = self.reported.get(kind)
        if f is not None:
            f.ongoing = False
        self.reported[kind] = None

    def _report(self, kind, step, since, values, message) -> Finding:
        f = Finding(kind, step, since, message, values)
        self.reported[kind] = f
        self.findings.append(f)
        return f

    def _finish(self, new, step, held) -> list[Finding]:
        for kind in self.since:
            if kind not in held:
                self.since[kind] = None
                self._clear(kind)
        if "non_finite" not in held:
            self._clear("non_finite")
        return new

    def active(self) -> list[str]:
        """Kinds reported and still holding."""
        return [k for k, f in self.reported.items() if f is not None]


# ---------------------------------------------------------------------- finished runs
def _run_config(run_dir: Path) -> dict:
    """The run's config from its newest checkpoint's metadata (cheap: tensors are not read)."""
    path = ckpt.latest_checkpoint(run_dir)
    if path is None:
        return {}
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("config", "{}"))
    except (SafetensorError, OSError, ValueError):  # an unreadable checkpoint: fall back to defaults
        return {}


def diagnose_run(run_dir: str | os.PathLike, patience: int | None = None,
                 gamma: float | None = None, warmup: int | None = None) -> list[Finding]:
    """Health findings of a run folder, from its metrics.jsonl (empty list: nothing found).

    The same detectors as the live monitor. ``gamma``, ``patience`` and the floor under k_t
    (``k_min``, its anneal) are the run's own (from its newest checkpoint), else 0.5, 200
    steps and no floor; ``warmup`` (steps before the
    collapse detector starts) defaults to 100. The collapse detector needs
    the ``diversity_ratio`` the live monitor logs; a step that goes back (a restore) starts
    a new episode. Each finding has ``kind``, ``step``, ``since``, ``message``, ``values``
    and ``ongoing`` (still holding at the last row); ``str(finding)`` is its message.
    """
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)  # FileNotFoundError if it is no run folder
    cfg = _run_config(run_dir)
    g = gamma if gamma is not None else cfg.get("gamma", 0.5)
    p = patience if patience is not None else (cfg.get("health_patience") or DEFAULT_PATIENCE)
    tracker = HealthTracker(g, p, warmup=warmup, report_stall=not cfg.get("lr_stall"),
                            k_min=cfg.get("k_min") or 0.0,
                            k_min_anneal=(cfg.get("k_min_anneal_start") or 0, cfg.get("k_min_anneal_end") or 0))
    last = None
    for row in rows:
        if last is not None and row["step"] <= last:
            tracker.reset()
        tracker.update(row)
        last = row["step"]
        if "restored_to" in row:
            tracker.reset()
            last = row["restored_to"]
    return tracker.findings
