"""The inner width of squeeze-and-excitation blocks, pruned on its own (``plan(..., se_ratio=...)``).

A squeeze-and-excitation (SE) block computes ``x * gate(expand(act(reduce(pool(x)))))`` with two
1x1 convolutions around a narrow bottleneck. The channel groups already couple ``expand``'s
outputs with the gated channels of ``x``; the bottleneck itself (``reduce``'s outputs, which are
``expand``'s inputs) has no BatchNorm, so the method's importance (the BatchNorm scale) does not
exist for it. :func:`find_se_blocks` recognises the bottlenecks in the traced graph and
:func:`select_se` removes a fixed fraction of each one's channels, block by block, by the gain of
each channel through the bottleneck (:func:`se_scores`).

Removing inner channel ``c`` is exact with respect to the original network with that channel's
activation ``act(reduce(.))[c]`` set to 0: the pruned ``expand`` simply no longer reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn

from .._validation import is_number
from .graph import Traced, _Analysis, _other_node_args, _shape
from .rounding import allowed_widths, keep_best

__all__ = ["SEBlock", "check_se_ratio", "find_se_blocks", "se_scores", "select_se"]


@dataclass(frozen=True)
class SEBlock:
    """A squeeze-and-excitation bottleneck: ``reduce`` and ``expand`` are the names of its 1x1
    convolutions (``groups=1``), ``channels`` its inner width (``reduce``'s outputs, ``expand``'s
    inputs). Its :attr:`name` is ``reduce``'s."""

    reduce: str
    expand: str
    channels: int

    @property
    def name(self) -> str:
        """The block's name in plans: its reducing conv."""
        return self.reduce

    def modules(self) -> list[str]:
        """The two layers its inner channels slice: ``reduce`` (outputs) and ``expand`` (inputs)."""
        return [self.reduce, self.expand]


def check_se_ratio(se_ratio) -> float:
    """``float(se_ratio)`` when it is a number in [0, 1), else ``ValueError`` naming it."""
    if not is_number(se_ratio) or not 0.0 <= se_ratio < 1.0:
        raise ValueError(f"se_ratio must be a float in [0, 1) (the fraction of each squeeze-and-excitation "
                         f"block's inner channels to remove), got {se_ratio!r}")
    return float(se_ratio)


def _pointwise_chain_back(analysis: _Analysis, node: fx.Node) -> fx.Node:
    """From ``node`` back through elementwise ops, each with one user and one graph input: the
    first node that is not such an op."""
    while analysis.kind(node) == "pointwise" and node.args and isinstance(node.args[0], fx.Node) \
            and len(node.args[0].users) == 1 and not _other_node_args(node, node.args[0]):
        node = node.args[0]
    return node


def _is_1x1_conv(analysis: _Analysis, node: fx.Node) -> bool:
    """A conv with ``groups=1``, called once, 1x1 kernel, one graph input."""
    if analysis.kind(node) != "conv" or not isinstance(node.args[0], fx.Node) \
            or _other_node_args(node, node.args[0]):
        return False
    conv = analysis.modules[node.target]
    return isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (1, 1) and conv.groups == 1


def _is_global_pool(analysis: _Analysis, node: fx.Node) -> bool:
    """A spatial mean or average/max pool down to 1x1 (from the recorded shape when there is one)."""
    if analysis.kind(node) != "pool" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    shape = _shape(node)
    if shape is not None:
        return len(shape) == 4 and shape[2:] == (1, 1)
    m = analysis.modules.get(node.target) if node.op == "call_module" else None
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return m.output_size in (1, (1, 1))
    return node.op == "call_method" and node.target == "mean"  # _spatial_mean made it a pool


def _gated_by(analysis: _Analysis, expand: fx.Node, data: fx.Node) -> bool:
    """Does ``expand``'s output, through elementwise ops only, multiply ``data``?"""
    node = expand
    while len(node.users) == 1:
        (user,) = node.users
        kind = analysis.kind(user)
        if kind == "mul":
            args = [a for a in user.args if isinstance(a, fx.Node)]
            return len(user.args) == 2 and len(args) == 2 and not user.kwargs and data in args and node in args
        if kind != "pointwise" or _other_node_args(user, node):
            return False
        node = user
    return False


