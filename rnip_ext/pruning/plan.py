"""Choosing the channels to keep: a :class:`PruningPlan` for a pruning ratio or a FLOPs/parameter budget."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .._validation import check_int, is_number
from .channels import ChannelGraph, channel_graph, module_slices
from .folding import fold_report
from .graph import Blocker, ChannelGroup, check_residual_streams
from .importance import group_scores
from .latency_plan import plan_to_latency, refuse_latency_options
from .rounding import allowed_widths, check_round_to, keep_best, round_width
from .se import SEBlock, check_se_ratio, select_se

__all__ = ["PruningPlan", "plan", "plan_from_keep", "plan_receded", "module_slices"]

SCOPES = ("global", "local")
FOLDS = ("approximate", "refuse")


@dataclass
class PruningPlan:
    """What :func:`rnip_ext.pruning.apply` will remove, and what it will cost.

    Attributes:
        keep: ``{BatchNorm qualified name: sorted int64 tensor of kept channels}`` for every
            BatchNorm that loses channels (coupled BatchNorms listed with identical indices).
        groups: every prunable channel group (see :func:`find_channel_groups`).
        group_keep: kept channels per group name (all groups, pruned or not).
        scores: the group scores the choice was made on (``min`` over chained BatchNorms,
            ``max`` over the summed BatchNorms of a residual stream).
        params, flops: ``(before, after)`` parameter and multiply-accumulate counts, the latter
            for ``example_inputs``.
        ratio: the requested fraction of prunable channels to remove (for a plan made to a
            budget: ``None`` with ``scope="global"``, the per-layer fraction the budget led to with
            ``scope="local"``); ``achieved_ratio`` the fraction of prunable channels the plan removes.
        target_flops, target_params: the budget the plan was made for, as a fraction of the
            original's count (``None`` when not given); ``achieved_flops`` and
            ``achieved_params`` are the fractions the plan reaches (``after / before``).
        threshold: the highest score removed (``None`` when nothing is).
        inexact_folds: consumers into which removed channels' constant outputs are folded only
            approximately (a kxk zero-padded convolution sees the constant only away from the
            border; a gated path drops a non-zero constant). Empty when every fold is exact or
            there is nothing to fold.
        prunable_flops: the share of the network's FLOPs in layers some channel group slices
            (what any plan can change at all); ``blockers``: for every BatchNorm outside all
            groups, the construct that keeps it whole (a residual addition, a concatenation, a
            module fx cannot trace, ...). A plan that leaves the FLOPs essentially unchanged
            warns with them.
        round_to: every pruned group, and every squeeze-and-excitation inner width the plan
            narrows, keeps a multiple of it (or all its channels).
        target_latency, max_latency: a latency budget (:mod:`rnip_ext.pruning.latency_plan`);
            ``latency``: ``(before, predicted, measured)`` seconds per forward pass for such a
            plan (``measured`` ``None`` when not refined), ``latency_table`` the table used,
            ``latency_rule`` the rule that chose the widths (``"knapsack"`` or ``"threshold"``).
        residual_streams: whether the groups couple residual streams (see :func:`plan`).
        se_ratio: the fraction of each squeeze-and-excitation block's inner channels the plan
            was asked to remove (see :func:`plan`); ``se_blocks``: every such block found
            (:class:`~rnip_ext.pruning.se.SEBlock`); ``se_keep``: ``{block name (its reducing
            conv): sorted int64 tensor of kept inner channels}`` for every block that loses
            channels (empty when none does).
    """

    keep: dict[str, Tensor]
    groups: list[ChannelGroup]
    group_keep: dict[str, Tensor]
    scores: dict[str, Tensor]
    params: tuple[int, int]
    flops: tuple[int, int]
    ratio: float | None
    achieved_ratio: float
    scope: str
    min_channels: int
    threshold: float | None
    fold: str
    inexact_folds: list[str] = field(default_factory=list)
    signature: dict[str, tuple] = field(default_factory=dict, repr=False)
    target_flops: float | None = None
    target_params: float | None = None
    prunable_flops: float = 1.0
    blockers: list[Blocker] = field(default_factory=list, repr=False)
    blocked: str = ""
    round_to: int = 1
    target_latency: float | None = None
    max_latency: float | None = None
    latency: tuple | None = None
    latency_table: object = field(default=None, repr=False)
    latency_rule: str | None = None
    residual_streams: bool = False
    se_ratio: float = 0.0
    se_blocks: list[SEBlock] = field(default_factory=list, repr=False)
    se_keep: dict[str, Tensor] = field(default_factory=dict)

    def se_modules(self) -> list[str]:
        """The layers the plan slices for squeeze-and-excitation inner widths (reduce, expand)."""
        return [n for b in self.se_blocks if b.name in self.se_keep for n in b.modules()]

    @property
    def achieved_flops(self) -> float:
        """FLOPs (MACs) after pruning as a fraction of before: ``flops[1] / flops[0]``."""
        return self.flops[1] / max(self.flops[0], 1)

    @property
    def achieved_params(self) -> float:
        """Parameters after pruning as a fraction of before: ``params[1] / params[0]``."""
        return self.params[1] / max(self.params[0], 1)

    def __str__(self) -> str:
        if self.target_flops is not None or self.target_params is not None:
            per_layer = f", {self.ratio:.4f} per layer" if self.ratio is not None else ""
        if self.target_latency is not None or self.max_latency is not None:
            before, predicted, measured = self.latency
            asked = (f"target_latency={self.target_latency:g}" if self.target_latency is not None
                     else f"max_latency={self.max_latency * 1e3:.4g} ms")
            request = (f"{asked} requested ({self.latency_rule or 'knapsack'}), {predicted * 1e3:.4g} ms predicted"
                       + (f", {measured * 1e3:.4g} ms measured" if measured is not None else "")
                       + f" of {before * 1e3:.4g} ms ({self.achieved_ratio:.4f} of channels removed)")
        elif self.target_flops is not None:
            request = (f"target_flops={self.target_flops:g} requested, {self.achieved_flops:.4f} achieved "
                       f"({self.achieved_ratio:.4f} of channels removed{per_layer})")
        elif self.target_params is not None:
            request = (f"target_params={self.target_params:g} requested, {self.achieved_params:.4f} achieved "
                       f"({self.achieved_ratio:.4f} of channels removed{per_layer})")
        else:
            request = f"ratio={self.ratio:g} requested, {self.achieved_ratio:.4f} achieved"
        lines = [
            f"PruningPlan: scope={self.scope}, {request}, min_channels={self.min_channels}"
            + (f", round_to={self.round_to}" if self.round_to > 1 else "")
            + (f", threshold={self.threshold:.4g}" if self.threshold is not None else ""),
            f"{'layer':<40} {'channels':>15} {'kept':>7}",
        ]
        for g in self.groups:
            kept = len(self.group_keep[g.name])
            label = g.name + (f" (+{len(g.bns) - 1} coupled)" if len(g.bns) > 1 else "") \
                + (" stream" if g.residual else "")
            lines.append(f"{label:<40} {g.channels:>6} -> {kept:<6} {kept / g.channels:>6.1%}")
        if self.se_keep:
            lines.append(f"squeeze-and-excitation inner widths (se_ratio={self.se_ratio:g}, per block):")
            for b in self.se_blocks:
                kept = len(self.se_keep.get(b.name, range(b.channels)))
                lines.append(f"{b.name + ' (SE)':<40} {b.channels:>6} -> {kept:<6} {kept / b.channels:>6.1%}")
        p0, p1 = self.params
        f0, f1 = self.flops
        lines.append(f"parameters: {p0:,} -> {p1:,} ({self.achieved_params:.1%} kept, "
                     f"{1 - self.achieved_params:.1%} fewer)")
        lines.append(f"FLOPs (MACs): {f0:,} -> {f1:,} ({self.achieved_flops:.1%} kept, "
                     f"{1 - self.achieved_flops:.1%} fewer)")
        lines.append(f"prunable: {self.prunable_flops:.1%} of the FLOPs are in layers some channel group slices"
                     + (f"; kept whole: {self.blocked}" if self.blockers else ""))
        if self.inexact_folds:
            lines.append("approximate folds (kxk zero-padded convs, gates): " + ", ".join(self.inexact_folds))
        return "\n".join(lines)


def _check_budget(ratio, target_flops, target_params, scope) -> tuple[str, float] | None:
    """``None`` for a ratio plan, else ``("flops" | "params", fraction)``; errors for bad combinations."""
    given = [n for n, v in (("ratio", ratio), ("target_flops", target_flops), ("target_params", target_params))
             if v is not None]
    if len(given) != 1:
        raise ValueError("pass exactly one of ratio, target_flops and target_params, got "
                         + (", ".join(given) if given else "none"))
    if ratio is not None:
        if not is_number(ratio) or not 0.0 <= ratio < 1.0:
            raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
        return None
    name, value = ("flops", target_flops) if target_flops is not None else ("params", target_params)
    if not is_number(value) or not 0.0 < value <= 1.0:
        raise ValueError(f"target_{name} must be a fraction of the original's count in (0, 1], got {value!r}")
    return name, float(value)


def _check_args(scope, min_channels, fold) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    check_int("min_channels", min_channels, 1)
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {fold!r}")


def _check_min_channels(groups: list[ChannelGroup], min_channels: int, ratio: float) -> None:
    """``min_channels`` against the layers' widths. Larger than some layers: those keep all their
    channels (a ``UserWarning`` naming them; the rest are still pruned). At least every layer's
    width while a ratio asks for removal (``ratio > 0``): nothing could be removed, so a
    ``ValueError`` instead of a silent 0%. A budget passes ``ratio=0``: whether it can be met is
    the budget search's to say (a budget of 1 needs no removal)."""
    if ratio > 0 and all(g.channels <= min_channels for g in groups):
        widest = max(g.channels for g in groups)
        raise ValueError(f"min_channels={min_channels} is at least the width of every prunable layer (the widest "
                         f"has {widest} channels): nothing can be removed; lower min_channels")
    small = [f"{g.name} ({g.channels})" for g in groups if g.channels < min_channels]
    if small:
        warnings.warn(f"min_channels={min_channels} exceeds the width of {', '.join(small)}: "
                      "they keep all their channels", UserWarning, stacklevel=3)


