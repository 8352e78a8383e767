"""The fused single-pass step (fastbegan.step) against the reference two-loss step.

The reference is ``Trainer.train_step`` (``compute_grads``: two ``autograd.grad`` calls,
L_D's gradients to D, L_G's to G). Both trainers start from the same seed, so they hold
the same weights and draw the same batches and z; we compare losses, k_t, M, every
parameter gradient and every parameter after Adam, for several steps.

Both trainers' Adam is switched to the fused implementation (FusedStep does that), so the
only differences left are float rounding: fp32, atol 1e-6 (losses, gradients: the
one-backward weight gradient sums the real and -k * fake contributions in one reduction
instead of two). k_t is set to 0.37 first: at k_t = 0 the fake half's D gradient vanishes
and half of what is tested would be trivially zero.
"""

import contextlib
import re
import types
import warnings

import numpy as np
import pytest
import torch

from fastbegan import ops
from fastbegan.autocompile import CPU_COMPILE_MODE
from fastbegan.remedies import VARIANT_PRESETS
from fastbegan.step import FusedStep, ReferenceStep, fused_step_status
from fastbegan.train import TrainConfig, Trainer

from testutil import requires_gpu


def _trainer(backend="torch", device="cpu", **kw):
    cfg = dict(res=8, filters=4, z_dim=8, h=8, batch_size=2, backend=backend, device=device,
               seed=3, out="/nonexistent", precision="fp32", reference_step=True)
    cfg.update(kw)
    data = np.random.default_rng(0).integers(0, 256, (8, cfg["res"], cfg["res"], 3), dtype=np.uint8)
    t = Trainer(TrainConfig(**cfg), data, log=lambda m: None)
    t.k = torch.tensor(0.37, device=t.device)
    return t


# the default variant's levers (remedies.VARIANT_PRESETS["settle"]) with its pulling-away
# anneal moved to steps 3-8, so that 20 steps cross it (GPU tests): the anneal factor and
# the EMA of G run on the device, inside the graph
SETTLE_SHORT = {**VARIANT_PRESETS["settle"], "pt_anneal_start": 3, "pt_anneal_end": 8}
# fastbegan train's default (remedies.DEFAULT_VARIANT): the adapted gamma, pixel feature
# matching and the sliced Wasserstein term against the data set's statistics
MATCH = VARIANT_PRESETS["match"]
# the default with D's inputs shifted (--augment-shift): the shifts drawn inside the graph
MATCH_SHIFT = {**MATCH, "augment_shift": 0.125}


def _use_fused_adam(tr):
    for opt in (tr.opt_g, tr.opt_d):
        for group in opt.param_groups:
            group["fused"], group["foreach"] = True, False


def _compare(a, b, va, vb, atol=1e-6, what=""):
    for key in ("loss_real", "loss_fake", "loss_d", "k", "M") + tuple(k for k in ("gamma", "loss_sw") if k in vb):
        torch.testing.assert_close(va[key].float(), vb[key].float(), rtol=0, atol=atol,
                                   msg=lambda m: f"{what} {key}: {m}")
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=atol,
                                   msg=lambda m: f"{what} grad of {name}: {m}")
        torch.testing.assert_close(p, q, rtol=0, atol=atol, msg=lambda m: f"{what} {name}: {m}")
    if a.g_ema is not None:  # the EMA of G (remedies.GeneratorEMA), when the run keeps one
        for name, x, y in zip(a.g_ema.names, a.g_ema.shadow, b.g_ema.shadow):
            torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=lambda m: f"{what} EMA of {name}: {m}")


def _run_pair(fused_backend, steps, ref_backend="torch", step_kw=None, atol=1e-6, **kw):
    if (step_kw or {}).get("compile"):
        # each FusedStep compiles the same code object (step_forward's closure) for another model:
        # start from an empty dynamo cache so that earlier tests' graphs do not count towards
        # its recompile limit (one run's process compiles it once)
        torch._dynamo.reset()
    ref = _trainer(ref_backend, **kw)
    fus = _trainer(fused_backend, **kw)
    _use_fused_adam(ref)
    step = FusedStep(fus, **(step_kw or {}))
    for i in range(steps):
        with ops.use_backend(ref_backend):
            vb = ref.train_step()
        with ops.use_backend(fused_backend):
            va = step()
        _compare(fus, ref, va, vb, atol=atol, what=f"step {i}")
        assert fus.step == ref.step == i + 1
    fus.stepper = step  # for the caller (Trainer.train_step is not used here)
    return fus, ref


