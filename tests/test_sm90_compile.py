"""Hopper resource check without a GPU (docs/design.md §8).

Every shipped autotune config of every forward-kernel variant (kernels/conv3x3.py
``aot_specs``) is compiled ahead of time for ``GPUTarget("cuda", 90, 32)``; registers, spills
and shared memory are read from the cubin (cuobjdump) and ``ptxas -v``. The test fails on
any spill or on shared memory beyond the H100's per-block limit (227 KB), and writes the
table to benchmarks/results/sm90_resources.json.

Compiling runs in a child process without TRITON_INTERPRET (conftest sets it for the
interpreter tests, and interpreted kernels cannot be compiled), in parallel over the CPU
cores; Triton's on-disk cache makes reruns fast.
"""
from pathlib import Path

import pytest

from testutil import sm90_table

from fastbegan.kernels import aot

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "sm90_resources.json"
FACTORIES = ["fastbegan.kernels.conv3x3:aot_specs", "fastbegan.kernels.conv3x3:aot_specs_fp32"]


def _base(variant: str) -> str:
    """'upsample@tile16x8/fp32' -> 'upsample'."""
    return variant.split("@")[0].split("/")[0]


@pytest.fixture(scope="module")
def table():
    return sm90_table(FACTORIES, RESULTS,
                      "forward conv3x3 kernels compiled ahead of time for sm_90 (no GPU): "
                      "registers/thread, shared memory/block (bytes), spill bytes (ptxas -v), "
                      "one row per shipped autotune config and variant; bf16 activations with fp32 "
                      "weights unless the variant ends in /fp32 (fp32 activations and weights). "
                      "Written by tests/test_sm90_compile.py.")


def test_every_shipped_config_compiled(table):
    from fastbegan.kernels import conv3x3
    assert len(table) == len(conv3x3.aot_specs()) + len(conv3x3.aot_specs_fp32())
    kernels = {r["kernel"] for r in table}
    assert {"conv3x3_fwd_ptr", "conv3x3_fwd_tma", "upsample_nearest2x",
            "subpixel_weight"} <= kernels
    for kname in ("conv3x3_fwd_ptr", "conv3x3_fwd_tma"):
        variants = {_base(r["variant"]) for r in table if r["kernel"] == kname}
        expected = set(conv3x3.AOT_VARIANTS) - ({"upsample_9tap"} if kname.endswith("ptr")
                                                else set())
        assert variants == expected, kname
        n_cfg = len(conv3x3.PTR_CONFIGS_GPU if kname.endswith("ptr") else conv3x3.TMA_CONFIGS_GPU)
        for v in expected:
            rows = [r for r in table if r["kernel"] == kname and _base(r["variant"]) == v]
            assert len(rows) >= n_cfg, (kname, v)


def test_no_spills_and_shared_memory_fits_h100(table):
    bad = aot.table_violations(table)
    assert not bad, "\n".join(bad)


def test_hopper_path_uses_tma_and_wgmma(table):
    """The descriptor kernel must really lower to TMA loads and wgmma on sm_90, and the
    pointer kernel at least to wgmma (tensor cores)."""
    for r in table:
        if r["kernel"] == "conv3x3_fwd_tma":
            assert r["uses_tma"] and r["uses_wgmma"], r
        elif r["kernel"] == "conv3x3_fwd_ptr":
            assert r["uses_wgmma"], r
