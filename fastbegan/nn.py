"""Drop-in modules for other projects: ``fastbegan.nn.Conv2dELU`` (docs/design.md §5).

``Conv2dELU`` is ``[nn.Upsample(2x nearest)] -> nn.Conv2d(c_in, c_out, 3, padding=1[,
stride=2]) -> [nn.ELU()]`` as one fused module. Its parameters are ``nn.Conv2d``'s
(``weight`` (C_out, C_in, 3, 3), ``bias`` (C_out,) or None: same names, shapes, dtypes and
initialisation), so its ``state_dict()`` is that of the conv it replaces;
:meth:`Conv2dELU.from_conv2d` wraps an existing conv's Parameters without a copy. The
forward runs :func:`fastbegan.ops.conv3x3_elu` on the selected backend. Memory format
follows ``nn.Conv2d`` (channels_last in, channels_last out): on the triton backend an NCHW
input costs two activation-sized copies, so run the model in channels_last.
"""
from __future__ import annotations

import math

import torch
import torch.nn as _nn
from torch import Tensor

from . import ops
from .ops import reference

__all__ = ["Conv2dELU", "conv2d_support"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Read once, like the kernels do (triton.jit reads it at import), and dynamo-friendly.
_INTERPRET = ops.interpreting()


def _pair(v, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) for i in t):
        raise ValueError(f"Conv2dELU: {name} must be an int or a pair of ints, got {v!r}")
    return t


def conv2d_support(conv: _nn.Module) -> str | None:
    """``None`` if ``conv`` can be replaced by a :class:`Conv2dELU`, else the reason why not.

    Supported: exactly ``nn.Conv2d`` (not a subclass, whose forward may differ), 3x3 kernel,
    padding 1 (or ``"same"`` at stride 1), stride 1 or 2 (the same in both dimensions),
    dilation 1, groups 1, padding_mode ``"zeros"``, with or without bias, initialised
    (not lazy), no weight parametrization, no hooks on the module.
    """
    if not isinstance(conv, _nn.Conv2d):
        return f"not an nn.Conv2d ({type(conv).__name__})"
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(conv):
        return "weight is parametrized (e.g. weight/spectral norm)"
    if isinstance(conv.weight, _nn.parameter.UninitializedParameter):
        return "lazy module not initialised yet (run one forward first)"
    if type(conv) is not _nn.Conv2d:
        return f"{type(conv).__name__} is a subclass of nn.Conv2d (its forward may differ)"
    if tuple(conv.kernel_size) != (3, 3):
        return f"kernel_size {tuple(conv.kernel_size)} is not 3x3"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation {tuple(conv.dilation)} is not 1"
    if conv.groups != 1:
        return f"groups={conv.groups} (only 1 is supported)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
    stride = tuple(conv.stride)
    if stride not in ((1, 1), (2, 2)):
        return f"stride {stride} is not 1 or 2"
    pad = conv.padding
    if isinstance(pad, str):
        if not (pad == "same" and stride == (1, 1)):
            return f"padding={pad!r} is not 1"
    elif tuple(pad) != (1, 1):
        return f"padding {tuple(pad)} is not 1"
    if _has_hooks(conv):
        return "has forward hooks or pre-hooks (weight_norm/spectral_norm or user hooks)"
    return None


def _has_hooks(m: _nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks
                or getattr(m, "_backward_hooks", None)
                or getattr(m, "_backward_pre_hooks", None))


