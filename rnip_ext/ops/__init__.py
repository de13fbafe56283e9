"""Custom operators (``torch.library``): the bounded-BN Triton ops and the channel-gather op."""
