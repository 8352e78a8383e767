"""Public functional API: ``fastbegan.functional.conv3x3_elu`` (see :mod:`fastbegan.ops`)."""
from .ops import conv3x3_elu, l1_recon_loss, upsample_nearest2x, began_update

__all__ = ["conv3x3_elu", "upsample_nearest2x", "l1_recon_loss", "began_update"]
