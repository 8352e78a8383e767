"""The ``triton`` backend: fused Triton kernels registered as ``torch.library`` custom ops.

Each op lives in its own module (kernel launchers in :mod:`fastbegan.kernels`, custom-op
registration, fake implementation and autograd beside it); this module gathers them
under the names :mod:`fastbegan.ops` dispatches to.
"""
from .triton_conv import conv3x3_elu, upsample_nearest2x  # noqa: F401
from .triton_loss import began_update, l1_recon_loss  # noqa: F401
from .triton_conv_l1 import conv3x3_l1_pair_began  # noqa: F401
from .triton_conv_pair import conv3x3_elu_pair  # noqa: F401