def find_se_blocks(model: nn.Module, gm: Traced, opaque: dict[str, str] | None = None) -> list[SEBlock]:
    """Every squeeze-and-excitation bottleneck of a traced (and shape-propagated) model, in graph order:
    ``reduce`` (1x1 conv, ``groups=1``, bias or not, reading a global pool or spatial mean of
    ``x``) -> elementwise ops (activations, ``Identity``) -> ``expand`` (1x1 conv, ``groups=1``)
    -> elementwise ops (the gate) -> ``x * gate``. Both convs must be called once and read
    nothing else; the inner tensors must have no other readers."""
    analysis = _Analysis(model, gm, opaque)
    blocks = []
    for node in gm.graph.nodes:
        if not _is_1x1_conv(analysis, node) or len(node.args[0].users) != 1:
            continue
        reduce = _pointwise_chain_back(analysis, node.args[0])
        if not _is_1x1_conv(analysis, reduce) or len(reduce.users) != 1:
            continue
        pool = reduce.args[0]
        if not _is_global_pool(analysis, pool) or len(pool.users) != 1:
            continue
        r, e = analysis.modules[reduce.target], analysis.modules[node.target]
        if r.out_channels != e.in_channels or not _gated_by(analysis, node, pool.args[0]):
            continue
        blocks.append(SEBlock(reduce.target, node.target, r.out_channels))
    return blocks


@torch.no_grad()
def se_scores(model: nn.Module, blocks: list[SEBlock]) -> dict[str, Tensor]:
    """Score of inner channel ``c`` of each block: ``||W_reduce[c]||_2 * ||W_expand[:, c]||_2``.

    The channel's gain through the bottleneck: how strongly the pooled input can drive it times
    how strongly it drives the gate's logits (both activations in between are 1-Lipschitz or
    nearly so). It has no BatchNorm scale to compare with other layers', so blocks are only
    ranked within themselves. Biases are left out: ``reduce``'s bias moves the channel's
    operating point, not its gain. float64 on the CPU, shape ``(channels,)``.
    """
    modules = dict(model.named_modules())
    out = {}
    for b in blocks:
        w_r = modules[b.reduce].weight.detach().to("cpu", torch.float64)
        w_e = modules[b.expand].weight.detach().to("cpu", torch.float64)
        out[b.name] = w_r.flatten(1).norm(dim=1) * w_e.transpose(0, 1).flatten(1).norm(dim=1)
    return out


def select_se(model: nn.Module, blocks: list[SEBlock], se_ratio: float, min_channels: int,
              round_to: int = 1) -> dict[str, Tensor]:
    """Kept inner channels (sorted int64) of every block that loses any: the
    ``floor(se_ratio * channels)`` lowest-scored ones go (ties by position), each block keeping
    at least ``min(min_channels, channels)`` -- the plan's own per-layer minimum. With
    ``round_to > 1`` the kept count is rounded *up* to the next allowed width (a multiple of
    ``round_to`` or the whole block, :func:`~rnip_ext.pruning.rounding.allowed_widths`), the
    best-scored channels kept: rounding never removes more than ``se_ratio`` asks."""
    if se_ratio == 0.0 or not blocks:
        return {}
    scores = se_scores(model, blocks)
    keep = {}
    for b in blocks:
        n_remove = min(int(se_ratio * b.channels + 1e-9), b.channels - min(min_channels, b.channels))
        width = next(w for w in allowed_widths(b.channels, round_to, min_channels) if w >= b.channels - n_remove)
        if width == b.channels:
            continue
        # keep_best breaks ties as the removal order does (ascending score, stable): with
        # round_to=1 this is exactly the floor(se_ratio * channels) lowest-scored channels removed.
        keep[b.name] = keep_best(scores[b.name], width)
    return keep