class Conv2dELU(_nn.Module):
    """``[2x nearest upsample] -> Conv2d(3x3, padding 1, stride 1|2) -> [ELU(alpha=1)]``, fused.

    Args mirror ``nn.Conv2d`` (``kernel_size`` must be 3, ``padding`` 1 or ``"same"``,
    ``stride`` 1 or 2) plus:

    - ``upsample``: nearest-upsample the input 2x first (replaces ``nn.Upsample(
      scale_factor=2)`` before the conv; the upsampled tensor is never materialised on the
      triton backend). Not with stride 2.
    - ``activation``: apply ELU (alpha 1) after the conv (default); ``False`` for a
      bare conv.

    ``forward(input, skip=None)``: ``skip`` is an optional tensor at the conv's input
    resolution, concatenated after ``input``'s channels (``torch.cat([up(x), skip], 1)``)
    without being written out on the triton backend; ``in_channels`` must count both.
    Unbatched (C, H, W) inputs work as with ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=1,
                 bias: bool = True, *, upsample: bool = False, activation: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if _pair(kernel_size, "kernel_size") != (3, 3):
            raise ValueError(f"Conv2dELU: kernel_size must be 3, got {kernel_size!r}")
        stride = _pair(stride, "stride")
        if stride not in ((1, 1), (2, 2)):
            raise ValueError(f"Conv2dELU: stride must be 1 or 2, got {stride}")
        if padding == "same" and stride == (1, 1):
            padding = 1
        if isinstance(padding, str) or _pair(padding, "padding") != (1, 1):
            raise ValueError(f"Conv2dELU: padding must be 1, got {padding!r}")
        if upsample and stride != (1, 1):
            raise ValueError("Conv2dELU: upsample and stride 2 cannot be combined")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        # The nn.Conv2d attributes that code inspecting a model commonly reads.
        self.kernel_size, self.stride, self.padding = (3, 3), stride, (1, 1)
        self.dilation, self.groups, self.padding_mode = (1, 1), 1, "zeros"
        self.upsample, self.activation = bool(upsample), bool(activation)
        factory = {"device": device, "dtype": dtype}
        self.weight = _nn.Parameter(torch.empty((out_channels, in_channels, 3, 3), **factory))
        if bias:
            self.bias = _nn.Parameter(torch.empty(out_channels, **factory))
        else:
            self.register_parameter("bias", None)
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The same initialisation as ``nn.Conv2d`` (He-uniform with a = sqrt(5))."""
        _nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = _nn.init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            _nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_conv2d(cls, conv: _nn.Conv2d, *, upsample: bool = False,
                    activation: bool = True) -> "Conv2dELU":
        """A ``Conv2dELU`` that holds ``conv``'s own ``weight`` and ``bias`` Parameters.

        Raises ``ValueError`` with the reason if ``conv`` is not supported
        (see :func:`conv2d_support`).
        """
        why = conv2d_support(conv)
        if why is not None:
            raise ValueError(f"Conv2dELU.from_conv2d: unsupported conv: {why}")
        m = cls(conv.in_channels, conv.out_channels, 3, stride=conv.stride, padding=1,
                bias=conv.bias is not None, upsample=upsample, activation=activation,
                device="meta", dtype=conv.weight.dtype)
        m.weight = conv.weight
        m.bias = conv.bias
        m.train(conv.training)
        return m

    def forward(self, input: Tensor, skip: Tensor | None = None) -> Tensor:
        unbatched = input.dim() == 3
        if unbatched:
            input = input.unsqueeze(0)
            skip = None if skip is None else skip.unsqueeze(0)
        y = self._forward4d(input, skip)
        return y.squeeze(0) if unbatched else y

    def _forward4d(self, x: Tensor, skip: Tensor | None) -> Tensor:
        kw = dict(upsample=self.upsample, stride=self.stride[0], activation=self.activation,
                  skip=skip)
        if ops.get_backend() != "triton":
            return ops.conv3x3_elu(x, self.weight, self.bias, **kw)
        dev = x.device.type
        if torch.is_autocast_enabled(dev) and x.is_floating_point():
            dt = torch.get_autocast_dtype(dev)
            x = x.to(dt)
            skip = None if skip is None else skip.to(dt)
        # What the kernels do not handle (CPU tensors outside the interpreter, other dtypes)
        # runs the reference math: never an error a plain conv would not raise.
        kernel_ok = (x.dtype in _KERNEL_DTYPES and self.weight.dtype in _KERNEL_DTYPES
                     and (dev == "cuda" or (dev == "cpu" and _INTERPRET)))
        if not kernel_ok:
            return reference.conv3x3_elu_ref(x, self.weight, self.bias, **kw)
        # nn.Conv2d's rule: channels_last in -> channels_last out, otherwise NCHW out.
        keep_cl = (x.is_contiguous(memory_format=torch.channels_last)
                   and not x.is_contiguous())
        # converts an NCHW x to NHWC (a copy); the kernels read a channels_last weight as it
        # is, any other weight layout costs a weight-sized copy per call
        y = ops.conv3x3_elu(x, self.weight, self.bias, **kw)
        return y if keep_cl else y.contiguous()

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size=(3, 3), "
             f"stride={self.stride}, padding=(1, 1)")
        if self.bias is None:
            s += ", bias=False"
        if self.upsample:
            s += ", upsample=True"
        s += ", activation=ELU" if self.activation else ", activation=None"
        return s
