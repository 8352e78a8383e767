"""The collapse remedies (fastbegan.remedies): each term against a hand computation, its
gradient only where its paper puts it, every backend and the fused step, and the faithful
BEGAN unchanged bit for bit when they are off."""
import copy
import itertools
import math

import numpy as np
import pytest
import torch

from fastbegan import ops
from fastbegan.remedies import constrained_space_loss, feature_matching, mode_seeking, pulling_away
from fastbegan.step import FusedStep, ReferenceStep
from fastbegan.train import TrainConfig, Trainer


def _trainer(backend="torch", **kw):
    cfg = dict(res=8, filters=4, z_dim=8, h=8, batch_size=3, backend=backend, device="cpu", seed=5,
               out="/nonexistent", precision="fp32", reference_step=True, health_patience=0)
    cfg.update(kw)
    data = np.random.default_rng(1).integers(0, 256, (8, cfg["res"], cfg["res"], 3), dtype=np.uint8)
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


def test_mode_seeking_term_by_hand():
    """MSGAN: 1 / (mean|G(z_a) - G(z_b)| / mean|z_a - z_b| + 1e-5), halves a = rows 0, 1 and
    b = rows 2, 3 of a batch of 5 (the odd row left out)."""
    g = torch.Generator().manual_seed(0)
    img, z = torch.randn(5, 3, 4, 4, generator=g), torch.rand(5, 8, generator=g) * 2 - 1
    d_img = sum(float((img[i] - img[i + 2]).abs().sum()) for i in range(2)) / (2 * 3 * 4 * 4)
    d_z = sum(float((z[i] - z[i + 2]).abs().sum()) for i in range(2)) / (2 * 8)
    assert mode_seeking(img, z).item() == pytest.approx(1 / (d_img / d_z + 1e-5), rel=1e-5)
    # two z that give one image cost the most: 1 / eps
    assert mode_seeking(torch.ones(2, 3, 4, 4), z[:2]).item() == pytest.approx(1e5)


def test_feature_matching_term_by_hand():
    """(mean_j |mu_j(f) - mu_j(r)| + mean_j |sd_j(f) - sd_j(r)|) / mean_j sd_j(r), the
    moments across the batch (population sd), written out per column."""
    f = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 6.0]])
    r = torch.tensor([[0.0, 1.0], [4.0, -1.0], [2.0, 3.0]])
    def col(m, j):
        v = [float(m[i, j]) for i in range(3)]
        mu = sum(v) / 3
        return mu, (sum((a - mu) ** 2 for a in v) / 3) ** 0.5
    gap_mu = sum(abs(col(f, j)[0] - col(r, j)[0]) for j in range(2)) / 2
    gap_sd = sum(abs(col(f, j)[1] - col(r, j)[1]) for j in range(2)) / 2
    spread = sum(col(r, j)[1] for j in range(2)) / 2
    assert feature_matching(f, r).item() == pytest.approx((gap_mu + gap_sd) / spread, rel=1e-5)
    assert feature_matching(r, r).item() == pytest.approx(0.0, abs=1e-6)  # the reals' own moments
    # scale-free: the same batches with codes 50x larger
    assert feature_matching(50 * f, 50 * r).item() == pytest.approx(feature_matching(f, r).item(), rel=1e-5)
    # one sample repeated (a collapsed batch) costs its missing spread: here exactly 1
    assert feature_matching(r.mean(0, keepdim=True).expand(3, 2), r).item() == pytest.approx(1.0, rel=1e-4)


def test_pixel_moments_of_the_training_set_by_hand():
    """--fm-data's target: each pixel's mean and population sd over the whole set in [-1, 1],
    in the layout of (N, 3, H, W).flatten(1); with flips over the set and its mirror images."""
    from fastbegan.remedies import moment_gap, pixel_moments
    u8 = torch.tensor([[[[0, 255, 51], [102, 0, 0]]], [[[255, 255, 153], [0, 0, 255]]],
                       [[[0, 0, 0], [204, 51, 0]]]], dtype=torch.uint8)  # (N 3, H 1, W 2, C 3)
    v = u8.double() / 127.5 - 1                                            # [-1, 1], (N, H, W, C)
    def by_hand(vals):  # vals: (M, H, W, C) -> per (c, h, w), in that order
        out_m, out_s = [], []
        for c in range(3):
            for w in range(2):
                col = [float(vals[i, 0, w, c]) for i in range(len(vals))]
                mu = sum(col) / len(col)
                out_m.append(mu)
                out_s.append((sum((a - mu) ** 2 for a in col) / len(col)) ** 0.5)
        return torch.tensor(out_m), torch.tensor(out_s)
    mean, sd = pixel_moments(u8, flip=False, chunk=2)  # two chunks: the sums carry over
    want_m, want_s = by_hand(v)
    torch.testing.assert_close(mean, want_m.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sd, want_s.float(), rtol=0, atol=1e-6)
    mean_f, sd_f = pixel_moments(u8, flip=True)
    want_m, want_s = by_hand(torch.cat([v, v.flip(2)]))
    torch.testing.assert_close(mean_f, want_m.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sd_f, want_s.float(), rtol=0, atol=1e-6)
    # a fake batch with the set's own moments pays nothing; one collapsed image pays its missing spread
    fake = torch.cat([v, v.flip(2)]).permute(0, 3, 1, 2).flatten(1).float()
    assert moment_gap(fake, mean_f, sd_f).item() == pytest.approx(0.0, abs=1e-5)
    one = mean_f.view(1, -1).expand(4, -1)
    assert moment_gap(one, mean_f, sd_f).item() == pytest.approx(1.0, rel=1e-3)  # eps: sd 1e-4, not 0


