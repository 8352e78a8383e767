"""The divergence guard: restore the last good state with the lr halved on a NaN/Inf loss.

Every step ORs ``~isfinite(L_real + L_fake)`` into the trainer's ``nonfinite`` device flag
(no host synchronisation). :class:`DivergenceGuard` reads it at log intervals (it is one of
``Trainer.log_hooks``) and before every checkpoint (then the parameters are checked too,
so a checkpoint is never written from a diverged state). On NaN/Inf it loads the newest
checkpoint, or before the first one the state the run started from (kept in host memory),
halves the lr (Adam's state comes from the restored state) and says so; after
``max_restores`` restores it raises :class:`DivergenceError`. Under torchrun the flag holds
the all-reduced losses, so every rank restores at the same step (docs/training.md).
"""
from __future__ import annotations

import torch

from . import checkpoint as ckpt
from . import distributed


class DivergenceError(RuntimeError):
    """Training kept producing NaN/Inf after ``max_restores`` restores."""


class DivergenceGuard:
    """``Trainer.log_hooks`` entry and the check before each checkpoint.

    ``restores``: restores so far in this launch (the retry budget is per launch).
    ``start``: the in-memory restore point ``(tensors, host_state)`` taken by
    :meth:`snapshot` when the run has no checkpoint of its current step, else None.
    """

    def __init__(self, max_restores: int):
        self.max_restores = max_restores
        self.restores = 0
        self.start: tuple[dict, dict] | None = None

    def __call__(self, trainer, row: dict) -> str | None:
        return self.check(trainer)

    def snapshot(self, trainer) -> None:
        """Keep the current state in host memory as the restore point, unless a checkpoint
        of this very step exists (a resumed run): then that file is the restore point."""
        last = ckpt.latest_checkpoint(trainer.cfg.out)
        if last is not None and ckpt.checkpoint_step(last) == trainer.step:
            self.start = None
            return
        tensors = {k: v.detach().to("cpu", copy=True) for k, v in trainer.state_tensors().items()}
        self.start = (tensors, trainer.host_state())

    def check(self, trainer, params: bool = False) -> str | None:
        """Host side: if a loss was NaN/Inf since the last check (or, with ``params``, a
        parameter is), restore the last good state with lr halved and return a message;
        raise :class:`DivergenceError` after ``max_restores`` restores. None if all is well."""
        bad = trainer.nonfinite
        if params:
            finite = [torch.isfinite(p).all() for p in trainer.model.parameters()]
            bad = bad | ~torch.stack(finite).all()
        if not bool(bad):  # host synchronisation (log intervals and checkpoints only)
            return None
        bad_step, lr, restores = trainer.step, trainer.lr, self.restores + 1
        last = ckpt.latest_checkpoint(trainer.cfg.out)
        good_step = self.start[0]["state.step"].item() if self.start is not None else -1
        use_file = last is not None and ckpt.checkpoint_step(last) >= good_step
        if restores > self.max_restores:
            raise DivergenceError(
                f"training diverged (NaN/Inf loss by step {bad_step}) again after "
                f"{self.max_restores} restores with halved lr (lr now {lr:.3g}). Start a new run "
                "with a lower --lr, --precision fp32 or another --gamma"
                + (f"; the last good checkpoint is {last}" if use_file else "")
                + " (--max-restores sets the number of retries)")
        if use_file:
            trainer.load_checkpoint(last)
            source = str(last)
        elif self.start is not None:
            tensors, state = self.start
            trainer.load_state({k: v.clone() for k, v in tensors.items()}, dict(state))  # keep it pristine
            source = "the state this run started from"
        else:  # pragma: no cover - snapshot runs at the start of fit
            raise DivergenceError(f"training diverged (NaN/Inf loss by step {bad_step}) and there "
                                  "is no checkpoint to go back to")
        self.restores = restores
        distributed.check_same_step(trainer.step, trainer.device, "a restore")
        trainer._set_lr(min(lr, trainer.lr) * 0.5)
        return (f"NaN/Inf loss by step {bad_step}: restored {source} (step {trainer.step}), lr halved "
                f"to {trainer.lr:.3g} (restore {restores} of at most {self.max_restores})")
