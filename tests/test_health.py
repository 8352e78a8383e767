"""Training health monitor (fastbegan.health): detectors, actions, no sync in the step."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from testutil import tiny_trainer
from fastbegan.checkpoint import list_checkpoints, load_checkpoint
from fastbegan.data import procedural_faces
from fastbegan.health import (
    Finding,
    HealthMonitor,
    HealthTracker,
    batch_diversity,
    diagnose_run,
)
from fastbegan.train import TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def faces16():
    return procedural_faces(64, 16, seed=3)[0]


def make(tmp_path, data, **kw):
    return tiny_trainer(tmp_path, data, **{"batch_size": 8, "steps": 20, "health_patience": 4, **kw})


def monitor_of(trainer) -> HealthMonitor:
    (mon,) = [h for h in trainer.log_hooks if isinstance(h, HealthMonitor)]
    return mon


def rows(steps, **fields):
    """Synthetic metrics rows: fields are constants or functions of the step."""
    base = {"k": 0.01, "M": 0.2, "loss_real": 0.2, "loss_fake": 0.1, "lr": 1e-4, "diversity_ratio": 0.5}
    base.update(fields)
    return [{"step": s, **{k: (v(s) if callable(v) else v) for k, v in base.items()}} for s in steps]


def feed(tracker, rs):
    return [f for r in rs for f in tracker.update(r)]


# ---------------------------------------------------------------------- detectors on synthetic signals
def test_healthy_signals_give_nothing():
    t = HealthTracker(gamma=0.5, patience=100)
    assert feed(t, rows(range(10, 2001, 10), M=lambda s: 0.3 * 0.9995 ** s)) == []


def test_constant_generator_output_triggers_collapse(faces16):
    real = torch.from_numpy(faces16[:16]).permute(0, 3, 1, 2).float() / 127.5 - 1
    fake = real[5:6].expand(16, -1, -1, -1) + 0.01 * torch.randn(16, 3, 16, 16)  # one face for every z
    assert batch_diversity(fake).item() < 0.02
    assert batch_diversity(real).item() > 0.2
    mon = HealthMonitor(gamma=0.5, patience=20)
    tr = SimpleNamespace(step=0, last_batch={"x": real, "fake": fake}, cfg=None)
    notes = []
    for r in rows(range(10, 201, 10), M=lambda s: 0.3 * 0.995 ** s):
        tr.step = r["step"]
        notes.append(mon(tr, r))
        assert r["diversity_ratio"] < 0.05 and r["contrast_ratio"] > 0.9
    said = [n for n in notes if n]
    assert len(said) == 1, said  # reported once per episode
    assert said[0].startswith("mode collapse suspected since step 100")  # after the 100-step warmup
    assert "x real (below 0.1x for 20 steps" in said[0] and "higher --gamma" in said[0]
    assert r["health"] == ["mode_collapse"]
    # a diverse fake batch clears it
    tr.last_batch["fake"] = torch.rand(16, 3, 16, 16) * 2 - 1
    r = rows([210], M=0.3 * 0.995 ** 210)[0]
    tr.step = 210
    assert mon(tr, r) is None and r["health"] == [] and r["diversity_ratio"] > 0.5


def test_flat_young_generator_is_not_a_collapse(faces16):
    """A fresh G's outputs are flat blobs, all alike: normal early on, not a collapse."""
    real = torch.from_numpy(faces16[:16]).permute(0, 3, 1, 2).float() / 127.5 - 1
    blobs = real.mean(0, keepdim=True).expand(16, -1, -1, -1) * 0.2 + 0.01 * torch.randn(16, 3, 16, 16)
    mon = HealthMonitor(gamma=0.5, patience=20)
    tr = SimpleNamespace(step=0, last_batch={"x": real, "fake": blobs}, cfg=None)
    for r in rows(range(10, 301, 10), M=lambda s: 0.3 * 0.995 ** s):
        tr.step = r["step"]
        assert mon(tr, r) is None
    assert r["diversity_ratio"] < 0.05 and r["contrast_ratio"] < 0.5


