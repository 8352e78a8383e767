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
import inspect
import os


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``): on CPU
    tensors, in the tests. Triton reads the variable when a kernel module is imported,
    so it must be set before that (tests/testutil.py does)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _patch_interpreter_scalars() -> bool:
    """Let older interpreters run loops with runtime bounds under NumPy >= 2.4.

    The interpreter holds a scalar as a 1-element array, and Triton 3.6's converts it for
    ``range(...)`` with ``int(array)``, which NumPy 2.4 rejects ("only 0-dimensional
    arrays can be converted to Python scalars"): every kernel with a K loop failed there.
    Later Tritons squeeze the array first; this gives 3.6 the same conversion. Returns
    whether it patched (only an interpreter with the old conversion is touched)."""
    try:
        from triton.runtime import interpreter
        patch_tensor = interpreter._patch_lang_tensor
        if "int(self.handle.data)" not in inspect.getsource(patch_tensor):
            return False
    except Exception:  # another Triton layout: leave it as it is
        return False

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patched
    return True


if interpreting():
    _patch_interpreter_scalars()