def _round_units(mask: Tensor, unit: int) -> Tensor:
    """A block of ``unit`` channels (a group of a grouped conv) goes only if all its channels go."""
    if unit == 1:
        return mask
    return mask.reshape(-1, unit).any(1, keepdim=True).expand(-1, unit).reshape(-1)


def _select(scores: list[Tensor], ratio: float, scope: str, min_channels: int,
            units: list[int] | None = None) -> list[Tensor]:
    """Boolean keep-masks: drop the lowest-scored channels, ties broken by position (stable);
    with ``units``, a block of a group's channels is removed only whole."""
    masks = [torch.ones(len(s), dtype=torch.bool) for s in scores]
    if scope == "global":
        flat = torch.cat(scores)
        n_remove = math.floor(ratio * len(flat) + 1e-9)
        removed = torch.argsort(flat, stable=True)[:n_remove]
        offsets = torch.tensor([0] + [len(s) for s in scores]).cumsum(0)
        for mask, start, stop in zip(masks, offsets[:-1], offsets[1:]):
            local = removed[(removed >= start) & (removed < stop)] - start
            mask[local] = False
    else:
        for mask, s in zip(masks, scores):
            mask[torch.argsort(s, stable=True)[: math.floor(ratio * len(s) + 1e-9)]] = False
    for mask, s in zip(masks, scores):
        short = min(min_channels, len(s)) - int(mask.sum())
        if short > 0:  # give back the best of the removed channels
            removed = (~mask).nonzero().flatten()
            best = removed[torch.argsort(s[removed], descending=True, stable=True)[:short]]
            mask[best] = True
    if units is not None:
        masks = [_round_units(m, u) for m, u in zip(masks, units)]
    return masks


