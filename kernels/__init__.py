"""Triton kernels of fastbegan (installed as ``fastbegan.kernels``).

Only Triton kernels and their thin launchers live here; dispatch, custom-op
registration, autograd and the fallback chain live in :mod:`fastbegan.ops`.

Modules (one per op family, each: kernels, launchers, autotune configs, AOT specs):

- :mod:`.conv3x3`      forward ``conv3x3_fwd`` (pointer and tensor-descriptor kernels),
  ``upsample_nearest2x_fwd``;
- :mod:`.conv3x3_bwd`  backward ``conv3x3_dgrad`` / ``conv3x3_wgrad`` (and the L1 mode
  ``conv3x3_l1_dgrad`` / ``conv3x3_l1_wgrad``);
- :mod:`.l1_loss`      the BEGAN losses and the k_t / M update;
- :mod:`.common`       what the launchers share (dot precision, layouts, grid limits,
  autotune settings);
- :mod:`.aot`          ahead-of-time sm_90 compilation (resource tables, TTGIR dumps).

:func:`interpreting` is the one place that reads ``TRITON_INTERPRET``.
"""
import os


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``): on CPU
    tensors, in the tests. Triton reads the variable when a kernel module is imported,
    so it must be set before that (tests/testutil.py does)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
