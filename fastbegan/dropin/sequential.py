""":func:`fastbegan.optimize`: swaps ``[upsample ->] Conv2d -> ELU`` runs of modules inside plain
``nn.Sequential`` containers for :class:`fastbegan.nn.Conv2dELU` (``state_dict()`` unchanged),
with a report of what was fused and what was left alone and why."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch.nn as _nn

from .. import ops
from ..nn import Conv2dELU, conv2d_support
from .patterns import elu_support, upsample_support


def _is_plain_sequential(m: _nn.Module) -> bool:
    return isinstance(m, _nn.Sequential) and type(m).forward is _nn.Sequential.forward


@dataclass
class Replacement:
    """One fused module: ``path`` is the conv's (and now the Conv2dELU's) qualified name."""
    path: str
    pattern: str                  # e.g. "Upsample(2x) + Conv2d(3x3) + ELU"
    absorbed: list[str]           # paths now holding nn.Identity()
    note: str = ""

    def __str__(self) -> str:
        s = f"{self.path}: {self.pattern}"
        if self.absorbed:
            s += f" (Identity at {', '.join(self.absorbed)})"
        return s + (f"; {self.note}" if self.note else "")


@dataclass
class Skipped:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class OptimizeReport:
    """What :func:`optimize` did. ``replaced`` / ``skipped`` (Conv2d left alone, with the
    reason) / ``already_fused`` (Conv2dELU found from an earlier call)."""
    backend: str | None
    applied: bool = True
    note: str = ""
    replaced: list[Replacement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    already_fused: list[str] = field(default_factory=list)

    @property
    def num_replaced(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        if not self.applied:
            head = f"fastbegan.optimize: model left unchanged: {self.note}"
        else:
            n_conv = len(self.replaced) + len(self.skipped)
            head = (f"fastbegan.optimize (backend {self.backend}): fused {len(self.replaced)} "
                    f"of {n_conv} Conv2d")
            if self.already_fused:
                head += f"; {len(self.already_fused)} already fused"
        lines = [head]
        if self.replaced:
            lines.append("  replaced:")
            lines += [f"    {r}" for r in self.replaced]
        if self.skipped:
            lines.append("  left alone:")
            lines += [f"    {s}" for s in self.skipped]
        return "\n".join(lines)

    __repr__ = __str__


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _scan_sequential(seq: _nn.Sequential, prefix: str, report: OptimizeReport,
                     handled: set[int]) -> list[tuple[str, _nn.Module]]:
    """Plan the swaps inside one Sequential; returns [(child name, new module)]."""
    names = list(seq._modules.keys())
    mods = [seq._modules[k] for k in names]
    swaps: list[tuple[str, _nn.Module]] = []
    for i, m in enumerate(mods):
        if not isinstance(m, _nn.Conv2d) or isinstance(m, Conv2dELU):
            continue
        path = _join(prefix, names[i])
        why = conv2d_support(m)
        if why is not None:
            report.skipped.append(Skipped(path, why))
            handled.add(id(m))
            continue
        nxt = mods[i + 1] if i + 1 < len(mods) else None
        prv = mods[i - 1] if i > 0 else None
        act = nxt is not None and elu_support(nxt) is None
        act_note = ""
        if not act and isinstance(nxt, _nn.ELU):
            act_note = elu_support(nxt)
        up = False
        up_note = ""
        if prv is not None and isinstance(prv, (_nn.Upsample, _nn.UpsamplingNearest2d)):
            up_why = upsample_support(prv)
            if up_why is None and tuple(m.stride) != (1, 1):
                up_why = "a stride-2 conv after an upsample is not fused"
            up = up_why is None
            if not up:
                up_note = f"upsample at {_join(prefix, names[i - 1])} kept: {up_why}"
        if not (act or up):
            reason = act_note or "no ELU after it (and no 2x nearest upsample before it)"
            report.skipped.append(Skipped(path, reason + (f"; {up_note}" if up_note else "")))
            handled.add(id(m))
            continue
        parts, absorbed = [], []
        if up:
            parts.append("Upsample(2x nearest)")
            absorbed.append(_join(prefix, names[i - 1]))
            swaps.append((names[i - 1], _nn.Identity()))
        stride = "/2" if tuple(m.stride) == (2, 2) else ""
        parts.append(f"Conv2d(3x3{stride}, {m.in_channels}->{m.out_channels})")
        if act:
            parts.append("ELU")
            absorbed.append(_join(prefix, names[i + 1]))
            swaps.append((names[i + 1], _nn.Identity()))
        swaps.append((names[i], Conv2dELU.from_conv2d(m, upsample=up, activation=act)))
        report.replaced.append(Replacement(path, " + ".join(parts), absorbed, up_note))
        handled.add(id(m))
    return swaps


def optimize(model: _nn.Module, *, inplace: bool = False,
             backend: str = "auto") -> tuple[_nn.Module, OptimizeReport]:
    """Swap fusable ``[Upsample] + Conv2d(3x3) + ELU`` runs for :class:`fastbegan.nn.Conv2dELU`.

    Returns ``(model, report)``; ``print(report)`` says what was fused and why each other
    ``Conv2d`` was left alone. With ``inplace=False`` (default) the model is deep-copied
    first and the original is untouched; with ``inplace=True`` it is changed in place and
    the fused modules hold the very same ``Parameter`` objects (an existing optimizer keeps
    working). Parameter names, shapes and values never change: ``state_dict()`` keys are
    the same and old checkpoints load. Idempotent: a second call finds nothing new.

    ``backend``:

    - ``"auto"``: on a CUDA GPU that Triton supports, select the ``triton`` backend for all
      fastbegan ops (:func:`fastbegan.ops.set_backend`, process-wide) and swap. Anywhere
      else (CPU, no Triton, old GPU) the fused modules would only run the PyTorch
      reference -- the same math as the original modules, no faster -- so the model is
      returned unchanged (a copy unless ``inplace``) with a warning saying why.
    - ``"triton"``: select it and swap; raises if Triton cannot run here.
    - ``"torch"``: select the pure-PyTorch reference and swap anyway (for testing, or to
      keep one model definition across machines).

    On the triton backend the fused modules run CPU tensors (outside the Triton
    interpreter) and dtypes the kernels lack through the reference, so a model moved to
    CPU later still works.
    """
    if backend not in ops.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(ops.BACKENDS)}")
    if not isinstance(model, _nn.Module):
        raise TypeError(f"fastbegan.optimize expects an nn.Module, got {type(model).__name__}")
    if backend == "auto":
        ok, why = ops.triton_status()
        if ok and ops.interpreting():
            ok, why = False, ("only the Triton interpreter is available, which 'auto' never "
                              "picks (backend='triton' uses it)")
        if not ok:
            note = (f"no fused kernels here: {why}. The fused modules would run the PyTorch "
                    "reference, the same math as the original ones; backend='torch' swaps "
                    "them in anyway")
            warnings.warn(f"fastbegan.optimize: model left unchanged: {note}", stacklevel=2)
            out = model if inplace else copy.deepcopy(model)
            return out, OptimizeReport(backend=None, applied=False, note=note)
        backend = "triton"
    chosen = ops.set_backend(backend)
    if not inplace:
        model = copy.deepcopy(model)
    report = OptimizeReport(backend=chosen)
    handled: set[int] = set()
    # named_modules() lists a shared submodule once (under its first path): each
    # Sequential is planned once, and a conv shared by two Sequentials is fused in both.
    containers = [(p, m) for p, m in model.named_modules() if _is_plain_sequential(m)]
    plans = [(seq, _scan_sequential(seq, prefix, report, handled)) for prefix, seq in containers]
    new_ids: set[int] = set()
    for seq, swaps in plans:
        for name, new in swaps:
            setattr(seq, name, new)
            new_ids.add(id(new))
    for path, m in model.named_modules():
        if isinstance(m, Conv2dELU):
            if id(m) not in new_ids:
                report.already_fused.append(path)
        elif isinstance(m, _nn.Conv2d) and id(m) not in handled:
            why = conv2d_support(m)
            report.skipped.append(Skipped(path, why or (
                "not inside an nn.Sequential next to an ELU (calls in a forward() are "
                "invisible here: use torch.compile(model, backend='fastbegan'))")))
    order = {path: i for i, (path, _) in enumerate(model.named_modules(remove_duplicate=False))}
    report.replaced.sort(key=lambda r: order.get(r.path, len(order)))
    report.skipped.sort(key=lambda r: order.get(r.path, len(order)))
    return model, report
