"""``torch.compile(model, backend="fastbegan")``: an FX pass over the graph dynamo captured
(:func:`rewrite_graph`: the patterns in ``forward`` too, functional or module calls), then
inductor (:func:`compile_backend`; registered by fastbegan/_compile_registration.py)."""
from __future__ import annotations

import inspect
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as _nn
import torch.nn.functional as F
from torch import fx

from .. import ops
from ..nn import Conv2dELU, conv2d_support
from .patterns import _is_two, elu_support, upsample_support


@dataclass
class RewriteReport:
    """What :func:`rewrite_graph` did to one graph. ``fused``: ``(where, pattern)`` per fused
    call; ``skipped``: ``(where, reason)`` per conv left alone. ``where`` is the conv
    module's path when the conv is a module, else ``file:line `source```."""
    backend: str
    fused: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_fused(self) -> int:
        return len(self.fused)

    def __str__(self) -> str:
        lines = [f"fastbegan compile pass (backend {self.backend}): fused {len(self.fused)}"]
        lines += [f"  fused: {n}: {p}" for n, p in self.fused]
        lines += [f"  left alone: {n}: {r}" for n, r in self.skipped]
        return "\n".join(lines)


#: One RewriteReport per graph the "fastbegan" compile backend has compiled, oldest first
#: (a hook for tests and for users asking "did it fuse anything?"); clear it at will.
compile_reports: list[RewriteReport] = []

_CONV_NAMES = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
_ELU_C_NAMES = ("input", "alpha", "scale", "input_scale")
_ELU_C_DEFAULTS = {"alpha": 1.0, "scale": 1.0, "input_scale": 1.0}
_ELU_C = (torch._C._nn.elu, torch._C._nn.elu_)
_UPSAMPLE_FNS = (F.interpolate, F.upsample, F.upsample_nearest)


def _bind_builtin(node: fx.Node, names, defaults) -> dict[str, Any] | None:
    if len(node.args) > len(names) or any(k not in names for k in node.kwargs):
        return None
    out = dict(defaults)
    out.update(zip(names, node.args))
    out.update(node.kwargs)
    return out if names[0] in out else None


def _bind_py(fn: Callable, node: fx.Node) -> dict[str, Any] | None:
    try:
        b = inspect.signature(fn).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    b.apply_defaults()
    return dict(b.arguments)


def _val(node: Any) -> Any:
    """The example (fake) value dynamo recorded for ``node``, if any."""
    if isinstance(node, fx.Node):
        return node.meta.get("example_value", node.meta.get("val"))
    return node


def _attr(gm: fx.GraphModule, node: Any) -> Any:
    v = _val(node)
    if v is None and isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            v = obj
        except AttributeError:
            v = None
    return v


def _module(gm: fx.GraphModule, node: fx.Node) -> _nn.Module | None:
    if node.op != "call_module":
        return None
    try:
        return gm.get_submodule(node.target)
    except AttributeError:
        return None


def _as_pair(v: Any) -> tuple | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2:
        return tuple(v)
    return None


@dataclass
class _Conv:
    x: Any
    weight: Any        # fx.Node, or a str attribute path for call_module convs
    bias: Any
    stride: int


