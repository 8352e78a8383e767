"""The benchmark cases: peak matmul, training step, D fwd+bwd, G fwd, kernels (schema.VARIANTS).

On CPU: tiny shapes (res 8 / 16, 8 filters), one compiled case; with
FASTBEGAN_BENCH_CPU_REAL=1 the real training step (res 32 and 64, n 64, batch 16), every
variant in its own process (fastbegan/bench/isolated.py), all of them three times over,
interleaved (FASTBEGAN_BENCH_CPU_REPEATS), peak memory per row.
On GPU: res 32 / 64 / 128 at batch 16 and 64, kernel shapes of the res-128 model.
"""
import json
import math

import pytest

from fastbegan import bench
from fastbegan.bench.cases import cpu_real_shapes
from fastbegan.bench.isolated import run_in_subprocess

from benchsession import DEVICE, RESULTS_DIR, get_session

CASES = bench.default_cases(DEVICE)


def _id(case):
    wl, v, p = case
    repeat = f"-repeat{p['repeat']}" if "repeat" in p else ""
    return f"{wl}[{bench.case_name(wl, p).replace(' ', '_')}]-{v}{repeat}"


@pytest.mark.parametrize("workload,variant,params", CASES, ids=[_id(c) for c in CASES])
def test_case(workload, variant, params, bench_session, measure):
    if DEVICE.type == "cpu" and cpu_real_shapes():
        row = run_in_subprocess(workload, variant, params, bench_session)
    else:
        row = bench.run_case(workload, variant, params, bench_session, measure=measure)
    if row["status"] in ("n/a", "skipped"):
        pytest.skip(f"{row['status']}: {row['reason']}")
    if row["status"] == "error":
        pytest.fail(f"{workload} {row['case']} ({variant}): {row['reason']}")
    assert row["ms_median"] > 0 and math.isfinite(row["ms_median"])
    assert row["ms_q1"] <= row["ms_median"] <= row["ms_q3"]


@pytest.mark.results_check
def test_results_file_written_and_well_formed():
    session = get_session()
    if not session.rows:
        pytest.skip("no benchmark case ran in this session (deselected)")
    json_path = RESULTS_DIR / f"{session.stem}.json"
    md_path = json_path.with_suffix(".md")
    assert json_path.is_file() and md_path.is_file()
    if DEVICE.type == "cpu":
        want = "cpu-smoke-" if not cpu_real_shapes() else "cpu-"
        assert json_path.name.startswith(want), f"CPU results must be named {want}..."
    doc = json.loads(json_path.read_text())
    assert bench.validate_results(doc) == []
    # one row per case and variant (interleaved repeats of the CPU real shapes merged)
    assert len(doc["rows"]) == len({(r["workload"], r["case"], r["variant"]) for r in session.rows})
    meta = doc["meta"]
    assert meta["device"]["type"] == DEVICE.type and meta["env"]["torch"]
    ran = {(r["workload"], r["variant"]) for r in doc["rows"] if r["status"] == "ok"}
    if ("train_step", "a") in ran and ("train_step", "b") in ran:
        steps = [r for r in doc["rows"] if r["workload"] == "train_step" and r["status"] == "ok"]
        assert all(r["speedup_vs_a"] > 0 and r["tflops"] > 0 and r["images_per_s"] > 0 for r in steps)
    text = md_path.read_text()
    assert meta["device"]["name"] in text and "| case | var | ms (median) |" in text
    assert meta["env"]["torch"] in text
