"""--augment-shift (fastbegan.augment): the shift against numpy's edge padding, its gradient,
the draws, and the step with it: D's losses are those of the shifted images, the fused step
(eager and compiled, torch and triton backends) equals the reference step, and a run without
it draws and trains as before."""
import sys

import numpy as np
import pytest
import torch

from fastbegan import augment, ops
from fastbegan.step import FusedStep, ReferenceStep
from fastbegan.train import TrainConfig

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_fused_step import MATCH, _no_compile_fallback, _run_pair, _trainer, _triton_conv_reason  # noqa: E402


def _shift_numpy(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(C, H, W) moved down by dy and right by dx, the gap filled with the edge: np.pad's
    'edge' mode, then the window that starts dy rows above and dx columns left of the copy."""
    c, h, w = img.shape
    p = max(h, w)
    padded = np.pad(img, ((0, 0), (p, p), (p, p)), mode="edge")
    return padded[:, p - dy:p - dy + h, p - dx:p - dx + w]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_translate_equals_edge_padding(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 6, 8, generator=gen).to(dtype).contiguous(memory_format=torch.channels_last)
    shift = torch.tensor([[0, 0], [1, -2], [-3, 4], [5, 7], [-6, -8]])  # up to the whole side
    out = augment.translate(x, shift)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)  # what D's convs read
    for n, (dy, dx) in enumerate(shift.tolist()):
        np.testing.assert_array_equal(out[n].float().numpy(), _shift_numpy(x[n].float().numpy(), dy, dx))


def test_translate_gradient_is_its_adjoint():
    """<translate(x), y> = <x, translate^T(y)>: the gradient sums each output pixel's upstream
    gradient into the input pixel it was copied from (edges collect the repeats)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    shift = torch.tensor([[2, -1], [0, 3], [-4, 0]])
    torch.autograd.gradcheck(lambda t: augment.translate(t, shift), (x,))
    y = torch.randn(3, 2, 5, 5, dtype=torch.float64, generator=gen)
    (augment.translate(x, shift) * y).sum().backward()
    want = torch.zeros_like(x)
    for n, (dy, dx) in enumerate(shift.tolist()):
        for i in range(5):
            for j in range(5):
                want[n, :, min(max(i - dy, 0), 4), min(max(j - dx, 0), 4)] += y[n, :, i, j]
    torch.testing.assert_close(x.grad, want)


def test_max_shift_and_draws():
    assert augment.max_shift(32, 0.0) == 0
    assert augment.max_shift(32, 0.125) == 4 and augment.max_shift(64, 0.125) == 8
    assert augment.max_shift(8, 0.01) == 1  # at least one pixel when on
    s = augment.draw_shifts(4096, 3, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert s.shape == (4096, 4) and s.dtype == torch.int64
    assert set(s.unique().tolist()) == set(range(-3, 4))  # every offset, none beyond


def test_d_view_off_is_the_identity():
    x, f = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    a, b = augment.d_view(x, f, None)
    assert a is x and b is f


@pytest.mark.parametrize("bad", [-0.1, 0.5, 0.9])
def test_config_rejects_a_shift_out_of_range(bad):
    with pytest.raises(ValueError, match="--augment-shift is the largest shift"):
        TrainConfig(res=32, augment_shift=bad)


def test_reference_step_losses_are_those_of_the_shifted_images():
    """One reference step with --augment-shift: its L_real and L_fake equal D's L1 losses on
    the real batch and G(z) shifted by the step's own draws (replayed from the same seed),
    written out here with numpy's edge padding; and they differ from the unshifted losses."""
    t = _trainer(augment_shift=0.25, res=8, batch_size=4)
    replay = _trainer(augment_shift=0.25, res=8, batch_size=4)
    draws = ReferenceStep(replay).draw()  # the same generator state: the step's draws
    assert draws.shift is not None and draws.shift.abs().max() <= 2
    x = ReferenceStep(replay)._images(draws.idx, draws.flip)
    with torch.no_grad():
        fake = replay.G(draws.z)
        shifted = [torch.from_numpy(np.stack([_shift_numpy(img.numpy(), *s) for img, s in
                                              zip(batch, draws.shift[:, cols].tolist())]))
                   for batch, cols in ((x, slice(0, 2)), (fake, slice(2, 4)))]
        want = [float(ops.l1_recon_loss(b, replay.D(b))) for b in shifted]
        plain = [float(ops.l1_recon_loss(b, replay.D(b))) for b in (x, fake)]
    with ops.use_backend("torch"):
        got = t.train_step()
    assert float(got["loss_real"]) == pytest.approx(want[0], abs=1e-6)
    assert float(got["loss_fake"]) == pytest.approx(want[1], abs=1e-6)
    assert abs(want[0] - plain[0]) > 1e-4 and abs(want[1] - plain[1]) > 1e-4


def test_without_it_the_draws_are_unchanged():
    """Off (the default), a step draws indices, flips and z only: the generator ends where it
    did before the option existed, so earlier runs resume and repeat exactly."""
    t = _trainer()
    d = ReferenceStep(t).draw()
    assert d.shift is None
    gen = torch.Generator().manual_seed(0)
    gen.set_state(_trainer().gen.get_state())
    torch.randint(8, (2,), generator=gen)
    torch.rand(2, generator=gen)  # flips
    torch.rand(2, 8, generator=gen)  # z
    assert torch.equal(gen.get_state(), t.gen.get_state())


def test_fused_equals_reference_with_the_shift():
    """The fused step (eager) with --augment-shift equals the reference step: alone, with the
    default variant's levers (pixel terms read G(z) unshifted) and with the terms on D's codes
    (pulling-away, BEGAN-CS, feature matching on codes: they read D's shifted view)."""
    _run_pair("torch", steps=3, augment_shift=0.25)
    _run_pair("torch", steps=3, augment_shift=0.25, atol=3e-5, **MATCH)
    _run_pair("torch", steps=2, augment_shift=0.25, pt_weight=0.1, cs_alpha=0.1, fm_weight=0.2,
              batch_size=4, atol=3e-5)


def test_separate_z_reference_step_runs_with_the_shift():
    """The paper's two draws (reference step only): D's update and G's pass both see shifted
    images; the step runs and its losses are finite."""
    t = _trainer(augment_shift=0.25, separate_z=True)
    with ops.use_backend("torch"):
        vals = t.train_step()
    assert torch.isfinite(vals["loss_real"]) and torch.isfinite(vals["loss_fake"])


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    _triton_conv_reason() is not None, reason=str(_triton_conv_reason())))])
def test_compiled_step_with_the_shift(backend):
    """The shift inside the compiled fused step (a gather in the graph, its draws eager before
    it) with the default variant's levers: equal to the reference step (CPU; triton in the
    interpreter)."""
    with _no_compile_fallback():
        fus, ref = _run_pair(backend, steps=2, step_kw={"compile": True}, augment_shift=0.25, atol=3e-5, **MATCH)
    assert not fus.stepper.forward.pending
    assert isinstance(fus.stepper, FusedStep)
