"""The package's import structure: no module imports one that imports it back, every module
imports in a fresh interpreter, and the Triton conv op has its backward once imported."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where each importable name lives: fastbegan/ is fastbegan, kernels/ is installed as fastbegan.kernels
PACKAGES = {"fastbegan": ROOT / "fastbegan", "fastbegan.kernels": ROOT / "kernels"}

def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py of the package (kernels/ included)."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((pkg, *parts))] = path
    return out


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its file (also inside functions,
    and ``importlib.import_module("...")`` with a literal name)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = ".".join(base[:len(base) - node.level + 1]) if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            # `from pkg import name`: the submodule pkg.name if there is one, else pkg itself
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant)):
            targets = [node.args[0].value]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import fastbegan.ops.reference` -> that module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    mods = modules()
    graph = {m: imported_modules(m, p, set(mods)) for m, p in mods.items()}
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_reader_sees_imports_of_every_kind():
    mods = modules()
    assert "fastbegan.bench.runner" in mods and "fastbegan.kernels.conv3x3" in mods
    known = set(mods)
    assert imported_modules("fastbegan.model", mods["fastbegan.model"], known) >= {"fastbegan.ops",
                                                                                   "fastbegan.checkpoint"}
    assert "fastbegan.kernels.conv3x3" in imported_modules(   # absolute `from fastbegan.kernels import conv3x3`
        "fastbegan.ops.triton_conv_pair", mods["fastbegan.ops.triton_conv_pair"], known)
    assert "fastbegan.ops.triton_ops" in imported_modules(    # importlib.import_module("...")
        "fastbegan.ops", mods["fastbegan.ops"], known)
    assert "fastbegan.step" in imported_modules(               # `from ..step import` inside a function
        "fastbegan.bench.workloads", mods["fastbegan.bench.workloads"], known)


def test_no_module_imports_one_that_imports_it_back():
    cycles = import_cycles()
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)
    # the conv op's backward module (once in a cycle with the forward module, behind a
    # silenced ImportError) imports none of the modules that use it
    mods = modules()
    bwd = imported_modules("fastbegan.ops.triton_conv_bwd", mods["fastbegan.ops.triton_conv_bwd"], set(mods))
    assert "fastbegan.ops.triton_conv_bwd" in imported_modules(
        "fastbegan.ops.triton_conv", mods["fastbegan.ops.triton_conv"], set(mods))
    assert not bwd & {"fastbegan.ops.triton_conv", "fastbegan.ops.triton_conv_pair",
                      "fastbegan.ops.triton_conv_l1", "fastbegan.ops.triton_ops"}


def test_no_silenced_import_errors():
    """An ImportError of our own modules must be loud: no ``try: from . import x`` whose
    ImportError (or Exception) handler just passes (a handler that reports or re-raises
    it, as the benchmarks' "n/a: not importable" rows do, is fine)."""
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Try):
                own = [n for n in node.body if isinstance(n, ast.ImportFrom)
                       and (n.level or (n.module or "").startswith("fastbegan"))]
                silent = [h for h in node.handlers
                          if (h.type is None or ast.unparse(h.type) in ("ImportError", "Exception"))
                          and all(isinstance(stmt, ast.Pass) for stmt in h.body)]
                assert not (own and silent), f"{name}: line {node.lineno}"


FRESH = r"""
import importlib, sys
import torch
import fastbegan.ops.triton_conv_bwd  # the backward module first: the forward op still gets it
from fastbegan.ops import triton_ops

# the conv op's backward is there after the one documented import
x = torch.randn(1, 4, 4, 4, dtype=torch.float64).float().contiguous(memory_format=torch.channels_last)
w = torch.randn(4, 4, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_()
b = torch.zeros(4, requires_grad=True)
y = triton_ops.conv3x3_elu(x.requires_grad_(), w, b)
y.sum().backward()
assert x.grad is not None and w.grad is not None and b.grad is not None, "no backward"
assert torch.ops.fastbegan.conv3x3_elu.default is not None

for name in sys.argv[1:]:
    importlib.import_module(name)
print(len(sys.argv) - 1, "modules")
"""


def test_every_module_imports_in_a_fresh_interpreter_and_the_conv_op_has_its_backward():
    pytest.importorskip("triton")
    env = dict(os.environ)
    if "TRITON_INTERPRET" in os.environ or not _has_cuda():
        env["TRITON_INTERPRET"] = "1"  # the kernels' CPU path (tests/testutil.py)
    names = sorted(m for m in modules() if m != "fastbegan.__main__")  # __main__ runs the CLI
    r = subprocess.run([sys.executable, "-c", FRESH, *names], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[0] == str(len(names)) and len(names) > 40


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def test_the_documented_public_api_is_there():
    import fastbegan
    from fastbegan.cli import main
    for obj in (fastbegan.optimize, fastbegan.nn.Conv2dELU, fastbegan.BEGAN, fastbegan.Generator.from_checkpoint,
                fastbegan.Discriminator):
        assert callable(obj)
    from fastbegan.functional import conv3x3_elu
    from fastbegan.health import diagnose_run
    from fastbegan.metrics import swd
    assert all(callable(f) for f in (conv3x3_elu, diagnose_run, swd))
    assert set(main.commands) == {"train", "sample", "prepare", "eval", "interpolate", "plot", "bench", "doctor"}


def test_no_function_outside_kernels_is_over_80_lines():
    """Outsized units hide their structure: split anything longer (kernels/ excepted, where a
    Triton kernel is one function by nature)."""
    long = []
    for path in (ROOT / "fastbegan").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > 80:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long
