"""The collapse remedies (fastbegan.remedies): each term against a hand computation, its
gradient only where its paper puts it, every backend and the fused step, and the faithful
BEGAN unchanged bit for bit when they are off."""
import itertools

import numpy as np
import pytest
import torch

from fastbegan import ops
from fastbegan.remedies import constrained_space_loss, pulling_away
from fastbegan.step import FusedStep
from fastbegan.train import TrainConfig, Trainer


def _trainer(backend="torch", **kw):
    cfg = dict(res=8, filters=4, z_dim=8, h=8, batch_size=3, backend=backend, device="cpu", seed=5,
               out="/nonexistent", precision="fp32", reference_step=True, health_patience=0)
    cfg.update(kw)
    data = np.random.default_rng(1).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    t = Trainer(TrainConfig(**cfg), data, log=lambda *_: None)
    t.k = torch.tensor(0.37)
    return t


# ------------------------------------------------------------------------- the terms
def test_constrained_space_term_by_hand():
    codes = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    want = (0.5 + 1.0 + 1.0 + 1.0) / 4
    assert constrained_space_loss(codes, z).item() == pytest.approx(want)
    with pytest.raises(ValueError, match="--h equal to --z-dim"):
        constrained_space_loss(codes, torch.zeros(2, 3))


def test_pulling_away_term_by_hand():
    codes = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    rows = [r / r.norm() for r in codes]
    pairs = [(i, j) for i, j in itertools.product(range(3), repeat=2) if i != j]
    want = sum(float(rows[i] @ rows[j]) ** 2 for i, j in pairs) / len(pairs)  # 1/(N(N-1)) sum_{i!=j}
    assert pulling_away(codes).item() == pytest.approx(want)
    assert pulling_away(torch.ones(4, 5)).item() == pytest.approx(1.0)  # all alike: the maximum
    assert pulling_away(torch.eye(3)).item() == pytest.approx(0.0)      # orthogonal codes: 0


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="--h must equal --z-dim"):
        TrainConfig(cs_alpha=0.1, z_dim=64, h=32)
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(pt_weight=-1.0)
    with pytest.raises(ValueError, match="batch-size >= 2"):
        TrainConfig(pt_weight=0.1, batch_size=1)


# ------------------------------------------------------------------------- gradients
def _grads(t, seed_state):
    t.gen.set_state(seed_state)
    x = t.real_batch()
    z = t.sample_z(t.cfg.batch_size)
    t.compute_grads(x, z)
    return ([p.grad.clone() for p in t.D.parameters()], [p.grad.clone() for p in t.G.parameters()], x, z)


@pytest.mark.parametrize("option", ["cs_alpha", "pt_weight"])
def test_each_term_reaches_only_its_network(option):
    """BEGAN-CS changes D's gradients only (by alpha * its gradient), the pulling-away
    term G's only (by beta * its gradient); the k_t update and the other network's
    gradients are those of BEGAN."""
    plain, withit = _trainer(), _trainer(**{option: 0.5})
    state = plain.gen.get_state()
    d0, g0, x, z = _grads(plain, state)
    d1, g1, _, _ = _grads(withit, state)
    # the term's own gradient, computed separately by autograd
    fake = withit.G(z)
    codes = withit.D.encoder(fake)
    term = constrained_space_loss(codes, z) if option == "cs_alpha" else pulling_away(codes)
    net = withit.D if option == "cs_alpha" else withit.G
    extra = torch.autograd.grad(0.5 * term, list(net.parameters()), allow_unused=True)
    changed, same = (d1, g1) if option == "cs_alpha" else (g1, d1)
    base_changed, base_same = (d0, g0) if option == "cs_alpha" else (g0, d0)
    for a, b in zip(same, base_same):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b, e in zip(changed, base_changed, extra):
        torch.testing.assert_close(a, b + (0 if e is None else e), rtol=1e-5, atol=1e-7)
    assert any(e is not None and e.abs().max() > 1e-6 for e in extra)  # the term does something
    # the k_t update still uses BEGAN's L_real and L_fake
    va, vb = _trainer().train_step(), _trainer(**{option: 0.5}).train_step()
    assert va["k"].item() == vb["k"].item() and va["M"].item() == vb["M"].item()
    assert f"loss_{option[:2]}" in vb


# ------------------------------------------------------------------------- fused step, backends
def _pair(backend, steps=2, **kw):
    ref, fus = _trainer(**kw), _trainer(backend, **kw)
    for t in (ref, fus):
        for opt in (t.opt_g, t.opt_d):
            for group in opt.param_groups:
                group["fused"], group["foreach"] = True, False
    step = FusedStep(fus, compile=False)
    for _ in range(steps):
        with ops.use_backend("torch"):
            vb = ref.train_step()
        with ops.use_backend(backend):
            va = step()
        for key in ("loss_real", "loss_fake", "k", "M", "loss_cs", "loss_pt"):
            if key in vb:
                torch.testing.assert_close(va[key], vb[key], rtol=0, atol=2e-6, msg=key)
        for (name, p), q in zip(fus.model.named_parameters(), ref.model.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=2e-6, msg=name)
    return va


