"""Custom operators (``torch.library``): the bounded-BN ops (Triton kernels) and the channel-gather op.

Importing this package registers every ``torch.ops.rnip_ext`` op; it needs neither Triton (the
bounded-BN ops import it when they first run) nor the compiled extension (``HAS_C_EXT``).
"""

from . import bounded_bn
from .channel_gather import HAS_C_EXT, channel_gather, channel_gather_many

__all__ = [
    "HAS_C_EXT",
    "bounded_bn",
    "channel_gather",
    "channel_gather_many",
]
