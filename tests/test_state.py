"""The run's state (fastbegan.state.TrainState, LrSchedule): device tensors written in place,
the checkpoint form (old checkpoints included), and the lr rules."""
import math

import pytest
import torch

from fastbegan.state import LrSchedule, TrainState


def test_state_dict_round_trip_in_place():
    a = TrainState("cpu", k_init=0.25, lr=1e-3, seed=5)
    torch.rand(3, generator=a.gen)
    a.k.fill_(0.4)
    a.set_step(12)
    a.set_lr(5e-4)
    a.best_m, a.best_m_step, a.lr_halvings, a.restores, a.collapse_restores = 0.3, 9, 1, 2, 1
    a.nonfinite.fill_(True)
    sd = a.state_dict()
    assert set(sd["tensors"]) == {"state.k", "state.gamma", "state.step", "rng.gen", "rng.torch"}
    assert sd["host"] == {"lr": 5e-4, "best_m": 0.3, "best_m_step": 9, "lr_halvings": 1, "restores": 2,
                          "collapse_restores": 1}
    b = TrainState("cpu", lr=1e-3)
    k, step_t, lr_t, gen = b.k, b.step_t, b.lr_t, b.gen
    b.nonfinite.fill_(True)
    b.load_state_dict({"tensors": {n: v.clone() for n, v in sd["tensors"].items()}, "host": dict(sd["host"])})
    # same tensors (a captured CUDA graph reads them), new values
    assert b.k is k and b.step_t is step_t and b.lr_t is lr_t and b.gen is gen
    assert b.k.item() == pytest.approx(0.4) and b.step == int(b.step_t) == 12
    assert b.lr == 5e-4 and b.lr_t.item() == pytest.approx(5e-4) and not b.nonfinite
    assert (b.best_m, b.best_m_step, b.lr_halvings, b.restores, b.collapse_restores) == (0.3, 9, 1, 2, 1)
    assert torch.equal(torch.rand(3, generator=b.gen), torch.rand(3, generator=a.gen))


def test_an_adapted_gamma_resumes_and_a_fixed_one_is_the_configs():
    """--k-target: gamma is the run's state and resumes where it was (also after a restore);
    a fixed gamma stays the one the (resumed) run is given; a checkpoint from before
    state.gamma existed leaves the starting gamma."""
    a = TrainState("cpu", gamma=1.5, adapt_gamma=True)
    a.gamma.fill_(1.8)
    sd = a.state_dict()
    assert sd["tensors"]["state.gamma"].item() == pytest.approx(1.8)
    adapted = TrainState("cpu", gamma=1.5, adapt_gamma=True)
    gamma = adapted.gamma
    adapted.load_state_dict(sd)
    assert adapted.gamma is gamma and gamma.item() == pytest.approx(1.8)
    fixed = TrainState("cpu", gamma=0.7)
    fixed.load_state_dict(sd)
    assert fixed.gamma.item() == pytest.approx(0.7)
    old = TrainState("cpu", gamma=1.5, adapt_gamma=True)
    old.load_state_dict({"tensors": {n: v for n, v in sd["tensors"].items() if n != "state.gamma"}})
    assert old.gamma.item() == pytest.approx(1.5)


def test_old_checkpoint_host_state_loads():
    """A checkpoint written before the state was one object: no best_m, no
    collapse_restores (and ``restores`` saved but, then, never read back)."""
    st = TrainState("cpu", lr=1e-4)
    tensors = {"state.k": torch.tensor(0.1), "state.step": torch.tensor(30),
               "rng.gen": st.gen.get_state(), "rng.torch": torch.get_rng_state()}
    st.load_state_dict({"tensors": tensors, "host": {"lr": 5e-5, "best_m": None, "best_m_step": 20,
                                                     "lr_halvings": 1, "restores": 1}})
    assert st.step == 30 and st.lr == 5e-5 and math.isinf(st.best_m)
    assert (st.restores, st.collapse_restores) == (1, 0)
    st.load_state_dict({"tensors": tensors})  # no host state at all: the run's lr
    assert st.lr == 1e-4 and st.lr_halvings == 0


def test_schedule_sets_the_rate_everywhere():
    from types import SimpleNamespace
    cfg = SimpleNamespace(lr_half_every=2, lr_min=3e-4, lr_stall=0)
    st = TrainState("cpu", lr=1e-3)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched = LrSchedule(cfg, st, [opt])
    for step, want in ((1, 1e-3), (2, 5e-4), (3, 5e-4), (4, 3e-4)):
        st.advance()
        sched.after_step()
        assert st.step == step and st.lr == want and opt.param_groups[0]["lr"] == want
        assert st.lr_t.item() == pytest.approx(want)


def test_d_rate_follows_g_rate_at_the_fixed_ratio():
    """--lr-d (TTUR): D's Adam gets lr * ratio wherever G's gets lr (halvings, a restore's
    halving, a loaded checkpoint's rate), on the host and in the device tensor a CUDA graph
    reads."""
    from types import SimpleNamespace
    cfg = SimpleNamespace(lr_half_every=2, lr_min=1e-5, lr_stall=0)
    st = TrainState("cpu", lr=1e-4, lr_d_ratio=3.0)
    opt_g = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=1e-4)
    opt_d = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], lr=3e-4)
    sched = LrSchedule(cfg, st, [opt_g], [opt_d])
    assert st.lr_d == pytest.approx(3e-4) and st.lr_d_t.item() == pytest.approx(3e-4)
    for _ in range(2):
        st.advance()
        sched.after_step()
    assert opt_g.param_groups[0]["lr"] == pytest.approx(5e-5)
    assert opt_d.param_groups[0]["lr"] == pytest.approx(1.5e-4) and st.lr_d_t.item() == pytest.approx(1.5e-4)
    saved = st.state_dict()
    other = TrainState("cpu", lr=1e-4, lr_d_ratio=3.0)
    other.load_state_dict(saved)
    assert other.lr == pytest.approx(5e-5) and other.lr_d_t.item() == pytest.approx(1.5e-4)
