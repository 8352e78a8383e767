"""fastbegan.bench: report maths, results files, the `fastbegan bench` command (CPU, fast)."""
import json

import pytest
import torch
from click.testing import CliRunner

from fastbegan import bench, ops
from fastbegan.bench import timing, variants, workloads
from fastbegan.cli import main

CPU = torch.device("cpu")


def _row(workload, variant, case, ms, flops=None, images=16, status="ok", reason=None):
    r = {k: None for k in bench.ROW_KEYS}
    r.update(workload=workload, variant=variant, case=case, status=status, reason=reason, params={},
             what=bench.VARIANTS.get(variant, "x"))
    if status == "ok":
        r.update(ms_median=ms, ms_q1=ms * 0.9, ms_q3=ms * 1.1, ms_iqr=ms * 0.2, ms_min=ms * 0.8, rounds=5,
                 inner=1, images=images, images_per_s=images / ms * 1e3 if images else None, flops=flops,
                 tflops=flops / ms * 1e-9 if flops else None)
    return r


def _meta(spec=1000.0):
    return {"device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "slug": "h100-80gb-hbm3",
                       "capability": "9.0", "sms": 132, "memory_gb": 79.2,
                       "peak_bf16_tflops_spec": spec, "peak_spec_entry": "H100 SXM"},
            "env": {"torch": "2.11.0", "triton": "3.6.0", "python": "3.11", "commit": "abc123", "dirty": False,
                    "cuda": "12.8", "cudnn": 91000},
            "created": "2026-01-01T00:00:00+00:00", "complete": True}


def _rows():
    f = 10 ** 12  # 1 TFLOP per step
    return [_row("matmul_peak", "bf16", "8192^3", 2.0, flops=2 * 10 ** 12, images=None),  # 1000 TFLOP/s
            _row("train_step", "a", "res128 b16 n128", 10.0, f), _row("train_step", "b", "res128 b16 n128", 5.0, f),
            _row("train_step", "c", "res128 b16 n128", 4.0, f), _row("train_step", "d", "res128 b16 n128", 2.0, f),
            _row("train_step", "c", "res64 b16 n64", None, status="skipped", reason="compile budget used up")]


def test_peak_table():
    assert bench.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == (989.4, "H100 SXM")
    assert bench.peak_bf16_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert bench.peak_bf16_tflops("NVIDIA H100 NVL")[0] == 835.0
    assert bench.peak_bf16_tflops("NVIDIA H200")[0] == 989.4
    assert bench.peak_bf16_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert bench.peak_bf16_tflops("Some Future GPU") == (None, None)


def test_summarize_quartiles():
    s = bench.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert s["ms_median"] == 3.0 and s["ms_q1"] == 2.0 and s["ms_q3"] == 4.0 and s["ms_iqr"] == 2.0
    assert s["ms_min"] == 1.0 and s["rounds"] == 5
    assert bench.summarize([7.0])["ms_iqr"] == 0


def test_speedups_and_peaks():
    rows = {(r["workload"], r["variant"], r["case"]): r for r in bench.finalize_rows(_rows(), _meta())}
    d = rows[("train_step", "d", "res128 b16 n128")]
    assert d["speedup_vs_a"] == pytest.approx(5.0)
    assert d["speedup_vs_best_bc"] == pytest.approx(2.0)       # best of b (5 ms) and c (4 ms)
    assert d["tflops"] == pytest.approx(500.0)
    assert d["pct_peak_spec"] == pytest.approx(50.0)
    assert d["pct_peak_measured"] == pytest.approx(50.0)        # matmul measured 1000 TFLOP/s
    assert rows[("train_step", "a", "res128 b16 n128")]["speedup_vs_a"] == pytest.approx(1.0)
    assert rows[("train_step", "c", "res64 b16 n64")]["speedup_vs_a"] is None


