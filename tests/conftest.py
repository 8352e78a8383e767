"""Test configuration: the Triton interpreter without a GPU (see testutil), backend reset,
a cache of the session's own."""
import os
import shutil
import tempfile

import pytest

from testutil import DEVICE  # noqa: F401  (first: sets TRITON_INTERPRET before kernels load)


def _session_cache() -> str:
    """A fresh ``$FASTBEGAN_CACHE`` for the test session, set before fastbegan reads it
    (``fastbegan.data.default_cache_dir`` reads the variable at each call; a test that sets
    its own with monkeypatch still wins). Old compile records, data caches and kernel-path
    records would otherwise decide what the tests run: a wrong-result record left by one
    borderline `fastbegan doctor` run must not silence a kernel's tests. Only the records of
    sticky CUDA errors are carried over from the user's cache: running such a path again
    would take the CUDA context down (the doctor stage of benchmarks/gpu_suite.sh writes
    them before the tests run); the tests report those as skips."""
    from fastbegan.data import default_cache_dir, read_json_table, write_json_atomic
    from fastbegan.ops.fallback import is_sticky_record
    outer = default_cache_dir() / "dropped_paths.json"
    path = tempfile.mkdtemp(prefix="fastbegan-test-cache-")
    sticky = {}
    for env, variants in read_json_table(outer).items():
        kept = {var: {p: why for p, why in paths.items() if isinstance(why, str) and is_sticky_record(why)}
                for var, paths in variants.items() if isinstance(paths, dict)} if isinstance(variants, dict) else {}
        kept = {var: paths for var, paths in kept.items() if paths}
        if kept:
            sticky[env] = kept
    if sticky:
        write_json_atomic(os.path.join(path, "dropped_paths.json"), sticky)
    os.environ["FASTBEGAN_CACHE"] = path
    return path


SESSION_CACHE = _session_cache()


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


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
    """A kernel path that an earlier process recorded as dying of a sticky CUDA error on this
    GPU is reported as a skip with that reason instead of being run again (it would take
    the CUDA context down). A wrong-result record raises no KernelPathDropped: the path is
    run and verified, and the test fails if it is still wrong (fallback._run_strict)."""
    outcome = yield
    report = outcome.get_result()
    from fastbegan.ops.fallback import KernelPathDropped
    if call.excinfo is not None and call.excinfo.errisinstance(KernelPathDropped):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")