def test_collapse_needs_patience_and_warmup():
    t = HealthTracker(gamma=0.5, patience=200)
    # low diversity at the start (a fresh G is nearly constant) is not a collapse
    early = rows(range(10, 101, 10), diversity_ratio=0.01)
    later = rows(range(110, 501, 10), diversity_ratio=0.3)
    assert feed(t, early + later) == []
    # a dip shorter than patience is not reported either
    assert feed(t, rows(range(510, 600, 10), diversity_ratio=0.01) + rows([600])) == []


def test_k_zero_message_says_raise_gamma():
    t = HealthTracker(gamma=0.05, patience=100)
    found = feed(t, rows(range(10, 301, 10), k=0.0, loss_real=0.2, loss_fake=0.1))
    assert [f.kind for f in found] == ["k_zero"]
    msg = found[0].message
    assert msg.startswith("k_t has been 0 for 100 steps (since step 10)")
    assert "L_fake 0.1000 > gamma*L_real 0.0100" in msg
    assert "higher --gamma" in msg and "lower --gamma" not in msg


def test_collapse_messages_name_the_remedy_unless_it_is_on():
    """k_t at 0 is BEGAN's early collapse: the message names the options that escape it
    (fastbegan.health.REMEDY_FLAGS), except in a run that already uses a remedy."""
    from fastbegan.health import REMEDY_FLAGS
    plain = feed(HealthTracker(gamma=0.5, patience=100), rows(range(10, 301, 10), k=0.0))
    assert plain and REMEDY_FLAGS in plain[0].message and "docs/training.md" in plain[0].message
    treated = feed(HealthTracker(gamma=0.5, patience=100), rows(range(10, 301, 10), k=0.0, loss_pt=0.3))
    assert treated and REMEDY_FLAGS not in treated[0].message
    matched = feed(HealthTracker(gamma=0.5, patience=100), rows(range(10, 301, 10), k=0.0, loss_sw=0.4))
    assert matched and REMEDY_FLAGS not in matched[0].message
    assert REMEDY_FLAGS.startswith("--variant match (--gamma 1.5")


def test_k_on_its_floor_is_reported_with_the_loss_ratio():
    """k_t pinned on --k-min 0.05 while L_fake / L_real = 1.2 > gamma 0.5: the equilibrium
    is not acting; reported once, after the patience, with the ratio and what to try."""
    t = HealthTracker(gamma=0.5, patience=100, k_min=0.05)
    found = feed(t, rows(range(10, 301, 10), k=0.05, loss_real=0.1, loss_fake=0.12))
    assert [(f.kind, f.since, f.step) for f in found] == [("k_floor", 10, 110)]
    msg = found[0].message
    assert msg.startswith("k_t has sat on its floor (k_min 0.05) for 100 steps (since step 10)")
    assert "L_fake / L_real = 1.20 stays above gamma 0.5" in msg
    assert "higher --gamma (the loss ratio says about 1.20, now 0.5)" in msg and "--lambda-k" in msg
    assert t.active() == ["k_floor"]
    # k_t leaves the floor: the episode ends
    assert feed(t, rows([310], k=0.08)) == [] and t.active() == []
    # --k-target: the rows carry the adapted gamma, and the message quotes it
    adapted = feed(HealthTracker(gamma=0.5, patience=100, k_min=0.05),
                   rows(range(10, 301, 10), k=0.05, loss_real=0.1, loss_fake=0.12, gamma=0.9))
    assert "stays above gamma 0.9" in adapted[0].message and "--k-target" in adapted[0].message


