"""benchmarks/variety_study.py's measures: background hues, D's reconstruction error and the
equilibrium's summary, against values written out by hand (the training and the other scores
it drives are tested where they live)."""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import variety_study as V  # noqa: E402


def test_background_hues_read_the_faces_background():
    """Faces drawn with their background hue in one bin, then spread over all twelve."""
    from fastbegan.data import FACTORS, draw_face
    base = {f: 0.5 for f in FACTORS}
    one = np.stack([draw_face({**base, "bg_hue": 0.26 + 0.008 * i, "skin_hue": i / 8}, 32) for i in range(8)])
    got = V.background_hues(one)
    assert got["bg_bins"] == 1 and got["bg_entropy"] == pytest.approx(0.0)  # skin does not count
    spread = np.stack([draw_face({**base, "bg_hue": (b + 0.5) / 12}, 32) for b in range(12)])
    got = V.background_hues(spread)
    assert got["bg_bins"] == 12 and got["bg_entropy"] == pytest.approx(1.0)
    # the same from G's float NCHW output in [-1, 1]
    as_float = torch.from_numpy(spread).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert V.background_hues(as_float)["bg_bins"] == 12


def test_hue_bins_and_d_error_by_hue():
    """Each face's bin is its drawn background hue's; the samples' fullest bin; D's L per bin
    (bins of >= 10 faces), the easiest bin and the worst-over-best spread, for a D that keeps
    90% of a red-background face and half of any other."""
    from fastbegan.data import FACTORS, draw_face
    base = {f: 0.5 for f in FACTORS}
    hues = [0.5 / 12] * 12 + [6.5 / 12] * 10 + [9.5 / 12] * 3
    faces = np.stack([draw_face({**base, "bg_hue": h}, 32) for h in hues])
    assert list(V.hue_bins(faces)) == [0] * 12 + [6] * 10 + [9] * 3
    assert V.background_hues(faces)["bg_top_bin"] == 0

    def d(v):
        keep = torch.from_numpy(np.where(V.hue_bins(v) == 0, 0.9, 0.5)).float().view(-1, 1, 1, 1)
        return keep * v
    t = V.to_tensor(faces)
    red = float((0.1 * t[:12]).abs().flatten(1).mean(1).mean())
    green = float((0.5 * t[12:22]).abs().flatten(1).mean(1).mean())
    got = V.recon_by_hue(d, faces)
    assert set(got["L_by_hue"]) == {0, 6}  # bin 9 has 3 faces: left out
    assert got["L_by_hue"][0] == pytest.approx(red, rel=1e-5)
    assert got["L_by_hue"][6] == pytest.approx(green, rel=1e-5)
    assert got["hue_easiest"] == 0 and got["hue_L_spread"] == pytest.approx(green / red, rel=1e-5)


def test_factor_coverages_name_the_factor_the_samples_miss(monkeypatch):
    """With an estimator that reads the factors straight off (stubbed): backgrounds on two hues
    cover 2 of the fresh faces' 10 hue deciles, pose_x squeezed into its middle fifth covers 2,
    the others as the data; factors the regressor cannot estimate (r2 < 0.5) are left out."""
    from fastbegan import metrics as Q
    from fastbegan.data import FACTORS
    rng = np.random.default_rng(0)
    real = rng.random((1000, len(FACTORS)))
    fake = rng.random((1000, len(FACTORS)))
    j = {n: i for i, n in enumerate(FACTORS)}
    fake[:, j["bg_hue"]] = np.where(np.arange(1000) % 2, 0.02, 0.52)   # red / cyan
    fake[:, j["pose_x"]] = 0.4 + 0.2 * fake[:, j["pose_x"]]
    fake[:, j["smile"]] = 0.5                                           # not estimated: ignored

    class Stub:
        r2 = {n: (0.0 if n == "smile" else 0.9) for n in FACTORS}
        def predict(self, images):
            return real if images is ref else fake
    ref = np.zeros((1000, 8, 8, 3), np.uint8)
    monkeypatch.setattr(Q.FactorEstimator, "load_or_train", classmethod(lambda cls, *a, **k: Stub()))
    got = V.factor_coverages(torch.zeros(1000, 3, 8, 8), ref)

    def by_hand(a, b):  # histogram intersection over a's deciles
        edges = np.quantile(a, np.linspace(0, 1, 11))
        edges[0], edges[-1] = -np.inf, np.inf
        return float(np.minimum(np.histogram(a, edges)[0] / len(a), np.histogram(b, edges)[0] / len(b)).sum())
    assert got["bg_hue_cov"] == pytest.approx(by_hand(real[:, j["bg_hue"]], fake[:, j["bg_hue"]]))
    assert got["bg_hue_cov"] == pytest.approx(0.2, abs=0.03)
    assert got["other_cov_worst"] == "pose_x"
    assert got["other_cov_min"] == pytest.approx(by_hand(real[:, j["pose_x"]], fake[:, j["pose_x"]]))
    assert got["other_cov_min"] < 0.35 < min(by_hand(real[:, j[n]], fake[:, j[n]]) for n in ("size", "skin_hue"))


