"""``fastbegan doctor`` under the Triton interpreter: the whole CPU matrix passes, covers
every op and kernel path, and a kernel that computes a wrong result makes it fail (exit
status 1, the row marked FAIL in the table and the JSON)."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from testutil import DEVICE, requires_gpu
from fastbegan import doctor
from fastbegan.cli import main
from fastbegan.kernels import conv3x3_bwd, interpreting

needs_interpreter = pytest.mark.skipif(not interpreting() or DEVICE != "cpu",
                                       reason="the CPU matrix runs under the Triton interpreter")
pytestmark = pytest.mark.usefixtures("one_thread")


@requires_gpu
def test_gpu_matrix_bf16_and_fp32_at_real_shapes():
    """On a GPU: every path at the res-64 layer shapes (batch 4 to keep it short), bf16 and
    fp32; the full res 64 + 128 matrix is `fastbegan doctor` (gpu_suite.sh)."""
    cases = doctor.layer_cases(64, batch=4)
    rows = doctor.run_matrix(torch.device("cuda"), [torch.bfloat16, torch.float32], cases)
    bad = [r for r in rows if r.status not in ("pass", "skip")]
    assert not bad, doctor.format_table(bad)


@pytest.fixture(scope="module")
def rows():
    return doctor.run_matrix(torch.device("cpu"), [torch.float16, torch.float32],
                             doctor.cpu_cases())


@needs_interpreter
def test_cpu_matrix_passes(rows):
    bad = [r for r in rows if r.status not in ("pass", "skip")]
    assert not bad, doctor.format_table(bad)
    # only the tensor-descriptor kernel on 3 input channels (6-byte rows) is not eligible
    skipped = {(r.op, r.shape, r.path) for r in rows if r.status == "skip"}
    assert skipped == {("conv3x3_elu", "2x3x8x8->16", "tma")}


@needs_interpreter
def test_cpu_matrix_covers_every_op_and_path(rows):
    done = {(r.op, r.path, r.dtype) for r in rows if r.status == "pass"}
    for dt in ("float16", "float32"):
        for op, path in [("conv3x3_elu", "tma"), ("conv3x3_elu", "tma_9tap"),
                         ("conv3x3_elu", "ptr"), ("conv3x3_dgrad[x]", "triton"),
                         ("conv3x3_dgrad[skip]", "triton"), ("conv3x3_wgrad", "triton"),
                         ("conv3x3_elu_pair (fwd+bwd)", "triton"),
                         ("conv3x3_l1_pair_began (fwd+bwd)", "triton"),
                         ("upsample_nearest2x", "triton")]:
            assert (op, path, dt) in done, (op, path, dt)
    variants = {r.shape for r in rows if r.op == "conv3x3_elu" and r.status == "pass"}
    for mark in ("/up", "/s2", "+skip", "->3/linear", "2x3x8x8"):
        assert any(mark in v for v in variants), mark


@needs_interpreter
def test_wrong_kernel_fails_the_doctor(monkeypatch, tmp_path):
    real = conv3x3_bwd.conv3x3_wgrad

    def wrong(*a, **k):
        dw, db = real(*a, **k)
        return dw * 1.5, db
    monkeypatch.setattr(conv3x3_bwd, "conv3x3_wgrad", wrong)
    monkeypatch.setattr(doctor, "cpu_cases", lambda: [
        doctor.ConvCase("c_in3", 1, 3, 0, 8, 4, 4), doctor.ConvCase("c_out3", 1, 8, 0, 3, 4, 4,
                                                                    activation=False),
        doctor.ConvCase("upsample", 1, 8, 0, 8, 2, 2, upsample=True)])
    out = tmp_path / "doctor.json"
    r = CliRunner().invoke(main, ["doctor", "--dtype", "fp32", "--out", str(out)])
    assert r.exit_code == 1, r.output
    report = json.loads(out.read_text())
    assert not report["ok"] and report["environment"]["interpreter"]
    failed = {(row["op"], row["status"]) for row in report["rows"] if row["status"] != "pass"}
    assert ("conv3x3_wgrad", "FAIL") in failed
    assert "FAIL" in r.output and "max rel err" in r.output


_SMALL_CASES = [doctor.ConvCase("c_in3", 1, 3, 0, 8, 4, 4),
                doctor.ConvCase("c_out3", 1, 8, 0, 3, 4, 4, activation=False),
                doctor.ConvCase("upsample", 1, 8, 0, 8, 2, 2, upsample=True)]


@pytest.fixture
def persisted(monkeypatch, tmp_path):
    """Drops recorded on this device too (on a GPU they are by default), in a fresh cache."""
    from fastbegan.ops import fallback
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(fallback, "_persists", lambda device: True)
    monkeypatch.setattr(doctor, "cpu_cases", lambda: _SMALL_CASES)
    fallback.reset()
    yield tmp_path / "cache" / "dropped_paths.json"
    fallback.reset()


def _doctor(tmp_path, *flags):
    out = tmp_path / "doctor.json"
    r = CliRunner().invoke(main, ["doctor", "--dtype", "fp32", "--out", str(out), *flags])
    return r, json.loads(out.read_text())


def _statuses(report, op):
    return {row["status"] for row in report["rows"] if row["op"] == op}


@needs_interpreter
def test_doctor_findings_are_recorded_for_later_processes(monkeypatch, tmp_path, persisted):
    """A wrong wgrad kernel fails the doctor and is recorded; the next doctor (or training
    run) does not run it again (rows 'dropped', with the first run's reason); --retest
    forgets the record and checks it afresh."""
    from fastbegan.ops import fallback
    real = conv3x3_bwd.conv3x3_wgrad
    monkeypatch.setattr(conv3x3_bwd, "conv3x3_wgrad", lambda *a, **k: (real(*a, **k)[0] * 1.5, real(*a, **k)[1]))
    r, report = _doctor(tmp_path)
    assert r.exit_code == 1 and _statuses(report, "conv3x3_wgrad") == {"FAIL"}
    assert "conv3x3_wgrad" in persisted.read_text()
    fallback.reset()                                             # a new process
    r, report = _doctor(tmp_path)
    assert r.exit_code == 1 and _statuses(report, "conv3x3_wgrad") == {"dropped"}
    assert all("doctor: max relative error" in row["note"] for row in report["rows"]
               if row["status"] == "dropped")
    assert _statuses(report, "conv3x3_dgrad[x]") == {"pass"}
    fallback.reset()
    monkeypatch.setattr(conv3x3_bwd, "conv3x3_wgrad", real)       # fixed
    r, report = _doctor(tmp_path, "--retest")
    assert r.exit_code == 0, r.output
    assert _statuses(report, "conv3x3_wgrad") == {"pass"}


@needs_interpreter
def test_sticky_error_stops_the_doctor_and_the_rerun_goes_on(monkeypatch, tmp_path, persisted):
    """A dgrad kernel that leaves the 'GPU' unusable: the doctor saves its table, names the
    path and exits with STICKY_EXIT; run again, it skips that path (recorded) and checks
    every other one."""
    from fastbegan.ops import fallback

    def crash(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    with monkeypatch.context() as m:
        m.setattr(conv3x3_bwd, "conv3x3_dgrad", crash)
        m.setattr(fallback, "_sticky_cuda_error", lambda dev: "RuntimeError: CUDA error")
        r, report = _doctor(tmp_path)
    assert r.exit_code == doctor.STICKY_EXIT and "run `fastbegan doctor` again" in r.output
    assert not report["complete"] and _statuses(report, "conv3x3_dgrad[x]") == {"ERROR"}
    fallback.reset()
    r, report = _doctor(tmp_path)
    assert r.exit_code == 1 and report["complete"]
    dgrad = [(row["shape"], row["status"]) for row in report["rows"] if row["op"] == "conv3x3_dgrad[x]"]
    first = next(row["shape"] for row in report["rows"] if row["op"] == "conv3x3_dgrad[x]")
    assert dgrad[0] == (first, "dropped")      # the variant that crashed; the others run and pass
    assert {s for _, s in dgrad[1:]} == {"pass"} and len(dgrad) == len(_SMALL_CASES)
    assert _statuses(report, "conv3x3_wgrad") == {"pass"}


def test_toolchain_rows_name_what_is_missing(monkeypatch):
    """Triton builds its launchers with a C compiler and the Python headers: on a GPU each
    missing piece is an ERROR row naming it; on a CPU (interpreter) a skip; and the auto
    backend does not pick Triton on such a GPU."""
    from fastbegan import ops
    monkeypatch.setenv("CC", "no-such-compiler")
    rows = doctor.toolchain_rows(torch.device("cuda"))
    assert [r.status for r in rows] == ["ERROR"] and "CC=no-such-compiler is not found" in rows[0].note
    assert doctor.toolchain_rows(torch.device("cpu"))[0].status == "skip"
    monkeypatch.setattr(ops, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    ok, why = ops.triton_status()
    assert not ok and "C compiler" in why
    monkeypatch.delenv("CC")
    assert doctor.toolchain_rows(torch.device("cuda"))[0].status == "pass"
