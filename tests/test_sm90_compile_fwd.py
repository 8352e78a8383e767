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
import os
from pathlib import Path

import pytest

from testutil import sm90_table

from fastbegan.kernels import aot

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "sm90_resources.json"
FACTORIES = ["fastbegan.kernels.conv3x3:aot_specs", "fastbegan.kernels.conv3x3:aot_specs_fp32"]
# A second Python with another Triton (the GPU machine's 3.6): the same table for it, in
# sm90_resources_triton<version>.json. Unset in CI (one Triton installed there).
OTHER_PYTHON = os.environ.get("FASTBEGAN_AOT_OTHER_PYTHON")


def _base(variant: str) -> str:
    """'upsample@tile16x8/fp32' -> 'upsample'."""
    return variant.split("@")[0].split("/")[0]


@pytest.fixture(scope="module")
def table():
    return sm90_table(FACTORIES, RESULTS,
                      "forward conv3x3 kernels compiled ahead of time for sm_90 (no GPU): registers/thread, "
                      "shared memory/block (bytes), spill bytes (ptxas -v), one row per shipped autotune "
                      "config and variant; bf16 activations and weights (the launcher casts fp32 master "
                      "weights once per call) unless the variant ends in /fp32 (fp32 activations and "
                      "weights); kloop_casts: float conversions inside the K loop of the TTGIR (none "
                      "expected). Written by tests/test_sm90_compile_fwd.py.")


def test_no_weight_cast_in_the_k_loop(table):
    """The launcher passes weights in the activations' dtype, so the TTGIR of every
    forward kernel's K loop has no float conversion (checked in the dump, per config)."""
    rows = [r for r in table if r["kernel"].startswith("conv3x3_fwd")]
    assert rows and all("kloop_casts" in r for r in rows)
    bad = [f"{r['kernel']} {r['variant']} {r['config']}: {r['kloop_casts']}" for r in rows
           if r["kloop_casts"]]
    assert not bad, "\n".join(bad)


def test_k_loop_cast_detector_sees_fp32_weights():
    """Control: the same kernels fed fp32 weights (as launched before the fix) do show the
    per-iteration cast, so the check above can fail."""
    rows = sm90_table(["fastbegan.kernels.conv3x3:aot_specs_cast_control"], None, "")
    assert {r["kernel"] for r in rows} == {"conv3x3_fwd_ptr", "conv3x3_fwd_tma"}
    for r in rows:
        assert any(c.startswith("arith.truncf") for c in r["kloop_casts"]), r


@pytest.mark.skipif(not OTHER_PYTHON, reason="FASTBEGAN_AOT_OTHER_PYTHON (a Python with "
                    "another Triton, e.g. the GPU machine's 3.6) is not set")
def test_other_triton_version():
    info = {}
    rows = aot.compile_table_subprocess(FACTORIES, python=OTHER_PYTHON, info=info)
    aot.write_table(RESULTS.with_name(f"sm90_resources_triton{info['triton_version']}.json"),
                     rows, "forward conv3x3 kernels, as sm90_resources.json, compiled with "
                     f"Triton {info['triton_version']}. Written by tests/test_sm90_compile_fwd.py "
                     "with FASTBEGAN_AOT_OTHER_PYTHON set.", info["triton_version"])
    assert not aot.table_violations(rows), "\n".join(aot.table_violations(rows))
    assert not [r for r in rows if r["kernel"].startswith("conv3x3_fwd") and r["kloop_casts"]]
    control = aot.compile_table_subprocess(["fastbegan.kernels.conv3x3:aot_specs_cast_control"],
                                           python=OTHER_PYTHON)
    assert all(any(c.startswith("arith.truncf") for c in r["kloop_casts"]) for r in control)


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
        configs = conv3x3.PTR_CONFIGS_GPU if kname.endswith("ptr") else conv3x3.TMA_CONFIGS_GPU
        n_wide = sum(c.kwargs["BLOCK_N"] > conv3x3.NARROW_N for c in configs)
        for v in expected:
            rows = [r for r in table if r["kernel"] == kname and _base(r["variant"]) == v]
            n_cfg = len(configs) if v in ("plain", "linear") else n_wide   # narrow: C_out <= 16
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
