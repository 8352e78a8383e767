"""One run's training state and its lr rules (docs/design.md §4).

:class:`TrainState` is everything about a run that is neither the networks nor the
optimisers: BEGAN's k_t, the step counter, the learning rate, the data/z generator and the
divergence flag as DEVICE tensors (a step, CUDA graph or not, reads and writes them in
place, so they never change identity), and the host-side counters (the M-stall tracker,
the lr halvings, the restores of the divergence guard and of ``--on-collapse restore``).
``state_dict()`` / ``load_state_dict()`` are how checkpoints save and restore it whole
(the keys are the checkpoint format's: ``state.k``, ``state.gamma``, ``state.step``,
``rng.gen``, ``rng.torch`` as tensors, the rest as JSON host state; a missing key, in a checkpoint
written before it existed, loads its default).

The loop needs the step number on the host every step without reading the device, so the
counter exists twice: ``step_t`` (device, advanced by the step's device work, inside a CUDA
graph too) and ``step`` (host, advanced by :meth:`TrainState.advance` after each step).
Only this class writes them (:meth:`set_step`, :meth:`advance`), so they cannot drift
apart; the same holds for ``lr`` / ``lr_t`` and D's ``lr_d`` / ``lr_d_t`` (:meth:`set_lr`;
D's rate is G's times the run's fixed ``lr_d_ratio``, ``--lr-d``).

:class:`LrSchedule` holds the lr rules over a state and the two optimisers: halving every
``lr_half_every`` steps and the M-stall rule (``--lr-stall``), writing the rate into the
optimisers' param groups (Adam's moments are kept).
"""
from __future__ import annotations

import math

import torch

TENSOR_KEYS = ("state.k", "state.gamma", "state.step", "rng.gen", "rng.torch")
# the host counters and their values in a fresh run (and in checkpoints without them)
COUNTERS = {"best_m_step": 0, "lr_halvings": 0, "restores": 0, "collapse_restores": 0}


class TrainState:
    """k_t, step, lr, generator and divergence flag on ``device``; host counters.

    Device tensors (0-d): ``k`` fp32, ``gamma`` fp32 (the run's fixed gamma, or with
    ``adapt_gamma``, ``--k-target``, the adapted one: :func:`fastbegan.remedies.adapt_gamma`),
    ``step_t`` int64, ``lr_t`` and ``lr_d_t`` fp32 (G's and D's rates), ``nonfinite`` bool
    (ORed with "this step's losses were NaN/Inf", no host read); ``gen`` the device
    generator every index, flip and z is drawn from. Host: ``step`` (== ``step_t``
    between steps), ``lr`` (== ``lr_t``), ``best_m`` / ``best_m_step`` (the M-stall rule),
    ``lr_halvings``, ``restores`` (divergence guard) and ``collapse_restores``
    (``--on-collapse restore``): the restore budgets, kept across resumes.
    """

    def __init__(self, device: torch.device | str, *, k_init: float = 0.0, gamma: float = 0.5,
                 adapt_gamma: bool = False, lr: float = 1e-4, lr_d_ratio: float = 1.0, seed: int = 0):
        self.device = torch.device(device)
        self.lr0 = float(lr)  # what a checkpoint without an lr loads
        self.lr_d_ratio = float(lr_d_ratio)
        self.k = torch.full((), float(k_init), dtype=torch.float32, device=self.device)
        self.gamma = torch.full((), float(gamma), dtype=torch.float32, device=self.device)
        self.adapt_gamma = adapt_gamma  # a checkpoint's gamma is the run's state only when it adapts
        self.step_t = torch.zeros((), dtype=torch.int64, device=self.device)
        self.lr_t = torch.full((), float(lr), dtype=torch.float32, device=self.device)
        self.lr_d_t = torch.full((), float(lr) * self.lr_d_ratio, dtype=torch.float32, device=self.device)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.gen = torch.Generator(self.device).manual_seed(seed)
        self.step, self.lr, self.best_m = 0, float(lr), math.inf
        for name, value in COUNTERS.items():
            setattr(self, name, value)

    # ------------------------------------------------------------------ writes
    def set_step(self, step: int) -> None:
        self.step = int(step)
        self.step_t.fill_(self.step)

    def advance(self) -> None:
        """Host side of one finished step (its device work advanced ``step_t``)."""
        self.step += 1

    def set_lr(self, lr: float) -> None:
        """G's rate ``lr`` and D's (``lr * lr_d_ratio``), host and device."""
        self.lr = float(lr)
        self.lr_t.fill_(self.lr)
        self.lr_d_t.fill_(self.lr_d)

    @property
    def lr_d(self) -> float:
        return self.lr * self.lr_d_ratio

    def counters(self) -> dict[str, int]:
        """The restore counters (what a restore carries over the state it loads)."""
        return {"restores": self.restores, "collapse_restores": self.collapse_restores}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, dict]:
        """``{"tensors": {...}, "host": {...}}``: the checkpoint's state tensors and its JSON
        host state. The tensors are the live ones where they exist (copy before keeping)."""
        tensors = {"state.k": self.k, "state.gamma": self.gamma, "state.step": torch.tensor(self.step),
                   "rng.gen": self.gen.get_state(), "rng.torch": torch.get_rng_state()}
        host = {"lr": self.lr, "best_m": None if math.isinf(self.best_m) else self.best_m}
        host.update({name: getattr(self, name) for name in COUNTERS})
        return {"tensors": tensors, "host": host}

    def load_state_dict(self, sd: dict[str, dict]) -> None:
        """Set everything from :meth:`state_dict`'s form, in place (the device tensors keep
        their identity: a captured CUDA graph still reads them). The divergence flag is
        cleared: a checkpoint is never written from a diverged state."""
        tensors, host = sd["tensors"], sd.get("host", {})
        self.k.copy_(tensors["state.k"])
        # an adapted gamma resumes where it was; a fixed one is the config's (--gamma as given)
        if self.adapt_gamma and "state.gamma" in tensors:
            self.gamma.copy_(tensors["state.gamma"])
        self.set_step(int(tensors["state.step"]))
        self.gen.set_state(tensors["rng.gen"])
        torch.set_rng_state(tensors["rng.torch"])
        self.set_lr(host.get("lr", self.lr0))
        best = host.get("best_m")
        self.best_m = math.inf if best is None else best
        for name, default in COUNTERS.items():
            setattr(self, name, int(host.get(name, default)))
        self.nonfinite.zero_()


