"""Test configuration: the Triton interpreter without a GPU (see testutil), backend reset."""
import pytest

from testutil import DEVICE  # noqa: F401  (first: sets TRITON_INTERPRET before kernels load)


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
