"""The op set the BEGAN model is written in, and the backend switch.

Every op has two implementations with identical signatures and semantics:

- ``torch``: the pure-PyTorch reference (:mod:`fastbegan.ops.reference`), the CPU path;
- ``triton``: fused Triton kernels registered as ``torch.library`` custom ops
  (:mod:`fastbegan.ops.triton_ops`), for CUDA GPUs (and the Triton interpreter on CPU
  when ``TRITON_INTERPRET=1``, which the tests use).

``set_backend("auto")`` picks ``triton`` on a CUDA GPU that Triton supports, otherwise
``torch`` with a one-time warning. The model calls only the functions below. On triton,
each op falls back per shape to a slower path (down to the torch reference) when a kernel
fails, with one warning line (:mod:`.fallback`, ``set_verify_kernels``).

Layout convention: activations are logical NCHW tensors in channels_last memory format;
weights are logical ``(C_out, C_in, 3, 3)`` tensors (fastbegan's own model keeps them
channels_last too, the layout the kernels read without a copy).
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import warnings

import torch
from torch import Tensor

from fastbegan.kernels import interpreting

from . import fallback, reference
from .fallback import KernelFallbackWarning, KernelFatalError

BACKENDS = ("auto", "torch", "triton")
MIN_TRITON = (3, 6)  # as pyproject.toml requires: the oldest Triton tested (.ci/versions)
_backend = "torch"
_warned = False
_triton_ops = None  # fastbegan.ops.triton_ops, imported once when the backend is selected


def triton_status() -> tuple[bool, str]:
    """(usable, reason): can the Triton backend run here?"""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        return False, f"Triton is not importable ({e.__class__.__name__}: {e})"
    version = str(getattr(triton, "__version__", "0"))
    if _version_tuple(version) < MIN_TRITON:
        return False, (f"Triton {version} is too old (fastbegan needs >= "
                       f"{'.'.join(map(str, MIN_TRITON))}: pip install -U triton)")
    if interpreting():
        return True, "Triton interpreter (TRITON_INTERPRET=1)"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU is available"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"GPU compute capability {major}.{minor} < 8.0 (bf16 tensor cores needed)"
    missing = launcher_toolchain_missing()
    if missing:
        return False, f"Triton cannot build its kernel launchers: missing {' and '.join(missing)}"
    return True, f"CUDA GPU sm_{major}{minor}"


def launcher_toolchain_missing() -> list[str]:
    """What Triton lacks to build its kernel launchers, as Triton looks for it (a C compiler:
    ``$CC``, else gcc or clang; the Python headers of this interpreter); empty if nothing.
    Triton builds a small C module at the first launch on a GPU: without these, every
    kernel would fail there and each op fall back to the reference."""
    import shutil
    import sysconfig
    missing = []
    cc = os.environ.get("CC")
    if not (shutil.which(cc) if cc else (shutil.which("gcc") or shutil.which("clang"))):
        missing.append(f"a C compiler ({'CC=' + cc + ' is not found' if cc else 'no gcc or clang on PATH'}; "
                       "e.g. apt install gcc)")
    scheme = sysconfig.get_default_scheme()
    scheme = "posix_prefix" if scheme == "posix_local" else scheme
    include = sysconfig.get_paths(scheme=scheme)["include"]
    if not os.path.exists(os.path.join(include, "Python.h")):
        missing.append(f"the Python headers ({include}/Python.h; e.g. apt install python3-dev)")
    return missing


def _version_tuple(v: str) -> tuple[int, ...]:
    parts = []
    for p in v.split("+")[0].split(".")[:3]:
        m = re.match(r"\d+", p)
        if not m:
            break
        parts.append(int(m.group()))
    return tuple(parts) or (0,)


def backend_choice(name: str) -> tuple[str, str]:
    """``(backend, why)``: the concrete backend for ``auto|torch|triton`` and, when ``auto``
    fell back to the reference, why (else ""). Raises a clear error on bad input; warns
    nothing (callers that report their choices, like the trainer's start-up lines, say it)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name == "torch":
        return "torch", ""
    ok, why = triton_status()
    if name == "triton" and not ok:
        raise RuntimeError(f"the triton backend cannot run here: {why}. "
                           "Use --backend torch (or auto, which falls back by itself).")
    if name == "auto" and not ok:
        return "torch", why
    if name == "auto" and interpreting():
        return "torch", ""  # the interpreter is for tests: never pick it implicitly
    return "triton", ""


def resolve_backend(name: str) -> str:
    """Map ``auto|torch|triton`` to a concrete backend (:func:`backend_choice`), with a
    one-time warning when ``auto`` falls back to the pure-PyTorch reference."""
    global _warned
    backend, why = backend_choice(name)
    if why and not _warned:
        warnings.warn(f"fastbegan: using the pure-PyTorch backend ({why}).", stacklevel=3)
        _warned = True
    return backend


def set_backend(name: str) -> str:
    """Select the backend for all ops; returns the concrete backend picked."""
    global _backend, _triton_ops
    backend = resolve_backend(name)
    if backend == "triton" and _triton_ops is None:
        # Import here, not per call: dynamo cannot trace importlib (fullgraph=True would break).
        _triton_ops = importlib.import_module("fastbegan.ops.triton_ops")
    _backend = backend
    return _backend


def get_backend() -> str:
    return _backend


def set_verify_kernels(on: bool = True) -> None:
    """Check the first call of every op and shape of the triton backend against the torch
    reference, dropping a kernel path that disagrees (``fastbegan train --verify-kernels``;
    see :mod:`fastbegan.ops.fallback`)."""
    fallback.set_verify(on)


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily switch backend: ``with use_backend("triton"): ...``."""
    prev = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(prev)


def _triton():
    return _triton_ops


def _per_sample(wgrad_scale: Tensor | None, n: int) -> Tensor | None:
    """The Triton kernels take one factor per sample: a per-block scale expanded."""
    return None if wgrad_scale is None else reference.per_sample_scale(wgrad_scale, n)


def conv3x3_elu(x: Tensor, weight: Tensor, bias: Tensor | None, *, upsample: bool = False,
                stride: int = 1, activation: bool = True, skip: Tensor | None = None,
                wgrad_scale: Tensor | None = None) -> Tensor:
    """Fused ``[nearest-upsample 2x] -> [concat skip] -> conv3x3(pad 1, stride) + bias -> [ELU]``.

    x: (N, C_x, H, W) channels_last. skip: optional (N, C_s, H', W') at the conv's input
    resolution (after the upsample), concatenated after x's channels. weight:
    (C_out, C_x + C_s, 3, 3); bias: (C_out,) or None. ``stride`` is 1 or 2 (not with
    ``upsample``). ``wgrad_scale``: optional (N,) tensor that weights sample n's
    contribution to the weight and bias gradients (the input gradient is unscaled), or a
    per-block (G, 1) tensor: the batch is G equal blocks and block g's samples all get
    ``wgrad_scale[g]`` (the fused step's ``[1; -k_t]``; the torch backend then skips the
    scaled copy of the gradient on large layers). The forward value does not depend on
    it. Returns (N, C_out, H'/stride, W'/stride).
    """
    if stride not in (1, 2):
        raise ValueError(f"conv3x3_elu: stride must be 1 or 2, got {stride}")
    if upsample and stride != 1:
        raise ValueError("conv3x3_elu: upsample and stride 2 cannot be combined")
    if _backend == "triton":
        return _triton().conv3x3_elu(x, weight, bias, upsample=upsample, stride=stride,
                                     activation=activation, skip=skip,
                                     wgrad_scale=_per_sample(wgrad_scale, x.shape[0]))
    if wgrad_scale is not None:
        return reference.conv3x3_elu_scaled_ref(x, weight, bias, wgrad_scale, upsample=upsample,
                                                stride=stride, activation=activation, skip=skip)
    return reference.conv3x3_elu_ref(x, weight, bias, upsample=upsample, stride=stride,
                                     activation=activation, skip=skip)


def conv3x3_elu_pair(xa: Tensor, xb: Tensor, weight: Tensor, bias: Tensor | None, *,
                     activation: bool = True, wgrad_scale: Tensor | None = None) -> Tensor:
    """``conv3x3_elu(torch.cat([xa, xb]), weight, bias)`` (stride 1, no upsample, no skip)
    for a batch given as two halves: (Na + Nb, C_out, H, W).

    On triton the concatenation is never formed and the backward computes the input
    gradient only of the halves that need one (D's first conv in the fused step: G(z)
    needs it, the real batch does not). ``wgrad_scale``: (Na + Nb,) or per block, as in
    :func:`conv3x3_elu`.
    """
    if _backend == "triton":
        return _triton().conv3x3_elu_pair(xa, xb, weight, bias, activation=activation,
                                          wgrad_scale=_per_sample(wgrad_scale, xa.shape[0] + xb.shape[0]))
    return conv3x3_elu(torch.cat([xa, xb]), weight, bias, activation=activation,
                       wgrad_scale=wgrad_scale)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, wgrad_scale: Tensor | None = None) -> Tensor:
    """The model's fc layers: ``F.linear`` with the same optional per-sample weight-gradient
    scale as :func:`conv3x3_elu`. One implementation on every backend (a cuBLAS GEMM)."""
    return reference.linear_ref(x, weight, bias, wgrad_scale)


def upsample_nearest2x(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, C, 2H, 2W) nearest. Prefer ``conv3x3_elu(upsample=True)``."""
    if _backend == "triton":
        return _triton().upsample_nearest2x(x)
    return reference.upsample_nearest2x_ref(x)


def l1_recon_loss(x: Tensor, recon: Tensor) -> Tensor:
    """``mean |x - recon|`` as a 0-d fp32 tensor (differentiable in ``recon``)."""
    if _backend == "triton":
        return _triton().l1_recon_loss(x, recon)
    return reference.l1_recon_loss_ref(x, recon)


def began_update(k: Tensor, loss_real: Tensor, loss_fake: Tensor, gamma: float,
                 lambda_k: float) -> tuple[Tensor, Tensor]:
    """``(k_next, M_global)``; see :func:`reference.began_update_ref`. No host sync."""
    if _backend == "triton":
        return _triton().began_update(k, loss_real, loss_fake, gamma, lambda_k)
    return reference.began_update_ref(k, loss_real, loss_fake, gamma, lambda_k)


def conv3x3_l1_pair_began(h: Tensor, weight: Tensor, bias: Tensor | None, x_real: Tensor,
                          x_fake: Tensor, k: Tensor, gamma: float, lambda_k: float, *,
                          wgrad_scale: Tensor | None = None):
    """D's last step: ``recon = conv3x3(h)`` (linear: the decoder's ``to_rgb``), the L1
    losses of both halves and the BEGAN update, as one differentiable op.

    h: (2B, C, H, W) channels_last, the input of D's last conv for ``[x_real; x_fake]``;
    weight (3, C, 3, 3); x_real, x_fake (B, 3, H, W). Returns ``(losses, k_next, M,
    recon)``: ``losses = [L_real, L_fake]`` (a (2,) fp32 tensor with gradients to h, weight,
    bias and both targets), ``k_next``, ``M`` as :func:`began_update`, ``recon`` detached.
    ``wgrad_scale`` (2B,) or per block scales the weight/bias gradients, as in
    :func:`conv3x3_elu`. On triton the L1 gradient ``sign(recon - x) * dL / numel`` is
    computed inside the conv's backward kernels (never written as a tensor).
    """
    if _backend == "triton":
        return _triton().conv3x3_l1_pair_began(h, weight, bias, x_real, x_fake, k, gamma, lambda_k,
                                               wgrad_scale=_per_sample(wgrad_scale, h.shape[0]))
    return reference.conv3x3_l1_pair_began_ref(h, weight, bias, x_real, x_fake, k, gamma,
                                               lambda_k, wgrad_scale)


__all__ = ["BACKENDS", "set_backend", "get_backend", "use_backend", "resolve_backend",
           "triton_status", "launcher_toolchain_missing", "interpreting", "set_verify_kernels", "KernelFallbackWarning",
           "KernelFatalError", "conv3x3_elu", "conv3x3_elu_pair", "linear", "upsample_nearest2x", "l1_recon_loss", "began_update",
           "conv3x3_l1_pair_began"]
