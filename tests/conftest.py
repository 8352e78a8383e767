"""Test configuration.

Without a CUDA GPU, Triton kernels run in the interpreter on CPU tensors. The variable
must be set before any kernel module is imported (``triton.jit`` reads it then).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _reset_backend():
    """Every test starts on the reference backend and leaves it so."""
    from fastbegan import ops
    ops.set_backend("torch")
    yield
    ops.set_backend("torch")