def test_fused_equals_reference_torch_backend():
    _run_pair("torch", steps=3)


def test_fused_equals_reference_res16_skip_vanishing_residual():
    """Res 16 (two levels: the upsample and stride-2 convs), skip connections, and the
    vanishing-residual carry computed on the device from the step counter."""
    fus, ref = _run_pair("torch", steps=2, res=16, skip=True, vanishing_residual=5)
    assert float(fus.G.carry) == float(ref.G.carry) == pytest.approx(1 - 1 / 5)


def test_linear_layers_need_the_scale(monkeypatch):
    """Without scaling D's fc weight gradients per sample the single pass is wrong: the
    equivalence test above would catch it."""
    from fastbegan import ops
    monkeypatch.setattr(ops, "linear", lambda x, w, b, wgrad_scale=None: torch.nn.functional.linear(x, w, b))
    with pytest.raises(AssertionError, match="fc"):
        _run_pair("torch", steps=1)


def test_gradients_go_where_they_belong():
    """G's gradient is dL_fake/dG only (D's L_D does not leak into G), D's is dL_D/dD only
    (the known bug: backpropagating L_D + L_G once and stepping both optimisers)."""
    t = _trainer()
    step = FusedStep(t)
    step()
    g_grads = [p.grad.clone() for p in t.G.parameters()]
    d_grads = [p.grad.clone() for p in t.D.parameters()]
    ref = _trainer()
    draws = ReferenceStep(ref)  # the same draws as the fused step's
    x = draws.real_batch()
    z = draws.sample_z(2)
    fake = ref.G(z)
    rec = ref.D(torch.cat([x, fake]))
    l_real = ops.l1_recon_loss(x, rec[:2])
    l_fake = ops.l1_recon_loss(fake, rec[2:])
    naive = torch.autograd.grad(l_real - ref.k * l_fake + l_fake, list(ref.D.parameters()),
                                retain_graph=True)
    want_g = torch.autograd.grad(l_fake, list(ref.G.parameters()), retain_graph=True)
    want_d = torch.autograd.grad(l_real - ref.k * l_fake, list(ref.D.parameters()))
    for g, w in zip(g_grads, want_g):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    for g, w in zip(d_grads, want_d):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6)
    assert any((g - n).abs().max() > 1e-4 for g, n in zip(d_grads, naive))


def _triton_conv_reason():
    try:
        import fastbegan.ops.triton_conv  # noqa: F401
        import fastbegan.ops.triton_ops  # noqa: F401
    except Exception as e:
        return f"fastbegan.ops.triton_conv is not importable yet ({e.__class__.__name__}: {e})"
    return None


@pytest.mark.skipif(_triton_conv_reason() is not None, reason=str(_triton_conv_reason()))
def test_fused_triton_equals_reference(device):
    """The whole fused step on the triton backend (interpreter on CPU: fp32, res 8,
    filters 4, batch 2) against the reference step on the torch backend. One step: the
    interpreter runs the conv backward kernels slowly (~10 s of CPU per step here)."""
    _run_pair("triton", steps=1 if device == "cpu" else 3, device=device, filters=4)


