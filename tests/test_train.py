"""The reference trainer: BEGAN's losses and gradients, k_t, lr schedule, exact resume."""
import json

import numpy as np
import pytest
import torch

from testutil import tiny_trainer
from fastbegan import ops
from fastbegan.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint
from fastbegan.data import procedural_faces
from fastbegan.images import to_unit_range
from fastbegan.step import ReferenceStep
from fastbegan.train import TrainConfig


@pytest.fixture(scope="module")
def faces16():
    return procedural_faces(24, 16, seed=3)[0]


def make(tmp_path, data, **kw):
    return tiny_trainer(tmp_path, data, **kw)


def test_uint8_to_unit_range():
    u = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 1, 3, 1).expand(1, 1, 3, 3)
    x = to_unit_range(u.contiguous())
    assert x.shape == (1, 3, 1, 3) and x.min() == -1 and x.max() == 1
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_gradients_go_where_they_belong(tmp_path, faces16):
    """D gets grad(L_D) only and G gets grad(L_G) only (not L_D + L_G into both)."""
    t = make(tmp_path, faces16)
    t.k = torch.tensor(0.3)
    torch.manual_seed(0)
    ref = ReferenceStep(t)
    x = ref.real_batch()
    z = ref.sample_z(4)
    lr_, lf = ref.compute_grads(x, z)
    gd = [p.grad.clone() for p in t.D.parameters()]
    gg = [p.grad.clone() for p in t.G.parameters()]
    # independent recomputation, loss by loss
    fake = t.G(z)
    rec = t.D(torch.cat([x, fake]))
    l_real = (x - rec[:4]).abs().mean()
    l_fake = (fake - rec[4:]).abs().mean()
    want_d = torch.autograd.grad(l_real - 0.3 * l_fake, list(t.D.parameters()), retain_graph=True)
    want_g = torch.autograd.grad(l_fake, list(t.G.parameters()), retain_graph=True)
    wrong_g = torch.autograd.grad(l_real - 0.3 * l_fake + l_fake, list(t.G.parameters()))
    for a, b in zip(gd, want_d):
        torch.testing.assert_close(a, b)
    for a, b in zip(gg, want_g):
        torch.testing.assert_close(a, b)
    # the known bug (one backward of L_D + L_G) gives G different gradients: we must differ from it
    assert any(not torch.allclose(a, b) for a, b in zip(gg, wrong_g))
    assert lr_.item() == pytest.approx(l_real.item(), rel=1e-5)
    assert lf.item() == pytest.approx(l_fake.item(), rel=1e-5)


def test_few_steps_k_and_m_follow_the_formulas(tmp_path, faces16):
    t = make(tmp_path, faces16, gamma=0.9, lambda_k=0.01)
    k = 0.0
    for _ in range(4):
        out = t.train_step()
        lr_, lf = out["loss_real"].item(), out["loss_fake"].item()
        assert np.isfinite(lr_) and np.isfinite(lf)
        k = min(1.0, max(0.0, k + 0.01 * (0.9 * lr_ - lf)))
        assert out["k"].item() == pytest.approx(k, abs=1e-6)
        assert out["M"].item() == pytest.approx(lr_ + abs(0.9 * lr_ - lf), rel=1e-5)
        assert 0.0 <= out["k"].item() <= 1.0
    assert t.k.item() > 0.0  # gamma 0.9: D reconstructs real images worse than fakes at first


def test_separate_z_step_runs(tmp_path, faces16):
    t = make(tmp_path, faces16, separate_z=True)
    out = t.train_step()
    assert torch.isfinite(out["loss_real"]) and torch.isfinite(out["M"])
    assert all(p.grad is not None for p in t.G.parameters())


def test_lr_halving_keeps_adam_state(tmp_path, faces16):
    t = make(tmp_path, faces16, lr_half_every=2)
    t.train_step()
    state = t.opt_d.state[next(iter(t.D.parameters()))]
    moment = state["exp_avg"]
    t.train_step()  # step 2: halved
    assert t.lr == pytest.approx(5e-5)
    assert all(g["lr"] == pytest.approx(5e-5) for g in t.opt_d.param_groups + t.opt_g.param_groups)
    assert t.opt_d.state[next(iter(t.D.parameters()))]["exp_avg"] is moment  # not rebuilt
    assert int(t.opt_d.state[next(iter(t.D.parameters()))]["step"]) == 2


