"""Research tools (issue 9): interpolation, SWD, factor score, eval report, plots, TensorBoard, CLI.

Everything runs on tiny models (res 16, filters 8) and small image sets on the CPU.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from fastbegan import metrics as Q
from fastbegan.metrics.factors import _decode
from fastbegan.metrics.pyramid import _gauss
from fastbegan.data import FACTORS, procedural_faces, sample_factors


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """FASTBEGAN_CACHE in a temp folder, holding a quickly trained 16x16 factor regressor."""
    d = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("FASTBEGAN_CACHE", str(d))
    est = Q.FactorEstimator.train(16, n_train=256, n_val=64, epochs=2, width=8)
    est.save(Q.FactorEstimator.cache_path(16))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_dir):
    """A 3-step res-16 run trained through the Trainer (procedural faces): its run folder."""
    from fastbegan import ops
    from fastbegan.train import TrainConfig, Trainer
    ops.set_backend("torch")
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(res=16, filters=8, z_dim=8, h=8, batch_size=4, steps=3, n_procedural=64, out=str(out),
                      log_every=1, ckpt_every=3, sample_every=1000, device="cpu", backend="torch")
    data, _ = procedural_faces(64, 16, seed=cfg.seed)
    Trainer(cfg, data, log=lambda m: None).fit(progress=False)
    return out


def _ckpt(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("ckpt_*.safetensors"))[-1]


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


# --------------------------------------------------------------------------- interpolation

def test_inversion_recovers_known_z():
    """Adam on z recovers a known latent: L1 falls >= 20x from the best random start, z within 0.05."""
    from fastbegan.interpolate import invert
    from fastbegan.model import Generator
    torch.manual_seed(0)
    g = Generator(16, 8, 8).eval()
    z_true = torch.rand(3, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
    z_true[0, :3] = torch.tensor([1.0, -1.0, 1.0])      # on the boundary: the clamp must hold it
    with torch.no_grad():
        x = g(z_true)
    inv = invert(g, x, steps=100, lr=0.05, restarts=8, seed=1)
    assert (inv.loss_final < inv.loss_init / 20).all(), (inv.loss_init, inv.loss_final)
    assert (inv.z - z_true).abs().max() < 0.05
    assert inv.z.abs().max() <= 1.0
    assert inv.history[-1] < inv.history[0]
    assert all(p.requires_grad for p in g.parameters())   # G's own flags are restored


def test_lerp_and_rows():
    from fastbegan.interpolate import interpolate_images, interpolate_seeds, lerp_latents
    from fastbegan.model import Generator
    za, zb = torch.zeros(2, 4), torch.ones(2, 4)
    line = lerp_latents(za, zb, 5).view(2, 5, 4)
    assert torch.allclose(line[:, 0], za) and torch.allclose(line[:, -1], zb)
    assert torch.allclose(line[0, 2], torch.full((4,), 0.5))
    with pytest.raises(ValueError):
        lerp_latents(za, zb, 1)
    torch.manual_seed(0)
    g = Generator(16, 8, 8).eval()
    assert interpolate_seeds(g, [(1, 2), (3, 4)], frames=4).shape == (8, 3, 16, 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    imgs, inv = interpolate_images(g, x[:1], x[1:], frames=3, steps=2, restarts=2)
    assert imgs.shape == (5, 3, 16, 16)                     # real, 3 frames, real
    assert torch.equal(imgs[0], x[0]) and torch.equal(imgs[-1], x[1])
    assert inv.z.shape == (2, 8)


# --------------------------------------------------------------------------- SWD

@pytest.fixture(scope="module")
def faces32():
    a, _ = procedural_faces(96, 32, seed=100)
    b, _ = procedural_faces(96, 32, seed=101)
    return a, b


SWD_KW = dict(patches_per_image=32, n_dirs=128)


def test_swd_identical_is_zero_and_real_pairs_small(faces32):
    a, b = faces32
    same = Q.swd(a, a, **SWD_KW)
    assert same.resolutions == [32, 16] and len(same.per_level) == 2
    assert same.mean < 1e-6
    # uint8 NHWC and float NCHW inputs are the same images
    assert Q.swd(a, Q.as_float_images(a), **SWD_KW).mean < 1e-6
    base = Q.swd(a, b, **SWD_KW).mean
    assert 0 < base < 100


def test_swd_sees_brightness_and_shift(faces32):
    a, b = faces32
    base = Q.swd(a, b, **SWD_KW).mean
    x = Q.as_float_images(b)
    bright = Q.swd(a, (x + 0.2).clamp(-1, 1), **SWD_KW).mean
    shifted = Q.swd(a, torch.roll(x, 4, dims=3), **SWD_KW).mean
    assert bright > 5 * base, (bright, base)
    assert shifted > 2 * base, (shifted, base)
    # Karras's per-set normalisation is (by design) nearly blind to a global brightness cast
    per_set = Q.swd(a, (x + 0.2).clamp(-1, 1), normalize="per_set", **SWD_KW).mean
    assert per_set < bright / 5


def test_swd_monotone_in_noise_and_blur(faces32):
    a, _ = faces32
    x = Q.as_float_images(a)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(x.shape, generator=gen)
    by_noise = [Q.swd(a, (x + s * noise).clamp(-1, 1), **SWD_KW).mean for s in (0.0, 0.05, 0.1, 0.2)]
    assert by_noise == sorted(by_noise) and by_noise[0] < 1e-6, by_noise
    blurred, by_blur = x, []
    for _ in range(3):
        blurred = _gauss(blurred)
        by_blur.append(Q.swd(a, blurred, **SWD_KW).mean)
    assert by_blur == sorted(by_blur), by_blur


def test_swd_rejects_mismatched_sets(faces32):
    a, _ = faces32
    small, _ = procedural_faces(4, 16, seed=0)
    with pytest.raises(ValueError):
        Q.swd(a, small)
    with pytest.raises(ValueError):
        Q.swd(a, a, normalize="nope")


def test_laplacian_pyramid_reconstructs():
    x = torch.rand(2, 3, 32, 32)
    pyr = Q.laplacian_pyramid(x)
    assert [p.shape[-1] for p in pyr] == [32, 16]
    assert torch.allclose(pyr[0] + Q.pyr_up(pyr[1]), x, atol=1e-5)


# --------------------------------------------------------------------------- factor score

def _factor_array(n, seed):
    f = sample_factors(n, seed)
    return np.stack([f[k] for k in FACTORS], 1)


def test_factor_comparison_known_cases():
    real, other = _factor_array(512, 1), _factor_array(512, 2)
    good = Q.compare_factors(real, other)
    assert good["factor_score"] > 0.85 and good["recall"] > 0.8 and good["precision"] > 0.8
    assert good["factor_w1_mean"] < 0.05
    one_face = np.repeat(other[:1], 512, 0)
    bad = Q.compare_factors(real, one_face)
    assert bad["factor_score"] < 0.15 and bad["recall"] < 0.05
    assert bad["factor_w1_mean"] > 0.15
    half = other.copy()
    half[:, FACTORS.index("size")] *= 0.5                # only small faces
    cov = Q.compare_factors(real, half)["per_factor"]["size"]["coverage"]
    assert 0.4 < cov < 0.6


def test_circular_wasserstein():
    a, b = np.full(100, 0.05), np.full(100, 0.95)
    assert Q.wasserstein_1d(a, b) == pytest.approx(0.9, abs=0.01)
    assert Q.wasserstein_1d(a, b, circular=True) == pytest.approx(0.1, abs=0.01)
    u = np.random.default_rng(0).random(2000)
    assert Q.wasserstein_1d(u, (u + 0.5) % 1.0, circular=True) < 0.03


def test_factor_estimator_end_to_end(cache_dir):
    """The (cached, quickly trained) regressor: real vs real scores well, one repeated face badly."""
    est = Q.FactorEstimator.load_or_train(16)
    assert set(est.r2) == set(FACTORS)
    a, _ = procedural_faces(128, 16, seed=7)
    b, _ = procedural_faces(128, 16, seed=8)
    pred = est.predict(a)
    assert pred.shape == (128, len(FACTORS)) and (pred >= 0).all() and (pred <= 1).all()
    good = Q.factor_score(est, a, b)
    bad = Q.factor_score(est, a, np.repeat(b[:1], 128, 0))
    assert good["factor_score"] > bad["factor_score"] + 0.4
    assert good["recall"] > bad["recall"] + 0.4
    assert good["render_fidelity"] > 0.8                    # ~0.95 by construction
    noise = np.random.default_rng(0).integers(0, 256, (128, 16, 16, 3), dtype=np.uint8)
    assert Q.factor_score(est, a, noise)["render_fidelity"] < 0.1
    with pytest.raises(ValueError):
        est.predict(procedural_faces(2, 32, seed=0)[0])


# --------------------------------------------------------------------------- fidelity: k-NN precision / recall

def _knn_pr_by_loops(real, fake, k):
    """Kynkaenniemi et al. 2019 written out point by point (the definition, slow)."""
    def radius(points, i):
        d = sorted(float(np.linalg.norm(points[i] - points[j])) for j in range(len(points)) if j != i)
        return d[k - 1]
    rr = [radius(real, i) for i in range(len(real))]
    rf = [radius(fake, i) for i in range(len(fake))]
    prec = np.mean([any(np.linalg.norm(f - r) <= rr[j] for j, r in enumerate(real)) for f in fake])
    rec = np.mean([any(np.linalg.norm(r - f) <= rf[j] for j, f in enumerate(fake)) for r in real])
    return prec, rec


def test_knn_precision_recall_by_hand():
    # 1-NN radii of the real points 0, 1, 3: 1, 1, 2. Fakes 0.5 (inside 0's ball), 10 (outside
    # all), 4.9 (inside 3's): precision 2/3; the fakes' radii 4.4, 5.1, 4.4 cover every real point
    real, fake = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([[0.5], [10.0], [4.9]])
    assert Q.knn_precision_recall(real, fake, k=1) == pytest.approx((2 / 3, 1.0))
    rng = np.random.default_rng(0)
    for k in (1, 3):
        r, f = rng.normal(size=(40, 5)), rng.normal(0.7, 1.3, size=(35, 5))
        want = _knn_pr_by_loops(r, f, k)
        assert Q.knn_precision_recall(torch.tensor(r), torch.tensor(f), k) == pytest.approx(want)
    with pytest.raises(ValueError, match="more than 3 points"):
        Q.knn_precision_recall(torch.zeros(3, 2), torch.zeros(5, 2))


def test_random_features_are_fixed_and_see_fidelity():
    a, _ = procedural_faces(96, 16, seed=3)
    b, _ = procedural_faces(96, 16, seed=4)
    feats = Q.RandomFeatures()
    fa = feats(a)
    assert fa.shape == (96, 2048) and torch.equal(fa, Q.RandomFeatures()(a))   # seeded: the same space
    x = Q.as_float_images(b)
    assert torch.allclose(feats(x), feats(b))                                 # uint8 and float alike
    good = Q.fidelity(a, b, feats)
    assert good["precision"] > 0.8 and good["recall"] > 0.8 and good["n"] == 96
    blurred = _gauss(_gauss(_gauss(x)))
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert Q.fidelity(a, blurred, feats)["precision"] < good["precision"] - 0.3
    assert Q.fidelity(a, noise, feats)["precision"] == 0.0
    one = Q.fidelity(a, x[:1].repeat(96, 1, 1, 1), feats)
    assert one["recall"] < 0.1


def test_factor_regressor_features(cache_dir):
    est = Q.FactorEstimator.load_or_train(16)
    a, _ = procedural_faces(64, 16, seed=7)
    b, _ = procedural_faces(64, 16, seed=8)
    f = est.features(a)
    assert f.shape == (64, 128) and (f >= 0).all()                            # the last hidden ReLU
    with torch.no_grad():                                                     # its head gives predict()
        out = est.net.body[-1](f)
    assert np.allclose(_decode(out), est.predict(a), atol=1e-6)
    good = Q.fidelity(a, b, Q.feature_extractor("factor-regressor", 16))
    bad = Q.fidelity(a, np.repeat(b[:1], 64, 0), est.features)
    assert good["recall"] > bad["recall"] + 0.5
    with pytest.raises(ValueError, match="unknown feature space"):
        Q.feature_extractor("inception", 16)


# --------------------------------------------------------------------------- eval report

def test_eval_report(tiny_run, tmp_path, cache_dir):
    from fastbegan.evaluate import evaluate
    out = tmp_path / "report"
    r = evaluate(_ckpt(tiny_run), out, n=32, swd_patches=16, swd_dirs=64, log=lambda m: None)
    rep = json.loads((out / "report.json").read_text())
    assert rep["step"] == 3 and rep["config"]["res"] == 16
    assert rep["logged"]["step"] == 3 and isinstance(rep["logged"]["M"], float)
    m = rep["measured"]
    assert m["M_global"] == pytest.approx(m["L_real"] + abs(0.5 * m["L_real"] - m["L_fake"]))
    assert rep["swd"]["swd_x1e3_mean"] > 0 and "16" in rep["swd"]["swd_x1e3_per_level"]
    assert rep["swd_real_baseline"]["swd_x1e3_mean"] > 0
    f = rep["factors"]
    assert 0 <= f["factor_score"] <= 1 and set(f["per_factor"]) == set(FACTORS)
    assert 0 <= rep["factors_real_baseline"]["factor_score"] <= 1
    assert 0 <= f["render_fidelity"] <= 1
    assert rep["memorisation"]["ratio"] > 0
    fid = rep["fidelity"]
    assert fid["primary"] == "factor-regressor" and set(fid["spaces"]) == {"factor-regressor", "random-cnn"}
    for v in fid["spaces"].values():
        assert 0 <= v["precision"] <= 1 and 0 <= v["recall"] <= 1 and v["k"] == 3 and v["n"] == 32
        assert 0 <= v["real_baseline"]["precision"] <= 1
    assert rep["health"]["source"] == "fastbegan.health.diagnose_run" and isinstance(rep["health"]["signals"], list)
    md = (out / "report.md").read_text()
    for text in ("SWD x1e3", "factor score", "render fidelity", "precision (factor-regressor features",
                 "recall (random-cnn features", "Training health", "nearest_neighbours.png", "samples.png"):
        assert text in md
    assert _png_size(out / "samples.png") == (8 * 18 + 2, 4 * 18 + 2)     # 32 samples, 8 per row
    assert _png_size(out / "nearest_neighbours.png") == (6 * 18 + 2, 8 * 18 + 2)
    assert _png_size(out / "metrics.png") == (800, 1100)
    assert r["out"] == str(out)


def test_eval_on_image_folder(tmp_path, cache_dir):
    """A run trained on a folder: SWD against training images, no factor score, no held-out ratio."""
    from fastbegan.data import load_folder
    from fastbegan.evaluate import evaluate
    from fastbegan.train import TrainConfig, Trainer
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, f in enumerate(procedural_faces(40, 20, seed=11)[0]):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    cfg = TrainConfig(res=16, filters=8, z_dim=8, h=8, batch_size=4, steps=2, data=str(folder),
                      out=str(tmp_path / "run"), log_every=1, sample_every=1000, device="cpu", backend="torch")
    Trainer(cfg, load_folder(folder, 16)[0], log=lambda m: None).fit(progress=False)
    rep = evaluate(_ckpt(tmp_path / "run"), tmp_path / "ev", n=16, swd_patches=8, swd_dirs=32, log=lambda m: None)
    assert rep["factors"] is None and "procedural" in rep["factors_note"]
    assert rep["real_data"]["reference"] == "random training images"
    assert rep["swd_real_baseline"]["swd_x1e3_mean"] > 0
    assert "ratio" not in rep["memorisation"]
    assert list(rep["fidelity"]["spaces"]) == ["random-cnn"] and rep["fidelity"]["primary"] == "random-cnn"
    assert "n/a" in (tmp_path / "ev" / "report.md").read_text()


def test_eval_health_section(tmp_path):
    """The report's health section is fastbegan.health.diagnose_run's findings, as dicts."""
    from fastbegan import evaluate as E
    rows = [{"step": s, "k": 0.0, "M": 0.1, "loss_real": 0.05, "loss_fake": 0.06, "lr": 1e-4}
            for s in range(0, 450, 50)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    h = E.health_section(tmp_path)
    assert h["source"] == "fastbegan.health.diagnose_run"
    assert [f["kind"] for f in h["signals"]] == ["k_zero"] and h["signals"][0]["since"] == 0
    assert "k_t has been 0" in h["signals"][0]["message"]
    h = E.health_section(tmp_path / "nothing-here")   # no metrics.jsonl: a note, no failure
    assert "signals" not in h and "no metrics.jsonl" in h["note"]


def test_nearest_neighbours_finds_copies():
    from fastbegan.evaluate import nearest_neighbours
    from fastbegan.images import to_unit_range
    train, _ = procedural_faces(40, 16, seed=3)
    q = to_unit_range(train[[7, 21]])
    d, i = nearest_neighbours(q, train, k=3, chunk=16)
    assert i[:, 0].tolist() == [7, 21] and d[:, 0].max() < 1e-3
    assert (d[:, 1] > d[:, 0]).all()


# --------------------------------------------------------------------------- plots and TensorBoard

def test_plot_run_png_and_trainer_hook(tiny_run, tmp_path):
    from fastbegan.plots import plot_run
    assert _png_size(tiny_run / "metrics.png") == (800, 1100)   # written by Trainer.fit()
    path = plot_run(tiny_run, tmp_path / "curves.png")
    assert _png_size(path) == (800, 1100)


def test_plot_draws_an_adapted_gamma_beside_k(tmp_path):
    """Rows with gamma (--k-target) get it on k_t's panel (a right axis): same size, other pixels."""
    from fastbegan.plots import plot_run
    base = {"k": 0.1, "M": 0.2, "loss_real": 0.1, "loss_fake": 0.15, "lr": 1e-4}
    for name, extra in (("fixed", {}), ("adapted", {"gamma": 1.5})):
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, **base, **{k: v + s / 1000 for k, v in extra.items()}}) + "\n"
            for s in range(50, 501, 50)))
        plot_run(run)
        assert _png_size(run / "metrics.png") == (800, 1100)
    with Image.open(tmp_path / "fixed" / "metrics.png") as a, Image.open(tmp_path / "adapted" / "metrics.png") as b:
        assert np.asarray(a).shape == np.asarray(b).shape and (np.asarray(a) != np.asarray(b)).any()