def test_steps_need_no_trainer():
    """A step works on what it is given (StepInputs: model, optimisers, data, state, config),
    no trainer object at all: built by hand, the fused and the reference step take the same
    two steps, and they advance the state they were given."""
    from fastbegan.model import BEGAN
    from fastbegan.state import TrainState
    from fastbegan.step import StepInputs
    cfg = TrainConfig(res=8, filters=4, z_dim=8, h=8, batch_size=2, backend="torch", device="cpu",
                      precision="fp32", seed=3)
    data = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8))

    def inputs():
        torch.manual_seed(0)
        model = BEGAN(8, 4, 8, 8)
        opt_d, opt_g = (torch.optim.Adam(m.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
                        for m in (model.D, model.G))
        return StepInputs(cfg=cfg, model=model, G=model.G, D=model.D, opt_d=opt_d, opt_g=opt_g, data=data,
                          state=TrainState("cpu", k_init=0.37, lr=cfg.lr, seed=cfg.seed))
    fused_in, ref_in = inputs(), inputs()
    _use_fused_adam(types.SimpleNamespace(opt_g=ref_in.opt_g, opt_d=ref_in.opt_d))
    fused, ref = FusedStep(fused_in, compile=False), ReferenceStep(ref_in)
    with ops.use_backend("torch"):
        for i in range(2):
            _compare(fused_in, ref_in, fused(), ref(), what=f"step {i}")
    for st in (fused_in.state, ref_in.state):
        assert st.step == int(st.step_t) == 2 and st.k.item() != pytest.approx(0.37)
    assert fused.last_batch["fake"].shape == (2, 3, 8, 8)


def test_no_host_sync_cpu(monkeypatch):
    """The step never reads a tensor on the host: every host read raises during it."""
    t = _trainer()
    step = FusedStep(t)
    step()  # first step: creates the Adam state (no reads either, but keep it out)

    def boom(*a, **k):
        raise AssertionError("host read of a tensor inside the step")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, boom)
    vals = step()
    step()
    monkeypatch.undo()
    assert t.step == 3 and set(vals) == {"loss_real", "loss_fake", "loss_d", "k", "M"}


def test_host_state_changes_reach_the_device_state():
    """A new k (checkpoint load), a new step counter and an lr halving reach the step: the
    state's device tensors are written in place, never replaced."""
    fus = _trainer(lr_half_every=2)
    ref = _trainer(lr_half_every=2)
    _use_fused_adam(ref)
    fus.stepper = step = FusedStep(fus)
    k_buffer = fus.state.k
    for i in range(3):
        vb, va = ref.train_step(), fus.train_step()
        _compare(fus, ref, va, vb, what=f"step {i}")
    assert fus.lr == ref.lr == 5e-5 and fus.state.lr_t.item() == pytest.approx(5e-5)
    for t in (fus, ref):
        t.k = torch.tensor(0.6)
        t.step = 7
    vb, va = ref.train_step(), fus.train_step()
    _compare(fus, ref, va, vb, what="after k reset")
    assert fus.step == 8 and int(fus.state.step_t) == 8
    assert fus.k is step.state.k is k_buffer  # one k, the step's and the trainer's


def test_fit_checkpoint_resume_with_fused_step(tmp_path):
    """Trainer.fit on the fused step: logging, checkpoints, and a resumed run that
    continues exactly like an uninterrupted one (state mirrored after the load)."""
    from fastbegan.checkpoint import latest_checkpoint

    def make(out, steps):
        t = _trainer(out=str(out), steps=steps, log_every=1, sample_every=100, ckpt_every=2)
        t.stepper = FusedStep(t)
        return t

    full = make(tmp_path / "a", 4)
    rows = full.fit(progress=False)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    make(tmp_path / "b", 2).fit(progress=False)
    resumed = make(tmp_path / "b", 4)
    resumed.load_checkpoint(latest_checkpoint(tmp_path / "b"))
    assert resumed.step == 2
    resumed.fit(progress=False)
    # the loaded moments got their channels_last parameters' layout back (fused Adam pairs
    # param / grad / moments element by element in memory order)
    for p in resumed.G.parameters():
        assert resumed.opt_g.state[p]["exp_avg"].stride() == p.stride()
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), n
    assert torch.equal(full.k, resumed.k) and resumed.k is resumed.stepper.state.k


def test_status_and_trainer_path():
    """The fused step is the default wherever it applies (CPU included); the reference
    step for --reference-step and --separate-z (torchrun runs the fused step: test_distributed)."""
    ok, why = fused_step_status(_trainer(reference_step=False))
    assert ok and "cpu" in why
    t = _trainer(reference_step=False)
    assert isinstance(t.stepper, FusedStep) and t.step_path.startswith("fused")
    ok, why = fused_step_status(_trainer())
    assert not ok and "--reference-step" in why and isinstance(_trainer().stepper, ReferenceStep)
    ok, why = fused_step_status(_trainer(separate_z=True, reference_step=False))
    assert not ok and "separate" in why
    with pytest.raises(ValueError, match="separate_z"):
        FusedStep(_trainer(separate_z=True))
    with pytest.raises(ValueError, match="CUDA"):
        FusedStep(_trainer(), cuda_graph=True)