def _pool_by_hand(v, side):
    """(N, H, W, 3) floats -> (N, 3 * side * side): block means, in (c, i, j) order."""
    n, h = v.shape[0], v.shape[1]
    f = h // side
    return v.reshape(n, side, f, side, f, 3).mean((2, 4)).permute(0, 3, 1, 2).reshape(n, -1)


def _sw_target_by_hand(v, sides, grid):
    """(M, H, W, 3) floats in [-1, 1] -> per side (dirs, order statistics at (i + 0.5) / grid, mean sd)."""
    out = []
    for side in sides:
        gen = torch.Generator().manual_seed(side)
        dirs = torch.randn(3 * side * side, 128, generator=gen, dtype=torch.float64)
        dirs = dirs / dirs.norm(dim=0)
        proj = _pool_by_hand(v, side) @ dirs
        srt = proj.sort(0).values
        q = torch.stack([srt[int((i + 0.5) * len(srt) / grid)] for i in range(grid)])
        out.append((dirs.float(), q.float(), proj.std(0).mean().float()))
    return out


def test_thumbnail_quantiles_and_sliced_wasserstein_by_hand():
    """--sw-weight's target and term, written out: per scale of the pyramid (1x1 ... 8x8; 16x16
    images), block means in the layout of (N, 3, s, s).flatten(1), projected on 128 unit
    directions (seed = the side), the set's order statistics at (i + 0.5) / grid (the set with
    its mirror images under flips); the term as the mean over scales of the gap between a
    batch's sorted projections and the set's (i + 0.5) / B quantiles over the projections' spread."""
    from fastbegan.remedies import sliced_wasserstein, thumbnail_quantiles
    g = torch.Generator().manual_seed(3)
    u8 = torch.randint(0, 256, (40, 16, 16, 3), generator=g, dtype=torch.uint8)
    got = thumbnail_quantiles(u8, flip=True, grid=16, chunk=7)
    assert [t[0].shape for t in got] == [(3, 128), (12, 128), (48, 128), (192, 128)]
    v = u8.double() / 127.5 - 1
    want = _sw_target_by_hand(torch.cat([v, v.flip(2)]), (1, 2, 4, 8), 16)
    for (d, q, sc), (wd, wq, wsc) in zip(got, want):
        torch.testing.assert_close(d, wd, rtol=0, atol=1e-6)
        torch.testing.assert_close(q, wq, rtol=0, atol=1e-5)
        assert sc.item() == pytest.approx(wsc.item(), rel=1e-5)
    # every second image when the set is larger than max_images (no flips); one scale
    (_, q2, _), = thumbnail_quantiles(u8, flip=False, sides=(4,), grid=4, max_images=20)
    torch.testing.assert_close(q2, _sw_target_by_hand(v[::2], (4,), 4)[0][1], rtol=0, atol=1e-5)
    # the term: a batch of 4 images (N, 3, H, W) in [-1, 1]
    fake = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    per_scale = []
    for d, q, sc in want:
        side = int(round((d.shape[0] / 3) ** 0.5))
        pf = (_pool_by_hand(fake.permute(0, 2, 3, 1).double(), side) @ d.double()).sort(0).values
        rows = torch.stack([q[int((i + 0.5) * 16 / 4)] for i in range(4)]).double()
        per_scale.append(((pf - rows).abs().mean() / sc.double()).item())
    assert sliced_wasserstein(fake, got).item() == pytest.approx(sum(per_scale) / 4, rel=1e-5)