def test_plots_without_matplotlib(tiny_run, monkeypatch):
    from fastbegan.plots import PlotsUnavailable, plot_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotsUnavailable, match=r"pip install matplotlib"):
        plot_run(tiny_run)


def test_tb_writer(tmp_path, monkeypatch):
    from fastbegan.tb import TBWriter
    calls = []

    class FakeWriter:
        def __init__(self, log_dir):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    w = TBWriter(tmp_path / "tb", writer_factory=FakeWriter)
    w.log_row({"step": 7, "k": 0.01, "M": 0.2, "loss_real": 0.3, "loss_fake": 0.1, "lr": 1e-4, "note": "x"})
    w.close()
    assert ("began/k_t", 0.01, 7) in calls and ("began/M_global", 0.2, 7) in calls and calls[-1] == ("close",)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # tensorboard not installed
    off = TBWriter(tmp_path / "tb2")
    assert not off.enabled
    off.log_row({"step": 1, "k": 0.0})
    off.close()
    assert not (tmp_path / "tb2").exists()


def test_trainer_logs_to_tensorboard(tmp_path, monkeypatch):
    """With a (fake) tensorboard importable, fit() writes the logged rows' scalars."""
    from fastbegan.train import TrainConfig, Trainer
    rows = []

    class FakeWriter:
        def __init__(self, log_dir):
            pass

        def add_scalar(self, tag, value, step):
            rows.append((tag, step))

        def flush(self):
            pass

        def close(self):
            pass

    mod = types.ModuleType("torch.utils.tensorboard")
    mod.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", mod)
    cfg = TrainConfig(res=8, filters=4, z_dim=4, h=4, batch_size=2, steps=2, out=str(tmp_path / "r"),
                      log_every=1, sample_every=1000, device="cpu", backend="torch")
    Trainer(cfg, procedural_faces(4, 8, seed=0)[0], log=lambda m: None).fit(progress=False)
    assert ("began/M_global", 1) in rows and ("began/M_global", 2) in rows


