"""pytest configuration of the benchmark suite (``pytest benchmarks/``).

Every case adds a row to one :class:`fastbegan.bench.BenchSession`; the rows are written to
``benchmarks/results/<device>-<date>.json`` and ``.md`` after every case (so a run cut
short by a timeout still leaves its rows) and once more, marked complete, by the
session-finish hook. ``FASTBEGAN_BENCH_RESULTS`` writes them elsewhere.

Timing goes through the pytest-benchmark fixture when the plugin is installed and enabled
(``benchmark.pedantic``: its own table and ``--benchmark-json`` then work too); without it
(e.g. a GPU machine without the plugin, or ``--benchmark-disable``) the same rounds are
timed by :func:`fastbegan.bench.own_measure`.

Budgets (environment): FASTBEGAN_BENCH_BUDGET_S (no new case after this many seconds),
FASTBEGAN_BENCH_COMPILE_BUDGET_S (compile time for the torch.compile cases),
FASTBEGAN_BENCH_COMPILE=auto|all|none. Cases over budget are reported as skipped.
"""
from __future__ import annotations


import pytest

from fastbegan import bench

import benchsession  # noqa: E402
from benchsession import DEVICE, RESULTS_DIR, get_session  # noqa: E402,F401


@pytest.fixture
def bench_session() -> bench.BenchSession:
    return get_session()


@pytest.fixture
def measure(request):
    """``measure(fn, device, inner, rounds) -> ms per iteration per round``."""
    def run(fn, device, inner, rounds):
        use_plugin = request.config.pluginmanager.hasplugin("benchmark")
        bm = request.getfixturevalue("benchmark") if use_plugin else None
        if bm is None or getattr(bm, "disabled", False):
            return bench.own_measure(fn, device, inner, rounds)

        def target():
            for _ in range(inner):
                fn()
            bench.synchronize(device)
        bench.synchronize(device)
        bm.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)
        return [t * 1e3 / inner for t in bm.stats.stats.data]
    return run


def pytest_collection_modifyitems(config, items):
    """The results-file checks run last, after every case has written its row."""
    last = [i for i in items if i.get_closest_marker("results_check")]
    items[:] = [i for i in items if not i.get_closest_marker("results_check")] + last


def pytest_configure(config):
    config.addinivalue_line("markers", "results_check: checks the results file (runs last)")


def pytest_sessionfinish(session, exitstatus):
    _session = benchsession._session
    if _session is not None and _session.rows:
        # exit status 2: interrupted (e.g. the GPU suite's `timeout -s INT`): rows so far
        _session.write(complete=int(exitstatus) != 2, exitstatus=int(exitstatus))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    _session = benchsession._session
    if _session is not None and _session.rows and _session.stem:
        terminalreporter.write_line(
            f"fastbegan benchmark results: {RESULTS_DIR / _session.stem}.json / .md "
            f"({len(_session.rows)} rows, {_session.elapsed():.0f} s)")