def test_fused_step_with_both_remedies_equals_the_reference_step():
    va = _pair("torch", cs_alpha=0.3, pt_weight=0.2)
    assert "loss_cs" in va and "loss_pt" in va


@pytest.mark.usefixtures("triton_backend")
def test_fused_step_with_remedies_on_the_triton_backend():
    """The Triton kernels (interpreter on CPU, fp32) in the fused step with both terms."""
    _pair("triton", steps=1, cs_alpha=0.3, pt_weight=0.2)


def test_pulling_away_pass_computes_no_weight_gradients():
    """The pulling-away term's extra encoder pass sends its gradient to G only, so its
    backward runs no weight-gradient convolution at all (not one scaled by 0): recorded at
    the aten level, every convolution_backward of that pass asks for the input gradient only."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastbegan.remedies import fused_step_terms

    class Record(TorchDispatchMode):
        masks: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution_backward.default:
                self.masks.append(list(args[-1]))
            return func(*args, **(kwargs or {}))

    t = _trainer()
    fake = t.G(torch.rand(3, 8) * 2 - 1).detach().requires_grad_()
    (value, weight), = fused_step_terms(t.D, fake, None, cs_alpha=0.0, pt_weight=0.5).values()
    with Record() as rec:
        (weight * value).backward()
    assert rec.masks == [[True, False, False]] * len(t.D.encoder.convs)
    assert all(p.grad is None for p in t.D.parameters())
    # the input gradient is the term's own (autograd through the encoder, weights frozen)
    frozen = fake.detach().requires_grad_()
    want, = torch.autograd.grad(weight * pulling_away(t.D.encoder(frozen)), frozen)
    torch.testing.assert_close(fake.grad, want)


def test_faithful_began_is_unchanged_bit_for_bit():
    """With the remedies off, a step equals the paper's step written out here (D over
    [x; G(z)], L_D to D, L_G = L_fake to G), to the last bit."""
    t = _trainer()
    state = t.gen.get_state()
    d_new, g_new, x, z = _grads(t, state)
    fake = t.G(z)
    rec = t.D(torch.cat([x, fake]))
    b = x.shape[0]
    l_real, l_fake = ops.l1_recon_loss(x, rec[:b]), ops.l1_recon_loss(fake, rec[b:])
    d_want = torch.autograd.grad(l_real - t.k * l_fake, list(t.D.parameters()), retain_graph=True)
    g_want = torch.autograd.grad(l_fake, list(t.G.parameters()))
    for a, w in zip(d_new + g_new, list(d_want) + list(g_want)):
        assert torch.equal(a, w)


def test_k_init_starts_k_there_and_the_update_follows_the_paper(tmp_path):
    """--k-init sets k_0 only: the first step's k is the paper's update of it, on the
    reference step and on the fused step."""
    for reference in (True, False):
        cfg = TrainConfig(res=8, filters=4, z_dim=8, h=8, batch_size=3, device="cpu", backend="torch",
                          precision="fp32", out=str(tmp_path), health_patience=0, k_init=0.1, gamma=0.9,
                          lambda_k=0.01, reference_step=reference)
        t = Trainer(cfg, np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
                    log=lambda *_: None)
        assert t.k.item() == pytest.approx(0.1) and (t.fused_step is None) == reference
        out = t.train_step()
        lr_, lf = out["loss_real"].item(), out["loss_fake"].item()
        assert out["k"].item() == pytest.approx(min(1, max(0, 0.1 + 0.01 * (0.9 * lr_ - lf))), abs=1e-6)
    with pytest.raises(ValueError, match="k-init"):
        TrainConfig(k_init=1.5)


def test_k_min_is_a_floor_after_the_papers_update(tmp_path):
    """--k-min clips k_t to [k_min, 1] after the paper's update and nowhere else: a step
    whose update lands below the floor ends at the floor, one above it is the paper's."""
    for reference in (True, False):
        for lambda_k in (1.0, 1e-4):  # far below the floor / barely moved from k_0 = 0.3
            cfg = TrainConfig(res=8, filters=4, z_dim=8, h=8, batch_size=3, device="cpu", backend="torch",
                              precision="fp32", out=str(tmp_path), health_patience=0, k_init=0.3, k_min=0.2,
                              gamma=0.01, lambda_k=lambda_k, reference_step=reference)
            t = Trainer(cfg, np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
                        log=lambda *_: None)
            out = t.train_step()
            lr_, lf = out["loss_real"].item(), out["loss_fake"].item()
            paper = min(1.0, max(0.0, 0.3 + lambda_k * (0.01 * lr_ - lf)))
            assert paper < 0.2 if lambda_k == 1.0 else paper > 0.2
            assert out["k"].item() == pytest.approx(max(0.2, paper), abs=1e-6)
    with pytest.raises(ValueError, match="k-min"):
        TrainConfig(k_min=-0.1)