def test_k_floor_needs_a_floor_and_a_pinned_k():
    """Not reported: k_t moving above the floor, a stretch shorter than the patience, the
    same k_t in a run without a floor (k_min 0: the k_zero rule's case), or a floor that
    has been annealed away (the floor then is 0)."""
    moving = rows(range(10, 401, 10), k=lambda s: 0.05 + 0.02 * (1 + math.sin(s / 30)), loss_fake=0.12,
                  loss_real=0.1)
    assert feed(HealthTracker(gamma=0.5, patience=100, k_min=0.05), moving) == []
    brief = rows(range(10, 100, 10), k=0.05) + rows(range(100, 401, 10), k=0.07)
    assert feed(HealthTracker(gamma=0.5, patience=100, k_min=0.05), brief) == []
    assert feed(HealthTracker(gamma=0.5, patience=100), rows(range(10, 401, 10), k=0.05)) == []
    annealed = HealthTracker(gamma=0.5, patience=100, k_min=0.05, k_min_anneal=(0, 200))
    assert [f.kind for f in feed(annealed, rows(range(200, 501, 10), k=0.0))] == ["k_zero"]


def test_k_following_an_annealed_floor_down_is_on_the_floor():
    """With --k-min-anneal 0 1000 the floor falls from 0.05 to 0; a k_t that follows it down
    sits on it."""
    t = HealthTracker(gamma=0.5, patience=100, k_min=0.05, k_min_anneal=(0, 1000))
    found = feed(t, rows(range(10, 401, 10), k=lambda s: 0.05 * (1000 - s) / 1000, loss_fake=0.12,
                         loss_real=0.1))
    assert [(f.kind, f.since) for f in found] == [("k_floor", 10)]
    assert "(k_min 0.0445)" in found[0].message   # the floor at the step it is reported (110)


def test_k_floor_live_and_after_the_fact(tmp_path, faces16):
    """gamma 0 with --k-min 0.05: k_t += lambda_k (0 - L_fake) falls at every step and the
    floor holds it; the live monitor says so once, and diagnose_run finds it again from
    metrics.jsonl with the run's k_min (read from its checkpoint)."""
    t = make(tmp_path, faces16, gamma=0.0, k_min=0.05, steps=12, ckpt_every=12)
    logged = []
    t.log = logged.append
    out = t.fit(progress=False)
    assert all(abs(r["k"] - 0.05) < 1e-6 for r in out)
    said = [m for m in logged if "sat on its floor" in m]
    assert len(said) == 1 and said[0].startswith("step 6: k_t has sat on its floor (k_min 0.05) for 4 steps")
    assert not [m for m in logged if "k_t has been 0" in m]
    assert [(f.kind, f.since) for f in diagnose_run(tmp_path)] == [("k_floor", 2)]
    assert diagnose_run(tmp_path, patience=100) == []


def test_k_one_message_says_lower_gamma():
    t = HealthTracker(gamma=0.9, patience=50)
    found = feed(t, rows(range(10, 201, 10), k=1.0, loss_real=0.2, loss_fake=0.05))
    assert [f.kind for f in found] == ["k_one"]
    assert "k_t has been 1 for 50 steps" in found[0].message and "lower --gamma" in found[0].message


def test_rising_m_triggers():
    t = HealthTracker(gamma=0.5, patience=100)
    m = lambda s: 0.3 - 0.0005 * s if s <= 400 else 0.1 + 0.002 * (s - 400)
    found = feed(t, rows(range(10, 801, 10), M=m))
    assert [f.kind for f in found] == ["m_rising"]
    f = found[0]
    assert "M_global rising since step" in f.message and "lower --lr" in f.message
    assert f.values["M"] > 1.3 * f.values["best_M"] and f.values["best_step"] == 400