def test_write_validate_render_and_cli_show(tmp_path):
    j, m = bench.write_results(_rows(), _meta(), tmp_path, "h100-80gb-hbm3-2026-01-01-000000")
    doc = json.loads(j.read_text())
    assert bench.validate_results(doc) == []
    md = m.read_text()
    assert "NVIDIA H100 80GB HBM3" in md and "torch 2.11.0, triton 3.6.0" in md and "abc123" in md
    assert "| res128 b16 n128 | d | 2.000 |" in md and "5.00x" in md and "**skipped**: compile budget" in md
    # an older CPU file must not win over the newer GPU one
    old = dict(_meta(), created="2025-01-01T00:00:00+00:00")
    bench.write_results(_rows(), old, tmp_path, "cpu-2025-01-01-000000")
    assert bench.newest_results(tmp_path) == j
    res = CliRunner().invoke(main, ["bench", "--results", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "| res128 b16 n128 | d | 2.000 |" in res.output and str(j) in res.output


def test_validate_catches_problems():
    doc = {"schema": bench.SCHEMA, "meta": _meta(), "rows": bench.finalize_rows(_rows(), _meta())}
    bad = json.loads(json.dumps(doc))
    bad["rows"][1]["ms_median"] = float("nan")
    del bad["rows"][2]["tflops"]
    bad["rows"][5]["reason"] = None
    errs = bench.validate_results(bad)
    assert any("ms_median = nan" in e for e in errs)
    assert any("keys missing: ['tflops']" in e for e in errs)
    assert any("row 5: status skipped without a reason" in e for e in errs)
    assert bench.validate_results({"schema": "x", "meta": {}, "rows": []})


def test_cli_show_without_results(tmp_path):
    res = CliRunner().invoke(main, ["bench", "--results", str(tmp_path / "none")])
    assert res.exit_code == 1 and "no benchmark results" in res.output


def test_run_case_matmul_and_policies():
    s = bench.BenchSession.from_env(CPU, quick=True)
    row = bench.run_case("matmul_peak", "bf16", {"n": 64}, s)
    assert row["status"] == "ok" and row["tflops"] > 0 and row["ms_q1"] <= row["ms_median"] <= row["ms_q3"]
    s.compile_policy = "none"
    assert bench.run_case("G_fwd", "c", dict(res=8, batch=2, filters=4), s)["status"] == "skipped"
    assert bench.run_case("G_fwd", "d", dict(res=8, batch=2, filters=4), s)["status"] == "n/a"
    s.budget_s = 0
    assert "time budget" in bench.run_case("G_fwd", "a", dict(res=8, batch=2, filters=4), s)["reason"]
    assert ops.get_backend() == "torch"


def test_fastbegan_train_step_variants_on_cpu():
    """(d) and (e) on a CPU: fastbegan's fused step on the torch backend, (d) compiled
    (not run here: a minute of inductor), (e) eager; (a)-(c) keep the reference step."""
    s = bench.BenchSession.from_env(CPU, quick=True)
    p = dict(res=8, batch=2, filters=4)
    with ops.use_backend("torch"):
        d = workloads._prepare_train_step("d", p, CPU, s)
        assert "FusedStep" in d.what and "torch.compile'd" in d.what and d.fn.compiles_next
        e = workloads._prepare_train_step("e", p, CPU, s)
        assert "FusedStep" in e.what and "compile" not in e.what
        out = e.fn()
        a = workloads._prepare_train_step("a", p, CPU, s)
        assert a.fn.__self__.stepper.kind == "reference"  # Trainer.train_step, the reference step
    assert {"loss_real", "loss_fake", "k", "M"} <= set(out)


def test_port_variant_runs_the_port_step():
    s = bench.BenchSession.from_env(CPU, quick=True)
    prep = workloads._prepare_train_step("p", dict(res=8, batch=2, filters=4), CPU, s)
    assert type(prep.fn).__name__ == "PortStep" and prep.what == bench.VARIANTS["p"]
    out = prep.fn()
    assert set(out) == {"loss_d", "loss_g", "k"} and prep.fn.tr.step == 1


def test_cpu_real_shapes_cases_and_file_names(monkeypatch):
    from fastbegan.bench.cases import CPU_REAL_ENV
    from fastbegan.bench.session import file_slug
    dev = {"type": "cpu", "name": "CPU: Intel(R) Xeon(R) Processor", "slug": "cpu"}
    monkeypatch.delenv(CPU_REAL_ENV, raising=False)
    assert file_slug(dev) == "cpu-smoke"
    tiny = {(w, v) for w, v, _ in bench.default_cases(CPU)}
    assert {("train_step", v) for v in "pabcde"} <= tiny and ("conv_elu", "e") not in tiny
    monkeypatch.setenv(CPU_REAL_ENV, "1")
    assert file_slug(dev) == "cpu-intel-r-xeon-r-processor"
    monkeypatch.setenv("FASTBEGAN_BENCH_CPU_REPEATS", "2")
    real = [(w, v, p) for w, v, p in bench.default_cases(CPU) if w == "train_step"]
    # every variant once, then all of them again (interleaved), each repeat numbered
    assert [(v, p["res"], p["batch"], p["filters"], p["repeat"]) for _, v, p in real] == \
        [(v, r, 16, 64, i) for i in (0, 1) for r in (32, 64) for v in "pabcde"]
    assert variants.compile_kwargs(CPU) == {"backend": "inductor"}


def test_interleaved_repeats_merge_into_one_row_per_variant():
    """Three processes of one variant: the row is the median of their medians (q1/q3 the
    fastest and slowest), throughput from that median, speedups between merged rows; a
    failed repeat is left out."""
    f = 10 ** 12
    rows = [_row("train_step", "b", "res32 b16 n64", ms, f) for ms in (9.0, 10.0, 30.0)]
    rows += [_row("train_step", "d", "res32 b16 n64", ms, f) for ms in (4.0, 5.0)]
    rows += [_row("train_step", "d", "res32 b16 n64", None, status="error", reason="killed")]
    rows[0]["peak_mem_mb"], rows[2]["peak_mem_mb"] = 100.0, 300.0
    out = {r["variant"]: r for r in bench.finalize_rows(rows, _meta())}
    assert len(bench.finalize_rows(rows, _meta())) == 2
    b, d = out["b"], out["d"]
    assert (b["ms_median"], b["ms_q1"], b["ms_q3"]) == (10.0, 9.0, 30.0)
    assert b["peak_mem_mb"] == 300.0 and "median of 3 processes" in b["what"]
    assert b["images_per_s"] == pytest.approx(16 / 10.0 * 1e3) and b["tflops"] == pytest.approx(100.0)
    assert d["status"] == "ok" and d["ms_median"] == 4.5 and "median of 2 processes" in d["what"]
    assert d["speedup_vs_best_bc"] == pytest.approx(10.0 / 4.5)
    doc = {"schema": bench.SCHEMA, "meta": _meta(), "rows": bench.finalize_rows(rows, _meta())}
    assert bench.validate_results(doc) == []


def test_isolated_case_reports_peak_memory():
    """A case in its own process comes back as a row, with the process's peak memory."""
    from fastbegan.bench.isolated import run_in_subprocess
    s = bench.BenchSession.from_env(CPU, quick=True)
    row = run_in_subprocess("train_step", "e", dict(res=8, batch=2, filters=4), s, timeout_s=300)
    assert row["status"] == "ok", row["reason"]
    assert row["peak_mem_mb"] > 0 and "own process" in row["what"] and s.rows == [row]
    bad = run_in_subprocess("train_step", "e", dict(res=7, batch=2, filters=4), s, timeout_s=300)
    assert bad["status"] == "error" and "resolution" in bad["reason"]


def test_isolated_case_under_torchrun_reports_the_allreduce():
    """A case with ``world`` runs under torchrun (benchmarks/distributed_step.py): both ranks
    time the same number of steps (else the all-reduce would hang), rank 0 reports the row,
    with the processes and the all-reduce's time per step; its case name says torchrun."""
    from fastbegan.bench.isolated import run_in_subprocess
    s = bench.BenchSession.from_env(CPU, quick=True)
    row = run_in_subprocess("train_step", "e", dict(res=8, batch=4, filters=4, world=2), s, timeout_s=300)
    assert row["status"] == "ok", row["reason"]
    assert row["case"] == "res8 b4 n4 torchrun x2" and row["world"] == 2
    assert 0 < row["allreduce_ms"] < row["ms_median"]
    assert "[torchrun, 2 processes x 1 thread; all-reduce" in row["what"]


def test_speedup_over_the_port():
    rows = _rows() + [_row("train_step", "p", "res128 b16 n128", 20.0, 10 ** 12)]
    d = {(r["variant"]): r for r in bench.finalize_rows(rows, _meta()) if r["case"] == "res128 b16 n128"}["d"]
    assert d["speedup_vs_p"] == pytest.approx(10.0)
    md = bench.render_markdown(rows, _meta())
    assert "| vs p | vs a | vs best(b,c) |" in md and "10.00x" in md


def test_d_kernel_workloads_fall_back_to_eager_without_cuda_graphs(monkeypatch):
    """The (d) plumbing of the D/G workloads, on CPU with the torch backend (the real (d)
    needs a GPU): CUDA graph capture is impossible on CPU -> eager, with the reason."""
    monkeypatch.setattr(variants, "require_triton", lambda device: None)
    monkeypatch.setattr(variants, "D_BACKEND", "torch")
    s = bench.BenchSession.from_env(CPU, quick=True)
    with ops.use_backend("torch"):
        prep = workloads._prepare_g_fwd("d", dict(res=8, batch=2, filters=4), CPU, s)
    assert "eager (CUDA graph capture failed" in prep.what
    assert prep.fn().shape == (2, 3, 8, 8)


def test_cli_run_quick(tmp_path):
    res = CliRunner().invoke(main, ["bench", "--run", "--res", "8", "--variants", "ab", "--device", "cpu",
                                    "--save", "--results", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "| res8 b4 n8 | a |" in res.output and "| res8 b4 n8 | b |" in res.output
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and files[0].startswith("cpu-smoke-") and files[0].endswith(".json")
    assert bench.validate_results(json.loads((tmp_path / files[0]).read_text())) == []


def test_compile_over_its_time_limit_is_skipped_not_failed(monkeypatch):
    import time
    s = bench.BenchSession.from_env(CPU, quick=True)
    s.compile_policy = "all"
    orig = workloads.PREPARE["G_fwd"]

    def slow_first_call(v, p, d, sess):
        prep = orig(v, p, d, sess)
        fn, calls = prep.fn, []

        def first_slow():
            if not calls:
                calls.append(1)
                time.sleep(3)
            return fn()
        prep.fn = first_slow
        return prep
    monkeypatch.setitem(workloads.PREPARE, "G_fwd", slow_first_call)
    real = timing.time_limit
    monkeypatch.setattr(timing, "time_limit", lambda sec: real(0.5 if sec else None))
    row = bench.run_case("G_fwd", "c", dict(res=8, batch=2, filters=4), s)
    assert row["status"] == "skipped" and "compile stopped" in row["reason"]
    assert s.compile_used_s > 0
