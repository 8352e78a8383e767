"""Shared test constants (imported by tests as ``from testutil import ...``).

Without a CUDA GPU, Triton kernels run in the interpreter on CPU tensors. The variable
must be set before any kernel module is imported (``triton.jit`` reads it then); the
conftest imports this module first. (Not in conftest.py itself: benchmarks/ has a
conftest too, and ``from conftest import`` would pick whichever was imported first.)
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if HAS_CUDA else "cpu"
requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def tiny_trainer(out, data, **overrides):
    """A Trainer for tests: tiny widths, CPU, torch backend, fp32, quiet, no samples (the
    default training step, i.e. the fused one; ``reference_step=True`` for the reference).

    ``data`` is a (N, res, res, 3) uint8 array; res is taken from it. Any TrainConfig
    field can be overridden.
    """
    from fastbegan.train import Trainer, TrainConfig
    cfg = {"res": data.shape[1], "filters": 4, "z_dim": 8, "h": 8, "batch_size": 4, "steps": 6,
           "device": "cpu", "backend": "torch", "precision": "fp32", "out": str(out), "log_every": 2,
           "sample_every": 1000, "ckpt_every": 1000, **overrides}
    return Trainer(TrainConfig(**cfg), data, log=lambda *_: None)


def sm90_table(factories, results_path, what, python=None):
    """Compile the kernel specs of ``factories`` for sm_90 (no GPU needed), write the
    resource table to ``results_path`` (unless None) and return its rows; skips if this
    Triton cannot. ``python``: compile with another interpreter (another Triton)."""
    from fastbegan.kernels import aot
    info = {}
    try:
        rows = aot.compile_table_subprocess(factories, python=python, info=info)
    except aot.Sm90Unavailable as e:
        pytest.skip(f"cannot compile for sm_90 without a GPU here: {e}")
    if results_path is not None:
        path = _table_path(results_path, info.get("triton_version"))
        aot.write_table(path, rows, _held_what(path) or what, info.get("triton_version"))
    return rows


def _held_what(path):
    """The description a table file already holds (None: no file): kept when the table is
    written again, so that a rerun that finds the same rows leaves the file as it was (another
    version's table is first written by the FASTBEGAN_AOT_OTHER_PYTHON tests, with their text)."""
    import json
    from pathlib import Path
    try:
        return json.loads(Path(path).read_text()).get("what")
    except (OSError, ValueError):
        return None


def _table_path(path, version):
    """``path`` for the Triton version it holds already (or a new file); another version's
    table goes beside it, as ``<stem>_triton<version>.json`` (.ci/versions runs the suite
    with the GPU machines' Triton and must not overwrite the main table)."""
    import json
    from pathlib import Path
    path = Path(path)
    try:
        held = json.loads(path.read_text()).get("triton_version")
    except (OSError, ValueError):
        held = None
    if held is None or held == version:
        return path
    return path.with_name(f"{path.stem}_triton{version}{path.suffix}")


# max abs error allowed, relative to the reference's largest magnitude, per activation dtype
# (fp16: operands rounded before the fp32-accumulated dot; bf16: GPU only, docs/design.md §8)
REL_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def assert_close_rel(name, got, want, dtype):
    """``max |got - want| <= REL_TOL[dtype] * max |want|`` (floor 1e-6), with the numbers."""
    assert got.shape == want.shape, (name, tuple(got.shape), tuple(want.shape))
    scale = max(want.abs().max().item(), 1e-6)
    err = (got.float() - want.float()).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"{name}: max error {err:.3g} > {REL_TOL[dtype]} x {scale:.3g}"