# ---------------------------------------------------------------------------- GPU only
def _gpu_trainer(**kw):
    kw.setdefault("backend", "triton")
    return _trainer(device="cuda", res=16, filters=8, batch_size=4, **kw)


@requires_gpu
@pytest.mark.parametrize("levers", [{}, SETTLE_SHORT, MATCH, MATCH_SHIFT], ids=["began", "settle", "match", "match-shift"])
def test_gpu_no_sync(levers):
    """CUDA: no synchronising call inside the step (sync debug mode 'error')."""
    t = _gpu_trainer(**levers)
    step = FusedStep(t, cuda_graph=False)
    step()  # Triton autotuning synchronises: first step outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@requires_gpu
@pytest.mark.parametrize("levers", [{}, SETTLE_SHORT, MATCH, MATCH_SHIFT], ids=["began", "settle", "match", "match-shift"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_cuda_graph_equals_eager(precision, levers):
    """20 steps replayed from a CUDA graph equal 20 eager steps (same seed, same batches);
    with the default variant's levers, the EMA of G too.

    Tolerance: the same kernels run in both, so differences come only from kernels that
    are not bitwise deterministic (atomics in split-K reductions), amplified by 20 Adam
    steps; 1e-4 fp32, 2e-2 bf16."""
    atol = 1e-4 if precision == "fp32" else 2e-2
    eager_t, graph_t = _gpu_trainer(precision=precision, **levers), _gpu_trainer(precision=precision, **levers)
    eager = FusedStep(eager_t, cuda_graph=False)
    graph = FusedStep(graph_t, cuda_graph=True, warmup=2)
    for i in range(20):
        ve, vg = eager(), graph()
        for key in ("loss_real", "loss_fake", "k", "M"):
            torch.testing.assert_close(vg[key], ve[key], rtol=0, atol=atol)
    assert graph.graphed.graph is not None
    for p, q in zip(graph_t.model.parameters(), eager_t.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=atol)
    if levers.get("k_target"):
        torch.testing.assert_close(graph_t.state.gamma, eager_t.state.gamma, rtol=0, atol=atol)
    if levers.get("ema_decay"):
        for a, b in zip(graph_t.g_ema.shadow, eager_t.g_ema.shadow):
            torch.testing.assert_close(a, b, rtol=0, atol=atol)
    assert graph_t.gen.get_state().equal(eager_t.gen.get_state())


@requires_gpu
def test_gpu_fused_equals_reference():
    """On the GPU: the fused triton step (graph) against the reference torch-backend step."""
    ref, fus = _gpu_trainer(backend="torch"), _gpu_trainer()
    _use_fused_adam(ref)
    step = FusedStep(fus)
    for i in range(5):
        with ops.use_backend("torch"):
            vb = ref.train_step()
        with ops.use_backend("triton"):
            va = step()
        _compare(fus, ref, va, vb, atol=1e-3, what=f"step {i}")


# ---------------------------------------------------------------------------- torch.compile
# FusedStep(compile=...) compiles step_forward (gather/convert, G, D, losses) with
# fullgraph=True; the random draws and Adam stay eager. Inductor builds C++ on CPU: the
# first compile of this tiny model takes ~15-25 s on 2 cores (the on-disk cache helps reruns).
@contextlib.contextmanager
def _no_compile_fallback():
    """Turn the fallback warning into an error: these tests must run the compiled code."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastbegan: torch.compile")
        yield


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_step_equals_reference(precision):
    """compile=True (inductor, CPU) gives the reference step's losses, k_t, M, gradients and
    parameters for 2 steps: fp32 within 1e-6; bf16 (autocast inside the compiled region)
    runs and stays within bf16 rounding (1e-2). ~20 s each with a cold inductor cache."""
    with _no_compile_fallback():
        fus, _ = _run_pair("torch", steps=2, step_kw={"compile": True}, precision=precision,
                           atol=1e-6 if precision == "fp32" else 1e-2)
    assert fus.stepper.forward.mode == CPU_COMPILE_MODE and not fus.stepper.forward.pending


@pytest.mark.skipif(_triton_conv_reason() is not None, reason=str(_triton_conv_reason()))
def test_compiled_step_triton_backend(device):
    """The compiled step on the triton backend (our custom ops inside the inductor graph)
    against the reference step. The first call compiles, is checked and returns the eager
    step's results; the later ones are the compiled graph's. CPU: two steps, kernels in the
    interpreter (~10 s with a cold inductor cache). GPU: 4 steps, the last two captured in /
    replayed from the CUDA graph around the compiled forward and backward."""
    with _no_compile_fallback():
        fus, _ = _run_pair("triton", steps=2 if device == "cpu" else 4, device=device, filters=4,
                           step_kw={"compile": True}, atol=1e-6 if device == "cpu" else 1e-3)
    # still compiled after its one check: the second step ran the compiled graph (no recompile)
    assert fus.stepper.forward.mode == "default" and fus.stepper.forward.checks == 1
    assert fus.stepper.cuda_graph == (device == "cuda")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    _triton_conv_reason() is not None, reason=str(_triton_conv_reason())))])
@pytest.mark.parametrize("variant", ["settle", "match"])
def test_compiled_step_with_a_variants_levers(backend, variant):
    """A preset's levers in the compiled step, equal to the reference step (CPU; triton in
    the interpreter). settle: k_t floor, pulling-away term annealed to a final weight (window
    moved to steps 1-2 so that 3 steps cross it), EMA of G. match (fastbegan train's default):
    gamma adapted to hold k_t near 0.1, pixel feature matching and the sliced Wasserstein term
    against the data set's statistics, as the preset sets them."""
    from fastbegan.remedies import DEFAULT_VARIANT
    assert DEFAULT_VARIANT in ("settle", "match")  # the default is one of those tested here
    levers = dict(SETTLE_SHORT, pt_anneal_start=1, pt_anneal_end=2) if variant == "settle" else MATCH
    with _no_compile_fallback():
        # match: atol 3e-5, the feature-matching term's 1 / the data's spread (as below)
        fus, ref = _run_pair(backend, steps=3, step_kw={"compile": True}, atol=3e-5, **levers)
    assert not fus.stepper.forward.pending
    if variant == "match":
        assert fus.state.gamma.item() == pytest.approx(ref.state.gamma.item(), abs=3e-5)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    _triton_conv_reason() is not None, reason=str(_triton_conv_reason())))])
