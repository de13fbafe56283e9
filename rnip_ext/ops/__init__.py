"""Custom operators (``torch.library``): the bounded-BN Triton ops and the channel-gather op."""

from .channel_gather import HAS_C_EXT, channel_gather, channel_gather_many

__all__ = [
    "HAS_C_EXT",
    "channel_gather",
    "channel_gather_many",
]