# --------------------------------------------------------------------------- CLI

def test_cli_sample_options(tiny_run, tmp_path):
    from fastbegan.cli import main
    ck = str(_ckpt(tiny_run))
    runner = CliRunner()
    r = runner.invoke(main, ["sample", ck, "--grid", "4x2", "--truncate", "0.5", "--seed", "3",
                             "--out", str(tmp_path / "g.png"), "--each", str(tmp_path / "each")])
    assert r.exit_code == 0, r.output
    assert _png_size(tmp_path / "g.png") == (4 * 18 + 2, 2 * 18 + 2)
    files = sorted((tmp_path / "each").glob("sample_*.png"))
    assert len(files) == 8 and _png_size(files[0]) == (16, 16)
    # --each alone writes no grid; the old options still work
    r = runner.invoke(main, ["sample", ck, "--n", "3", "--each", str(tmp_path / "e2")], catch_exceptions=False)
    assert r.exit_code == 0 and len(list((tmp_path / "e2").iterdir())) == 3
    r = runner.invoke(main, ["sample", ck, "--n", "5", "--out", str(tmp_path / "old.png")])
    assert r.exit_code == 0 and _png_size(tmp_path / "old.png") == (3 * 18 + 2, 2 * 18 + 2)
    for args, msg in ((["--grid", "8"], "COLSxROWS"), (["--truncate", "1.5"], "truncate"),
                      (["--grid", "2x2", "--n", "5"], "do not fit")):
        r = runner.invoke(main, ["sample", ck, "--out", str(tmp_path / "x.png"), *args])
        assert r.exit_code != 0 and msg in r.output, r.output


