"""fastbegan: the fastest way to train BEGAN, and fused Triton conv+ELU kernels.

``fastbegan.BEGAN`` / ``Generator`` / ``Discriminator``: the model (fastbegan/model.py).
``fastbegan.functional.conv3x3_elu``: the fused op. ``fastbegan.ops.set_backend``: pick
``auto | torch | triton``.
"""
__version__ = "0.1.0"

from .model import BEGAN, Discriminator, Generator  # noqa: E402,F401