def test_compiled_step_with_the_variety_terms(backend):
    """The mode-seeking term, the centred pulling-away term and feature matching (issue 31's
    levers) in the compiled step, with a floor under k_t: equal to the reference step (CPU;
    triton in the interpreter)."""
    with _no_compile_fallback():
        # atol 3e-5: G's gradients reach ~1.5 here (the mode-seeking term's 1 / its ratio and feature
        # matching's 1 / the reals' spread are large on these tiny nets); fp32 rounding, 1e-5 relative
        fus, _ = _run_pair(backend, steps=2, step_kw={"compile": True}, pt_weight=0.1, pt_centred=True,
                           ms_weight=0.2, fm_weight=0.2, k_init=0.1, k_min=0.05, atol=3e-5)
    assert not fus.stepper.forward.pending


def test_fused_equals_reference_with_the_batch_statistic():
    """D's minibatch stddev (--mbstd-group) couples the samples of a group, and the fused
    step is still exact: each group lies inside one half, so its gradient carries that half's
    weight-gradient scale (1 or -k_t). Groups of 2 and the whole half of 4, the latter with
    the pulling-away and BEGAN-CS terms (their extra encoder pass takes the fakes alone)."""
    _run_pair("torch", steps=3, batch_size=4, mbstd_group=2)
    _run_pair("torch", steps=2, batch_size=4, mbstd_group=4, pt_weight=0.1, cs_alpha=0.1)


