"""fastbegan.flops against hand counts and against the convolutions the model really runs."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastbegan import flops
from fastbegan.model import BEGAN


def test_one_layer_by_hand():
    # conv 4 -> 8 channels, 6x6 output, batch 2: 2 * (4*9) MACs per output, 8*36*2 outputs
    assert flops.conv3x3_flops(4, 8, 6, 6, batch=2) == 2 * 4 * 9 * 8 * 6 * 6 * 2 == 41472
    x = torch.randn(2, 4, 6, 6)
    w = torch.randn(8, 4, 3, 3)
    with FlopCounterMode(display=False) as fc:
        F.conv2d(x, w, padding=1)
    assert fc.get_total_flops() == 41472
    # stride 2: output 3x3
    with FlopCounterMode(display=False) as fc:
        F.conv2d(x, w, padding=1, stride=2)
    assert fc.get_total_flops() == flops.conv3x3_flops(4, 8, 3, 3, batch=2)


class _Conv2dCounter:
    """Sums 2*C_in*9*C_out*H_out*W_out*N over every F.conv2d call (the reference backend's)."""

    def __init__(self):
        self.total, self.calls = 0, 0

    def __call__(self, orig):
        def conv2d(x, weight, *args, **kwargs):
            y = orig(x, weight, *args, **kwargs)
            n, c_out, h, w = y.shape
            assert weight.shape[2:] == (3, 3)
            self.total += 2 * weight.shape[1] * 9 * c_out * h * w * n
            self.calls += 1
            return y
        return conv2d


@pytest.mark.parametrize("res,filters,skip", [(8, 4, False), (16, 4, False), (32, 3, True)])
def test_whole_model_matches_conv_hooks(monkeypatch, res, filters, skip):
    torch.manual_seed(0)
    model = BEGAN(res, filters, z_dim=8, h=8, skip=skip)
    counter = _Conv2dCounter()
    monkeypatch.setattr(F, "conv2d", counter(F.conv2d))
    b = 3
    with torch.no_grad():
        fake = model.G(torch.rand(b, 8) * 2 - 1)
    assert counter.total == flops.generator_forward_flops(res, filters, b, skip=skip)
    assert counter.calls == len(flops.decoder_layers(res, filters, skip=skip))
    counter.total = counter.calls = 0
    with torch.no_grad():
        model.D(fake)
    assert counter.total == flops.discriminator_forward_flops(res, filters, b, skip=skip)
    assert counter.calls == len(flops.encoder_layers(res, filters)) + len(flops.decoder_layers(res, filters))


def test_whole_model_with_linear_and_backward_matches_flop_counter():
    """torch's FlopCounterMode (aten-level, convs and matmuls) agrees, backward included."""
    res, n, b = 16, 4, 2
    torch.manual_seed(0)
    model = BEGAN(res, n, z_dim=8, h=8)
    z = torch.rand(b, 8) * 2 - 1
    with FlopCounterMode(display=False) as fc:
        model.G(z)
    assert fc.get_total_flops() == flops.generator_forward_flops(res, n, b, z_dim=8, include_linear=True)
    x = torch.randn(b, 3, res, res, requires_grad=True)  # so the first conv's input grad is counted
    with FlopCounterMode(display=False) as fc:
        model.D(x).sum().backward()
    fwd = flops.discriminator_forward_flops(res, n, b, h=8, include_linear=True)
    assert fc.get_total_flops() == flops.forward_backward_flops(fwd) == 3 * fwd


def test_train_step_and_default_sizes():
    # step = 3 * (G(B) + D(2B)); filters default to 128 at res >= 128, else 64
    res, b = 64, 16
    g = flops.generator_forward_flops(res, None, b)
    d = flops.discriminator_forward_flops(res, None, 2 * b)
    assert flops.train_step_flops(res, None, b) == 3 * (g + d)
    assert flops.generator_forward_flops(128) == flops.generator_forward_flops(128, 128)
    assert flops.generator_forward_flops(64) == flops.generator_forward_flops(64, 64)
    # res 128, n 128: the decoder's level-4 (128x128) conv pair, per image, by hand
    per_conv = 2 * 128 * 9 * 128 * 128 * 128
    layers = {l.name: l.flops for l in flops.decoder_layers(128, 128)}
    assert layers["dec.L4.conv1+up"] == layers["dec.L4.conv2"] == per_conv
    assert set(flops.flops_table(32, 8, 2)) == {"G_forward", "D_forward", "D_forward_backward", "train_step"}
    # linear layers are a small fraction
    lin = flops.train_step_flops(128, batch=1, include_linear=True) - flops.train_step_flops(128, batch=1)
    assert 0 < lin < 0.01 * flops.train_step_flops(128, batch=1)
