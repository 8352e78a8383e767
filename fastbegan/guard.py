"""Going back to a good state: the divergence guard and the one restore routine.

Every step ORs ``~isfinite`` of the sum of its losses (L_real, L_fake, remedy terms) into the
state's ``nonfinite`` device flag (no host synchronisation). :class:`DivergenceGuard` reads it at log intervals (it is one of
``Trainer.log_hooks``) and before every checkpoint (then the parameters are checked too,
so a checkpoint is never written from a diverged state). On NaN/Inf it goes back to the
newest good state with :func:`restore` and says so; after ``max_restores`` restores it
raises :class:`DivergenceError`. Under torchrun the flag holds the all-reduced losses, so
every rank restores at the same step (docs/training.md).

:func:`restore` is the only way back, for the guard and for the health monitor's
``--on-collapse restore`` alike: the newest checkpoint (written before a given step, for a
collapse), or before the first one the state the run started from (kept in host memory by
:meth:`DivergenceGuard.snapshot`), the lr halved (Adam's state comes from the restored
state), the torchrun same-step check, and the restore counted in the run's
:class:`~fastbegan.state.TrainState`: the budgets are in every checkpoint, so they hold
across resumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import checkpoint as ckpt
from . import distributed


class DivergenceError(RuntimeError):
    """Training kept producing NaN/Inf after ``max_restores`` restores."""


@dataclass
class Restored:
    """Where :func:`restore` went: ``source`` the checkpoint loaded (None: the state the run
    started from), ``step`` the step now current, ``lr`` the halved rate now in use."""
    source: Path | None
    step: int
    lr: float


def restore_point(out, start: tuple[dict, dict] | None, before: int | None = None) -> Path | str | None:
    """The newest good state: the newest checkpoint in ``out`` (of a step below ``before``,
    if given), or ``"start"`` (the in-memory ``start`` snapshot) when that is newer or the
    only one; None when there is none. A checkpoint wins a tie (the same state)."""
    files = [p for p in ckpt.list_checkpoints(out) if before is None or ckpt.checkpoint_step(p) < before]
    start_step = int(start[0]["state.step"]) if start is not None else None
    if start_step is not None and before is not None and start_step >= before:
        start_step = None
    if files and (start_step is None or ckpt.checkpoint_step(files[-1]) >= start_step):
        return files[-1]
    return "start" if start_step is not None else None


def restore(trainer, start: tuple[dict, dict] | None, *, count: str, before: int | None = None
            ) -> Restored | None:
    """Go back to :func:`restore_point` with the lr halved (from the lower of the current and
    the restored rate) and count it in ``trainer.state`` under ``count`` (``"restores"``,
    the divergence guard's, or ``"collapse_restores"``). The restore counters are carried
    over the load: they count the run's restores, not the restored state's. Under torchrun
    every rank must arrive at the same step (:func:`distributed.check_same_step`). None,
    and nothing changed, when there is no state to go back to."""
    point = restore_point(trainer.cfg.out, start, before)
    if point is None:
        return None
    st = trainer.state
    lr, counters = st.lr, st.counters()
    if point == "start":
        tensors, host = start
        trainer.load_state({k: v.clone() for k, v in tensors.items()}, dict(host))  # keep it pristine
    else:
        trainer.load_checkpoint(point)
    for name, value in counters.items():
        setattr(st, name, value)
    setattr(st, count, getattr(st, count) + 1)
    distributed.check_same_step(st.step, trainer.device, "a restore")
    trainer.schedule.set(min(lr, st.lr) * 0.5)
    return Restored(None if point == "start" else point, st.step, st.lr)


class DivergenceGuard:
    """``Trainer.log_hooks`` entry and the check before each checkpoint.

    ``max_restores``: the budget (the count, ``state.restores``, is the run's: kept in
    checkpoints). ``start``: the in-memory restore point ``(tensors, host_state)`` taken by
    :meth:`snapshot` when the run has no checkpoint of its current step, else None.
    """

    def __init__(self, max_restores: int):
        self.max_restores = max_restores
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
        st = trainer.state
        bad = st.nonfinite
        if params:
            finite = [torch.isfinite(p).all() for p in trainer.model.parameters()]
            bad = bad | ~torch.stack(finite).all()
        if not bool(bad):  # host synchronisation (log intervals and checkpoints only)
            return None
        bad_step, lr = st.step, st.lr
        if st.restores >= self.max_restores:
            point = restore_point(trainer.cfg.out, self.start)
            raise DivergenceError(
                f"training diverged (NaN/Inf loss by step {bad_step}) again after "
                f"{st.restores} restores with halved lr (lr now {lr:.3g}). Start a new run "
                "with a lower --lr, --precision fp32 or another --gamma"
                + (f"; the last good checkpoint is {point}" if isinstance(point, Path) else "")
                + " (--max-restores sets the number of retries)")
        done = restore(trainer, self.start, count="restores")
        if done is None:  # pragma: no cover - snapshot runs at the start of fit
            raise DivergenceError(f"training diverged (NaN/Inf loss by step {bad_step}) and there "
                                  "is no checkpoint to go back to")
        source = str(done.source) if done.source is not None else "the state this run started from"
        return (f"NaN/Inf loss by step {bad_step}: restored {source} (step {done.step}), lr halved "
                f"to {done.lr:.3g} (restore {st.restores} of at most {self.max_restores})")