def _match_conv(gm: fx.GraphModule, node: fx.Node) -> tuple[_Conv | None, str | None]:
    """(match, None), (None, reason) for a conv node we will not fuse, (None, None) else."""
    if node.op == "call_module":
        m = _module(gm, node)
        if not isinstance(m, _nn.Conv2d) or isinstance(m, Conv2dELU):
            return None, None
        why = conv2d_support(m)
        if why is not None:
            return None, why
        if len(node.args) != 1 or node.kwargs:
            return None, "unexpected call signature"
        bias = f"{node.target}.bias" if m.bias is not None else None
        return _Conv(node.args[0], f"{node.target}.weight", bias, m.stride[0]), None
    if node.op != "call_function" or node.target is not torch.conv2d:
        return None, None
    a = _bind_builtin(node, _CONV_NAMES, _CONV_DEFAULTS)
    if a is None:
        return None, "unexpected call signature"
    w = _attr(gm, a["weight"])
    x = _val(a["input"])
    if not isinstance(w, torch.Tensor) or w.dim() != 4:
        return None, "weight shape unknown"
    if tuple(w.shape[2:]) != (3, 3):
        return None, f"kernel {tuple(w.shape[2:])} is not 3x3"
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        return None, "input is not a known 4-D tensor"
    stride, dil = _as_pair(a["stride"]), _as_pair(a["dilation"])
    if stride not in ((1, 1), (2, 2)):
        return None, f"stride {a['stride']!r} is not 1 or 2"
    if dil != (1, 1):
        return None, f"dilation {a['dilation']!r} is not 1"
    if a["groups"] != 1:
        return None, f"groups={a['groups']!r}"
    pad = a["padding"]
    if not ((pad == "same" and stride == (1, 1)) or _as_pair(pad) == (1, 1)):
        return None, f"padding {pad!r} is not 1"
    if a["bias"] is not None and not isinstance(a["bias"], fx.Node):
        return None, "bias is not a tensor"
    return _Conv(a["input"], a["weight"], a["bias"], stride[0]), None


def _match_elu(gm: fx.GraphModule, node: fx.Node, src: fx.Node) -> bool:
    """Is ``node`` ELU(alpha=1) of ``src`` (module, F.elu, F.elu_ / torch._C._nn.elu[_])?"""
    if node.op == "call_module":
        m = _module(gm, node)
        return (m is not None and elu_support(m) is None and len(node.args) == 1
                and not node.kwargs and node.args[0] is src)
    if node.op != "call_function":
        return False
    if node.target is F.elu:
        a = _bind_py(F.elu, node)
    elif node.target in _ELU_C:
        a = _bind_builtin(node, _ELU_C_NAMES, _ELU_C_DEFAULTS)
        if a is not None and (a["scale"] != 1 or a["input_scale"] != 1):
            return False
    else:
        return False
    return a is not None and a["input"] is src and a["alpha"] == 1


def _elu_alpha(gm: fx.GraphModule, node: fx.Node) -> float | None:
    """alpha of an ELU node (module or functional), None if ``node`` is no ELU."""
    m = _module(gm, node)
    if isinstance(m, _nn.ELU):
        return float(m.alpha)
    a = None
    if node.op == "call_function" and node.target is F.elu:
        a = _bind_py(F.elu, node)
    elif node.op == "call_function" and node.target in _ELU_C:
        a = _bind_builtin(node, _ELU_C_NAMES, _ELU_C_DEFAULTS)
    return None if a is None or not isinstance(a["alpha"], (int, float)) else float(a["alpha"])


def _match_upsample(gm: fx.GraphModule, node: Any) -> Any:
    """If ``node`` is a 2x nearest upsample of a 4-D tensor, its input node; else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        m = _module(gm, node)
        if m is None or upsample_support(m) is not None or len(node.args) != 1 or node.kwargs:
            return None
        src = node.args[0]
    elif node.op == "call_function" and node.target in _UPSAMPLE_FNS:
        a = _bind_py(node.target, node)
        if a is None:
            return None
        mode = a.get("mode", "nearest")
        if mode not in ("nearest", "nearest-exact") or a.get("align_corners") is not None:
            return None
        if a.get("antialias"):
            return None
        src = a["input"]
        if a["size"] is not None:
            # fused only when the size is exactly twice the (static) input size
            sv, ov = _val(src), _val(node)
            if not (isinstance(sv, torch.Tensor) and isinstance(ov, torch.Tensor)
                    and sv.dim() == 4 and ov.dim() == 4
                    and all(isinstance(d, int) for d in (*sv.shape, *ov.shape))
                    and tuple(ov.shape[2:]) == (2 * sv.shape[2], 2 * sv.shape[3])):
                return None
        elif not _is_two(a["scale_factor"]):
            return None
    else:
        return None
    sv = _val(src)
    if not (isinstance(sv, torch.Tensor) and sv.dim() == 4):
        return None
    return src


def _where(node: fx.Node) -> str:
    """A readable location of a conv node: module path, or the user's source line."""
    stack = node.meta.get("nn_module_stack")
    if node.op == "call_module":
        return str(node.target)
    if stack:
        path, cls = list(stack.values())[-1]
        if isinstance(cls, type) and issubclass(cls, _nn.Conv2d):
            return re.sub(r"^L\['[^']*'\]\.?", "", str(path)) or node.name
    lines = (node.meta.get("stack_trace") or "").rstrip().splitlines()
    for i in range(len(lines) - 1, -1, -1):
        m = re.match(r'\s*File "(.+)", line (\d+)', lines[i])
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            return f"{os.path.basename(m[1])}:{m[2]} `{code}`"
    return node.name