def test_sliced_wasserstein_sees_the_joint_colour_law_that_pixel_moments_miss():
    """Backgrounds on a ring of hues against a batch of red and cyan ones: each channel's mean
    and spread are the same (pixel feature matching is ~0 for both), the colours' joint law is
    not, and the sliced Wasserstein term tells them apart (what issue 31's faces showed)."""
    from fastbegan.remedies import moment_gap, pixel_moments, sliced_wasserstein, thumbnail_quantiles
    def plain(rgb):  # (N, 3) in [-1, 1] -> uint8 images (N, 8, 8, 3) of one colour each
        return ((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).view(-1, 1, 1, 3).expand(-1, 8, 8, 3)
    def ring(n, phase=0.0):  # hues round the circle, each channel a cosine 120 degrees apart
        t = (torch.arange(n) + phase) / n * 2 * math.pi
        return 0.8 * torch.stack([torch.cos(t), torch.cos(t - 2 * math.pi / 3), torch.cos(t + 2 * math.pi / 3)], 1)
    data = plain(ring(1024))
    target_m, target_s = pixel_moments(data, flip=False)
    sw_target = thumbnail_quantiles(data, flip=False, grid=256)
    from fastbegan.images import to_unit_range
    on_ring = to_unit_range(plain(ring(16, 0.5)))
    # red and cyan, each channel rescaled to the ring's mean and spread
    rc = torch.tensor([[1.0, -0.5, -0.5], [-1.0, 0.5, 0.5]]).repeat(8, 1)
    rc = rc / rc.std(0, unbiased=False) * ring(1024).std(0, unbiased=False)
    red_cyan = to_unit_range(plain(rc))
    for batch in (on_ring, red_cyan):
        assert moment_gap(batch.flatten(1), target_m, target_s).item() < 0.05
    assert sliced_wasserstein(on_ring, sw_target).item() < 0.1  # 16 samples of the ring: ~0.05
    assert sliced_wasserstein(red_cyan, sw_target).item() > 4 * sliced_wasserstein(on_ring, sw_target).item()


def test_pixel_terms_stay_finite_on_a_set_without_spread():
    """A training set whose images are all one flat colour has no spread to divide by: the
    pixel terms divide by at least one 8-bit level (2/255 in [-1, 1]) and stay finite, with
    the value their formula gives at that divisor."""
    from fastbegan.remedies import (PIXEL_SPREAD_FLOOR, pixel_feature_matching, pixel_moments,
                                    sliced_wasserstein, thumbnail_quantiles)
    flat = torch.full((6, 8, 8, 3), 100, dtype=torch.uint8)
    level = 100 / 127.5 - 1
    target = thumbnail_quantiles(flat, flip=True, grid=8)
    assert all(sc.item() == pytest.approx(2 / 255) for _, _, sc in target)
    fake = torch.full((4, 3, 8, 8), level + 0.1)
    fake[:2] -= 0.2                                    # a batch at level +- 0.1
    # every projection of a thumbnail of flat (level) images is level * sum(dir); the batch's
    # are (level +- 0.1) * sum(dir): the gap is 0.1 |sum(dir)| whatever the rank
    want = sum((0.1 * d.sum(0).abs()).mean().item() / PIXEL_SPREAD_FLOOR for d, _, _ in target) / len(target)
    assert sliced_wasserstein(fake, target).item() == pytest.approx(want, rel=1e-4)
    m, sd = pixel_moments(flat, flip=False)
    assert sd.abs().max().item() < 1e-6
    # mean gap 0 (the batch's mean is the level), spread gap 0.1 against a target spread of 0
    got = pixel_feature_matching(fake, fake, (m, sd)).item()
    assert math.isfinite(got) and got == pytest.approx(0.1 / PIXEL_SPREAD_FLOOR, rel=1e-3)


def test_sw_sides_double_up_to_the_max_side_and_the_resolution():
    from fastbegan.remedies import sw_sides
    assert sw_sides(32) == (1, 2, 4, 8)                 # the default, --sw-max-side 8
    assert sw_sides(32, 16) == (1, 2, 4, 8, 16)
    assert sw_sides(8, 16) == (1, 2, 4, 8)              # never above the images' side
    assert sw_sides(64, 1) == (1,)


@pytest.mark.parametrize("res, max_side, sides", [(8, 8, (1, 2, 4, 8)), (16, 16, (1, 2, 4, 8, 16))])
def test_sliced_wasserstein_reaches_g_only(res, max_side, sides):
    """--sw-weight: G's gradient is BEGAN's plus the weight times the term's gradient (the
    target computed here from the data, flips included, on the pyramid up to --sw-max-side);
    D's is BEGAN's."""
    from fastbegan.remedies import sliced_wasserstein
    plain, withit = _trainer(res=res), _trainer(res=res, sw_weight=0.5, sw_max_side=max_side)
    state = plain.gen.get_state()
    d0, g0, _, z = _grads(plain, state)
    d1, g1, _, _ = _grads(withit, state)
    v = withit.data.double() / 127.5 - 1                      # (N, H, W, 3)
    v = torch.cat([v, v.flip(2)]) if withit.cfg.flip else v
    target = _sw_target_by_hand(v, sides, 1024)
    term = sliced_wasserstein(withit.G(z), target)
    _assert_g_gets_the_term(withit, term, (d0, g0), (d1, g1))


def test_centred_pulling_away_term_by_hand():
    """On codes minus their batch mean: a large component that every code shares (D's codes
    have one) makes the raw term near its maximum 1 and is left out of the centred one."""
    g = torch.Generator().manual_seed(1)
    codes = torch.randn(4, 6, generator=g) + 10.0
    c = codes - codes.mean(0)
    rows = [r / r.norm() for r in c]
    pairs = [(i, j) for i, j in itertools.product(range(4), repeat=2) if i != j]
    want = sum(float(rows[i] @ rows[j]) ** 2 for i, j in pairs) / len(pairs)
    assert pulling_away(codes, centred=True).item() == pytest.approx(want, rel=1e-5)
    assert pulling_away(codes).item() > 0.95 > 0.5 > want


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="--h must equal --z-dim"):
        TrainConfig(cs_alpha=0.1, z_dim=64, h=32)
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(pt_weight=-1.0)
    with pytest.raises(ValueError, match="batch-size >= 2"):
        TrainConfig(pt_weight=0.1, batch_size=1)
    with pytest.raises(ValueError, match="batch-size >= 2"):
        TrainConfig(ms_weight=0.1, batch_size=1)
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(ms_weight=-0.1)
    with pytest.raises(ValueError, match="batch-size >= 2"):
        TrainConfig(fm_weight=0.1, batch_size=1)
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(fm_weight=-0.1)
    with pytest.raises(ValueError, match="--fm-data .* with --fm-weight > 0 and --fm-pixels"):
        TrainConfig(fm_weight=0.1, fm_data=True)