def _signature(model: nn.Module, groups: list[ChannelGroup], extra: list[str] = ()) -> dict[str, tuple]:
    """Type and weight shape of every module the plan slices (``extra``: SE blocks' layers)."""
    modules = dict(model.named_modules())
    names = {n for g in groups for n in g.modules()} | set(extra)
    sig = {}
    for name in sorted(names):
        m = modules[name]
        shape = tuple(m.weight.shape) if getattr(m, "weight", None) is not None else (m.num_features,)
        sig[name] = (type(m).__name__, shape)
    return sig


@torch.no_grad()
def plan(
    model: nn.Module,
    ratio: float | None = None,
    scope: str = "global",
    min_channels: int = 3,
    *,
    example_inputs,
    target_flops: float | None = None,
    target_params: float | None = None,
    fold: str = "approximate",
    round_to: int | None = None,
    target_latency: float | None = None,
    max_latency: float | None = None,
    latency_table=None,
    latency_rule: str = "knapsack",
    residual_streams: bool = False,
    se_ratio: float = 0.0,
) -> PruningPlan:
    """Plan a one-shot channel pruning of ``model``, to a channel ``ratio`` or to a budget.

    Pass exactly one of:

    * ``ratio``: the fraction of prunable channels to remove, in [0, 1);
    * ``target_flops``: keep at most this fraction of the original's FLOPs (MACs), in (0, 1];
    * ``target_params``: keep at most this fraction of the original's parameters, in (0, 1];
    * ``target_latency``: at most this fraction, in (0, 1], of the unpruned network's measured
      latency, or ``max_latency``: at most this many seconds per forward pass of
      ``example_inputs`` (batch size included), on the model's device
      (:func:`rnip_ext.pruning.latency_plan.plan_to_latency`: a knapsack over importance per
      unit of latency measured in ``latency_table``, a :class:`~rnip_ext.pruning.latency.LatencyTable`
      or the path of a saved one, measured now when ``None``; then the pruned network is timed
      and the choice refined; ``scope`` must be ``"global"``). ``latency_rule="threshold"``
      keeps the channels above one global score threshold instead, the threshold set by the
      latency budget: better when the importances have not receded (which rule when:
      :mod:`rnip_ext.pruning.latency_plan`).

    ``round_to`` (an int, default ``None``: no rounding): every pruned layer keeps a multiple of
    it or all its channels (coupled layers alike; a grouped conv's groups: a multiple of both),
    the best-scored channels; kept counts are rounded to the nearest such width. A ratio plan
    then removes about ``ratio``; a budget plan searches the rounded candidates, so the budget
    is still met. 8 suits float32 vector units on CPU and fp16/bf16 tensor cores on CUDA.

    Scores are :func:`rnip_ext.pruning.channel_importance`'s default (``"relative"``: relative
    to the layer's strongest channel where the next BatchNorm renormalises, ``sigmoid(weight)``
    or ``|weight|`` elsewhere; a group of chained BatchNorms scores each channel by the minimum
    over them, a residual stream by the maximum; see :func:`rnip_ext.pruning.importance.group_scores`).

    With a ratio, ``scope="global"`` removes the ``floor(ratio * total)`` lowest-scored channels
    over all prunable layers (the paper's global quantile threshold; ties broken by position, so
    equal scores are handled), ``scope="local"`` the same fraction in each layer; then every
    layer gets back its best removed channels until it keeps ``min(min_channels, channels)``.

    With a budget and ``scope="global"``, all prunable channels are put in one order, ascending
    by score, ties broken by position (as for a global ratio); a channel whose layer would fall
    below ``min(min_channels, channels)`` is skipped. The plan removes the *shortest prefix* of
    that order whose pruned network meets the budget, ``after <= target * before``, where
    ``after`` is counted exactly on the narrowed network (a channel's cost depends on the widths
    of its neighbours: removing an input channel of a layer that already lost outputs saves
    less). Both counts fall with every removed channel, so the prefix is found by a binary search
    over its length with the exact count of each candidate. With ``scope="local"`` (the uniform
    baseline at equal cost) the plan is the local-ratio plan for the smallest per-layer fraction
    ``r`` among the values ``k / channels`` (where some layer's count changes) whose network
    meets the budget; ``plan.ratio`` is that ``r``. The result reports
    ``achieved_flops``/``achieved_params``; a budget below what removing every removable channel
    reaches raises ``ValueError`` naming the smallest reachable fraction.

    ``example_inputs`` (a tensor or tuple of tensors, e.g. ``torch.randn(1, 3, 32, 32)``) sets the
    input size the FLOPs are counted for. A removed channel still outputs a constant (its shift,
    through the activation); :func:`apply` folds that into the next layer's bias, exactly for
    linear layers, 1x1 and unpadded convolutions, approximately for kxk zero-padded ones:
    ``fold="refuse"`` raises instead of planning such a fold.

    ``residual_streams`` (default ``False``: residual streams are kept whole, as in the paper,
    which prunes ResNet-56's inner channels only): ``True`` couples each residual stream into
    one channel group (every BatchNorm summed into it with its producer conv, identity-branch
    BatchNorms, every layer reading it; :func:`rnip_ext.pruning.find_channel_groups`), so the
    stream's channels can go too, from all of them at once. A stream channel is scored by the
    maximum over the stream's BatchNorms (:func:`rnip_ext.pruning.importance.combine_scores`):
    it goes exactly when it has receded in every one. Streams that meet anything else (option-A
    shortcuts, concatenations, a BatchNorm after the sum, the network's output) stay whole, named
    in ``plan.blockers``. With a latency budget the table must be built with the same
    ``residual_streams`` (a RepVGG stream, whose convs read and write one group, is not supported
    by latency tables yet).

    ``se_ratio`` (default 0: untouched): the fraction, in [0, 1), of each squeeze-and-excitation
    block's *inner* channels to remove, block by block (``x * gate(expand(act(reduce(pool(x)))))``,
    1x1 convs with ``groups=1``: ``reduce``'s outputs, ``expand``'s inputs;
    :func:`rnip_ext.pruning.se.find_se_blocks`). These channels have no BatchNorm, so no score
    comparable with the others: each block removes ``floor(se_ratio * width)`` of its own
    channels, keeping at least ``min(min_channels, width)``, the lowest-scored by their gain
    through the bottleneck, ``||W_reduce[c]||_2 * ||W_expand[:, c]||_2``
    (:func:`rnip_ext.pruning.se.se_scores`). The pruned network equals the original with those
    channels' activations set to 0. A budget plan counts this removal first and then finds the
    channel groups' prefix that meets the budget. With ``round_to`` each block's kept count is
    rounded *up* to a multiple of it (or the whole width), the best-scored channels kept, so a
    block never loses more than ``floor(se_ratio * width)``. Not with a latency budget.
    """
    check_residual_streams(residual_streams)
    se_ratio = check_se_ratio(se_ratio)
    if target_latency is not None or max_latency is not None:
        if se_ratio > 0:
            raise ValueError("se_ratio is not supported with a latency budget (target_latency/max_latency) yet")
        others = [n for n, v in (("ratio", ratio), ("target_flops", target_flops), ("target_params", target_params))
                  if v is not None]
        if others:
            raise ValueError(f"pass exactly one budget: a latency budget and {', '.join(others)} were given")
        _check_args(scope, min_channels, fold)
        if scope != "global":
            raise ValueError("a latency budget is planned over all layers at once: scope must be 'global'")
        return plan_to_latency(model, example_inputs=example_inputs, target_latency=target_latency,
                               max_latency=max_latency, latency_table=latency_table, round_to=round_to,
                               min_channels=min_channels, fold=fold, residual_streams=residual_streams,
                               rule=latency_rule)
    refuse_latency_options(latency_table, latency_rule)
    round_to = check_round_to(round_to)
    budget = _check_budget(ratio, target_flops, target_params, scope)
    _check_args(scope, min_channels, fold)
    graph = _prunable_graph(model, example_inputs, residual_streams)
    groups = graph.groups
    # A budget that min_channels makes unreachable is reported by the budget search itself.
    _check_min_channels(groups, min_channels, float(ratio) if ratio is not None else 0.0)
    scores = group_scores(model, groups)
    se_keep = select_se(model, graph.se_blocks, se_ratio, min_channels, round_to)
    if budget is None:
        masks = _select([scores[g.name] for g in groups], float(ratio), scope, min_channels,
                        [g.unit for g in groups])
        group_keep = {g.name: m.nonzero().flatten().to(torch.int64) for g, m in zip(groups, masks)}
        group_keep = _rounded(groups, scores, group_keep, round_to, min_channels)
        result = _build_plan(model, graph, scores, group_keep, ratio=float(ratio), scope=scope,
                             min_channels=min_channels, fold=fold, se_keep=se_keep)
    else:
        kind, target = budget
        group_keep, local_ratio = _select_budget(model, graph, scores, kind, target, scope, min_channels, round_to,
                                                 se_keep)
        result = _build_plan(model, graph, scores, group_keep, ratio=local_ratio, scope=scope,
                             min_channels=min_channels, fold=fold, se_keep=se_keep)
        if kind == "flops":
            result.target_flops = target
        else:
            result.target_params = target
    result.round_to = round_to
    result.se_ratio = se_ratio
    _warn_if_unchanged(model, result, requested=budget is not None or ratio > 0)
    return result


