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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A kernel path that an earlier process recorded as dropped on this GPU (a sticky CUDA
    error or a wrong result, e.g. found by `fastbegan doctor`) is reported as a skip with
    that reason instead of being run again (it would take the CUDA context down)."""
    outcome = yield
    report = outcome.get_result()
    from fastbegan.ops.fallback import KernelPathDropped
    if call.excinfo is not None and call.excinfo.errisinstance(KernelPathDropped):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")
