"""Launch plumbing of the Triton kernels, checked on CPU: grid limits at the largest
shapes, the device guard for ``cuda:N``, the autotune cache setting.

The grid functions are pure host code, so they are checked at batch 256, res 256 for
every layer of the model (n = 128) and every shipped config, without a GPU: no axis may
exceed CUDA's limits (axis 0: 2**31 - 1 programs; axes 1 and 2: 65,535). Before the fold
the dgrad grid put cdiv(N*H*W, BLOCK_M) on axis 1: 2**24 / 64 = 262,144 at this size.
"""
from __future__ import annotations

import contextlib
import inspect

import pytest
import torch
import triton

from fastbegan.kernels import common, conv3x3, conv3x3_bwd, interpreting

BATCH, RES, N_FILTERS = 256, 256, 128


def _model_layers():
    """(C_in, C_out, H_out, W_out, upsample, stride) of every conv of G and D at RES."""
    n, levels = N_FILTERS, RES.bit_length() - 3       # res 256: 6 levels, 256^2 .. 8^2
    layers = [(3, n, RES, RES, False, 1)]             # encoder's first conv
    for i in range(1, levels + 1):
        r = RES >> (i - 1)
        layers += [(n * max(i - 1, 1), n * i, r, r, False, 1), (n * i, n * i, r, r, False, 1)]
        if i < levels:
            layers.append((n * i, n * i, r // 2, r // 2, False, 2))
    for i in range(levels):                           # decoder / generator
        r = 8 << i
        layers += [(n, n, r, r, i > 0, 1), (n, n, r, r, False, 1)]
    layers.append((n, 3, RES, RES, False, 1))          # to_rgb
    return layers


def _within_limits(grid):
    assert len(grid) <= 3
    return all(1 <= g <= lim for g, lim in zip(grid, common.MAX_GRID))


def test_forward_grids_fit_cuda_limits_at_batch_256_res_256():
    for c_in, c_out, h, w, up, stride in _model_layers():
        for cfg in conv3x3.PTR_CONFIGS_GPU:
            g = conv3x3.ptr_grid(BATCH * h * w, c_out)(cfg.kwargs)
            assert _within_limits(g), (c_in, c_out, h, w, cfg, g)
        h_t, w_t = (h // 2, w // 2) if up else (h, w)
        for cfg in conv3x3.TMA_CONFIGS_GPU:
            g = conv3x3.tma_grid(BATCH, h_t, w_t, 4 if up else 1, c_out)(cfg.kwargs)
            assert _within_limits(g), (c_in, c_out, h, w, cfg, g)
        g = conv3x3.upsample_grid(BATCH * h * w, c_in, 64, 64)
        assert _within_limits(g)


def test_backward_grids_fit_cuda_limits_at_batch_256_res_256():
    for c_in, c_out, h, w, up, stride in _model_layers():
        hs, ws = (h // 2, w // 2) if up else (h * stride, w * stride)   # the source's size
        if stride == 2:
            m, phases = BATCH * triton.cdiv(hs, 2) * triton.cdiv(ws, 2), 4
        else:
            m, phases = BATCH * hs * ws, 1
        for cfg in conv3x3_bwd.DGRAD_CONFIGS:
            g = conv3x3_bwd.dgrad_grid(c_in, m, phases)(cfg.kwargs)
            assert _within_limits(g), (c_in, c_out, h, w, cfg, g)
        taps = 16 if up else 9
        k = BATCH * hs * ws if up else BATCH * h * w
        tiles = triton.cdiv(c_out, 128) * taps * triton.cdiv(c_in, 128)
        for split in (None, 10**6):                   # the heuristic, and an absurd request
            s, _ = conv3x3_bwd._wgrad_split(k, tiles, torch.device("cuda"), split) \
                if split else conv3x3_bwd._wgrad_split(k, tiles, torch.device("cpu"), 4096)
            for cfg in conv3x3_bwd.WGRAD_CONFIGS:
                g = conv3x3_bwd.wgrad_grid(c_out, c_in, taps, s)(cfg.kwargs)
                assert _within_limits(g), (c_in, c_out, h, w, cfg, g)


def test_unfolded_dgrad_grid_would_break_the_limit():
    """The reason for the fold: the old grid's axis 1 at batch 256, res 256."""
    m = BATCH * RES * RES
    assert triton.cdiv(m, 128) > common.MAX_GRID[1]
    g = conv3x3_bwd.dgrad_grid(128, m, 1)({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64})
    assert g[1] == 1 and g[0] == triton.cdiv(m, 128)


def test_check_grid_raises_a_clear_error():
    with pytest.raises(ValueError, match="exceeds CUDA's limit of 65535 programs on axis 1"):
        common.check_grid((1, 70000, 1), "conv3x3_dgrad")
    assert common.check_grid((2**31 - 1, 65535, 65535), "x") == (2**31 - 1, 65535, 65535)


# ----------------------------------------------------------------------------------------
# device guard
# ----------------------------------------------------------------------------------------
def test_device_guard_selects_the_tensors_gpu():
    """cuda:N -> torch.cuda.device(N) (constructing it touches no GPU); CPU -> no-op."""
    g = common.device_guard(torch.device("cuda", 1))
    assert isinstance(g, torch.cuda.device) and g.idx == 1
    assert common.device_guard(torch.device("cuda", 0)).idx == 0
    assert isinstance(common.device_guard(torch.zeros(1)), contextlib.nullcontext)
    assert isinstance(common.device_guard("cpu"), contextlib.nullcontext)


@pytest.mark.skipif(not interpreting(), reason="records the CPU (interpreter) launches")
def test_every_op_launches_under_the_device_guard(monkeypatch, one_thread):
    """Each custom op of the triton backend enters the guard with its inputs' device
    before launching (the ops tested here cover every module that launches kernels)."""
    from fastbegan import ops
    from fastbegan.ops import triton_conv, triton_conv_bwd, triton_conv_l1, triton_loss
    seen = []

    def spy(dev):
        seen.append(torch.device(dev.device if isinstance(dev, torch.Tensor) else dev).type)
        return contextlib.nullcontext()
    for mod in (triton_conv, triton_conv_bwd, triton_conv_l1, triton_loss):
        monkeypatch.setattr(mod, "device_guard", spy)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 4, 4, generator=g).contiguous(memory_format=torch.channels_last)
    w1 = (0.3 * torch.randn(4, 4, 3, 3, generator=g)).requires_grad_()
    w2 = (0.3 * torch.randn(3, 4, 3, 3, generator=g)).requires_grad_()
    xr, xf = torch.rand(1, 3, 4, 4, generator=g), torch.rand(1, 3, 4, 4, generator=g)
    with ops.use_backend("triton"):
        h = ops.conv3x3_elu(x.requires_grad_(), w1, None)
        losses, *_ = ops.conv3x3_l1_pair_began(h, w2, None, xr, xf, torch.zeros(()), 0.5, 1e-3)
        losses.sum().backward()
        ops.upsample_nearest2x(x.detach())
    # conv; l1 conv + losses; l1 dgrad, l1 wgrad; conv dgrad, conv wgrad; upsample
    assert len(seen) == 8 and set(seen) == {"cpu"}


def test_autotune_results_cached_where_triton_supports_it():
    has = "cache_results" in inspect.signature(triton.autotune).parameters
    assert common.AUTOTUNE_CACHE == ({"cache_results": True} if has else {})
    if has and not interpreting():
        assert conv3x3.conv3x3_fwd_ptr_kernel.cache_results
        assert conv3x3_bwd.conv3x3_dgrad_kernel.cache_results


def test_autotune_cap_keeps_the_first_fitting_configs(monkeypatch):
    """FASTBEGAN_AUTOTUNE_MAX=N: the first N configs that fit the shape (lists are written
    best-first), for every prune function; 0 keeps them all."""
    monkeypatch.setattr(common, "AUTOTUNE_MAX", 2)
    ptr = conv3x3._prune_ptr(conv3x3.PTR_CONFIGS_GPU, {"C_out": 128})
    assert ptr == [c for c in conv3x3.PTR_CONFIGS_GPU if c.kwargs["BLOCK_N"] > 16][:2]
    narrow = conv3x3._prune_ptr(conv3x3.PTR_CONFIGS_GPU, {"C_out": 3})
    assert [c.kwargs["BLOCK_N"] for c in narrow] == [16, 16]
    d = conv3x3_bwd._prune_dgrad(conv3x3_bwd.DGRAD_CONFIGS,
                                 {"C": 128, "Co": 3, "y_ptr": torch.zeros(1, dtype=torch.bfloat16)})
    assert len(d) == 2 and all(c.kwargs["BLOCK_K"] == 16 for c in d)
    monkeypatch.setattr(common, "AUTOTUNE_MAX", 0)
    assert len(conv3x3._prune_ptr(conv3x3.PTR_CONFIGS_GPU, {"C_out": 128})) == 4


def test_three_output_channels_get_narrow_tiles():
    """C_out = 3 (to_rgb): forward BLOCK_N = 16 only, on both kernels; its dgrad (K = 9 x 3)
    BLOCK_K = 16 only; wide layers never get the narrow configs."""
    bf16 = torch.zeros(1, dtype=torch.bfloat16)
    for prune, configs in ((conv3x3._prune_ptr, conv3x3.PTR_CONFIGS_GPU),
                           (conv3x3._prune_tma, conv3x3.TMA_CONFIGS_GPU)):
        args = dict(C_x=128, C_s=0, X_PHASE=False, S_PHASE=False)
        narrow = prune(configs, dict(args, C_out=3))
        wide = prune(configs, dict(args, C_out=128))
        assert narrow and {c.kwargs["BLOCK_N"] for c in narrow} == {16}
        assert wide and min(c.kwargs["BLOCK_N"] for c in wide) >= 64
    d3 = conv3x3_bwd._prune_dgrad(conv3x3_bwd.DGRAD_CONFIGS, {"C": 128, "Co": 3, "y_ptr": bf16})
    assert {c.kwargs["BLOCK_K"] for c in d3} == {16}
    assert max(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] for c in d3) == 128 * 128
    d128 = conv3x3_bwd._prune_dgrad(conv3x3_bwd.DGRAD_CONFIGS,
                                    {"C": 128, "Co": 128, "y_ptr": bf16})
    assert min(c.kwargs["BLOCK_K"] for c in d128) >= 32
    # the encoder's first conv: 3 source channels, no config fits -> the small fallback
    assert conv3x3_bwd._prune_dgrad(conv3x3_bwd.DGRAD_CONFIGS,
                                    {"C": 3, "Co": 128, "y_ptr": bf16}) == \
        conv3x3_bwd.DGRAD_CONFIGS[-1:]