def _rounded(groups: list[ChannelGroup], scores: dict[str, Tensor], group_keep: dict[str, Tensor], round_to: int,
             min_channels: int) -> dict[str, Tensor]:
    """``group_keep`` with each kept count rounded to the nearest multiple of ``round_to`` (and
    of a grouped conv's ``unit``) or the whole group, the best-scored channels (blocks) kept."""
    if round_to == 1:
        return group_keep
    out = {}
    for g in groups:
        step = math.lcm(round_to, g.unit)
        width = round_width(len(group_keep[g.name]), g.channels, step, min_channels)
        if width == len(group_keep[g.name]) and (width == g.channels or width % step == 0) and g.unit == 1:
            out[g.name] = group_keep[g.name]  # already aligned: the planner's own choice stands
        elif g.unit == 1:
            out[g.name] = keep_best(scores[g.name], width)
        else:  # whole blocks, by their summed score
            blocks = keep_best(scores[g.name].reshape(-1, g.unit).sum(1), width // g.unit)
            out[g.name] = (blocks[:, None] * g.unit + torch.arange(g.unit)).flatten()
    return out


NO_OP = 0.9  # a plan keeping more than this share of the FLOPs (cutting < 10%) leaves the network essentially unchanged


def _warn_if_unchanged(model: nn.Module, p: PruningPlan, requested: bool) -> None:
    """No silent no-op: say why a plan asked to remove channels barely changes the network."""
    if not requested or p.achieved_flops <= NO_OP or p.flops[0] == 0:
        return
    if p.target_flops is not None and p.target_flops > NO_OP:
        return  # the budget itself asks for almost nothing
    warnings.warn(
        f"this plan keeps {p.achieved_flops:.1%} of the FLOPs of {type(model).__name__}: only "
        f"{p.prunable_flops:.1%} of them are in prunable layers; kept whole: {p.blocked or 'nothing'}",
        UserWarning, stacklevel=3)


def _removal_order(groups: list[ChannelGroup], scores: dict[str, Tensor], min_channels: int) -> Tensor:
    """Flat channel positions (groups concatenated) in removal order: ascending score, ties by
    position, each group stopping at ``min(min_channels, channels)`` kept channels."""
    flat = torch.cat([scores[g.name] for g in groups])
    owner = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([g.channels for g in groups]))
    order = torch.argsort(flat, stable=True)
    room = torch.tensor([g.channels - min(min_channels, g.channels) for g in groups])
    # rank of each channel among its own group's channels in the order
    owners = owner[order]
    by_group = torch.argsort(owners, stable=True)
    counts = torch.bincount(owners, minlength=len(groups))
    starts = counts.cumsum(0) - counts
    rank = torch.empty_like(order)
    rank[by_group] = torch.arange(len(order)) - starts[owners[by_group]]
    return order[rank < room[owners]]


