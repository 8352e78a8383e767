"""Imports of the kernel and op modules: no cycles, and the conv op always has its backward.

fastbegan.ops.triton_conv once imported its backward module at its end inside
``try/except ImportError: pass`` and the backward module imported it back through
importlib: an ImportError there silently left the conv op without a backward. Now the
backward module imports nothing that imports it, the forward module imports it plainly
and registers the formula, and these tests keep it so: a static import graph of
fastbegan.ops and fastbegan.kernels without cycles, and a fresh interpreter that imports
the backward module first and still gets gradients from the forward op.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"fastbegan.ops": ROOT / "fastbegan" / "ops", "fastbegan.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.glob("*.py"):
            mods[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of ``known`` that ``name`` imports (at any level of the file)."""
    pkg = name if path.stem == "__init__" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(n, stack):
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m, stack + [m])
                if found:
                    return found
        state[n] = 2
        return None
    for n in sorted(graph):
        if n not in state:
            found = visit(n, [n])
            if found:
                return found
    return None


def test_no_import_cycles_in_ops_and_kernels():
    mods = _modules()
    graph = {n: _imports(n, p, set(mods)) for n, p in mods.items()}
    # package __init__ -> submodule edges of a lazy import (importlib) are not in the AST;
    # a submodule importing its own package's __init__ is normal Python and not a cycle
    # as long as __init__ does not import that submodule at the top.
    assert "fastbegan.ops.triton_conv_bwd" in graph["fastbegan.ops.triton_conv"]
    assert not graph["fastbegan.ops.triton_conv_bwd"] & {
        "fastbegan.ops.triton_conv", "fastbegan.ops.triton_conv_pair",
        "fastbegan.ops.triton_conv_l1", "fastbegan.ops.triton_ops"}
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_silenced_import_errors():
    """An ImportError of our own modules must be loud: no try/except around them."""
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Try):
                caught = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
                body_imports = [n for n in node.body if isinstance(n, (ast.Import, ast.ImportFrom))]
                own = [n for n in body_imports if isinstance(n, ast.ImportFrom) and
                       (n.level or (n.module or "").startswith("fastbegan"))]
                assert not (own and caught & {"ImportError", "Exception"}), name


def test_backward_module_first_still_registers_the_autograd():
    """A fresh interpreter imports the backward module first; the forward op then has its
    gradient (under the Triton interpreter, a 2x2x3x3 conv)."""
    code = (
        "import torch\n"
        "import fastbegan.ops.triton_conv_bwd\n"
        "from fastbegan import ops\n"
        "ops.set_backend('triton')\n"
        "x = torch.randn(1, 2, 3, 3).contiguous(memory_format=torch.channels_last)\n"
        "x.requires_grad_()\n"
        "w = torch.randn(2, 2, 3, 3, requires_grad=True)\n"
        "ops.conv3x3_elu(x, w, None).sum().backward()\n"
        "print(x.grad is not None and w.grad is not None)\n")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("True")