def test_stalled_m_triggers():
    t = HealthTracker(gamma=0.5, patience=100)  # stall window 5 x patience = 500 steps
    m = lambda s: max(0.3 - 0.001 * s, 0.15) + 0.001 * math.sin(s)
    found = feed(t, rows(range(10, 1001, 10), M=m))
    assert [f.kind for f in found] == ["m_stalled"]
    assert found[0].message.startswith("M_global stalled for 500 steps")
    assert 150 <= found[0].since <= 300  # M flat from step 150; smoothing lags a little
    # not with --lr-stall, which already reports (and acts on) it
    assert feed(HealthTracker(0.5, 100, report_stall=False), rows(range(10, 1001, 10), M=m)) == []


def test_blown_up_losses_trigger():
    t = HealthTracker(gamma=0.5, patience=50)
    found = feed(t, rows(range(10, 201, 10), k=0.0, loss_real=0.4, loss_fake=lambda s: 300.0 / s,
                         M=lambda s: 300.0 / s, fake_absmax=80.0))
    kinds = [f.kind for f in found]
    assert "blowup" in kinds
    f = found[kinds.index("blowup")]
    assert f.since == 10 and f.step == 60 and "generator outputs reach 80" in f.message
    assert "lower --lr" in f.message


def test_non_finite_reported_at_once():
    t = HealthTracker(gamma=0.5, patience=100)
    found = feed(t, rows([10, 20]) + rows([30, 40], loss_fake=float("nan"), M=float("inf")))
    assert [f.kind for f in found] == ["non_finite"]
    assert found[0].step == 30 and "loss_fake=nan" in found[0].message


# ---------------------------------------------------------------------- real (tiny) runs
def test_forced_k_zero_run(tmp_path, faces16):
    """gamma = 0: k_t += lambda_k * (0 - L_fake) <= 0, so k_t stays 0."""
    t = make(tmp_path, faces16, gamma=0.0, steps=12)
    logged = []
    t.log = logged.append
    out = t.fit(progress=False)
    assert all(r["k"] == 0.0 for r in out)
    said = [m for m in logged if "k_t has been 0" in m]
    assert len(said) == 1 and said[0].startswith("step 6: k_t has been 0 for 4 steps (since step 2)")
    assert "higher --gamma (now 0" in said[0]
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("k_t has been 0" in e for r in lines for e in r.get("events", []))
    assert all("diversity_ratio" in r and "health" in r for r in lines)
    assert [f.kind for f in diagnose_run(tmp_path)] == ["k_zero"]


def force_collapse(mon, start, once=True):
    """The run's fakes count as collapsed from step ``start`` (until the first restore), and
    as diverse otherwise (a tiny fresh G's are not)."""
    real_measure = mon.measure

    def measure(trainer):
        out = real_measure(trainer)
        forced = trainer.step >= start and not (once and mon.restores)
        out["diversity_ratio"] = 0.0 if forced else 1.0
        out["contrast_ratio"] = 1.0
        return out
    mon.measure = measure


def test_on_collapse_restore(tmp_path, faces16):
    t = make(tmp_path, faces16, on_collapse="restore", ckpt_every=4, steps=20, health_patience=4)
    mon = monitor_of(t)
    mon.tracker.warmup = 0
    force_collapse(mon, start=10)
    seen = {}

    def check(trainer, row):  # runs right after the monitor
        if "restored_to" in row:
            tensors, _, _ = load_checkpoint(tmp_path / "checkpoints" / "ckpt_00000008.safetensors")
            seen["same"] = all(torch.equal(p.detach(), tensors[f"G.{n}"])
                               for n, p in trainer.G.named_parameters())
            seen["step"], seen["lr"] = trainer.step, trainer.lr
    t.log_hooks.append(check)
    logged = []
    t.log = logged.append
    t.fit(progress=False)
    assert mon.restores == [{"from": 14, "to": 8, "lr": 5e-5}]
    assert seen == {"same": True, "step": 8, "lr": 5e-5}
    msg = [m for m in logged if "--on-collapse restore" in m]
    assert len(msg) == 1 and "back to ckpt_00000008.safetensors" in msg[0] and "halved to 5e-05" in msg[0]
    assert t.step == 20 and t.lr == 5e-5
    # the checkpoint written during the collapse is out of the way of --resume
    assert (tmp_path / "checkpoints" / "discarded" / "ckpt_00000012.safetensors").exists()
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])[2]["lr"] == 5e-5
    steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 10, 12, 14, 16, 18, 20]
    found = diagnose_run(tmp_path, warmup=0)
    assert [(f.kind, f.since, f.ongoing) for f in found] == [("mode_collapse", 10, False)]