def _keep_after(groups: list[ChannelGroup], order: Tensor, k: int) -> dict[str, Tensor]:
    """Kept channels per group once the first ``k`` channels of ``order`` are removed (a block
    of a grouped conv goes only whole)."""
    mask = torch.ones(sum(g.channels for g in groups), dtype=torch.bool)
    mask[order[:k]] = False
    masks = [_round_units(m, g.unit) for g, m in zip(groups, mask.split([g.channels for g in groups]))]
    return {g.name: m.nonzero().flatten().to(torch.int64) for g, m in zip(groups, masks)}


def _local_ratios(groups: list[ChannelGroup]) -> list[float]:
    """Every per-layer fraction at which some layer's removed count changes: ``k / channels``."""
    return sorted({k / g.channels for g in groups for k in range(g.channels)})


def _select_budget(model: nn.Module, graph: ChannelGraph, scores: dict[str, Tensor], kind: str,
                   target: float, scope: str, min_channels: int,
                   round_to: int = 1,
                   se_keep: dict[str, Tensor] | None = None) -> tuple[dict[str, Tensor], float | None]:
    """The kept channels of the first candidate whose network meets the budget, and (local scope)
    the per-layer ratio it removes.

    Candidates are nested, each removing a superset of the previous one's channels, so the counts
    fall along them and a binary search finds the first that meets the budget: prefixes of the
    global removal order (``scope="global"``) or the local ratios ``k / channels`` in increasing
    order (``scope="local"``). Each candidate is counted on the channel graph (no trace). With
    ``round_to``, each candidate's kept counts are rounded (:func:`_rounded`; non-decreasing in
    the count, and the best channels of a group are nested), so the counts still fall.
    ``se_keep`` (SE inner widths, fixed beforehand) is part of every candidate.
    """
    groups = graph.groups
    before = graph.flops_total if kind == "flops" else graph.params_total

    def count(group_keep: dict[str, Tensor]) -> int:
        if kind == "flops":
            return graph.flops(group_keep, se_keep)
        return graph.params(group_keep, fold_report(model, groups, group_keep)[1], se_keep=se_keep)

    if scope == "global":
        order = _removal_order(groups, scores, min_channels)
        n_candidates = len(order) + 1

        def keep_of(i: int) -> dict[str, Tensor]:
            return _rounded(groups, scores, _keep_after(groups, order, i), round_to, min_channels)
    else:
        ratios = _local_ratios(groups)
        n_candidates = len(ratios)
        score_list = [scores[g.name] for g in groups]

        def keep_of(i: int) -> dict[str, Tensor]:
            masks = _select(score_list, ratios[i], "local", min_channels, [g.unit for g in groups])
            return _rounded(groups, scores, {g.name: m.nonzero().flatten().to(torch.int64)
                                             for g, m in zip(groups, masks)}, round_to, min_channels)

    budget = target * before
    # Integer-vs-float comparisons are exact in Python: ``after <= target * before`` as written.
    least = count(keep_of(n_candidates - 1))
    if least > budget:
        smallest = least / max(before, 1)
        raise ValueError(
            f"target_{kind}={target:g} cannot be met: removing every prunable channel down to "
            f"min_channels={min_channels} per layer (the layers that cannot be pruned stay whole) keeps "
            f"{smallest:.4f} of the {'FLOPs' if kind == 'flops' else 'parameters'}, the smallest reachable fraction; "
            f"kept whole: {graph.blocked_summary()}"
        )
    lo, hi = 0, n_candidates - 1  # invariant: candidate hi meets the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if count(keep_of(mid)) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return keep_of(hi), (None if scope == "global" else ratios[hi])


