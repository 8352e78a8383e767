"""Training health, live: :class:`HealthMonitor`, one of ``Trainer.log_hooks``.

At log intervals only, one small device computation on the newest real and fake batches
(diversity, contrast, the largest |fake|) and one host read; nothing runs inside the
training step. The signals go into the metrics row, the row goes through the rules
(:class:`fastbegan.health.rules.HealthTracker`), a message is printed once a condition
has held for ``patience`` steps, and ``on_collapse`` (warn | stop | restore) acts on a
suspected collapse. The trainer is only reached through the hook's argument (no import of
fastbegan.train here). The messages and what to do: docs/health.md.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import checkpoint as ckpt
from .rules import COLLAPSE_RATIO, DEFAULT_PATIENCE, Finding, HealthTracker

ON_COLLAPSE = ("warn", "stop", "restore")
MAX_RESTORES = 3            # --on-collapse restore gives up (stops) after this many


def _pooled(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """(B, C, H, W) -> (B, C*h*w) float, ``factor``x average-pooled (less at tiny sizes)."""
    x = x.detach().float()
    f = max(1, min(factor, x.shape[-1] // 4))
    return (F.avg_pool2d(x, f) if f > 1 else x).flatten(1)


def batch_contrast(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Mean over the batch of each pooled image's pixel standard deviation (0-d device tensor)."""
    return _pooled(x, factor).std(1).mean()