def test_truncated_latents():
    from fastbegan.sampling import parse_grid, sample_z
    z = sample_z(256, 8, seed=4, truncate=0.5)
    assert z.abs().max() <= 0.5 and z.abs().max() > 0.45
    assert torch.equal(sample_z(256, 8, seed=4, truncate=1.0) * 0.5, z)   # same draws, scaled
    assert parse_grid("8x4") == (8, 4)


def test_cli_interpolate(tiny_run, tmp_path):
    from fastbegan.cli import main
    ck = str(_ckpt(tiny_run))
    runner = CliRunner()
    r = runner.invoke(main, ["interpolate", ck, "--seeds", "1", "2", "--seeds", "3", "4", "--frames", "5",
                             "--out", str(tmp_path / "s.png")])
    assert r.exit_code == 0, r.output
    assert _png_size(tmp_path / "s.png") == (5 * 18 + 2, 2 * 18 + 2)
    faces, _ = procedural_faces(2, 40, seed=9)                 # other size: resized on load
    for i, f in enumerate(faces):
        Image.fromarray(f).save(tmp_path / f"f{i}.png")
    r = runner.invoke(main, ["interpolate", ck, "--from-images", str(tmp_path / "f0.png"), str(tmp_path / "f1.png"),
                             "--frames", "4", "--invert-steps", "3", "--restarts", "2",
                             "--out", str(tmp_path / "i.png")])
    assert r.exit_code == 0, r.output
    assert "inversion L1" in r.output
    assert _png_size(tmp_path / "i.png") == (6 * 18 + 2, 18 + 2)
    r = runner.invoke(main, ["interpolate", ck, "--pairs", "2", "--frames", "3", "--invert-steps", "2",
                             "--restarts", "1", "--out", str(tmp_path / "d.png")])
    assert r.exit_code == 0, r.output
    assert _png_size(tmp_path / "d.png") == (5 * 18 + 2, 2 * 18 + 2)
    r = runner.invoke(main, ["interpolate", ck, "--seeds", "1", "2", "--from-images", "a.png", "b.png"])
    assert r.exit_code != 0 and "not both" in r.output