def _prunable_graph(model: nn.Module, example_inputs, residual_streams: bool = False) -> ChannelGraph:
    """The model's channel graph (one trace, cached); errors when there is nothing to prune."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"plan expects an nn.Module, got {type(model).__name__}")
    if example_inputs is None:
        raise ValueError("example_inputs is required to count FLOPs: pass e.g. torch.randn(1, 3, 32, 32)")
    graph = channel_graph(model, example_inputs, residual_streams=check_residual_streams(residual_streams))
    if not graph.groups:
        raise ValueError(
            f"{type(model).__name__} has no prunable BatchNorm2d (a BatchNorm between a conv and the "
            "convs/linear layers reading it, with no residual addition in between); "
            f"kept whole: {graph.blocked_summary()}"
        )
    return graph


def _build_plan(model: nn.Module, graph: ChannelGraph, scores: dict[str, Tensor],
                group_keep: dict[str, Tensor], *, ratio: float | None, scope: str, min_channels: int,
                fold: str, se_keep: dict[str, Tensor] | None = None) -> PruningPlan:
    """The :class:`PruningPlan` keeping ``group_keep`` (sorted int64 indices per group name)
    and ``se_keep`` (per SE block that loses inner channels)."""
    se_keep = dict(se_keep or {})
    groups = graph.groups
    keep = {n: group_keep[g.name] for g in groups for n in g.bns if len(group_keep[g.name]) < g.channels}
    removed_scores = []
    for g in groups:
        mask = torch.ones(g.channels, dtype=torch.bool)
        mask[group_keep[g.name]] = False
        removed_scores.append(scores[g.name][mask])
    removed_scores = torch.cat(removed_scores)
    total = sum(g.channels for g in groups)
    inexact, new_biases = fold_report(model, groups, group_keep)
    if inexact and fold == "refuse":
        raise ValueError(
            "removing these channels needs an approximate fold of their constant output into "
            f"kxk zero-padded convolutions or through gates ({', '.join(inexact)}); pass fold='approximate' to "
            "accept it"
        )
    return PruningPlan(
        keep=keep,
        groups=groups,
        group_keep=group_keep,
        scores=scores,
        params=(graph.params_total, graph.params(group_keep, new_biases, se_keep=se_keep)),
        flops=(graph.flops_total, graph.flops(group_keep, se_keep)),
        ratio=ratio,
        achieved_ratio=len(removed_scores) / total,
        scope=scope,
        min_channels=min_channels,
        threshold=removed_scores.max().item() if len(removed_scores) else None,
        fold=fold,
        inexact_folds=inexact,
        signature=_signature(model, groups, [n for b in graph.se_blocks if b.name in se_keep for n in b.modules()]),
        prunable_flops=graph.prunable_flops() / max(graph.flops_total, 1),
        blockers=list(graph.blockers),
        blocked=graph.blocked_summary(),
        residual_streams=graph.residual_streams,
        se_blocks=list(graph.se_blocks),
        se_keep=se_keep,
    )


@torch.no_grad()
def plan_from_keep(model: nn.Module, keep: dict[str, Tensor], *, example_inputs,
                   fold: str = "approximate", residual_streams: bool = False,
                   se_keep: dict[str, Tensor] | None = None) -> PruningPlan:
    """A :class:`PruningPlan` that keeps exactly the given channels.

    ``keep`` maps a channel group's name (its first BatchNorm, see
    :func:`rnip_ext.pruning.find_channel_groups`) to the indices (or a boolean mask) of the
    channels to keep; groups not named keep every channel (in a group through a grouped convolution,
    ``unit > 1``, a block of ``unit`` channels is kept whole when any of its channels is named). Used by schedules that decide
    themselves which channels go (e.g. every channel whose importance fell below a threshold).
    ``ratio``/``scope`` of the result are the achieved fraction and ``"explicit"``.
    ``residual_streams``: the groups to name, as for :func:`plan`. ``se_keep`` (optional): the
    kept inner channels (indices or a boolean mask) of squeeze-and-excitation blocks, by block
    name (the reducing conv, see ``PruningPlan.se_blocks``); blocks not named keep all.
    """
    if fold not in FOLDS:
        raise ValueError(f"fold must be one of {FOLDS}, got {fold!r}")
    graph = _prunable_graph(model, example_inputs, residual_streams)
    groups = graph.groups
    _check_names("keep", keep, {g.name: g for g in groups}, "channel groups", "groups")
    group_keep = {}
    for g in groups:
        k = keep.get(g.name)
        if k is None:
            group_keep[g.name] = torch.arange(g.channels, dtype=torch.int64)
            continue
        k = _indices(g.name, k, g.channels)
        if g.unit > 1:  # whole blocks of a grouped conv: a block stays if any of its channels does
            mask = torch.zeros(g.channels, dtype=torch.bool)
            mask[k] = True
            k = _round_units(mask, g.unit).nonzero().flatten()
        group_keep[g.name] = k
    scores = group_scores(model, groups)
    removed = sum(g.channels - len(group_keep[g.name]) for g in groups)
    total = sum(g.channels for g in groups)
    min_kept = min(len(group_keep[g.name]) for g in groups)
    return _build_plan(model, graph, scores, group_keep, ratio=removed / total, scope="explicit",
                       min_channels=min_kept, fold=fold, se_keep=_explicit_se_keep(graph.se_blocks, se_keep))


def _check_names(arg: str, given, names, what: str, listed: str) -> None:
    """``given`` (the ``arg`` argument) is a dict whose keys are all in ``names``; errors name the others."""
    if not isinstance(given, dict):
        raise TypeError(f"{arg} must be a dict of name -> kept channels, got {type(given).__name__}")
    unknown = [n for n in given if n not in names]
    if unknown:
        raise ValueError(f"{arg} names {', '.join(map(repr, unknown))}, which are not {what} of the model "
                         f"({listed}: {', '.join(names) or 'none'})")


def _indices(name: str, k, channels: int) -> Tensor:
    """Sorted unique int64 indices from indices or a boolean mask over ``channels``; errors name ``name``."""
    k = torch.as_tensor(k).detach().cpu()
    if k.dtype == torch.bool:
        if k.shape != (channels,):
            raise ValueError(f"keep mask for '{name}' has shape {tuple(k.shape)}, it has {channels} channels")
        k = k.nonzero().flatten()
    k = torch.unique(k.to(torch.int64))  # sorted, no duplicates
    if len(k) == 0:
        raise ValueError(f"keep for '{name}' is empty: a layer must keep at least one channel")
    if k.min() < 0 or k.max() >= channels:
        raise ValueError(f"keep for '{name}' has indices outside [0, {channels})")
    return k


def _explicit_se_keep(blocks: list[SEBlock], se_keep) -> dict[str, Tensor]:
    """``se_keep`` checked against the model's SE blocks, only those that lose channels."""
    if not se_keep:
        return {}
    by_name = {b.name: b for b in blocks}
    _check_names("se_keep", se_keep, by_name, "squeeze-and-excitation blocks", "blocks")
    out = {}
    for name, k in se_keep.items():
        k = _indices(name, k, by_name[name].channels)
        if len(k) < by_name[name].channels:
            out[name] = k
    return out


