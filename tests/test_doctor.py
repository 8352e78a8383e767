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