class LrSchedule:
    """The lr rules of a run (docs/design.md §1) over ``state``, ``opts`` (G's Adam, or any
    optimiser at G's rate) and ``d_opts`` (D's Adam, at ``state.lr_d``): :meth:`set` writes
    a rate everywhere it lives, :meth:`after_step` halves it every ``lr_half_every`` steps
    (down to ``lr_min``), :meth:`observe_m` is the M-stall rule. D's rate follows G's at
    the fixed ratio ``state.lr_d_ratio`` (``--lr-d``)."""

    def __init__(self, cfg, state: TrainState, opts, d_opts=()):
        self.cfg, self.state, self.opts, self.d_opts = cfg, state, tuple(opts), tuple(d_opts)

    def set(self, lr: float) -> None:
        self.state.set_lr(lr)
        for opts, rate in ((self.opts, self.state.lr), (self.d_opts, self.state.lr_d)):
            for opt in opts:
                for group in opt.param_groups:
                    group["lr"] = rate  # Adam's moments are kept

    def after_step(self) -> None:
        cfg, st = self.cfg, self.state
        if cfg.lr_half_every and st.step % cfg.lr_half_every == 0:
            self.set(max(st.lr * 0.5, cfg.lr_min))

    def observe_m(self, m: float) -> str | None:
        """M-stall rule (host side, at log intervals): halve lr if M stopped improving by 1%
        for ``lr_stall`` steps."""
        cfg, st = self.cfg, self.state
        if m < st.best_m * 0.99:
            st.best_m, st.best_m_step = m, st.step
        elif cfg.lr_stall and st.step - st.best_m_step >= cfg.lr_stall and st.lr > cfg.lr_min:
            self.set(max(st.lr * 0.5, cfg.lr_min))
            st.lr_halvings += 1
            st.best_m, st.best_m_step = m, st.step
            return f"M stalled for {cfg.lr_stall} steps: lr halved to {st.lr:.3g}"
        return None