def test_lr_floor_and_stall_rule(tmp_path, faces16):
    t = make(tmp_path, faces16, lr=4e-5, lr_min=2e-5, lr_half_every=1, lr_stall=3)
    t.train_step(); t.train_step()
    assert t.lr == pytest.approx(2e-5)
    t2 = make(tmp_path, faces16, lr_stall=3)
    assert t2.schedule.observe_m(1.0) is None
    t2.step = 2
    assert t2.schedule.observe_m(0.999) is None  # < 1% better is not an improvement
    t2.step = 3
    msg = t2.schedule.observe_m(1.0)
    assert msg and "lr halved" in msg and t2.lr == pytest.approx(5e-5)


def test_fit_writes_metrics_samples_checkpoint(tmp_path, faces16):
    t = make(tmp_path, faces16, steps=4, sample_every=2, ckpt_every=2, keep_ckpts=1)
    rows = t.fit(progress=False)
    assert [r["step"] for r in rows] == [2, 4]
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [2, 4] and {"k", "M", "loss_real", "lr"} <= set(lines[0])
    assert (tmp_path / "samples" / "fake_00000004.png").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000004.safetensors"]
    tensors, cfg, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert cfg["res"] == 16 and int(tensors["state.step"]) == 4 and state["lr"] == pytest.approx(1e-4)


def test_resume_continues_exactly(tmp_path, faces16):
    full = make(tmp_path / "a", faces16, steps=6)
    full.fit(progress=False)
    half = make(tmp_path / "b", faces16, steps=3)
    half.fit(progress=False)
    resumed = make(tmp_path / "b", faces16, steps=6)
    resumed.load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert resumed.step == 3
    resumed.fit(progress=False)
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(full.k, resumed.k)
    sa, sb = full.opt_g.state_dict()["state"], resumed.opt_g.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"]) for i in sa)


def test_adapted_gamma_resumes_exactly(tmp_path, faces16):
    """--k-target: gamma is part of the run's state, so a resumed run continues the same
    trajectory (k_t, gamma, weights) as one that never stopped; the log has gamma."""
    kw = dict(k_init=0.2, k_min=0.05, k_target=0.1, lambda_gamma=0.05, lambda_k=0.05, gamma=1.5, log_every=1)
    full = make(tmp_path / "a", faces16, steps=6, **kw)
    full.fit(progress=False)
    half = make(tmp_path / "b", faces16, steps=3, **kw)
    half.fit(progress=False)
    resumed = make(tmp_path / "b", faces16, steps=6, **kw)
    resumed.load_checkpoint(latest_checkpoint(tmp_path / "b"))
    resumed.fit(progress=False)
    assert torch.equal(full.state.gamma, resumed.state.gamma) and torch.equal(full.k, resumed.k)
    assert full.state.gamma.item() != pytest.approx(1.5, abs=1e-5)
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n
    logged = [json.loads(l)["gamma"] for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 6 and logged[-1] == pytest.approx(full.state.gamma.item())


def test_resume_refuses_other_config(tmp_path, faces16):
    make(tmp_path, faces16, steps=2).fit(progress=False)
    other = make(tmp_path, faces16, filters=8)
    with pytest.raises(CheckpointError, match="filters=4"):
        other.load_checkpoint(latest_checkpoint(tmp_path))


def test_mbstd_checkpoints_resume_and_are_told_apart(tmp_path, faces16):
    """A run with D's batch statistic saves its extra weights and resumes exactly; a run
    without it refuses its checkpoint, and a checkpoint written before the option existed
    (no mbstd_group in its config) counts as off."""
    from fastbegan.checkpoint import check_compatible
    full = make(tmp_path / "a", faces16, steps=4, mbstd_group=2)
    full.fit(progress=False)
    half = make(tmp_path / "b", faces16, steps=2, mbstd_group=2)
    half.fit(progress=False)
    resumed = make(tmp_path / "b", faces16, steps=4, mbstd_group=2)
    resumed.load_checkpoint(latest_checkpoint(tmp_path / "b"))
    resumed.fit(progress=False)
    tensors, _, _ = load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert "D.encoder.fc_std.weight" in tensors
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(CheckpointError, match="mbstd_group=2 .this run: 0"):
        make(tmp_path / "c", faces16).load_checkpoint(latest_checkpoint(tmp_path / "b"))
    old = {k: v for k, v in full.cfg.to_dict().items() if k != "mbstd_group"}
    check_compatible(old, {**old, "mbstd_group": 0}, "old.safetensors")
    with pytest.raises(CheckpointError, match="mbstd_group=0"):
        check_compatible(old, full.cfg.to_dict(), "old.safetensors")


def test_batch_larger_than_data(tmp_path, faces16):
    with pytest.raises(ValueError, match="larger than the data set"):
        make(tmp_path, faces16[:3])


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        TrainConfig(backend="cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.set_backend("cudnn")
