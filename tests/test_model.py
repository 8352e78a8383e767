"""The BEGAN model: shapes, layouts, options, and the BEGAN formulas of the ops."""
import pytest
import torch

from fastbegan import ops
from fastbegan.model import BEGAN, Decoder, Encoder, check_resolution, minibatch_stddev
from fastbegan.ops.reference import conv3x3_elu_ref


@pytest.mark.parametrize("res", [8, 16, 32, 64, 128])
def test_shapes_and_channels_last(res):
    m = BEGAN(res, filters=4, z_dim=8, h=6)
    z = torch.rand(2, 8) * 2 - 1
    x = m.G(z)
    assert x.shape == (2, 3, res, res)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert m.D.encoder(x).shape == (2, 6)
    assert m.D(x).shape == (2, 3, res, res)


def test_architecture_matches_design():
    """res 32 -> 3 levels: encoder widths n, 2n, 3n with stride-2 convs between levels."""
    enc = Encoder(32, n=4, h=5)
    widths = [c.weight.shape[0] for c in enc.convs]
    strides = [c.stride for c in enc.convs]
    assert widths == [4, 4, 4, 4, 8, 8, 8, 12, 12]
    assert strides == [1, 1, 1, 2, 1, 1, 2, 1, 1]
    assert enc.fc.in_features == 12 * 8 * 8
    dec = Decoder(32, n=4, h=5)
    assert [c.upsample for c in dec.convs] == [False, False, True, False, True, False]
    assert dec.to_rgb.activation is False and dec.to_rgb.weight.shape[0] == 3
    assert all(c.activation for c in dec.convs)


@pytest.mark.parametrize("res", [7, 4, 12, 512, 0])
def test_bad_resolution(res):
    with pytest.raises(ValueError, match="power of two"):
        check_resolution(res)


def test_weights_are_channels_last():
    m = BEGAN(16, filters=4)
    for name, p in m.named_parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last), name


def test_skip_and_vanishing_residual():
    torch.manual_seed(0)
    dec = Decoder(32, n=4, h=6, skip=True, vanishing_residual=True)
    assert dec.convs[2].weight.shape[1] == 8  # n channels + n upsampled h0 channels
    z = torch.randn(2, 6)
    dec.carry.fill_(1.0)
    # with carry 1 every level passes its (upsampled) input through: the output is to_rgb
    # of the fc output upsampled twice
    h0 = dec.fc(z).view(-1, 8, 8, 4).permute(0, 3, 1, 2)
    up = torch.nn.functional.interpolate(h0, scale_factor=4, mode="nearest")
    expect = conv3x3_elu_ref(up, dec.to_rgb.weight, dec.to_rgb.bias, activation=False)
    torch.testing.assert_close(dec(z), expect)
    dec.carry.fill_(0.0)
    assert not torch.allclose(dec(z), expect)


def test_model_forward_on_explicit_reference():
    """The model's decoder equals the same computation written with plain torch ops."""
    torch.manual_seed(1)
    dec = Decoder(16, n=3, h=4)
    z = torch.randn(2, 4)
    x = dec.fc(z).view(-1, 8, 8, 3).permute(0, 3, 1, 2)
    F = torch.nn.functional
    for i, c in enumerate(dec.convs):
        if c.upsample:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.elu(F.conv2d(x, c.weight, c.bias, padding=1))
    x = F.conv2d(x, dec.to_rgb.weight, dec.to_rgb.bias, padding=1)
    torch.testing.assert_close(dec(z), x)


def test_l1_and_began_update_formulas():
    x = torch.tensor([[0.5, -1.0], [0.25, 0.0]])
    r = torch.tensor([[0.0, -0.5], [1.0, 0.0]])
    assert ops.l1_recon_loss(x, r).item() == pytest.approx((0.5 + 0.5 + 0.75 + 0.0) / 4)
    gamma, lam = 0.5, 0.001
    for k0, lr_, lf in [(0.0, 0.3, 0.1), (0.0, 0.1, 0.3), (0.9995, 0.8, 0.01), (0.4, 0.2, 0.1)]:
        k, m = ops.began_update(torch.tensor(k0), torch.tensor(lr_), torch.tensor(lf), gamma, lam)
        assert k.item() == pytest.approx(min(1.0, max(0.0, k0 + lam * (gamma * lr_ - lf))), abs=1e-7)
        assert m.item() == pytest.approx(lr_ + abs(gamma * lr_ - lf), abs=1e-7)


# ---------------------------------------------------------------- minibatch stddev (issue 31)
def _stddev_by_hand(x, group):
    """For each sample: the mean over features of the population std over its group of
    ``group`` consecutive samples (a last shorter group), written out with loops."""
    flat = x.double().flatten(1)
    out = []
    for start in range(0, len(flat), group):
        members = flat[start:start + group]
        mean = sum(members) / len(members)
        var = sum((m - mean) ** 2 for m in members) / len(members)
        out += [float((var + 1e-8).sqrt().mean())] * len(members)
    return torch.tensor(out, dtype=torch.float64).unsqueeze(1)


@pytest.mark.parametrize("n,group", [(8, 4), (8, 8), (6, 4), (5, 1), (4, 2)])
def test_minibatch_stddev_by_hand(n, group):
    x = torch.randn(n, 3, 2, 2, generator=torch.Generator().manual_seed(n + group))
    got = minibatch_stddev(x.contiguous(memory_format=torch.channels_last), group)
    assert got.shape == (n, 1) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _stddev_by_hand(x, group), rtol=1e-5, atol=1e-6)


def test_mbstd_code_sees_its_group_only():
    """With --mbstd-group the code of a sample changes when another member of its group
    changes and not when a sample of another group does: a batch [real; fake] with halves
    that are multiples of the group never mixes real and fake statistics."""
    torch.manual_seed(0)
    enc = Encoder(8, 4, 8, mbstd_group=2)
    assert enc.fc_std.weight.shape == (8, 1)
    x = torch.randn(4, 3, 8, 8)
    base = enc(x)
    y = x.clone()
    y[1] += 1.0  # the first group: samples 0 and 1
    moved = enc(y)
    assert (moved[0] - base[0]).abs().max() > 1e-4  # sample 0 sees its partner change
    torch.testing.assert_close(moved[2:], base[2:], rtol=0, atol=0)  # the other group does not
    # off: no statistic, no extra weights, each code a function of its own image only
    plain = Encoder(8, 4, 8)
    assert plain.fc_std is None
    torch.testing.assert_close(plain(y)[0], plain(x)[0], rtol=0, atol=0)


def test_mbstd_code_is_the_plain_code_plus_the_weighted_statistic():
    torch.manual_seed(1)
    enc = Encoder(8, 4, 8, mbstd_group=4)
    x = torch.randn(4, 3, 8, 8)
    feats = x
    for conv in enc.convs:
        feats = conv(feats)
    plain = torch.nn.functional.linear(feats.permute(0, 2, 3, 1).flatten(1), enc.fc.weight, enc.fc.bias)
    want = plain + _stddev_by_hand(feats, 4).float() * enc.fc_std.weight.view(1, -1)
    torch.testing.assert_close(enc(x), want, rtol=1e-5, atol=1e-5)
