"""Shared test constants (imported by tests as ``from testutil import ...``).

Without a CUDA GPU, Triton kernels run in the interpreter on CPU tensors. The variable
must be set before any kernel module is imported (``triton.jit`` reads it then); the
conftest imports this module first. (Not in conftest.py itself: benchmarks/ has a
conftest too, and ``from conftest import`` would pick whichever was imported first.)
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
