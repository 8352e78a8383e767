"""Hopper resource check of the conv3x3_elu backward kernels, without a GPU (docs/design.md §8).

Every shipped autotune config of the dgrad and wgrad kernels, in each variant (plain,
upsample / sub-pixel, stride 2; bf16 activations, and fp32 activations with the halved K
block the autotuner's prune step gives them), plus the dgrad weight-prep and the split-K
reduction kernels, is compiled ahead of time for ``GPUTarget("cuda", 90, 32)`` with
:mod:`fastbegan.kernels.aot`. The test fails on any register spill or on shared memory
beyond the H100's per-block limit (232448 bytes), and writes the table to
benchmarks/results/sm90_resources_bwd.json.

The compile runs in a child process without TRITON_INTERPRET (interpreted kernels cannot
be compiled), in parallel over the CPU cores; Triton's on-disk cache makes reruns fast.
"""
import os
from pathlib import Path

import pytest

from testutil import sm90_table

from fastbegan.kernels import aot
from fastbegan.kernels import conv3x3_bwd

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "sm90_resources_bwd.json"
FACTORIES = ["fastbegan.kernels.conv3x3_bwd:aot_specs", "fastbegan.kernels.conv3x3_bwd:aot_specs_fp32"]


@pytest.fixture(scope="module")
def table():
    return sm90_table(FACTORIES, RESULTS,
                      "conv3x3_elu backward kernels (kernels/conv3x3_bwd.py) compiled ahead of time "
                      "for sm_90 (no GPU): registers/thread, shared memory/block (bytes), spill bytes "
                      "(ptxas -v); one row per shipped autotune config and variant, bf16 activations "
                      "unless the variant ends in /fp32 (fp32 activations, TF32 dots, BLOCK_K halved "
                      "as the autotuner's prune does). dgrad/wgrad with ELU, except variant l1 (the "
                      "decoder's last conv fused with the L1 losses: no ELU, dpre from y and the "
                      "targets, fake-target gradient written by dgrad); wgrad with per-sample "
                      "scale and bias. Written by tests/test_sm90_compile_bwd.py.")


def test_every_shipped_config_compiled(table):
    assert len(table) == len(conv3x3_bwd.aot_specs()) + len(conv3x3_bwd.aot_specs_fp32())
    for kname, configs, variants in (
            ("conv3x3_dgrad", conv3x3_bwd.aot_dgrad_configs(False), {"plain", "upsample", "stride2"}),
            ("conv3x3_wgrad", conv3x3_bwd.WGRAD_CONFIGS, {"plain", "subpixel", "stride2"})):
        for v in variants:
            rows = [r for r in table if r["kernel"] == kname and r["variant"] == v]
            assert len(rows) == len(configs), (kname, v)
    # every shipped dgrad config is compiled in some variant
    cfgs = {tuple(sorted(r["config"].items())) for r in table if r["kernel"] == "conv3x3_dgrad"
            and "/" not in r["variant"]}
    assert len(cfgs) == len(conv3x3_bwd.DGRAD_CONFIGS)
    # the L1 mode (last conv fused with the losses): the configs kept for 3 output channels
    for kname, configs, fits in (("conv3x3_dgrad", conv3x3_bwd.DGRAD_CONFIGS, conv3x3_bwd._dgrad_fits),
                                 ("conv3x3_wgrad", conv3x3_bwd.WGRAD_CONFIGS, conv3x3_bwd._wgrad_fits)):
        rows = [r for r in table if r["kernel"] == kname and r["variant"] == "l1"]
        assert len(rows) == sum(fits(c, 128, 3) for c in configs) >= 1, kname
    assert {"conv3x3_dgrad_weight", "conv3x3_wgrad_reduce"} <= {r["kernel"] for r in table}


def test_no_spills_and_shared_memory_fits_h100(table):
    bad = aot.table_violations(table)
    assert not bad, "\n".join(bad)


def test_tensor_cores_on_hopper(table):
    """Every dgrad/wgrad config whose M block is a multiple of 64 lowers to wgmma."""
    for r in table:
        if r["kernel"] in ("conv3x3_dgrad", "conv3x3_wgrad") and r["config"]["BLOCK_M"] >= 64:
            assert r["uses_wgmma"], r


@pytest.mark.skipif(not os.environ.get("FASTBEGAN_AOT_OTHER_PYTHON"),
                    reason="FASTBEGAN_AOT_OTHER_PYTHON (a Python with another Triton, e.g. the "
                    "GPU machine's 3.6) is not set")
def test_other_triton_version():
    info = {}
    rows = aot.compile_table_subprocess(FACTORIES, python=os.environ["FASTBEGAN_AOT_OTHER_PYTHON"],
                                        info=info)
    v = info["triton_version"]
    aot.write_table(RESULTS.with_name(f"sm90_resources_bwd_triton{v}.json"), rows,
                    f"backward kernels, as sm90_resources_bwd.json, compiled with Triton {v}. "
                    "Written by tests/test_sm90_compile_bwd.py with FASTBEGAN_AOT_OTHER_PYTHON set.",
                    v)
    assert not aot.table_violations(rows), "\n".join(aot.table_violations(rows))