def test_two_learning_rates():
    """--lr-d (TTUR): D's Adam steps at its own rate in both steps (parameters equal after
    3 steps), and a CUDA graph capture hands each optimiser its own device rate tensor and
    gives the float rates back afterwards."""
    fus, ref = _run_pair("torch", steps=3, lr=1e-4, lr_d=4e-4)
    assert fus.opt_d.param_groups[0]["lr"] == pytest.approx(4e-4) == ref.opt_d.param_groups[0]["lr"]
    assert fus.opt_g.param_groups[0]["lr"] == pytest.approx(1e-4)
    step = fus.stepper
    with step._capture_context():
        assert fus.opt_d.param_groups[0]["lr"] is fus.state.lr_d_t
        assert fus.opt_g.param_groups[0]["lr"] is fus.state.lr_t
        assert fus.state.lr_d_t.item() == pytest.approx(4e-4)
    assert fus.opt_d.param_groups[0]["lr"] == pytest.approx(4e-4)
    assert fus.opt_g.param_groups[0]["lr"] == pytest.approx(1e-4)
    # against plain Adam at the two rates by hand: D moved by its rate, not G's
    slow = _trainer(lr=1e-4)
    with ops.use_backend("torch"):
        for _ in range(3):
            slow.train_step()
    moved = lambda t: sum(float((p - q).abs().sum()) for p, q in zip(t.D.parameters(), _trainer().D.parameters()))
    assert moved(ref) > 2 * moved(slow)
    # the log row carries D's rate beside G's
    row = ref._log_row({"k": ref.state.k}, 1.0)
    assert row["lr"] == pytest.approx(1e-4) and row["lr_d"] == pytest.approx(4e-4)
    assert "lr_d" not in slow._log_row({"k": slow.state.k}, 1.0)


def test_a_statistic_across_the_halves_would_break_the_fused_step(monkeypatch):
    """The counter-example that shows why groups stay inside a half: a statistic over the
    whole [real; fake] batch sends the fakes' loss into the reals' D gradients, which the
    per-half scale weights wrongly; the equivalence check catches it."""
    from fastbegan import model
    real = model.minibatch_stddev
    monkeypatch.setattr(model, "minibatch_stddev", lambda x, group: real(x, len(x)))
    with pytest.raises(AssertionError):
        _run_pair("torch", steps=1, batch_size=4, mbstd_group=4)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    _triton_conv_reason() is not None, reason=str(_triton_conv_reason())))])
def test_compiled_step_with_the_batch_statistic(backend):
    """The minibatch-stddev statistic in the compiled fused step, with the eq lever's gamma
    and lambda_k, feature matching on the pixels against the data set's moments and the sliced
    Wasserstein term against its thumbnail quantiles (constant tensors the compiled region
    reads; a sort inside it) and gamma adapted to a k_t target (--k-target: device
    state updated after the compiled region): equal to the reference step (CPU; triton in
    the interpreter)."""
    with _no_compile_fallback():
        fus, ref = _run_pair(backend, steps=2, step_kw={"compile": True}, batch_size=4, mbstd_group=2,
                             gamma=1.0, lambda_k=0.01, k_init=0.1, fm_weight=0.2, fm_pixels=True, fm_data=True,
                             sw_weight=0.5, k_target=0.2, lambda_gamma=0.1, atol=3e-5)
    assert not fus.stepper.forward.pending
    assert fus.state.gamma.item() == pytest.approx(ref.state.gamma.item(), abs=3e-5)
    assert fus.state.gamma.item() != pytest.approx(1.0, abs=1e-4)  # it moved


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_compile_failure_falls_back_to_eager(monkeypatch, where):
    """A compilation that raises at the first call (in the forward, or in the compiled
    backward, which AOTAutograd builds at the first backward) warns once with the reason and
    the step, that one included, runs eagerly: still the reference step."""
    calls = []

    def fake_compile(fn, **kw):
        calls.append(kw)

        def compiled(*args):
            if where == "forward":
                raise RuntimeError("boom: unsupported op")
            out = fn(*args)
            objective = out.objective + 0  # what the one backward starts from

            def hook(grad):
                raise RuntimeError("boom: backward compile")
            objective.register_hook(hook)
            return out._replace(objective=objective)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    ref, fus = _trainer(), _trainer()
    _use_fused_adam(ref)
    step = FusedStep(fus, compile="max-autotune-no-cudagraphs")
    assert calls == [{"fullgraph": True, "dynamic": False, "mode": "max-autotune-no-cudagraphs"}]
    assert step.forward.mode == "max-autotune-no-cudagraphs"
    with pytest.warns(UserWarning, match=r"torch.compile .*max-autotune-no-cudagraphs.*boom"):
        va = step()
    _compare(fus, ref, va, ref.train_step(), what="step 0")
    assert step.forward.mode is None
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastbegan")
        va = step()  # eager for good: no second warning
    _compare(fus, ref, va, ref.train_step(), what="step 1")