def _may_mutate_between(first: fx.Node, last: fx.Node) -> bool:
    """Could a node strictly between ``first`` and ``last`` mutate a tensor in place?
    (Conservative: in-place-looking calls and module calls count.)"""
    n = first.next
    while n is not last and n.op != "root":
        if n.op == "call_module":
            return True
        if n.op in ("call_function", "call_method"):
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
            if (name.endswith("_") and not name.endswith("__")) or n.kwargs.get("inplace"):
                return True
            if isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable:
                return True
        n = n.next
    return False


def _copy_meta(new: fx.Node, value: Any) -> None:
    if value is not None:
        new.meta["example_value"] = value


def rewrite_graph(gm: fx.GraphModule, *, backend: str = "torch") -> RewriteReport:
    """Rewrite ``gm`` in place: each ``[upsample] -> conv3x3 -> [ELU]`` run with something to
    fuse becomes one ``fastbegan.ops.conv3x3_elu`` call. Returns what it did.

    Rules: the conv's output must have no user but the ELU for the ELU to be fused, and
    the upsample's output no user but the conv for the upsample to be fused (otherwise that
    part stays as it was). ``backend`` is the one the graph will be traced with: on
    ``"triton"`` activations in dtypes the kernels lack are not fused, and where the
    original output was NCHW a ``.contiguous()`` keeps it so (the kernels write NHWC).
    """
    graph = gm.graph
    report = RewriteReport(backend=backend)
    erased: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node in erased:
            continue
        conv, why = _match_conv(gm, node)
        if conv is None:
            if why is not None:
                report.skipped.append((_where(node), why))
            continue
        xv = _val(conv.x)
        if backend == "triton" and isinstance(xv, torch.Tensor) and \
                xv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            report.skipped.append((_where(node), f"dtype {xv.dtype} not supported by the kernels"))
            continue
        users = list(node.users)
        elu = users[0] if len(users) == 1 and _match_elu(gm, users[0], node) else None
        up = None
        x = conv.x
        if conv.stride == 1 and isinstance(x, fx.Node) and len(x.users) == 1:
            src = _match_upsample(gm, x)
            # the fused call reads src where the conv was: nothing in between may mutate it
            if src is not None and not _may_mutate_between(x, node):
                up, x = x, src
        if elu is None and up is None:
            report.skipped.append((_where(node), _why_nothing_to_fuse(gm, users)))
            continue
        tail = elu if elu is not None else node
        where = _where(node)
        result = _insert_fused(gm, node, conv, x, upsample=up is not None, activation=elu is not None,
                               out_val=_val(tail), backend=backend)
        tail.replace_all_uses_with(result)
        for dead in (elu, node, up):
            if dead is not None:
                graph.erase_node(dead)
                erased.add(dead)
        parts = (["upsample2x"] if up is not None else []) + \
            [f"conv3x3{'/2' if conv.stride == 2 else ''}"] + (["elu"] if elu is not None else [])
        report.fused.append((where, " + ".join(parts)))
    graph.lint()
    gm.recompile()
    return report


def _why_nothing_to_fuse(gm: fx.GraphModule, users: list[fx.Node]) -> str:
    """Why a matched conv with neither a fusable ELU after it nor an upsample before it stays."""
    if len(users) > 1:
        return f"its output has {len(users)} users (an ELU is fused only into its sole user)"
    if users and _elu_alpha(gm, users[0]) not in (None, 1.0):
        return f"ELU alpha={_elu_alpha(gm, users[0])} (only 1.0 is fused)"
    return "no ELU after it and no upsample before it"