def test_on_collapse_restore_without_checkpoint_uses_start_state(tmp_path, faces16):
    t = make(tmp_path, faces16, on_collapse="restore", steps=12)
    mon = monitor_of(t)
    mon.tracker.warmup = 0
    force_collapse(mon, start=2)
    logged = []
    t.log = logged.append
    t.fit(progress=False)
    assert mon.restores == [{"from": 6, "to": 0, "lr": 5e-5}]
    assert any("the state this run started from" in m for m in logged)


def test_on_collapse_restore_is_the_guards_restore(tmp_path, faces16, monkeypatch):
    """--on-collapse restore goes through the one restore routine (fastbegan.guard.restore):
    under torchrun every rank must be at the same step after it (the check is called, here
    with the process group mocked), and the restore is counted in the run's state, which
    checkpoints keep: a resumed run that used its budget stops at the next collapse."""
    from fastbegan import distributed
    checked = []
    monkeypatch.setattr(distributed, "check_same_step", lambda step, device, what: checked.append((step, what)))
    t = make(tmp_path, faces16, on_collapse="restore", ckpt_every=4, steps=20, max_restores=1)
    mon = monitor_of(t)
    mon.tracker.warmup = 0
    force_collapse(mon, start=10)
    t.fit(progress=False)
    assert mon.restores == [{"from": 14, "to": 8, "lr": 5e-5}] and checked == [(8, "a restore")]
    assert t.state.collapse_restores == 1 and t.state.restores == 0
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])[2]["collapse_restores"] == 1
    resumed = make(tmp_path, faces16, on_collapse="restore", ckpt_every=4, steps=40, max_restores=1)
    resumed.load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert resumed.step == 20 and resumed.state.collapse_restores == 1
    mon = monitor_of(resumed)
    mon.tracker.warmup = 0
    force_collapse(mon, start=0, once=False)
    logged = []
    resumed.log = logged.append
    resumed.fit(progress=False)
    assert mon.restores == [] and resumed.step < 40
    assert any("collapsed again after 1 restores; stopping" in m for m in logged)


def test_on_collapse_restore_refused_when_ranks_disagree(tmp_path, faces16, monkeypatch):
    """The same-step check's error (ranks at different steps after reading the checkpoint:
    --out not shared) ends the run instead of training on from different states."""
    from fastbegan import distributed

    def disagree(step, device, what):
        raise RuntimeError(f"after {what} the processes are at different steps")
    monkeypatch.setattr(distributed, "check_same_step", disagree)
    t = make(tmp_path, faces16, on_collapse="restore", ckpt_every=4, steps=20)
    mon = monitor_of(t)
    mon.tracker.warmup = 0
    force_collapse(mon, start=10)
    with pytest.raises(RuntimeError, match="after a restore the processes are at different steps"):
        t.fit(progress=False)


def test_on_collapse_stop(tmp_path, faces16):
    t = make(tmp_path, faces16, on_collapse="stop", steps=40)
    mon = monitor_of(t)
    mon.tracker.warmup = 0
    force_collapse(mon, start=6, once=False)
    logged = []
    t.log = logged.append
    t.fit(progress=False)
    assert t.step == 10
    assert any("--on-collapse stop: stopping at step 10" in m for m in logged)
    assert list_checkpoints(tmp_path)[-1].name == "ckpt_00000010.safetensors"