def test_cpu_compile_mode_only_for_the_torch_backend_on_a_cpu(monkeypatch):
    """compile=True takes the C++ wrapper (CPU_COMPILE_MODE) on a CPU with the torch
    backend, and inductor's default mode (None) on other devices."""
    from fastbegan import autocompile
    modes = []
    monkeypatch.setattr(autocompile, "_compiled", lambda fn, mode: modes.append(mode) or fn)
    step = FusedStep(_trainer(), compile=True)
    assert modes == [CPU_COMPILE_MODE] and step.forward.mode == CPU_COMPILE_MODE
    step.forward.device = torch.device("cuda")  # what default_mode reads; nothing runs
    assert step.forward.default_mode() is None


def test_compile_default_and_switch(monkeypatch, tmp_path):
    """FusedStep: compile "auto" by default (on CPU decided after timed eager steps, see
    tests/test_selection.py); the trainer maps --compile auto|on|off onto it."""
    step = FusedStep(_trainer())
    assert step.forward.mode is None and "auto" in step.forward.why
    assert FusedStep(_trainer(), compile=False).forward.mode is None
    import fastbegan.step as step_mod
    seen = []

    class Recorder:
        def __init__(self, trainer, **kw):
            seen.append(kw)

        def describe(self):
            return "test"

    monkeypatch.setattr(step_mod, "fused_step_status", lambda t: (True, "test"))
    monkeypatch.setattr(step_mod, "FusedStep", Recorder)
    for value, want in (("auto", "auto"), ("on", True), ("off", False), (True, "auto"), (False, False)):
        _trainer(compile_step=value)
        assert seen[-1] == {"compile": want}

    from click.testing import CliRunner
    import fastbegan.train as train_mod
    from fastbegan.cli import main
    cfgs = []

    def fake_train(cfg, **kw):
        cfgs.append(cfg)
        return types.SimpleNamespace(step=0)
    monkeypatch.setattr(train_mod, "train", fake_train)
    for flags, want in (([], "auto"), (["--no-compile"], "off"), (["--compile"], "on"),
                        (["--compile", "off"], "off"), (["--compile", "auto"], "auto")):
        args = ["train", "--device", "cpu", "--out", str(tmp_path / "run")] + flags
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 0, res.output
        assert cfgs[-1].compile_step == want, flags


def _zeroing_g_compile(fn, mode):
    """A stand-in for torch.compile with the bug torch 2.11 had: the compiled step runs,
    but no gradient reaches G (a hook zeroes the gradient of G's output)."""
    def compiled(*args):
        out = fn(*args)
        out.fake.register_hook(torch.zeros_like)
        return out
    return compiled


def test_compile_self_check_drops_a_wrong_compilation(monkeypatch, tmp_path):
    """The first compiled step's gradients are compared with the eager step's on the same
    inputs: an injected compilation that gives G zero gradients is dropped with one
    warning naming the torch version and a parameter of G, recorded so that --compile
    auto does not compile it again, and every step (that one included) is the reference
    step."""
    from fastbegan import autocompile
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path))
    monkeypatch.setattr(autocompile, "_compiled", _zeroing_g_compile)
    ref, fus = _trainer(), _trainer()
    _use_fused_adam(ref)
    step = FusedStep(fus, compile=True)
    with pytest.warns(UserWarning, match=rf"results that differ .* gradient of G\.\S+ off by 1 .*torch {re.escape(torch.__version__)}") as rec:
        va = step()
    assert len([w for w in rec if "fastbegan" in str(w.message)]) == 1
    _compare(fus, ref, va, ref.train_step(), what="step 0")
    assert step.forward.mode is None and step.forward.self_check[0].startswith("G.")
    assert step.forward.self_check[1] == 1.0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastbegan")
        for i in (1, 2):
            _compare(fus, ref, step(), ref.train_step(), what=f"step {i}")
    decision = autocompile.decide(10**6, 1.0, "fp32", step.forward.key())
    assert not decision.compile and "self-check" in decision.why


