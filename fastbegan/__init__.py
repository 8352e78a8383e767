"""fastbegan: the fastest way to train BEGAN, and fused Triton conv+ELU kernels.

``fastbegan.BEGAN`` / ``Generator`` / ``Discriminator``: the model (fastbegan/model.py).
``fastbegan.functional.conv3x3_elu``: the fused op. ``fastbegan.ops.set_backend``: pick
``auto | torch | triton``.
"""
__version__ = "0.1.0"

from .model import BEGAN, Discriminator, Generator  # noqa: E402,F401

# Drop-in for other projects: fastbegan.optimize(model), fastbegan.nn.Conv2dELU, and the
# torch.compile(model, backend="fastbegan") backend, registered here without importing
# torch._dynamo now (see fastbegan/_compile_registration.py).
from . import _compile_registration  # noqa: E402

_compile_registration.install()


def __getattr__(name):  # lazy, keeps `import fastbegan` light
    if name == "optimize":
        from .dropin import optimize
        return optimize
    if name in ("nn", "dropin"):
        import importlib
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