@torch.no_grad()
def plan_receded(model: nn.Module, *, example_inputs, threshold: float = 0.01,
                 min_channels: int = 3, round_to: int | None = None,
                 residual_streams: bool = False, se_ratio: float = 0.0) -> PruningPlan | None:
    """The plan removing every receded channel, or ``None`` when none has receded.

    A channel has receded when its score (:func:`rnip_ext.pruning.importance.group_scores`,
    the minimum over chained BatchNorms, the maximum over a stream's) is below ``threshold``; each group keeps at least
    ``min(min_channels, channels)`` channels, topped up with its best-scored ones (ties by
    position). With ``round_to`` the kept count is rounded *up* to the next allowed width (a
    multiple of ``lcm(round_to, unit)``, or the whole group): the best-scored receded channels
    stay, so no channel above ``threshold`` is ever removed. Made by :func:`plan_from_keep`.
    ``residual_streams``: as for :func:`plan` (a stream channel has receded when it has in
    every BatchNorm of the stream). ``se_ratio``: as for :func:`plan` (rounded up alike with
    ``round_to``), a fraction of the SE blocks' inner widths *as they are now* (the plan is not
    ``None`` when only these go);
    calling this repeatedly with ``se_ratio > 0`` removes that fraction again each time.
    """
    if not is_number(threshold) or not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}")
    check_int("min_channels", min_channels, 1)
    round_to = check_round_to(round_to)
    se_ratio = check_se_ratio(se_ratio)
    graph = _prunable_graph(model, example_inputs, residual_streams)
    groups = graph.groups
    se_keep = select_se(model, graph.se_blocks, se_ratio, min_channels, round_to)
    scores = group_scores(model, groups)
    keep = {}
    for g in groups:
        mask = scores[g.name] >= threshold
        least = min(min_channels, g.channels)
        if int(mask.sum()) < least:
            mask[torch.argsort(scores[g.name], descending=True, stable=True)[:least]] = True
        if round_to > 1 and not mask.all():
            mask = _round_up(g, scores[g.name], mask, round_to, min_channels)
        if not mask.all():
            keep[g.name] = mask
    if not keep and not se_keep:
        return None
    result = plan_from_keep(model, keep, example_inputs=example_inputs, residual_streams=residual_streams,
                            se_keep=se_keep)
    result.se_ratio = se_ratio
    return result


def _round_up(g: ChannelGroup, scores: Tensor, mask: Tensor, round_to: int, min_channels: int) -> Tensor:
    """``mask`` widened to the narrowest allowed width holding it (whole blocks of ``g.unit``
    channels by their summed score for a grouped conv); the kept channels stay kept."""
    step = math.lcm(round_to, g.unit)
    count = int(_round_units(mask, g.unit).sum()) if g.unit > 1 else int(mask.sum())
    width = next(w for w in allowed_widths(g.channels, step, min_channels) if w >= count)
    ranked = scores.detach().cpu().to(torch.float64)
    ranked = ranked + (2.0 * float(ranked.abs().max()) + 1.0) * mask.to(torch.float64)  # the kept ones first
    if g.unit == 1:
        index = keep_best(ranked, width)
    else:  # a block ranks by its best channel, as group_scores scores it
        blocks = keep_best(ranked.reshape(-1, g.unit).amax(1), width // g.unit)
        index = (blocks[:, None] * g.unit + torch.arange(g.unit)).flatten()
    out = torch.zeros_like(mask)
    out[index] = True
    return out
