"""Swap the BatchNorm layers of an existing model for bounded ones (keeping what it computes)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .._validation import check_number
from . import fold as _fold
from .bounded_batchnorm import BoundedBatchNorm2d
from .norm_act import BoundedBatchNormAct2d, SyncBoundedBatchNormAct2d, is_norm_act
from .sync_bounded_batchnorm import SyncBoundedBatchNorm2d

__all__ = ["convert_batchnorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]

MODES = ("exact", "eval", "fresh")
# BatchNorm subclasses whose forward is act(drop(batch_norm(x))), read from their source: they
# become norm-activation layers. Any other subclass with its own forward is refused.
NORM_ACT_CLASSES = {
    "timm.layers.norm_act.BatchNormAct2d",
    "timm.models.layers.norm_act.BatchNormAct2d",
    "timm.layers.norm_act.SyncBatchNormAct",
    "timm.models.layers.norm_act.SyncBatchNormAct",
}


def _replacement(module: nn.Module, name: str) -> type | None:
    """The bounded class that replaces ``module``, None to leave it; TypeError for a subclass we
    cannot convert without changing what it computes."""
    if isinstance(module, BoundedBatchNorm2d):
        return None
    cls = type(module)
    for base, plain, fused in ((nn.SyncBatchNorm, SyncBoundedBatchNorm2d, SyncBoundedBatchNormAct2d),
                               (nn.BatchNorm2d, BoundedBatchNorm2d, BoundedBatchNormAct2d)):
        if not isinstance(module, base):
            continue
        if cls.forward is base.forward:
            return plain
        if f"{cls.__module__}.{cls.__qualname__}" in NORM_ACT_CLASSES and is_norm_act(module):
            return fused
        raise TypeError(
            f"'{name or type(module).__name__}' is a {cls.__qualname__}, a {base.__name__} subclass with its own "
            f"forward: convert_batchnorm cannot tell what a bounded replacement must compute. Known "
            f"norm-activation layers (timm's BatchNormAct2d) become BoundedBatchNormAct2d; replace this "
            f"layer by an nn.{base.__name__} plus separate modules for what its forward adds"
        )
    return None


def _targets(model: nn.Module) -> dict[str, tuple[nn.Module, type]]:
    """Every BatchNorm to replace, by qualified name (not looking inside the replaced layers)."""
    found: dict[str, tuple[nn.Module, type]] = {}

    def visit(module: nn.Module, name: str) -> None:
        cls = _replacement(module, name)
        if cls is not None:
            hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)
            if any(hooks):
                raise ValueError(f"BatchNorm '{name or type(module).__name__}' has hooks, which its bounded "
                                 "replacement would not carry: remove them, convert, then register them again")
            found[name] = (module, cls)
            return
        for child_name, child in module.named_children():
            visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    return found


def _bounded(bn: nn.Module, cls: type, bias: bool) -> BoundedBatchNorm2d:
    """A ``cls`` layer with ``bn``'s settings, running statistics, training mode, ``requires_grad``
    and (for norm-activation and synchronised layers) children and process group; ``weight`` ~ N(0, 1)
    and ``bias`` a copy of ``beta`` (or 0), as :meth:`BoundedBatchNorm2d.from_batchnorm`."""
    ref = bn.weight if bn.weight is not None else bn.running_mean
    extra = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    if issubclass(cls, SyncBoundedBatchNorm2d):
        extra["process_group"] = bn.process_group
    if issubclass(cls, (BoundedBatchNormAct2d, SyncBoundedBatchNormAct2d)):
        extra.update(act=bn.act, drop=bn.drop)
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
              bias=bias and bn.affine, **extra)
    with torch.no_grad():
        if bn.track_running_stats and bn.running_mean is not None:
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
        if new.bias is not None and bn.bias is not None:
            new.bias.copy_(bn.bias)
    for name in ("weight", "bias"):
        if getattr(new, name) is not None and getattr(bn, name) is not None:
            getattr(new, name).requires_grad_(getattr(bn, name).requires_grad)
    new.train(bn.training)
    return new


def _put(model: nn.Module, layers: dict[str, nn.Module]) -> None:
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


def _check_arguments(model, mode, bias, headroom) -> None:
    _check_module(model, "convert_batchnorm")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if bias is not None and not isinstance(bias, bool):
        raise TypeError(f"bias must be True, False or None, got {bias!r}")
    check_number("headroom", headroom, 1, low_open=True)


def _dropped_shifts(targets: dict[str, tuple[nn.Module, type]]) -> None:
    """``bias=False`` keeps the function only where every ``beta`` is 0."""
    shifted = [name for name, (bn, _) in targets.items() if bn.bias is not None and bool(bn.bias.detach().ne(0).any())]
    if shifted:
        raise ValueError(
            f"bias=False would drop the nonzero shift beta of {len(shifted)} BatchNorm layer(s) "
            f"({', '.join(repr(n) for n in shifted[:5])}{', ...' if len(shifted) > 5 else ''}) and change what the "
            "model computes: keep bias=None (a shift where the function needs one) or use mode='fresh'"
        )


def convert_batchnorm(model: nn.Module, *, mode: str = "exact", bias: bool | None = None,
                      headroom: float = 2.0) -> nn.Module:
    r"""Replace every BatchNorm2d of ``model`` (recursively, in place) by a bounded one.

    ``nn.BatchNorm2d`` becomes :class:`BoundedBatchNorm2d`, ``nn.SyncBatchNorm``
    :class:`SyncBoundedBatchNorm2d` (4-D inputs only), timm's ``BatchNormAct2d`` (and
    ``SyncBatchNormAct``) :class:`BoundedBatchNormAct2d` (:class:`SyncBoundedBatchNormAct2d`) with the
    same ``drop`` and ``act`` modules. Settings, device, dtype, running statistics,
    ``num_batches_tracked``, training mode and ``requires_grad`` carry over. Bounded layers,
    ``BatchNorm1d``/``3d`` and the rest are left alone; a subclass with its own forward is refused
    (``TypeError``), and so is a BatchNorm with hooks (``ValueError``).

    ``mode="exact"`` (default): the model computes what it computed, in training and in eval mode,
    to float rounding. Per layer, ``gamma * xhat + beta = c * (|gamma|/c * sign(gamma) xhat + beta/c)``
    with ``c = headroom * max |gamma|`` shared by the BatchNorms whose outputs meet (residual
    additions, concatenations): ``weight = logit(|gamma| / c)`` (so a channel with tiny ``|gamma|``
    reads as receded; ``|gamma|/c`` is floored at ``finfo.eps ** 2``), ``bias = beta / c``, the sign of
    ``gamma`` moves into the convolution producing the input (its output channel) and the running
    mean, and ``c`` into the next convolutions or linear layers, through ReLU, pooling, dropout,
    reshapes, sums and concatenations (``ReLU6``/``Hardtanh`` become ``Hardtanh`` with bounds ``/ c``;
    a BatchNorm reached by ``c`` takes it into its running statistics and ``eps``). Needs a
    ``torch.fx``-traceable model (see :mod:`rnip_ext.nn.fold`). Exactness is impossible, and a
    ``ValueError`` lists each such layer before anything changes, where (a) a layer with
    ``|gamma| >= 1`` feeds an operation that is not positively homogeneous (SiLU, GELU, Hardswish,
    sigmoid, the model's output...) before any convolution: there ``c = 1`` and
    ``weight = logit(|gamma|)`` is used when every ``|gamma| < 1``; (b) a layer with negative
    gammas reads no convolution of its own (after a concatenation or addition, a convolution
    whose output is read twice); (c) ``bias=False`` would drop a nonzero ``beta``. Only the
    forward of ``model`` is kept: a submodule called on its own may differ by the factors moved
    into later layers.

    ``mode="eval"``: as ``"exact"``, but where (a) applies the excess goes into the running
    variance instead (``running_var' = (running_var + eps) / g^2 - eps``): eval-mode outputs are
    kept; in training mode, those layers normalise with batch statistics and are ``g`` times
    smaller, so training starts from a changed network there.

    ``mode="fresh"``: the paper's initialisation, ``weight ~ N(0, 1)``; nothing else changes.

    ``bias``: whether the bounded layers have a shift. ``None`` (default): yes for ``"exact"`` and
    ``"eval"`` (a trained ``beta`` is generally nonzero), no for ``"fresh"`` (the paper's
    bias-free layer, where a receded channel outputs 0). ``headroom > 1``: ``c / max |gamma|``,
    the room the largest scale has to grow.

    Returns ``model``, or the new layer when ``model`` itself is a BatchNorm. Optimisers built
    before the call hold the old parameters: build them afterwards.
    """
    _check_arguments(model, mode, bias, headroom)
    keep_shift = mode != "fresh" if bias is None else bias
    targets = _targets(model)
    if mode != "fresh" and not keep_shift:
        _dropped_shifts(targets)
    new = {name: _bounded(bn, cls, keep_shift) for name, (bn, cls) in targets.items()}
    if "" in new:  # the model is a BatchNorm itself: convert it inside a one-layer holder
        name = type(model).__name__
        holder = nn.Sequential(OrderedDict([(name, model)]))
        _convert_in_place(holder, {name: model}, {name: new[""]}, mode, headroom)
        return holder[0]
    _convert_in_place(model, {name: bn for name, (bn, _) in targets.items()}, new, mode, headroom)
    return model


def _convert_in_place(model: nn.Module, originals: dict, new: dict, mode: str, headroom: float) -> None:
    """Put the new layers in; fold unless ``mode="fresh"``; on any error put the originals back."""
    _put(model, new)
    if mode == "fresh" or not new:
        return
    try:
        plan = _fold.plan_fold(model, originals, mode=mode, headroom=headroom)
    except BaseException:
        _put(model, originals)
        raise
    _fold.apply_fold(model, originals, plan)


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
    """Replace every ``BoundedBatchNorm2d`` of ``model`` (recursively, in place) by a ``SyncBoundedBatchNorm2d``
    (a ``BoundedBatchNormAct2d`` by a ``SyncBoundedBatchNormAct2d`` with the same ``drop`` and ``act``).

    The new layers hold the *same* ``Parameter`` and buffer objects (``weight``, ``bias``,
    ``running_mean``, ``running_var``, ``num_batches_tracked``), so optimisers built before the
    call stay valid; settings, training mode, backend and the receding regulariser's attachment
    carry over. Layers that are already synchronised are left alone. Returns ``model``, or the
    new layer when ``model`` itself is a ``BoundedBatchNorm2d``. Call it before wrapping the model
    in ``DistributedDataParallel``; a regulariser built before the call keeps working through its
    eager fallback, but build it afterwards to keep the fused penalty of the Triton path.
    """
    _check_module(model, "convert_sync_batchnorm")
    if isinstance(model, BoundedBatchNorm2d):
        if isinstance(model, SyncBoundedBatchNorm2d):
            return model
        if isinstance(model, BoundedBatchNormAct2d):
            return _swap_class(model, SyncBoundedBatchNormAct2d, process_group=process_group,
                               act=model.act, drop=model.drop)
        return _swap_class(model, SyncBoundedBatchNorm2d, process_group=process_group)
    for name, child in model.named_children():
        setattr(model, name, convert_sync_batchnorm(child, process_group))
    return model


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert_sync_batchnorm`: ``SyncBoundedBatchNorm2d`` -> ``BoundedBatchNorm2d``
    (``SyncBoundedBatchNormAct2d`` -> ``BoundedBatchNormAct2d``).

    Same sharing of parameters and buffers (the same objects), settings and attachments; returns
    ``model``, or the new layer when ``model`` itself is a ``SyncBoundedBatchNorm2d``.
    """
    _check_module(model, "revert_sync_batchnorm")
    if isinstance(model, SyncBoundedBatchNormAct2d):
        return _swap_class(model, BoundedBatchNormAct2d, act=model.act, drop=model.drop)
    if isinstance(model, SyncBoundedBatchNorm2d):
        return _swap_class(model, BoundedBatchNorm2d)
    for name, child in model.named_children():
        setattr(model, name, revert_sync_batchnorm(child))
    return model