def test_top_bin_rank_is_the_samples_bin_among_ds_bins():
    row = {"L_by_hue": {"0": 0.16, "5": 0.18, "6": 0.17, "9": 0.22}, "bg_top_bin": 5}
    assert V.top_bin_rank(row) == 2  # 0 (0.16), 6 (0.17), then 5
    assert V.top_bin_rank({**row, "bg_top_bin": 0}) == 0
    assert V.top_bin_rank({**row, "bg_top_bin": 3}) is None  # a bin with too few real faces
    assert V.top_bin_rank({"bg_top_bin": 0}) is None


def test_recon_error_is_begans_l():
    """mean |v - D(v)| over the set, batches of any size."""
    d = lambda v: 0.5 * v  # noqa: E731
    x = torch.linspace(-1, 1, 5 * 3 * 4 * 4).view(5, 3, 4, 4)
    assert V.recon_error(d, x, batch=2) == pytest.approx(float((0.5 * x).abs().mean()), rel=1e-6)


def test_k_summary_counts_the_floor(tmp_path):
    rows = [{"step": s, "k": k} for s, k in [(250, 0.2), (500, 0.05), (750, 0.0505), (1000, 0.12)]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = V.k_summary(tmp_path, 1000, k_min=0.05)
    assert s["k_on_floor"] == pytest.approx(0.5)  # 0.05 and 0.0505 are within 1e-3
    assert s["k_median"] == pytest.approx((0.0505 + 0.12) / 2) and s["k_max"] == pytest.approx(0.12)
    assert V.k_summary(tmp_path, 500, k_min=0.05)["k_on_floor"] == pytest.approx(0.5)


def test_fake_easier_counts_the_window_and_fills_old_rows(tmp_path):
    """The share of logged steps in (step - 500, step] with L_fake < L_real, and the backfill
    into rows scored before the measure existed (only where the run's log is there)."""
    run = tmp_path / "faces-eq"
    run.mkdir()
    losses = [(250, 0.1, 0.05), (500, 0.1, 0.2), (750, 0.1, 0.09), (1000, 0.1, 0.3)]
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss_real": r, "loss_fake": f}) + "\n" for s, r, f in losses))
    assert V.fake_easier(run, 1000) == pytest.approx(0.5)  # 750: easier, 1000 and 500 (edge) not
    assert V.fake_easier(run, 500) == pytest.approx(0.5)   # 250: easier, 500: not
    assert V.fake_easier(run, 100) is None
    rows = [{"dataset": "faces", "lever": "eq", "step": 750}, {"dataset": "digits", "lever": "eq", "step": 750},
            {"dataset": "faces", "lever": "eq", "step": 1000, "fake_easier": 0.9}]
    V.add_log_measures(rows, tmp_path)
    assert rows[0]["fake_easier"] == pytest.approx(0.5)  # 500 (not easier) and 750 (easier)
    assert "fake_easier" not in rows[1] and rows[2]["fake_easier"] == 0.9


def test_an_adapted_gamma_is_read_from_the_log(tmp_path):
    """--k-target runs: a row's gamma is the one logged at (or last before) its step."""
    run = tmp_path / "faces-kt"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "k": 0.1, "gamma": g}) + "\n" for s, g in ((500, 1.6), (1000, 1.9))))
    rows = [{"dataset": "faces", "lever": "kt", "step": 1000, "gamma": 1.5},
            {"dataset": "faces", "lever": "kt", "step": 750, "gamma": 1.5}]
    V.add_log_measures(rows, tmp_path)
    assert [r["gamma"] for r in rows] == [1.9, 1.6]
    assert V.logged_k(run, 1000) == 0.1 and V.logged_k(run, 400, "gamma") is None


