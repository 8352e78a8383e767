"""The compile self-check's comparison: one step's results against another's (pure).

:func:`compare_step` compares two runs of the fused step's forward and backward on the same
inputs (a compiled one against the eager one, :class:`fastbegan.autocompile.CompiledForward`):
every output of the forward (``step.StepOutputs``: the real and fake batches, the losses,
k_t's update, M, the objective and the remedies' terms) and every parameter's gradient,
each as a relative L2 error, and all gradients together (one relative L2 error over their
concatenation). :func:`snapshot` takes what it compares from a run. The tolerances and why
they are what they are: docs/design.md §4.2.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Tolerance:
    """What the check allows one precision. ``item``: an output's or a parameter's relative
    L2 error; in bf16 an item may also be off by ``noise_factor`` times what bf16 rounding
    alone moves it (the same step in fp32 against it), but never by more than ``cap``.
    ``total``: the relative L2 error of all gradients together (never widened)."""
    item: float
    cap: float
    total: float
    noise_factor: float = 0.0


# Measured on the first command's shapes and on trained weights (docs/design.md §4.2).
TOLERANCES = {"fp32": Tolerance(item=1e-3, cap=1e-3, total=1e-3),
              "bf16": Tolerance(item=5e-2, cap=0.25, total=5e-2, noise_factor=3.0)}


@dataclass
class StepSnapshot:
    """What the check compares of one run: ``outputs`` and ``grads`` by name (None: no
    gradient), and per output the smallest denominator of its relative error (``floors``;
    see :func:`snapshot`)."""
    outputs: dict[str, Tensor | None]
    grads: dict[str, Tensor | None]
    floors: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class CheckReport:
    """:func:`compare_step`'s verdict. ``worst``: the output (``out:<name>``) or parameter
    (``grad:<name>``) whose error is the largest share of its allowance, with ``error`` and
    ``allowed``; ``total_error`` / ``total_allowed``: all gradients together; ``ratio``: the
    larger of the two shares (above 1: failed); ``items``: every item's (error, allowed)."""
    worst: str
    error: float
    allowed: float
    total_error: float
    total_allowed: float
    items: dict[str, tuple[float, float]]

    @property
    def ratio(self) -> float:
        r = max(self.error / self.allowed, self.total_error / self.total_allowed)
        return r if r == r else float("inf")  # NaN: failed

    @property
    def passed(self) -> bool:
        return self.ratio <= 1.0

    def describe(self) -> str:
        """One line for the warning: the worst item and, if it failed, the gradients' total."""
        what = self.worst.replace("grad:", "gradient of ").replace("out:", "output ")
        line = f"{what} off by {self.error:.3g} (relative L2; allowed {self.allowed:.3g})"
        if self.total_error > self.total_allowed:
            line += (f"; all gradients together off by {self.total_error:.3g} "
                     f"(allowed {self.total_allowed:.3g})")
        return line


def snapshot(out, k: Tensor, model: nn.Module, lambda_k: float, gamma: float) -> StepSnapshot:
    """The outputs (``out``: a ``step.StepOutputs``, ``k`` the k_t it was given) and
    ``model``'s gradients of one run, detached. k_t enters as its update ``k_next - k``,
    measured against ``lambda_k * (gamma |L_real| + |L_fake|)`` at least: k_t itself is an
    input, and the update is a difference of the losses that can cancel at the balance
    (where a relative error of the difference alone means nothing)."""
    outputs: dict[str, Tensor | None] = {}
    for name, value in out._asdict().items():
        if name == "terms":
            outputs.update({f"terms.{n}": v.detach() for n, v in value.items()})
        elif name == "k_next":
            outputs["k_next"] = (value.detach().float() - k.detach().float())
        else:
            outputs[name] = value.detach()
    losses = out.losses.detach().float()
    floors = {"k_next": lambda_k * (gamma * losses[0].abs() + losses[1].abs())}
    grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
    return StepSnapshot(outputs, grads, floors)


