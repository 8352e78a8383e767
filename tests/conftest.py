"""Test configuration: the Triton interpreter without a GPU (see testutil), backend reset."""
import pytest

from testutil import DEVICE  # noqa: F401  (first: sets TRITON_INTERPRET before kernels load)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _reset_backend():
    """Every test starts on the reference backend and leaves it so, with the kernels'
    fallback chain strict (a kernel test must not pass on the torch path) and no
    decisions remembered."""
    from fastbegan import ops
    from fastbegan.ops import fallback
    ops.set_backend("torch")
    fallback.reset()
    fallback.set_strict(True)
    fallback.set_verify(False)
    yield
    ops.set_backend("torch")
    fallback.reset()
    fallback.set_strict(True)
    fallback.set_verify(False)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op CPU thread (restored after): tiny tensors only pay OpenMP overhead, which
    becomes seconds per test when the 2 CPU cores are shared. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def triton_backend(one_thread):
    """The triton backend for one test (the interpreter without a GPU), one CPU thread.
    Use with ``pytestmark = pytest.mark.usefixtures("triton_backend")``."""
    from fastbegan import ops
    with ops.use_backend("triton"):
        yield