# ------------------------------------------------------------------------- gradients
def _assert_g_gets_the_term(withit, term, plain_grads, with_grads, weight=0.5):
    """D's gradients are BEGAN's exactly; G's are BEGAN's plus ``weight`` times ``term``'s
    gradient (``term`` computed by the test from ``withit.G``), and that gradient is not 0."""
    (d0, g0), (d1, g1) = plain_grads, with_grads
    extra = torch.autograd.grad(weight * term, list(withit.G.parameters()))
    for a, b in zip(d1, d0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b, e in zip(g1, g0, extra):
        torch.testing.assert_close(a, b + e, rtol=1e-4, atol=1e-5)
    assert any(e.abs().max() > 1e-6 for e in extra)


def _grads(t, seed_state):
    t.gen.set_state(seed_state)
    ref = ReferenceStep(t)
    x = ref.real_batch()
    z = ref.sample_z()
    ref.compute_grads(x, z)
    return ([p.grad.clone() for p in t.D.parameters()], [p.grad.clone() for p in t.G.parameters()], x, z)


@pytest.mark.parametrize("option", ["cs_alpha", "pt_weight", "ms_weight", "fm_weight"])
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
    term = {"cs_alpha": lambda: constrained_space_loss(codes, z), "pt_weight": lambda: pulling_away(codes),
            "ms_weight": lambda: mode_seeking(fake, z),
            "fm_weight": lambda: feature_matching(codes, withit.D.encoder(x).detach())}[option]()
    net = withit.D if option == "cs_alpha" else withit.G
    extra = torch.autograd.grad(0.5 * term, list(net.parameters()), allow_unused=True)
    changed, same = (d1, g1) if option == "cs_alpha" else (g1, d1)
    base_changed, base_same = (d0, g0) if option == "cs_alpha" else (g0, d0)
    for a, b in zip(same, base_same):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b, e in zip(changed, base_changed, extra):
        torch.testing.assert_close(a, b + (0 if e is None else e), rtol=1e-4, atol=1e-5)  # fp32 sums
    assert any(e is not None and e.abs().max() > 1e-6 for e in extra)  # the term does something
    # the k_t update still uses BEGAN's L_real and L_fake
    va, vb = _trainer().train_step(), _trainer(**{option: 0.5}).train_step()
    assert va["k"].item() == vb["k"].item() and va["M"].item() == vb["M"].item()
    assert f"loss_{option[:2]}" in vb


@pytest.mark.parametrize("fm_data", [False, True])
def test_pixel_feature_matching_reaches_g_only(fm_data):
    """--fm-pixels: G's gradient is BEGAN's plus the weight times the gradient of feature
    matching on the flattened images (the real batch a fixed target, or with --fm-data the
    training set's moments, computed here from the data); D's is BEGAN's."""
    from fastbegan.images import to_unit_range
    from fastbegan.remedies import moment_gap
    plain, withit = _trainer(), _trainer(fm_weight=0.5, fm_pixels=True, fm_data=fm_data)
    state = plain.gen.get_state()
    d0, g0, x, z = _grads(plain, state)
    d1, g1, _, _ = _grads(withit, state)
    fake = withit.G(z).flatten(1)
    if fm_data:
        every = to_unit_range(withit.data).flatten(1)
        every = torch.cat([every, to_unit_range(withit.data.flip(2)).flatten(1)]) if withit.cfg.flip else every
        term = moment_gap(fake, every.mean(0), every.std(0, unbiased=False))
        assert float(term) != pytest.approx(float(feature_matching(fake, x.flatten(1))), rel=1e-3)
    else:
        term = feature_matching(fake, x.flatten(1))
    _assert_g_gets_the_term(withit, term, (d0, g0), (d1, g1))


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
        for key in ("loss_real", "loss_fake", "k", "M", "gamma", "loss_cs", "loss_pt", "loss_ms", "loss_fm", "loss_sw"):
            if key in vb:
                torch.testing.assert_close(va[key], vb[key], rtol=0, atol=2e-6, msg=key)
        for (name, p), q in zip(fus.model.named_parameters(), ref.model.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=2e-6, msg=name)
    return va


def test_fused_step_with_both_remedies_equals_the_reference_step():
    va = _pair("torch", cs_alpha=0.3, pt_weight=0.2)
    assert "loss_cs" in va and "loss_pt" in va


def test_fused_step_with_the_variety_terms_equals_the_reference_step():
    """The mode-seeking term, the centred pulling-away term and feature matching (issue 31's
    levers); feature matching alone too (its frozen pass of D's encoder without the
    pulling-away term's)."""
    va = _pair("torch", pt_weight=0.2, pt_centred=True, ms_weight=0.3, fm_weight=0.2)
    assert "loss_ms" in va and "loss_pt" in va and "loss_fm" in va
    assert "loss_fm" in _pair("torch", steps=1, fm_weight=0.2)
    assert "loss_fm" in _pair("torch", steps=1, fm_weight=0.2, fm_pixels=True)
    assert "loss_fm" in _pair("torch", steps=1, fm_weight=0.2, fm_pixels=True, fm_data=True)
    assert "loss_sw" in _pair("torch", steps=2, sw_weight=0.5)  # --sw-weight: a sort in the step
    assert "loss_sw" in _pair("torch", steps=1, res=16, sw_weight=0.5, sw_max_side=16)  # a 16x16 scale too
    assert "gamma" in _pair("torch", steps=3, k_target=0.3, lambda_gamma=0.1, lambda_k=0.05)  # --k-target


@pytest.mark.usefixtures("triton_backend")
def test_fused_step_with_remedies_on_the_triton_backend():
    """The Triton kernels (interpreter on CPU, fp32) in the fused step with both terms."""
    _pair("triton", steps=1, cs_alpha=0.3, pt_weight=0.2)
    _pair("triton", steps=1, pt_weight=0.2, pt_centred=True, ms_weight=0.3, fm_weight=0.2)
    _pair("triton", steps=2, k_target=0.3, lambda_gamma=0.1, lambda_k=0.05)


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
        assert t.k.item() == pytest.approx(0.1) and (t.stepper.kind == "reference") == reference
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


def test_k_target_adapts_gamma_as_written_out(tmp_path):
    """--k-target: each step's k_t comes from the paper's update with the adapted gamma (not
    --gamma), then gamma moves lambda_gamma of the way to L_fake / L_real + 10 (k_target -
    k_{t+1}), inside [0.25, 16]; on the reference and the fused step. A k_t above its target
    pulls gamma down to its bound; one far below it lifts gamma."""
    data = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    for reference in (True, False):
        for gamma0, k_target, lambda_k in ((2.0, 0.25, 0.5), (0.5, 0.9, 1e-3)):
            cfg = TrainConfig(res=8, filters=4, z_dim=8, h=8, batch_size=3, device="cpu", backend="torch",
                              precision="fp32", out=str(tmp_path), health_patience=0, k_init=0.3, k_min=0.05,
                              gamma=gamma0, lambda_k=lambda_k, k_target=k_target, lambda_gamma=0.2,
                              reference_step=reference)
            t = Trainer(cfg, data, log=lambda *_: None)
            k, gamma = 0.3, gamma0
            for _ in range(4):
                out = t.train_step()
                lr_, lf = out["loss_real"].item(), out["loss_fake"].item()
                k_next = max(0.05, min(1.0, max(0.0, k + lambda_k * (gamma * lr_ - lf))))
                gamma_next = min(16.0, max(0.25, gamma + 0.2 * (lf / lr_ + 10.0 * (k_target - k_next) - gamma)))
                assert out["k"].item() == pytest.approx(k_next, abs=1e-5)
                assert out["M"].item() == pytest.approx(lr_ + abs(gamma * lr_ - lf), abs=1e-5)
                assert out["gamma"].item() == pytest.approx(gamma_next, abs=1e-5) == t.state.gamma.item()
                k, gamma = k_next, gamma_next
            assert gamma == pytest.approx(0.25) if k_target < 0.3 else gamma > 0.5 + 0.3
    with pytest.raises(ValueError, match="k-target"):
        TrainConfig(k_target=0.05, k_min=0.05)
    for rate in (0.0, 1.5):
        with pytest.raises(ValueError, match="lambda-gamma"):
            TrainConfig(k_target=0.1, lambda_gamma=rate)


def test_variant_presets_and_overrides(tmp_path, monkeypatch):
    """--variant began is the paper (every remedy off); escape switches on its preset; an
    option given on the command line wins over the preset and makes the variant "custom"."""
    from fastbegan.remedies import PAPER, VARIANT_PRESETS, variant_flags, variant_options
    assert variant_options("began") == {"gamma": 0.5, "lambda_k": 0.001, "cs_alpha": 0.0, "pt_weight": 0.0, "k_init": 0.0, "k_min": 0.0,
                                        "pt_anneal_start": 0, "pt_anneal_end": 0, "pt_final": 0.0,
                                        "k_min_anneal_start": 0, "k_min_anneal_end": 0, "ema_decay": 0.0,
                                        "pt_centred": False, "ms_weight": 0.0, "fm_weight": 0.0, "fm_pixels": False,
                                        "fm_data": False, "sw_weight": 0.0, "k_target": 0.0, "variant": "began"} == {**PAPER,
                                                                                                   "variant": "began"}
    assert variant_flags("escape") == "--pt-weight 0.1 --k-init 0.1 --k-min 0.05"
    from fastbegan.remedies import lever_flags
    assert lever_flags({**PAPER, "pt_weight": 0.1, "pt_centred": True, "ms_weight": 0.2}) == (
        "--pt-weight 0.1 --pt-centred --ms-weight 0.2")
    # settle: escape, then the pulling-away weight falls to 0.05 over steps 2,000-2,500; EMA samples
    assert variant_flags("settle") == ("--pt-weight 0.1 --k-init 0.1 --k-min 0.05 --pt-anneal 2000 2500 "
                                       "--pt-final 0.05 --ema-decay 0.999")
    # match: the variety study's winner, gamma and lambda_k its own (the paper's are left out)
    assert variant_flags("match") == ("--gamma 1.5 --lambda-k 0.003 --k-init 0.1 --k-min 0.05 --ema-decay 0.999 "
                                      "--fm-weight 0.3 --fm-pixels --fm-data --sw-weight 1 --k-target 0.1")
    assert variant_options("match", gamma=1.5)["variant"] == "match"
    assert variant_options("match", gamma=1.2)["variant"] == "custom"
    # options that turn one preset into another take that one's name (the study's levers)
    assert variant_options("escape", **{k: v for k, v in VARIANT_PRESETS["match"].items()})["variant"] == "match"
    assert variant_options("began", pt_weight=0.1, k_init=0.1, k_min=0.05)["variant"] == "escape"
    assert variant_options("escape", pt_anneal_end=5)["variant"] == "custom"
    for name in VARIANT_PRESETS:  # every preset sets every option (a resume compares them all)
        assert set(VARIANT_PRESETS[name]) == set(PAPER)
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
    for extra, want in (([], (0.0, 0.02, 0.0, "custom", 0.5)),
                        (["--pt-weight", "0.2"], (0.0, 0.02, 0.2, "custom", 0.5)),
                        (["--variant", "escape"], (0.1, 0.05, 0.1, "escape", 0.5)),
                        (["--variant", "match"], (0.1, 0.05, 0.0, "match", 1.5))):
        assert CliRunner().invoke(main, [*tiny, "--resume", *extra]).exit_code == 0
        c = seen[-1]
        assert (c.k_init, c.k_min, c.pt_weight, c.variant, c.gamma) == want
    # the default (match) with its gamma changed: a resume keeps that gamma and match's lambda_k
    monkeypatch.undo()
    monkeypatch.setenv("FASTBEGAN_CACHE", str(tmp_path / "cache"))
    tuned = [*tiny[:-1], str(tmp_path / "tuned")]
    r = CliRunner().invoke(main, [*tuned, "--gamma", "1.2"])
    assert r.exit_code == 0, r.output
    monkeypatch.setattr(train_mod, "train", lambda cfg, **kw: seen.append(cfg) or types.SimpleNamespace(step=0))
    assert CliRunner().invoke(main, [*tuned, "--resume"]).exit_code == 0
    c = seen[-1]
    assert (c.gamma, c.lambda_k, c.sw_weight, c.k_target, c.variant) == (1.2, 0.003, 1.0, 0.1, "custom")
    assert CliRunner().invoke(main, [*tuned, "--resume", "--lambda-k", "0.002"]).exit_code == 0
    assert (seen[-1].gamma, seen[-1].lambda_k) == (1.2, 0.002)
    from fastbegan.remedies import PAPER
    assert resumed_variant_options({"res": 8}) == {**PAPER, "variant": "began"}
    kept = resumed_variant_options({"variant": "custom", "pt_weight": 0.1, "pt_anneal_start": 5, "pt_anneal_end": 9,
                                    "ema_decay": 0.99})  # the anneal and the EMA go on too
    assert (kept["pt_anneal_start"], kept["pt_anneal_end"], kept["ema_decay"]) == (5, 9, 0.99)
    assert isinstance(kept["pt_anneal_end"], int) and kept["variant"] == "custom"
    assert resumed_variant_options({"variant": "escape", "pt_weight": 0.1, "k_init": 0.1, "k_min": 0.05,
                                    "cs_alpha": 0.0})["variant"] == "escape"


# ------------------------------------------------------------------------- ending the escape, EMA
def test_anneal_scale_by_hand():
    from fastbegan.remedies import anneal_scale
    steps = torch.tensor([0, 10, 11, 15, 19, 20, 25])
    want = [1.0, 1.0, 0.9, 0.5, 0.1, 0.0, 0.0]      # (20 - t) / (20 - 10), clipped to [0, 1]
    got = [anneal_scale(s, 10, 20).item() for s in steps]
    assert got == pytest.approx(want, abs=1e-7)
    assert [anneal_scale(s, 20, 20).item() for s in steps] == [1, 1, 1, 1, 1, 0, 0]  # abrupt at END
    assert anneal_scale(torch.tensor(3), 1, 5).dtype == torch.float32
    # down to a final fraction 0.3 instead of 0: 0.3 + 0.7 * (20 - t) / 10
    assert [anneal_scale(s, 10, 20, 0.3).item() for s in steps] == pytest.approx(
        [1.0, 1.0, 0.93, 0.65, 0.37, 0.3, 0.3], abs=1e-6)
    with pytest.raises(ValueError, match="pt-final"):
        TrainConfig(pt_weight=0.1, pt_final=0.05)  # without --pt-anneal
    with pytest.raises(ValueError, match="START <= END"):
        TrainConfig(pt_anneal_start=5, pt_anneal_end=3)
    with pytest.raises(ValueError, match="ema-decay"):
        TrainConfig(ema_decay=1.0)


def _tiny_cfg(tmp_path, **kw):
    base = dict(res=8, filters=4, z_dim=8, h=8, batch_size=3, device="cpu", backend="torch", precision="fp32",
                out=str(tmp_path), health_patience=0)
    return TrainConfig(**{**base, **kw})


def _tiny_data():
    return np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize("reference", [True, False])
def test_annealed_floor_follows_the_schedule(tmp_path, reference):
    """k_min annealed over steps [1, 3]: the floor after step t is 0.2 * clip((3 - t) / 2, 0, 1);
    lambda_k 1 and gamma 0.01 put the paper's update below it every step."""
    cfg = _tiny_cfg(tmp_path, k_init=0.3, k_min=0.2, k_min_anneal_start=1, k_min_anneal_end=3, gamma=0.01,
                    lambda_k=1.0, reference_step=reference)
    t = Trainer(cfg, _tiny_data(), log=lambda *_: None)
    k = 0.3
    for step in range(5):
        out = t.train_step()
        paper = min(1.0, max(0.0, k + 1.0 * (0.01 * out["loss_real"].item() - out["loss_fake"].item())))
        floor = 0.2 * min(1.0, max(0.0, (3 - step) / 2))
        assert out["k"].item() == pytest.approx(max(paper, floor), abs=1e-6), step
        k = out["k"].item()
    assert k == 0.0  # no floor left, and the update pushes k to 0


def test_annealed_pulling_away_weight_by_hand():
    """At step 2 of the window [1, 3] the pulling-away term enters G's gradient with weight
    0.5 * (3 - 2) / (3 - 1) = 0.25; D's gradients are BEGAN's."""
    plain, withit = _trainer(), _trainer(pt_weight=0.5, pt_anneal_start=1, pt_anneal_end=3)
    plain.step = withit.step = 2
    state = plain.gen.get_state()
    d0, g0, x, z = _grads(plain, state)
    d1, g1, _, _ = _grads(withit, state)
    extra = torch.autograd.grad(0.25 * pulling_away(withit.D.encoder(withit.G(z))), list(withit.G.parameters()))
    for a, b in zip(d1, d0):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b, e in zip(g1, g0, extra):
        torch.testing.assert_close(a, b + e, rtol=1e-5, atol=1e-7)
    final = _trainer(pt_weight=0.5, pt_anneal_start=1, pt_anneal_end=3, pt_final=0.1)
    final.step = 2  # halfway from 0.5 to the final 0.1: weight 0.3
    _, g2, _, _ = _grads(final, state)
    extra = torch.autograd.grad(0.3 * pulling_away(final.D.encoder(final.G(z))), list(final.G.parameters()))
    for a, b, e in zip(g2, g0, extra):
        torch.testing.assert_close(a, b + e, rtol=1e-5, atol=1e-7)
    withit.step = 3  # the end of the window: weight 0, G's gradient is BEGAN's
    _, g3, _, _ = _grads(withit, state)
    for a, b in zip(g3, g0):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_fused_step_with_anneals_and_ema_equals_the_reference_step():
    kw = dict(pt_weight=0.2, pt_anneal_start=1, pt_anneal_end=3, pt_final=0.05, k_init=0.3, k_min=0.25, k_min_anneal_start=1,
              k_min_anneal_end=4, gamma=0.01, lambda_k=1.0, ema_decay=0.9)
    ref, fus = _trainer(**kw), _trainer(**kw)
    for t in (ref, fus):
        t.k = torch.tensor(0.3)
        for opt in (t.opt_g, t.opt_d):
            for group in opt.param_groups:
                group["fused"], group["foreach"] = True, False
    step = FusedStep(fus, compile=False)
    for i in range(5):
        vb, va = ref.train_step(), step()
        for key in ("loss_real", "loss_fake", "k", "loss_pt"):
            torch.testing.assert_close(va[key], vb[key], rtol=0, atol=2e-6, msg=key)
        for a, b in zip(fus.g_ema.shadow, ref.g_ema.shadow):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    assert va["k"].item() == 0.0  # past the floor's window


@pytest.mark.parametrize("reference", [True, False])
def test_ema_of_g_by_hand(tmp_path, reference):
    """ema_0 = G's initial weights; after step t: ema += r_t (p_t - ema) with
    r_t = 1 - min(decay, (1 + t) / (10 + t)), written out here over G's weights after each step."""
    decay = 0.5
    t = Trainer(_tiny_cfg(tmp_path, ema_decay=decay, reference_step=reference), _tiny_data(), log=lambda *_: None)
    want = [p.detach().clone() for p in t.G.parameters()]
    for step in range(4):
        t.train_step()
        r = 1 - min(decay, (1 + step) / (10 + step))     # 0.9, 0.8182, 0.75 (decay 0.5 from step 3 on)
        want = [w + r * (p.detach() - w) for w, p in zip(want, t.G.parameters())]
    for a, w in zip(t.g_ema.shadow, want):
        torch.testing.assert_close(a, w, rtol=1e-6, atol=1e-7)
    assert t.g_ema.shadow[0].stride() == next(t.G.parameters()).stride()


def test_training_sample_grid_shows_the_ema(tmp_path):
    """With an EMA, samples/fake_*.png is G run with the averaged weights (a generator loaded
    with them by hand), and G's own weights are left as they were."""
    from PIL import Image

    from fastbegan.images import save_grid
    t = Trainer(_tiny_cfg(tmp_path, ema_decay=0.5), _tiny_data(), log=lambda *_: None)
    for _ in range(3):
        t.train_step()
    before = [p.detach().clone() for p in t.G.parameters()]
    t.write_samples()
    g = copy.deepcopy(t.G)
    with torch.no_grad():
        for p, a in zip(g.parameters(), t.g_ema.shadow):
            p.copy_(a)
        save_grid(g(t.fixed_z).float(), tmp_path / "want.png")
        save_grid(t.G(t.fixed_z).float(), tmp_path / "raw.png")
    got = np.asarray(Image.open(tmp_path / "samples" / f"fake_{t.step:08d}.png"))
    assert np.array_equal(got, np.asarray(Image.open(tmp_path / "want.png")))
    assert not np.array_equal(got, np.asarray(Image.open(tmp_path / "raw.png")))
    for p, q in zip(t.G.parameters(), before):
        assert torch.equal(p, q)


def test_ema_is_in_checkpoints_and_resumes_exactly(tmp_path):
    from fastbegan import checkpoint as ckpt
    cfg = dict(ema_decay=0.9, k_init=0.1, k_min=0.05, pt_weight=0.1, pt_anneal_start=1, pt_anneal_end=3)
    straight = Trainer(_tiny_cfg(tmp_path / "a", **cfg), _tiny_data(), log=lambda *_: None)
    for _ in range(4):
        straight.train_step()
    first = Trainer(_tiny_cfg(tmp_path / "b", **cfg), _tiny_data(), log=lambda *_: None)
    for _ in range(2):
        first.train_step()
    path = first.save_checkpoint()
    tensors, _, _ = ckpt.load_checkpoint(path)
    assert {k for k in tensors if k.startswith("G_ema.")} == {f"G_ema.{n}" for n, _ in first.G.named_parameters()}
    resumed = Trainer(_tiny_cfg(tmp_path / "b", **cfg), _tiny_data(), log=lambda *_: None)
    resumed.load_checkpoint(path)
    for _ in range(2):
        resumed.train_step()
    for a, b in zip(resumed.g_ema.shadow, straight.g_ema.shadow):
        assert torch.equal(a, b)
    # a checkpoint of a run without the EMA: the averages start from its G
    plain = {k: v for k, v in tensors.items() if not k.startswith("G_ema.")}
    assert resumed.g_ema.load(plain) is False
    for a, p in zip(resumed.g_ema.shadow, resumed.G.parameters()):
        assert torch.equal(a, p.detach())


def test_levers_make_no_host_sync():
    """The schedules and the EMA update are device ops: no aten._local_scalar_dense (.item())."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastbegan.remedies import GeneratorEMA, anneal_scale, k_floor

    class Record(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    t = _trainer()
    ema = GeneratorEMA(t.G, 0.99)
    step = torch.tensor(7)
    with Record() as rec:
        k_floor(torch.tensor(0.01), 0.05 * anneal_scale(step, 5, 9))
        ema.update(step)
    assert rec.ops and not any("_local_scalar_dense" in o for o in rec.ops)


def test_cli_lever_options(tmp_path, monkeypatch):
    import types

    from click.testing import CliRunner

    import fastbegan.train as train_mod
    from fastbegan.cli import main
    seen = []
    monkeypatch.setattr(train_mod, "train", lambda cfg, **kw: seen.append(cfg) or types.SimpleNamespace(step=0))
    r = CliRunner().invoke(main, ["train", "--device", "cpu", "--out", str(tmp_path / "r"), "--pt-anneal", "10", "20",
                                  "--k-min-anneal", "5", "30", "--ema-decay", "0.99", "--pt-final", "0.02"])
    assert r.exit_code == 0, r.output
    c = seen[-1]
    assert (c.pt_anneal_start, c.pt_anneal_end, c.k_min_anneal_start, c.k_min_anneal_end, c.ema_decay, c.pt_final) == \
        (10, 20, 5, 30, 0.99, 0.02)
    assert CliRunner().invoke(main, ["train", "--device", "cpu", "--out", str(tmp_path / "s")]).exit_code == 0
    from fastbegan.remedies import DEFAULT_VARIANT, VARIANT_PRESETS
    preset = VARIANT_PRESETS[DEFAULT_VARIANT]  # none given: the default variant's own levers
    assert (seen[-1].pt_anneal_end, seen[-1].ema_decay) == (preset["pt_anneal_end"], preset["ema_decay"])
