"""benchmarks/quality_study.py's bookkeeping: forks, lineages and time to quality (the
training and scoring it drives are tested where they live)."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import quality_study as S  # noqa: E402


def _row(lever, step, p, r, view="raw", ds="digits", secs=None):
    return {"dataset": ds, "lever": lever, "view": view, "step": step, "precision": p, "recall": r,
            "train_s": float(step if secs is None else secs), "swd_x1e3": 100.0, "diversity_ratio": 1.0}


def test_time_to_quality_first_hit_or_best():
    series = [_row("escape", 500, 0.2, 0.1), _row("escape", 1000, 0.55, 0.45), _row("escape", 1500, 0.5, 0.5),
              _row("escape", 2000, 0.9, 0.9)]
    t = S.time_to_quality(series)
    assert t == {"reached": True, "step": 1500, "train_s": 1500.0, "precision": 0.5, "recall": 0.5}
    t = S.time_to_quality(series[:2])  # not reached: the best min(P, R), 0.45 at step 1000
    assert (t["reached"], t["step"], t["precision"]) == (False, 1000, 0.55)
    assert S.time_to_quality([]) == {}


def test_lineage_takes_the_parents_rows_up_to_the_fork():
    parent, fork_step = S.LEVERS["anneal"][1]
    rows = [_row(parent, s, 0.1, 0.1) for s in (1000, 2000, 2500, 3000)]
    rows += [_row("anneal", s, 0.6, 0.6) for s in (2500, 3000)] + [_row("anneal", 2500, 0.0, 0.0, view="ema")]
    got = S.lineage(rows, "digits", "anneal", "raw")
    assert [(r["lever"], r["step"]) for r in got] == [(parent, 1000), (parent, fork_step), ("anneal", 2500),
                                                      ("anneal", 3000)]



def test_first_own_step_of_a_forked_and_of_a_straight_run(tmp_path):
    parent, fork_step = S.LEVERS["anneal"][1]
    forked, straight = tmp_path / "forked", tmp_path / "straight"
    for run, steps in ((forked, (fork_step, fork_step + 1000)), (straight, (fork_step - 1000, fork_step))):
        (run / "checkpoints").mkdir(parents=True)
        for s in steps:
            (run / "checkpoints" / f"ckpt_{s:08d}.safetensors").write_bytes(b"")
    assert S.first_own_step("anneal", forked) == fork_step + 1  # the parent's rows stand for the rest
    assert S.first_own_step("anneal", straight) == 0  # trained straight through: scored from the start
    assert S.first_own_step("escape", forked) == 0
    assert S.run_dir(tmp_path, "faces", "anneal", 32).name == "faces-anneal"
    assert S.run_dir(tmp_path, "faces", "anneal", 64).name == "faces64-anneal"


def test_fork_copies_the_checkpoint_and_the_log_up_to_it(tmp_path):
    parent, child = tmp_path / "p", tmp_path / "c"
    (parent / "checkpoints").mkdir(parents=True)
    for s in (1000, 2000):
        (parent / "checkpoints" / f"ckpt_{s:08d}.safetensors").write_bytes(b"x%d" % s)
    (parent / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1950, 2000, 2050)))
    S.fork(parent, child, 2000)
    assert [p.name for p in (child / "checkpoints").iterdir()] == ["ckpt_00002000.safetensors"]
    assert (child / "checkpoints" / "ckpt_00002000.safetensors").read_bytes() == b"x2000"
    assert [json.loads(l)["step"] for l in (child / "metrics.jsonl").read_text().splitlines()] == [1950, 2000]
    S.fork(parent, child, 1000)  # an existing fork is left alone (resumed, never restarted)
    assert [p.name for p in (child / "checkpoints").iterdir()] == ["ckpt_00002000.safetensors"]
    with pytest.raises(FileNotFoundError, match="first"):
        S.fork(parent, tmp_path / "d", 3000)


def test_eval_steps_and_the_report():
    assert S.eval_steps(5000) == [500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000]
    rows = [_row("escape", s, 0.3 + s / 10000, 0.6) for s in (2000, 5000)]
    doc = {"meta": {"device": "cpu", "created": "now", "commit": "abc", "torch": "2", "seed": 0, "threads": 1,
                    "levers": S.LEVERS}, "datasets": ["digits"], "rows": rows, "real_baselines": {}}
    md = S.markdown(doc)
    assert "| escape | raw | 0.5000 / 0.6000 / 100.0 / 1.0000 / - | 0.8000 / 0.6000" in md
    assert "2000 s (step 2000, reached: P 0.50 R 0.60)" in md
