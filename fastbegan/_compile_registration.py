"""Registers the ``"fastbegan"`` torch.compile backend when ``import fastbegan`` happens,
without importing ``torch._dynamo`` (about a second) at that point.

If ``torch._dynamo`` is already imported, the backend is registered at once. Otherwise a
one-shot import hook waits for ``torch._dynamo.backends.registry`` (which
``torch.compile`` imports before it looks a backend name up) and registers the backend
right after that module has run. The registered function imports
:mod:`fastbegan.dropin.graph` only when a graph is compiled.

This module imports nothing heavy; it must stay that way.
"""
from __future__ import annotations

import importlib.abc
import sys

NAME = "fastbegan"
_REGISTRY = "torch._dynamo.backends.registry"


def fastbegan(gm, example_inputs, **kwargs):
    """torch.compile backend: fastbegan's FX pass, then inductor
    (see :func:`fastbegan.dropin.compile_backend`)."""
    from .dropin.graph import compile_backend
    return compile_backend(gm, example_inputs, **kwargs)


def _register_into(registry) -> None:
    if NAME not in registry._COMPILER_FNS:
        registry.register_backend(compiler_fn=fastbegan, name=NAME)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        try:
            _register_into(module)
        except Exception:  # never break torch's import; registration is best effort
            pass

    def __getattr__(self, name):  # get_source, get_code, ... for tracebacks and inspect
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        _remove_hook()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _Loader(spec.loader)
                return spec
        return None


_hook: _Finder | None = None


def _remove_hook() -> None:
    global _hook
    if _hook is not None and _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
    _hook = None


def install() -> None:
    """Register now if torch's backend registry is loaded, else when it gets loaded."""
    global _hook
    registry = sys.modules.get(_REGISTRY)
    if registry is not None and hasattr(registry, "_COMPILER_FNS"):
        _register_into(registry)
        return
    if _hook is None:
        _hook = _Finder()
        sys.meta_path.insert(0, _hook)