def test_cli_eval_and_plot(tiny_run, tmp_path, cache_dir):
    from fastbegan.cli import main
    runner = CliRunner()
    ck = str(_ckpt(tiny_run))
    r = runner.invoke(main, ["eval", ck, "--n", "16", "--swd-patches", "8", "--swd-dirs", "32", "--no-factors",
                             "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert rep["factors"] is None and "skipped" in rep["factors_note"]
    # FID: a clear message, never a download
    r = runner.invoke(main, ["eval", ck, "--fid-weights", str(tmp_path / "missing.pth")])
    assert r.exit_code == 1 and "does not exist" in r.output
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        r = runner.invoke(main, ["eval", ck, "--fid-weights", str(weights)])
        assert r.exit_code == 1 and "pip install torch-fidelity" in r.output
    r = runner.invoke(main, ["plot", str(tiny_run), "--out", str(tmp_path / "p.png")])
    assert r.exit_code == 0, r.output
    assert _png_size(tmp_path / "p.png") == (800, 1100)
    r = runner.invoke(main, ["plot", str(tmp_path / "nowhere")])
    assert r.exit_code == 1 and "metrics.jsonl" in r.output


def test_ema_weights_in_sample_eval_and_interpolate(tmp_path, cache_dir):
    """A checkpoint with an EMA of G's weights: sample, eval and interpolate use it, --raw
    the trained weights; eval records which and the truncation."""
    from fastbegan.cli import main
    from fastbegan.evaluate import evaluate
    from fastbegan.sampling import generate, load_generator, sample_z
    from fastbegan.train import TrainConfig, Trainer
    cfg = TrainConfig(res=16, filters=8, z_dim=8, h=8, batch_size=4, steps=3, n_procedural=64, out=str(tmp_path / "r"),
                      log_every=1, ckpt_every=3, sample_every=1000, device="cpu", backend="torch", ema_decay=0.5)
    t = Trainer(cfg, procedural_faces(64, 16, seed=0)[0], log=lambda m: None)
    t.fit(progress=False)
    ck = _ckpt(tmp_path / "r")
    ema, raw = load_generator(ck), load_generator(ck, raw=True)
    assert (ema.weights, raw.weights) == ("ema", "raw")
    for a, b, c, d in zip(ema.parameters(), t.g_ema.shadow, raw.parameters(), t.G.parameters()):
        assert torch.equal(a, b) and torch.equal(c, d)
    z = sample_z(4, 8, 0)
    assert not torch.allclose(generate(ema, z), generate(raw, z))
    rep = evaluate(ck, tmp_path / "ev", n=16, swd_patches=8, swd_dirs=32, factors=False, truncate=0.5,
                   log=lambda m: None)
    assert (rep["weights"], rep["truncate"]) == ("ema", 0.5)
    assert "G's EMA weights, z ~ U(-0.5, 0.5)" in (tmp_path / "ev" / "report.md").read_text()
    runner = CliRunner()
    r = runner.invoke(main, ["eval", str(ck), "--n", "16", "--swd-patches", "8", "--swd-dirs", "32", "--no-factors",
                             "--raw", "--out", str(tmp_path / "ev2")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ev2" / "report.json").read_text())["weights"] == "raw"
    for raw_flag in ([], ["--raw"]):
        out = tmp_path / f"s{len(raw_flag)}.png"
        r = runner.invoke(main, ["sample", str(ck), "--n", "4", "--out", str(out), *raw_flag])
        assert r.exit_code == 0, r.output
    assert (tmp_path / "s0.png").read_bytes() != (tmp_path / "s1.png").read_bytes()
    r = runner.invoke(main, ["interpolate", str(ck), "--seeds", "1", "2", "--frames", "3", "--raw",
                             "--out", str(tmp_path / "i.png")])
    assert r.exit_code == 0, r.output