def _insert_fused(gm: fx.GraphModule, node: fx.Node, conv: _Conv, x: Any, *, upsample: bool,
                  activation: bool, out_val: Any, backend: str) -> fx.Node:
    """Insert the ``ops.conv3x3_elu`` call that replaces the run ending at ``node``'s pattern;
    ``x`` is its input (the upsample's input when the upsample is fused). Returns the node
    that takes the pattern's output's place."""
    graph = gm.graph
    with graph.inserting_before(node):
        w, b = conv.weight, conv.bias
        if isinstance(w, str):
            w = graph.get_attr(w)
            _copy_meta(w, _attr(gm, w))
        if isinstance(b, str):
            b = graph.get_attr(b)
            _copy_meta(b, _attr(gm, b))
        conv_val, in_val = _val(node), _val(x)
        if (isinstance(conv_val, torch.Tensor) and isinstance(in_val, torch.Tensor)
                and conv_val.dtype != in_val.dtype):
            # autocast region: the conv computed in conv_val.dtype
            x = graph.call_method("to", (x, conv_val.dtype))
            _copy_meta(x, torch.empty_like(in_val, dtype=conv_val.dtype))
        fused = graph.call_function(ops.conv3x3_elu, (x, w, b), {
            "upsample": upsample, "stride": conv.stride, "activation": activation})
        result = fused
        if backend == "triton" and isinstance(out_val, torch.Tensor):
            if out_val.dim() == 4 and out_val.is_contiguous():
                # the kernels write NHWC: keep an NCHW output NCHW for the graph's other users
                _copy_meta(fused, torch.empty_like(out_val, memory_format=torch.channels_last))
                result = graph.call_method("contiguous", (fused,))
        _copy_meta(result, out_val)
    return result


_warned_reference = False


def _choose_backend(example_inputs) -> str:
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    on_cuda = any(t.device.type == "cuda" for t in tensors)
    interp = ops.interpreting()
    if ops.get_backend() == "triton" and (on_cuda or interp):
        return "triton"
    ok, _ = ops.triton_status()
    if ok and on_cuda and not interp:
        return "triton"
    return "torch"


def compile_backend(gm: fx.GraphModule, example_inputs, *, mode: str | None = None,
                    options: dict | None = None, inner: Any = "inductor"):
    """The ``"fastbegan"`` torch.compile backend: :func:`rewrite_graph`, then inductor.

    The fused calls are traced with the ``triton`` backend when the graph's inputs are on a
    CUDA GPU Triton supports (or when ``fastbegan.ops`` is set to ``triton``, e.g. under the
    interpreter in tests), else with the ``torch`` reference (then the result computes what
    plain ``backend="inductor"`` would). The choice is made per graph at compile time and
    does not change the process-wide backend. ``mode`` / ``options`` are inductor's, as in
    ``torch.compile(model, backend="fastbegan", mode="max-autotune")``. ``inner``: the
    compiler the rewritten graph is handed to: ``"inductor"``, or another registered
    backend name / callable (``"aot_eager"`` is handy for debugging).
    """
    global _warned_reference
    backend = _choose_backend(example_inputs)
    if backend == "torch" and not _warned_reference:
        _warned_reference = True
        ok, why = ops.triton_status()
        why = why if not ok else "the graph's inputs are not on a CUDA GPU"
        warnings.warn(f"torch.compile backend 'fastbegan': the fused calls run the PyTorch "
                      f"reference here ({why}); the result computes what backend='inductor' "
                      "would.", stacklevel=2)
    report = rewrite_graph(gm, backend=backend)
    compile_reports.append(report)
    with ops.use_backend(backend):
        if inner == "inductor":
            from torch._inductor.compile_fx import compile_fx
            patches: dict = {}
            if mode not in (None, "default"):
                patches.update(torch._inductor.list_mode_options(mode))
            if options:
                patches.update(options)
            return compile_fx(gm, example_inputs, config_patches=patches or None)
        if isinstance(inner, str):
            from torch._dynamo.backends.registry import lookup_backend
            inner = lookup_backend(inner)
        return inner(gm, example_inputs)
