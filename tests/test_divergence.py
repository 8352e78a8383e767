"""Divergence guard: a NaN/Inf loss (device flag, read at log intervals and before each
checkpoint) restores the last good state with lr halved; after --max-restores, a clear error."""
import math

import pytest
import torch
from click.testing import CliRunner

from testutil import tiny_trainer
from fastbegan import ops
from fastbegan.checkpoint import list_checkpoints, load_checkpoint
from fastbegan.cli import main
from fastbegan.data import procedural_faces
from fastbegan.guard import DivergenceError
from fastbegan.train import Trainer


@pytest.fixture(scope="module")
def faces8():
    return procedural_faces(16, 8, seed=1)[0]


def make(tmp_path, data, **kw):
    # the reference step: the NaN injection below replaces its compute_grads
    return tiny_trainer(tmp_path, data, **{"batch_size": 2, "steps": 10, "ckpt_every": 4,
                                           "reference_step": True, **kw})


def inject_nan(t: Trainer, at_steps):
    """Make the step that ends at each of ``at_steps`` produce NaN losses and gradients."""
    orig = t.stepper.compute_grads
    hits = []

    def compute_grads(*a, **kw):
        lr_, lf = orig(*a, **kw)
        if t.step + 1 in at_steps(len(hits)):
            hits.append(t.step + 1)
            for p in t.model.parameters():
                p.grad.fill_(math.nan)
            return lr_ * math.nan, lf * math.nan
        return lr_, lf
    t.stepper.compute_grads = compute_grads
    return hits


def all_finite_checkpoints(out):
    for p in list_checkpoints(out):
        tensors, _, _ = load_checkpoint(p)
        assert all(torch.isfinite(v).all() for k, v in tensors.items() if v.is_floating_point()), p


def test_nan_restores_last_checkpoint_with_half_lr(tmp_path, faces8):
    t = make(tmp_path, faces8)
    hits = inject_nan(t, lambda n: {5} if n == 0 else set())  # once, at step 5
    rows = t.fit(progress=False)
    assert hits == [5]
    events = [e for r in rows for e in r.get("events", [])]
    assert len(events) == 1 and "restored" in events[0] and "ckpt_00000004" in events[0]
    assert "lr halved to 5e-05" in events[0]
    assert t.step == 10 and t.state.restores == 1 and t.lr == pytest.approx(5e-5)
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    all_finite_checkpoints(tmp_path)
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])[2]["lr"] == pytest.approx(5e-5)


def test_nan_before_any_checkpoint_restores_start_state(tmp_path, faces8):
    t = make(tmp_path, faces8, ckpt_every=1000, steps=6)
    start = {k: v.clone() for k, v in t.model.state_dict().items()}
    hits = inject_nan(t, lambda n: {3} if n == 0 else set())
    rows = t.fit(progress=False)
    assert hits == [3]
    assert any("the state this run started from (step 0)" in e for r in rows for e in r.get("events", []))
    assert t.step == 6 and t.lr == pytest.approx(5e-5)
    assert not all(torch.equal(start[k], v) for k, v in t.model.state_dict().items())  # trained on


def test_no_checkpoint_is_written_from_a_diverged_state(tmp_path, faces8):
    """NaN between log intervals: the checkpoint due next restores instead of saving NaNs."""
    t = make(tmp_path, faces8, log_every=100, ckpt_every=3, steps=9, keep_ckpts=10)
    hits = inject_nan(t, lambda n: {5} if n == 0 else set())
    t.fit(progress=False)
    assert hits == [5] and t.state.restores == 1 and t.step == 9
    all_finite_checkpoints(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)][-1] == "ckpt_00000009.safetensors"


def test_gives_up_after_max_restores(tmp_path, faces8):
    t = make(tmp_path, faces8, max_restores=2)
    hits = inject_nan(t, lambda n: set(range(5, 100)))  # diverges every time past step 4
    with pytest.raises(DivergenceError, match="again after 2 restores") as e:
        t.fit(progress=False)
    assert "ckpt_00000004" in str(e.value) and "--max-restores" in str(e.value)
    assert hits == [5, 6] * 3 and t.lr == pytest.approx(2.5e-5)  # 3 tries: 2 restores, then the error
    all_finite_checkpoints(tmp_path)


def test_cli_divergence_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path / "cache"))
    real = ops.l1_recon_loss
    monkeypatch.setattr(ops, "l1_recon_loss", lambda x, r: real(x, r) * math.inf)
    r = CliRunner().invoke(main, ["train", "--res", "8", "--filters", "4", "--z-dim", "8", "--h", "8",
                                  "--batch-size", "2", "--device", "cpu", "--no-progress", "--steps", "4", "--reference-step",
                                  "--log-every", "1", "--max-restores", "1", "--out", str(tmp_path / "o")])
    assert r.exit_code == 1, r.output
    assert "restore 1 of at most 1" in r.output
    assert "Error: training diverged" in r.output and "Traceback" not in r.output
    # only the (finite) start state can have been saved, never a diverged one
    assert [p.name for p in list_checkpoints(tmp_path / "o")] in ([], ["ckpt_00000000.safetensors"])
    all_finite_checkpoints(tmp_path / "o")


def test_restore_budget_survives_resume(tmp_path, faces8):
    """The guard's restores are counted in the checkpoint (TrainState.restores): a run that
    used its budget and is resumed does not get a fresh one."""
    t = make(tmp_path, faces8, max_restores=1)
    inject_nan(t, lambda n: {5} if n == 0 else set())
    t.fit(progress=False)
    assert t.state.restores == 1
    assert load_checkpoint(list_checkpoints(tmp_path)[-1])[2]["restores"] == 1
    resumed = make(tmp_path, faces8, max_restores=1, steps=14)
    resumed.load_checkpoint(list_checkpoints(tmp_path)[-1])
    assert resumed.step == 10 and resumed.state.restores == 1
    hits = inject_nan(resumed, lambda n: {11} if n == 0 else set())
    with pytest.raises(DivergenceError, match="again after 1 restores"):
        resumed.fit(progress=False)
    assert hits == [11]


def test_an_infinite_remedy_term_counts_as_divergence(tmp_path, faces8, monkeypatch):
    """L_real and L_fake finite but a remedy term infinite (here the sliced Wasserstein target's
    spread forced to 0): the divergence flag is set that step (Adam would make G's weights NaN)."""
    t = make(tmp_path, faces8, sw_weight=1.0, reference_step=False)
    for _, _, scale in t.stepper.sw_target:
        scale.zero_()  # in place: the step holds these tensors
    vals = t.train_step()
    assert math.isfinite(vals["loss_real"].item()) and math.isfinite(vals["loss_fake"].item())
    assert math.isinf(vals["loss_sw"].item()) and bool(t.state.nonfinite)