def batch_diversity(x: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """Mean pairwise RMS distance between the images of a batch, on ``factor``x average-pooled
    images (0-d device tensor; no host synchronisation)."""
    d = _pooled(x, factor)
    n = d.shape[0]
    if n < 2:
        return torch.full((), float("nan"), device=x.device)
    dist = torch.cdist(d, d)
    return dist.sum() / (n * (n - 1) * math.sqrt(d.shape[1]))


class HealthMonitor:
    """``Trainer.log_hooks`` entry: ``monitor(trainer, row) -> message | None``."""

    def __init__(self, gamma: float = 0.5, patience: int = DEFAULT_PATIENCE, on_collapse: str = "warn",
                 collapse_ratio: float = COLLAPSE_RATIO, report_stall: bool = True,
                 max_restores: int = MAX_RESTORES, k_min: float = 0.0, k_min_anneal: tuple[int, int] = (0, 0)):
        if on_collapse not in ON_COLLAPSE:
            raise ValueError(f"on_collapse must be one of {', '.join(ON_COLLAPSE)}, got {on_collapse!r}")
        self.tracker = HealthTracker(gamma, patience, collapse_ratio, report_stall=report_stall,
                                     k_min=k_min, k_min_anneal=k_min_anneal)
        self.on_collapse = on_collapse
        self.max_restores = max_restores
        self.restores: list[dict] = []

    @classmethod
    def from_config(cls, cfg) -> HealthMonitor:
        # with --lr-stall the trainer already reports (and acts on) a stalled M
        return cls(cfg.gamma, cfg.health_patience, cfg.on_collapse, report_stall=not cfg.lr_stall,
                   k_min=getattr(cfg, "k_min", 0.0),
                   k_min_anneal=(getattr(cfg, "k_min_anneal_start", 0), getattr(cfg, "k_min_anneal_end", 0)))

    @torch.no_grad()
    def measure(self, trainer) -> dict:
        """Diversity of the newest fake and real batches: one small computation, one host read."""
        batch = trainer.last_batch
        if not batch or "fake" not in batch or "x" not in batch:
            return {}
        fake, x = batch["fake"], batch["x"]
        nonfinite = (~torch.isfinite(fake)).any().float()
        div_f, div_r = batch_diversity(fake), batch_diversity(x)
        amax = fake.detach().float().abs().amax()
        vec = torch.stack([div_f, div_r, nonfinite, amax, batch_contrast(fake), batch_contrast(x)])
        dist = getattr(trainer, "dist", None)
        if dist is not None and dist.enabled:  # every rank sees the same numbers, takes the same action
            from ..distributed import average
            vec = average(vec)
        df, dr, nf, am, cf, cr = vec.tolist()  # the one host read
        ratio = df / dr if dr > 0 else float("nan")
        contrast = cf / cr if cr > 0 else float("nan")
        out = {"diversity_fake": round(df, 6), "diversity_real": round(dr, 6), "fake_absmax": round(am, 4),
               "diversity_ratio": round(ratio, 4) if math.isfinite(ratio) else ratio,
               "contrast_ratio": round(contrast, 4) if math.isfinite(contrast) else contrast}
        if nf:
            out["fake_nonfinite"] = True
        return out

    def __call__(self, trainer, row: dict) -> str | None:
        if trainer.step != row["step"]:
            # an earlier hook (the divergence guard) has just gone back to a checkpoint:
            # this row's batch is gone, and the streaks start again from the restored state
            self.tracker.reset()
            return None
        row.update(self.measure(trainer))
        found = self.tracker.update(row)
        row["health"] = self.tracker.active()
        notes = [f.message for f in found]
        if any(f.kind == "mode_collapse" for f in found) and self.on_collapse != "warn":
            collapse = next(f for f in found if f.kind == "mode_collapse")
            notes.append(self.act(trainer, row, collapse))
        # one message per line; the trainer prefixes the first with "step N: "
        return f"\nstep {row['step']}: ".join(notes) if notes else None

    # ------------------------------------------------------------------ actions
    def act(self, trainer, row: dict, finding: Finding) -> str:
        if self.on_collapse == "restore":
            done = trainer.state.collapse_restores  # the run's count: kept in checkpoints
            if done >= getattr(trainer.cfg, "max_restores", self.max_restores):
                trainer.request_stop()
                return (f"--on-collapse restore: collapsed again after {done} restores; "
                        "stopping (a checkpoint is saved)")
            msg = self.restore(trainer, row, finding.since)
            if msg is not None:
                return msg
            trainer.request_stop()
            return (f"--on-collapse restore: no checkpoint from before step {finding.since} to go back to "
                    f"(one is written every --ckpt-every {trainer.cfg.ckpt_every} steps); stopping instead "
                    "(a checkpoint is saved)")
        trainer.request_stop()
        return (f"--on-collapse stop: stopping at step {trainer.step} (a checkpoint is saved); "
                f"the collapse began at step {finding.since}")

    def restore(self, trainer, row: dict, since: int) -> str | None:
        """Go back to the newest good state from before step ``since`` with the lr halved
        (:func:`fastbegan.guard.restore`, the divergence guard's routine: same-step check
        under torchrun, counted in the run's state); the checkpoints written after it
        (during the collapse) go to checkpoints/discarded/."""
        from ..guard import restore
        old_step = trainer.step
        guard = getattr(trainer, "guard", None)  # its in-memory start state is a restore point too
        done = restore(trainer, guard.start if guard is not None else None, before=since,
                       count="collapse_restores")
        if done is None:
            return None
        if done.source is not None:
            source = f"{done.source.name} (step {done.step}, written before the collapse began at step {since})"
        else:
            source = (f"the state this run started from (step {done.step}; no checkpoint was written "
                      f"before the collapse began at step {since})")
        new_lr = done.lr
        dist = getattr(trainer, "dist", None)
        moved = _discard_after(trainer.cfg.out, trainer.step) if dist is None or dist.is_main else 0
        self.tracker.reset()
        self.restores.append({"from": old_step, "to": trainer.step, "lr": new_lr})
        row["restored_to"] = trainer.step
        row["lr_after_restore"] = new_lr
        note = f"; {moved} later checkpoint(s) moved to checkpoints/discarded/" if moved else ""
        return f"--on-collapse restore: back to {source} with the lr halved to {new_lr:.3g}{note}"


def _discard_after(out: str | os.PathLike, step: int) -> int:
    later = [p for p in ckpt.list_checkpoints(out) if ckpt.checkpoint_step(p) > step]
    if later:
        dest = Path(out) / "checkpoints" / "discarded"
        dest.mkdir(exist_ok=True)
        for p in later:
            os.replace(p, dest / p.name)
    return len(later)
