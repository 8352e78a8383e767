"""benchmarks/distributed_step.py's plan (interleaved repeats, the variants and worlds per
device) and its summary lines, against numbers written out here."""
from distributed_step import plan, summary


def test_plan_interleaves_repeats_and_covers_each_device():
    cpu = plan("cpu", 2, tiny=False)
    assert len(cpu) == 2 * 2 * 4 and [p["repeat"] for _, p in cpu] == [0] * 8 + [1] * 8
    assert [(v, p.get("world")) for v, p in cpu[:4]] == [("b", None), ("d", None), ("b", 2), ("d", 2)]
    assert {(p["res"], p["batch"], p["filters"]) for _, p in cpu} == {(32, 16, 64), (64, 16, 64)}
    gpu = plan("cuda", 1, tiny=False, res=[128])
    assert [(v, p.get("world"), p["filters"], p["device"]) for v, p in gpu] == [("d", None, 128, "cuda"),
                                                                                ("d", 1, 128, "cuda")]
    assert {v for v, _ in plan("cpu", 1, tiny=True)} == {"b", "e"}  # --tiny: no compile


def test_summary_lines():
    rows = [dict(status="ok", case="res32 b16 n64 torchrun x2", variant="d", ms_median=100.0, allreduce_ms=4.0),
            dict(status="ok", case="res32 b16 n64 torchrun x2", variant="d", ms_median=120.0, allreduce_ms=6.0),
            dict(status="ok", case="res32 b16 n64 torchrun x2", variant="b", ms_median=165.0, allreduce_ms=5.0),
            dict(status="error", case="res64 b16 n64 torchrun x2", variant="b", ms_median=None),
            dict(status="ok", case="res64 b16 n64", variant="d", ms_median=10.0),
            dict(status="ok", case="res64 b16 n64 torchrun x1", variant="d", ms_median=10.5, allreduce_ms=None)]
    assert summary(rows) == [
        "res32 b16 n64 torchrun x2: fused step (d) 110.0 ms, reference step (b) 165.0 ms: 1.50x; "
        "the all-reduce is 4.5% of the fused step",
        "res64 b16 n64: fused step (d) 10.000 ms in one process, 10.500 ms in a process group of one "
        "(its all-reduce inside the CUDA graph): +0.500 ms (+5.0%)"]