def test_merge_adds_the_rows_of_parallel_runs(tmp_path, monkeypatch):
    """--merge: two lanes' results files become one (rows, baselines and levers of both, a row
    already there kept), and nothing is trained."""
    def lane(name, rows, precision="fp32"):
        doc = {"meta": {"levers": {r["lever"]: ["--x"] for r in rows}, "precision": precision},
               "datasets": sorted({r["dataset"] for r in rows}), "rows": rows,
               "real_baselines": {r["dataset"]: {"recall": 0.9} for r in rows}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(doc))
        return str(path)
    a = lane("a", [{"dataset": "faces", "lever": "g15", "step": s, "recall": 0.1} for s in (1000, 2000)])
    b = lane("b", [{"dataset": "digits", "lever": "kt", "step": 1000, "recall": 0.5},
                   {"dataset": "faces", "lever": "g15", "step": 1000, "recall": 0.7}])
    monkeypatch.setattr(V, "load_data", lambda *a, **k: pytest.fail("a merge trains and loads nothing"))
    monkeypatch.setattr(sys, "argv", ["variety_study.py", "--merge", a, b, "--results", str(tmp_path / "out"),
                                      "--stem", "merged", "--work", str(tmp_path / "work")])
    (tmp_path / "out").mkdir()
    V.main()
    doc = json.loads((tmp_path / "out" / "merged.json").read_text())
    assert sorted((r["dataset"], r["lever"], r["step"], r["recall"]) for r in doc["rows"]) == [
        ("digits", "kt", 1000, 0.5), ("faces", "g15", 1000, 0.1), ("faces", "g15", 2000, 0.1)]
    assert doc["datasets"] == ["faces", "digits"] and set(doc["real_baselines"]) == {"faces", "digits"}
    assert set(doc["meta"]["levers"]) == {"g15", "kt"} and doc["meta"]["precision"] == "fp32"
    assert "| g15 | 2000 |" in (tmp_path / "out" / "merged.md").read_text()


def test_second_phase_starts_from_the_parents_checkpoint(tmp_path):
    """A two-phase lever's run holds the parent's checkpoint at the start step and its logged
    rows up to there only; a missing parent checkpoint stops with what to run first."""
    parent, run = tmp_path / "faces-a", tmp_path / "faces-b"
    (parent / "checkpoints").mkdir(parents=True)
    for s in (250, 500):
        (parent / "checkpoints" / f"ckpt_{s:08d}.safetensors").write_bytes(bytes([s % 256]) * 8)
    rows = [{"step": s, "k": 0.1} for s in (50, 250, 300, 500)]
    (parent / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    V.seed_from_parent(run, parent, 250)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["ckpt_00000250.safetensors"]
    assert (run / "checkpoints" / "ckpt_00000250.safetensors").read_bytes() == bytes([250]) * 8
    assert [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()] == [50, 250]
    with pytest.raises(SystemExit, match="run the lever a to step 750 first"):
        V.seed_from_parent(tmp_path / "faces-c", parent, 750)
    assert V.listed_flags("eqfmpx03to01")[-1] == "(from eqfmpx03's step 250)"
    assert V.STARTS["eqfmpx03to01"][0] in V.LEVERS


def test_the_plan_reproduces_the_results_file():
    """--plan runs what the committed results file holds: every scored row is a planned run's
    scored step, every planned lever is defined, and a second phase comes after its parent."""
    assert V.plan_steps(2000) == [250, 500, 750, 1000, 1500, 2000]
    assert V.plan_steps(6000)[-3:] == [4000, 5000, 6000]
    order = list(V.PLAN)
    for lever in V.PLAN:
        assert lever in V.LEVERS
        parent = V.STARTS.get(lever, (None, 0))[0]
        assert parent is None or order.index(parent) < order.index(lever)
    for name in ("variety-cpu-amd-epyc-2026-12-03.json", "variety-cpu-intel-xeon-avx512-bf16-2026-12-07.json"):
        doc = json.loads((V.RESULTS / name).read_text())
        for r in doc["rows"]:
            if r["lever"] in V.RETIRED:  # kept with the commit that trained it
                assert r["lever"] not in V.LEVERS and r["lever"] in doc["meta"]["levers"]
                continue
            assert r["step"] in V.plan_steps(V.PLAN[r["lever"]][r["dataset"]]), (name, r["lever"], r["dataset"], r["step"])
    args = argparse.Namespace(plan=True, datasets=["digits"])
    assert ("digits", "eqfmpxd03", 3000, V.plan_steps(3000)) in V.jobs(args)
    assert all(ds == "digits" for ds, *_ in V.jobs(args))