def test_monitor_runs_only_in_log_hooks(tmp_path, faces16, monkeypatch):
    """No host synchronisation in the step: the monitor is never called inside train_step,
    and it reads the device once per log row."""
    t = make(tmp_path, faces16, steps=9, log_every=3)
    mon = monitor_of(t)
    state = {"in_step": False, "calls": 0, "reads": 0}
    step = t.train_step

    def train_step():
        state["in_step"] = True
        try:
            return step()
        finally:
            state["in_step"] = False
    t.train_step = train_step
    measure = mon.measure

    def counted(trainer):
        assert not state["in_step"]
        state["calls"] += 1
        tolist = torch.Tensor.tolist

        def spy(self):
            state["reads"] += 1
            return tolist(self)
        monkeypatch.setattr(torch.Tensor, "tolist", spy)
        try:
            return measure(trainer)
        finally:
            monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    mon.measure = counted
    t.fit(progress=False)
    assert state["calls"] == 3 and state["reads"] == 3
    # and the step itself does not touch the monitor
    monkeypatch.setattr(HealthMonitor, "measure", lambda *_: pytest.fail("monitor ran in the step"))
    monkeypatch.setattr(HealthTracker, "update", lambda *_: pytest.fail("monitor ran in the step"))
    t.train_step()


def test_monitor_off_and_bad_option(tmp_path, faces16):
    assert not [h for h in make(tmp_path, faces16, health_patience=0).log_hooks if isinstance(h, HealthMonitor)]
    with pytest.raises(ValueError, match="on_collapse"):
        TrainConfig(res=16, on_collapse="explode")


def test_normal_run_no_false_alarm(tmp_path):
    """A normal short run (res 16, 150 steps, patience 50) reports nothing."""
    data = procedural_faces(512, 16, seed=0)[0]
    t = make(tmp_path, data, filters=8, z_dim=16, h=16, batch_size=16, steps=150, log_every=10,
             health_patience=50)
    logged = []
    t.log = logged.append
    out = t.fit(progress=False)
    assert [r.get("events") for r in out if r.get("events")] == []
    assert all(r["health"] == [] for r in out)
    # the detectors had their inputs: k_t off its bounds, diversity and contrast measured
    assert all(0 < r["k"] < 1 and math.isfinite(r["diversity_ratio"]) and 0 < r["contrast_ratio"] < 2
               for r in out)
    assert diagnose_run(tmp_path) == []


def test_diagnose_run_reads_metrics(tmp_path):
    rs = rows(range(10, 401, 10), k=lambda s: 0.0 if s >= 100 else 0.01)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs) + '{"step": 41')
    found = diagnose_run(tmp_path, patience=100)
    assert [(f.kind, f.since, f.step, f.ongoing) for f in found] == [("k_zero", 100, 200, True)]
    assert isinstance(found[0], Finding) and str(found[0]) == found[0].message
    assert json.dumps([f.as_dict() for f in found])
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        diagnose_run(tmp_path / "nope")


def test_cli_options(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from fastbegan.cli import main
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path / "cache"))
    tiny = ["train", "--variant", "began", "--res", "8", "--filters", "4", "--z-dim", "8", "--h", "8",
            "--batch-size", "2", "--device", "cpu", "--no-progress", "--log-every", "1", "--steps", "4"]
    r = CliRunner().invoke(main, [*tiny, "--gamma", "0", "--health-patience", "2", "--on-collapse", "stop",
                                  "--out", str(tmp_path / "run")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "step 3: k_t has been 0 for 2 steps (since step 1)" in r.output
    cfg = load_checkpoint(list_checkpoints(tmp_path / "run")[-1])[1]
    assert cfg["on_collapse"] == "stop" and cfg["health_patience"] == 2
    r = CliRunner().invoke(main, [*tiny, "--on-collapse", "explode", "--out", str(tmp_path / "r2")])
    assert r.exit_code == 2 and "explode" in r.output
