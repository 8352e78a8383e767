"""fastbegan.images: the one uint8 -> [-1, 1] conversion."""
import numpy as np
import torch

from fastbegan.images import to_uint8, to_unit_range


def test_flip_on_uint8_equals_flip_after_conversion():
    u = torch.randint(0, 256, (4, 5, 6, 3), dtype=torch.uint8)
    flip = torch.tensor([True, False, True, False])
    got = to_unit_range(u, flip)
    plain = to_unit_range(u)
    want = torch.where(flip.view(-1, 1, 1, 1), plain.flip(3), plain)
    assert torch.equal(got, want) and got.shape == (4, 3, 5, 6)
    assert not torch.equal(got, plain)


def test_numpy_input_and_round_trip():
    a = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
    x = to_unit_range(a)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), a)
