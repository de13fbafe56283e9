"""Swap the BatchNorm layers of an existing model for bounded ones."""

from __future__ import annotations

from torch import nn

from .bounded_batchnorm import BoundedBatchNorm2d

__all__ = ["convert_batchnorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]


def _is_plain_batchnorm2d(module: nn.Module) -> bool:
    return isinstance(module, nn.BatchNorm2d) and not isinstance(module, BoundedBatchNorm2d)


def convert_batchnorm(model: nn.Module, *, bias: bool = False) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``model`` (recursively, in place) by a ``BoundedBatchNorm2d``.

    Each replacement comes from :meth:`BoundedBatchNorm2d.from_batchnorm`: same device, dtype and
    settings, running statistics and ``num_batches_tracked`` carried over, the shift kept when
    ``bias=True``, and the scale logit ``weight`` freshly drawn from ``N(0, 1)`` (the paper's
    initialisation; a plain ``gamma`` has no faithful bounded equivalent). Returns ``model``, or
    the new layer when ``model`` itself is a ``BatchNorm2d``. Optimisers built before the call
    still hold the old parameters: build them afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_batchnorm expects an nn.Module, got {type(model).__name__}")
    if _is_plain_batchnorm2d(model):
        return BoundedBatchNorm2d.from_batchnorm(model, bias=bias)
    for name, child in model.named_children():
        if _is_plain_batchnorm2d(child):
            setattr(model, name, BoundedBatchNorm2d.from_batchnorm(child, bias=bias))
        else:
            convert_batchnorm(child, bias=bias)
    return model


def _swap_class(old: BoundedBatchNorm2d, cls: type, **extra) -> BoundedBatchNorm2d:
    """A ``cls`` layer that takes over ``old``'s parameters and buffers (the same objects).

    Built on the meta device so nothing is allocated, then every parameter and buffer slot is
    pointed at ``old``'s tensor: optimisers built before the swap keep working, and the running
    statistics and ``num_batches_tracked`` are shared rather than copied.
    """
    new = cls(
        old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats,
        device="meta", bias=old.bias is not None, backend=old.backend, **extra,
    )  # fmt: skip
    for name in list(new._parameters):
        setattr(new, name, old._parameters[name])
    for name in list(new._buffers):
        setattr(new, name, old._buffers[name])
    new.train(old.training)
    # The regulariser's attachment travels with the layer (the shift the fused path computes).
    new.attach_penalty(old.penalty_shift)
    return new


def _check_module(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn} expects an nn.Module, got {type(model).__name__}")


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every ``BoundedBatchNorm2d`` of ``model`` (recursively, in place) by a ``SyncBoundedBatchNorm2d``.

    The new layers hold the *same* ``Parameter`` and buffer objects (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so optimisers built before the
    call stay valid; settings, training mode, backend and the receding regulariser's attachment
    carry over. Layers that are already synchronised are left alone. Returns ``model``, or the
    new layer when ``model`` itself is a ``BoundedBatchNorm2d``. Call it before wrapping the model
    in ``DistributedDataParallel``; a regulariser built before the call keeps working through its
    eager fallback, but build it afterwards to keep the fused penalty of the Triton path.
    """
    from .sync_bounded_batchnorm import SyncBoundedBatchNorm2d

    _check_module(model, "convert_sync_batchnorm")
    if isinstance(model, BoundedBatchNorm2d):
        if isinstance(model, SyncBoundedBatchNorm2d):
            return model
        return _swap_class(model, SyncBoundedBatchNorm2d, process_group=process_group)
    for name, child in model.named_children():
        setattr(model, name, convert_sync_batchnorm(child, process_group))
    return model


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert_sync_batchnorm`: ``SyncBoundedBatchNorm2d`` -> ``BoundedBatchNorm2d``.

    Same sharing of parameters and buffers (the same objects), settings and attachments; returns
    ``model``, or the new layer when ``model`` itself is a ``SyncBoundedBatchNorm2d``.
    """
    from .sync_bounded_batchnorm import SyncBoundedBatchNorm2d

    _check_module(model, "revert_sync_batchnorm")
    if isinstance(model, SyncBoundedBatchNorm2d):
        return _swap_class(model, BoundedBatchNorm2d)
    for name, child in model.named_children():
        setattr(model, name, revert_sync_batchnorm(child))
    return model