def test_compile_self_check_keeps_a_right_compilation(monkeypatch, tmp_path):
    """A compilation that computes the same gradients passes the check silently (error 0:
    the stand-in runs the eager code) and stays in use."""
    from fastbegan import autocompile
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(autocompile, "_compiled", lambda fn, mode: lambda *a: calls.append(1) or fn(*a))
    ref, fus = _trainer(), _trainer()
    _use_fused_adam(ref)
    step = FusedStep(fus, compile=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fastbegan")
        for i in range(2):
            _compare(fus, ref, step(), ref.train_step(), what=f"step {i}")
    assert step.forward.mode == CPU_COMPILE_MODE and step.forward.self_check[1] <= 1e-6 and len(calls) == 2


@pytest.mark.parametrize("compiled", ["fp32 eager", "zeroing"])
def test_compile_self_check_in_bf16_allows_rounding_not_bugs(monkeypatch, tmp_path, compiled):
    """In bf16 each output and parameter may also be off by ``noise_factor`` times what
    bf16 rounding alone moves it (eager bf16 against eager fp32, same inputs; capped): a
    stand-in compilation that computes in fp32 is exactly that far from the eager bf16
    step everywhere and is kept (fresh weights); one that zeroes G's gradients is dropped.
    Either way the bf16 eager step's gradients are the ones the step keeps."""
    from fastbegan import autocompile
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path))
    if compiled == "zeroing":
        monkeypatch.setattr(autocompile, "_compiled", _zeroing_g_compile)
    fus, plain = _trainer(precision="bf16"), _trainer(precision="bf16")
    step, plain_step = FusedStep(fus, compile=True), FusedStep(plain, compile=False)
    assert step.forward.reference is not None and plain_step.forward.reference is not None
    if compiled == "fp32 eager":
        step.forward.fn = step.forward.reference   # the "compiled" forward: fp32, no autocast
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        step()
    plain_step()
    dropped = [w for w in rec if "differ from the eager step" in str(w.message)]
    name, err, allowed = step.forward.self_check
    tol = autocompile.TOLERANCES["bf16"]
    if compiled == "fp32 eager":
        assert not dropped and step.forward.mode == CPU_COMPILE_MODE
        assert err > 0 and allowed == pytest.approx(min(tol.cap, max(tol.item, tol.noise_factor * err)))
        assert 0 < step.forward.report.total_error <= tol.total
    else:
        assert len(dropped) == 1 and step.forward.mode is None and name.startswith("G.") and err == 1.0
    for (n, p), (_, q) in zip(fus.model.named_parameters(), plain.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)   # bf16 eager's gradients kept


def test_grad_error():
    """The self-check's measure, against the formula written out."""
    from fastbegan.autocompile import _grad_error
    cpu = torch.device("cpu")
    g, w = torch.tensor([3.0, 4.0]), torch.tensor([3.0, 0.0])
    assert _grad_error(g, w, cpu).item() == pytest.approx(4.0 / 5.0)
    assert _grad_error(w, w, cpu).item() == 0.0
    assert _grad_error(torch.zeros(2), w, cpu).item() == 1.0
    assert _grad_error(None, w, cpu).item() == 1.0 and _grad_error(None, None, cpu).item() == 0.0
    assert _grad_error(torch.zeros(2), torch.zeros(2), cpu).item() == 0.0


@pytest.mark.skipif(_triton_conv_reason() is not None, reason=str(_triton_conv_reason()))
def test_warmup_decides_every_kernel_shape_before_capture(monkeypatch, one_thread):
    """On a GPU the step is captured after ``warmup`` eager steps, and inside a capture no
    kernel path may be tried or autotuned (a key first met there raises). Here the third
    step runs as if captured: it must find every (op, shape) of the triton backend decided
    by the two warm-up steps (the pulling-away term and skip connections on: the most ops)."""
    from fastbegan.ops import fallback
    fallback.set_strict(False)
    tr = _trainer("triton", pt_weight=0.1, k_min=0.05, skip=True)  # every op and variant in use
    step = FusedStep(tr, compile=False, warmup=2)
    with ops.use_backend("triton"):
        step()
        step()
        decided = set(fallback.decisions()["chosen"])
        monkeypatch.setattr(fallback, "_capturing", lambda: True)
        step()
    assert set(fallback.decisions()["chosen"]) == decided and len(decided) >= 10