def compare_step(got: StepSnapshot, want: StepSnapshot, tol: Tolerance,
                 reference: StepSnapshot | None = None) -> CheckReport:
    """``got`` (the compiled run) against ``want`` (the eager run on the same inputs). Each
    item may be off by ``tol.item``; with a ``reference`` (the same step in fp32, for a bf16
    ``want``) by up to ``tol.noise_factor`` times its own error ``want`` vs ``reference``,
    capped at ``tol.cap``; all gradients together by ``tol.total``. One host sync."""
    names = [f"out:{n}" for n in want.outputs] + [f"grad:{n}" for n in want.grads]
    dev = next(t.device for t in (*want.outputs.values(), *want.grads.values()) if t is not None)
    pairs = [(got.outputs.get(n), want.outputs[n], want.floors.get(n)) for n in want.outputs]
    pairs += [(got.grads.get(n), want.grads[n], None) for n in want.grads]
    errs = torch.stack([_rel_error(a, b, f, dev) for a, b, f in pairs])
    allowed = torch.full_like(errs, tol.item)
    if reference is not None and tol.noise_factor:
        ref = [reference.outputs.get(n) for n in want.outputs] + [reference.grads.get(n) for n in want.grads]
        noise = torch.stack([_rel_error(b, r, f, dev) for (_, b, f), r in zip(pairs, ref)])
        allowed = torch.clamp(tol.noise_factor * noise, min=tol.item, max=max(tol.cap, tol.item))
    total = _total_error([got.grads.get(n) for n in want.grads], list(want.grads.values()), dev)
    vals = torch.cat([errs, allowed, total.view(1)]).tolist()
    n = len(names)
    errs_l, allowed_l, total_f = vals[:n], vals[n:2 * n], vals[-1]
    ratios = [e / a if e == e else float("inf") for e, a in zip(errs_l, allowed_l)]
    i = max(range(n), key=ratios.__getitem__)
    return CheckReport(names[i], errs_l[i], allowed_l[i], total_f, tol.total,
                       {m: (e, a) for m, e, a in zip(names, errs_l, allowed_l)})


def _rel_error(got: Tensor | None, want: Tensor | None, floor: Tensor | None,
               device: torch.device) -> Tensor:
    """``|got - want| / max(|want|, |got|, floor)`` (L2, fp32, 0-d on ``device``; 0 for two
    zeros or two Nones, 1 where one of them is missing or zero)."""
    if got is None or want is None:
        return torch.tensor(0.0 if got is None and want is None else 1.0, device=device)
    g, w = got.detach().float(), want.detach().float()
    den = torch.maximum(w.norm(), g.norm())
    if floor is not None:
        den = torch.maximum(den, floor.to(den))
    return (g - w).norm() / den.clamp_min(1e-30)


def _total_error(got: list[Tensor | None], want: list[Tensor | None], device: torch.device) -> Tensor:
    """The relative L2 error of the concatenated gradients (a missing one counts as zeros)."""
    diff = want_sq = got_sq = torch.zeros((), device=device)
    for g, w in zip(got, want):
        if g is None and w is None:
            continue
        g = torch.zeros_like(w) if g is None else g
        w = torch.zeros_like(g) if w is None else w
        g, w = g.detach().float(), w.detach().float()
        diff = diff + (g - w).square().sum()
        want_sq, got_sq = want_sq + w.square().sum(), got_sq + g.square().sum()
    return diff.sqrt() / torch.maximum(want_sq, got_sq).sqrt().clamp_min(1e-30)


def _grad_error(got: Tensor | None, want: Tensor | None, device: torch.device) -> Tensor:
    """One gradient's relative L2 error ``|got - want| / max(|want|, |got|)`` (0-d fp32 on
    ``device``; 0 for two zeros, 1 where one of them is missing or zero)."""
    return _rel_error(got, want, None, device)