def test_variant_presets_and_overrides(tmp_path, monkeypatch):
    """--variant began is the paper (every remedy off); escape switches on its preset; an
    option given on the command line wins over the preset and makes the variant "custom"."""
    from fastbegan.remedies import VARIANT_PRESETS, variant_options
    assert variant_options("began") == {"cs_alpha": 0.0, "pt_weight": 0.0, "k_init": 0.0, "k_min": 0.0,
                                        "variant": "began"}
    assert variant_options("escape") == {**VARIANT_PRESETS["escape"], "variant": "escape"}
    assert variant_options("began", pt_weight=0.2)["variant"] == "custom"
    assert variant_options("escape", k_init=None)["variant"] == "escape"
    with pytest.raises(ValueError, match="unknown variant"):
        variant_options("wgan")
    from click.testing import CliRunner
    import fastbegan.train as train_mod
    from fastbegan.cli import main
    import types
    seen = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, **kw: seen.append(cfg) or types.SimpleNamespace(step=0))
    for flags, want in ((["--variant", "began"], (0.0, 0.0, 0.0, "began")),
                        (["--variant", "escape"], (VARIANT_PRESETS["escape"]["k_init"],
                                                   VARIANT_PRESETS["escape"]["pt_weight"], 0.0, "escape")),
                        (["--variant", "escape", "--k-init", "0"], (0.0, VARIANT_PRESETS["escape"]["pt_weight"],
                                                                    0.0, "custom")),
                        (["--variant", "began", "--k-min", "0.05"], (0.0, 0.0, 0.0, "custom"))):
        res = CliRunner().invoke(main, ["train", "--device", "cpu", "--out", str(tmp_path / "r"), *flags])
        assert res.exit_code == 0, res.output
        c = seen[-1]
        assert (c.k_init, c.pt_weight, c.cs_alpha, c.variant) == want
        assert c.k_min == (0.05 if "--k-min" in flags else VARIANT_PRESETS[flags[1]]["k_min"])
    # no --variant: fastbegan train's default variant, its preset exactly
    from fastbegan.remedies import DEFAULT_VARIANT
    assert CliRunner().invoke(main, ["train", "--device", "cpu", "--out", str(tmp_path / "d")]).exit_code == 0
    c = seen[-1]
    assert c.variant == DEFAULT_VARIANT
    assert {k: getattr(c, k) for k in VARIANT_PRESETS[DEFAULT_VARIANT]} == VARIANT_PRESETS[DEFAULT_VARIANT]


def test_resume_keeps_the_runs_own_variant(tmp_path, monkeypatch):
    """--resume without --variant continues with the remedies the run was started with (not
    the CLI's current default); options given on the command line still win; a checkpoint
    from before the remedies existed resumes as the paper's BEGAN."""
    import types

    from click.testing import CliRunner

    import fastbegan.train as train_mod
    from fastbegan.cli import main
    from fastbegan.remedies import resumed_variant_options
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path / "cache"))
    run = str(tmp_path / "run")
    tiny = ["train", "--res", "8", "--filters", "4", "--z-dim", "8", "--h", "8", "--batch-size", "2",
            "--device", "cpu", "--no-progress", "--steps", "2", "--ckpt-every", "2", "--out", run]
    r = CliRunner().invoke(main, [*tiny, "--variant", "began", "--k-min", "0.02"])
    assert r.exit_code == 0, r.output
    seen = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, **kw: seen.append(cfg) or types.SimpleNamespace(step=0))
    for extra, want in (([], (0.0, 0.02, 0.0, "custom")),
                        (["--pt-weight", "0.2"], (0.0, 0.02, 0.2, "custom")),
                        (["--variant", "escape"], (0.1, 0.05, 0.1, "escape"))):
        assert CliRunner().invoke(main, [*tiny, "--resume", *extra]).exit_code == 0
        c = seen[-1]
        assert (c.k_init, c.k_min, c.pt_weight, c.variant) == want
    assert resumed_variant_options({"res": 8}) == {"cs_alpha": 0.0, "pt_weight": 0.0, "k_init": 0.0, "k_min": 0.0,
                                                   "variant": "began"}
    assert resumed_variant_options({"variant": "escape", "pt_weight": 0.1, "k_init": 0.1, "k_min": 0.05,
                                    "cs_alpha": 0.0})["variant"] == "escape"
