"""Physically removing channels: a new, smaller module from a model and its :class:`PruningPlan`."""

from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..ops import channel_gather_many
from ..ops.channel_gather import check_many
from .channels import cached, module_slices, remember
from .folding import fold_delta, group_folds
from .layers import SLICED_TENSORS, handler_for
from .plan import PruningPlan, _signature, plan

__all__ = ["KEPT_STATE", "Remap", "SLICED_STATE", "apply", "prune", "replace_data"]


def _check_plan_fits(model: nn.Module, pruning_plan: PruningPlan) -> None:
    if not isinstance(pruning_plan, PruningPlan):
        raise TypeError(f"expected a PruningPlan, got {type(pruning_plan).__name__}")
    modules = dict(model.named_modules())
    missing = [n for n in pruning_plan.signature if n not in modules]
    if missing:
        raise ValueError(
            f"this plan was made for a different model: it names modules the model lacks ({', '.join(missing[:5])})"
        )
    actual = _signature(model, pruning_plan.groups, pruning_plan.se_modules())
    for name, expected in pruning_plan.signature.items():
        if actual[name] != expected:
            raise ValueError(
                f"this plan was made for a different model: module '{name}' is {actual[name][0]} of "
                f"shape {actual[name][1]}, the plan expects {expected[0]} of shape {expected[1]}"
            )


def _removed(channels: int, keep: Tensor) -> Tensor:
    mask = torch.ones(channels, dtype=torch.bool)
    mask[keep] = False
    return mask.nonzero().flatten()


# Optimiser state shaped like its parameter, sliced with it; and state kept as it is.
SLICED_STATE = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
KEPT_STATE = ("step",)


@dataclass
class Remap:
    """One tensor ``apply`` slices: ``old[out_index][:, in_index]`` becomes ``new``.

    For a parameter, its ``.grad`` and its optimiser state (``SLICED_STATE``) go through the same
    indices in the same gather; ``new_grad`` and ``new_state`` hold the results.
    """

    old: Tensor
    out_index: Tensor | None
    in_index: Tensor | None
    owner: str = ""
    attr: str = ""
    new: Tensor | None = None
    new_grad: Tensor | None = None
    new_state: dict = field(default_factory=dict)

    def index_for(self, t: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The indices for ``t`` (the tensor or anything shaped like it), on its device."""
        o = None if self.out_index is None else self.out_index.to(t.device)
        i = None if self.in_index is None or t.dim() < 2 else self.in_index.to(t.device)
        return o, i


def _remaps(model: nn.Module, slices: dict[str, list]) -> list[Remap]:
    modules = dict(model.named_modules())
    records = []
    for name, (out_idx, in_idx) in slices.items():
        m = modules[name]
        for attr in SLICED_TENSORS:
            t = getattr(m, attr, None)
            if not isinstance(t, Tensor):
                continue
            if out_idx is None and (in_idx is None or t.dim() < 2):
                continue  # e.g. a consumer's bias: indexed by its own, unchanged outputs
            records.append(Remap(t, out_idx, in_idx if t.dim() > 1 else None, name, attr))
    return records


def _check_optimizer(model: nn.Module, optimizer, records: list[Remap]) -> None:
    """Raise (before anything changes) unless ``optimizer`` holds only ``model``'s parameters
    and every sliced parameter's state is of a known kind."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    f"this optimizer was built for another model: it holds a parameter of shape "
                    f"{tuple(p.shape)} that is not a parameter of the {type(model).__name__} being pruned"
                )
    for r in records:
        state = optimizer.state.get(r.old, {}) if isinstance(r.old, nn.Parameter) else {}
        for key, value in state.items():
            if key in KEPT_STATE or (key in SLICED_STATE and value is None):
                continue
            if key not in SLICED_STATE:
                raise ValueError(
                    f"cannot prune the state of {type(optimizer).__name__}: parameter '{names[id(r.old)]}' "
                    f"has state '{key}', which rnip_ext does not know how to slice (known: "
                    f"{', '.join(SLICED_STATE + KEPT_STATE)}); prune without the optimizer and build a new one"
                )
            if not isinstance(value, Tensor) or value.shape != r.old.shape:
                raise ValueError(
                    f"optimizer state '{key}' of parameter '{names[id(r.old)]}' is not shaped like the parameter"
                )


def _jobs(records: list[Remap], optimizer) -> list[tuple[Tensor, Tensor | None, Tensor | None, object]]:
    """``(source, out indices, in indices, sink)`` for every remapped tensor, its gradient and its
    optimiser state; the sink stores the gathered tensor in its record."""
    jobs = []

    def add(t: Tensor, r: Remap, sink) -> None:
        jobs.append((t.detach(), *r.index_for(t), sink))

    for r in records:
        add(r.old, r, lambda new, r=r: setattr(r, "new", new))
        if isinstance(r.old, nn.Parameter) and r.old.grad is not None:
            add(r.old.grad, r, lambda new, r=r: setattr(r, "new_grad", new))
        state = optimizer.state.get(r.old, {}) if optimizer is not None else {}
        for key, value in state.items():
            if key in SLICED_STATE and value is not None:
                add(value, r, lambda new, r=r, key=key: r.new_state.__setitem__(key, new))
            else:
                r.new_state[key] = value
    return jobs


def _gather(records: list[Remap], optimizer, check_values: bool = True) -> None:
    """Every remapped tensor, its gradient and its optimiser state in one channel_gather_many call."""
    jobs = _jobs(records, optimizer)
    sources, outs, ins, sinks = zip(*jobs) if jobs else ((), (), (), ())
    for sink, new in zip(sinks, channel_gather_many(sources, outs, ins, check_values=check_values)):
        sink(new)


def _check_gathers(records: list[Remap], optimizer) -> None:
    """What :func:`_gather` of all ``records`` would refuse, refused before any is gathered."""
    jobs = [job[:3] for r in records for job in _jobs([r], optimizer)]
    if jobs:
        check_many(*zip(*jobs))
    for r in records:  # _jobs filled in the unsliced state: the gathers fill it again
        r.new_state = {}


def _rebind_optimizer(optimizer, model: nn.Module, pruned: nn.Module, records: list[Remap],
                      new_biases: dict[str, nn.Parameter]) -> None:
    """Point ``optimizer`` at ``pruned``'s parameters, in place, with the state remapped."""
    by_old = {id(r.old): r for r in records}
    pruned_params = dict(pruned.named_parameters())
    new_of = {id(old): pruned_params[name] for name, old in model.named_parameters()}
    state = {}
    for group in optimizer.param_groups:
        params = []
        for old in group["params"]:
            new = new_of[id(old)]
            params.append(new)
            r = by_old.get(id(old))
            if r is not None:
                if r.new_state:
                    state[new] = r.new_state
            elif old in optimizer.state:
                state[new] = optimizer.state[old]  # unsliced: the same tensors, now the pruned model's
        group["params"] = params
    optimizer.state = defaultdict(dict, state)
    _add_to_groups(optimizer, pruned, new_biases)


def _add_to_groups(optimizer, model: nn.Module, new_biases: dict[str, nn.Parameter]) -> None:
    """A bias created by folding joins the param group of its layer's weight (empty state)."""
    for name, bias in new_biases.items():
        weight = model.get_submodule(name).weight
        for group in optimizer.param_groups:
            if any(p is weight for p in group["params"]):
                group["params"].append(bias)
                break


def _resize(m: nn.Module, out_idx: Tensor | None, in_idx: Tensor | None) -> None:
    """Set a sliced module's width attributes to match its new tensors (its handler's rule)."""
    handler_for(m).resize(m, out_idx, in_idx)


def replace_data(param: nn.Parameter, data: Tensor) -> None:
    """``param.data = data`` for a tensor of another shape, leaving no stale gradient accumulator.

    Autograd caches each parameter's gradient accumulator, shaped like the parameter, while any
    graph built from it is alive (e.g. the last batch's ``loss`` in a training loop); a backward
    through a new graph would then fail with "expected shape". Autograd drops that cache when the
    tensor's dtype changes, so the data passes through an empty tensor of another dtype first.
    """
    param.grad = None  # the old gradient's shape no longer fits
    other = torch.float64 if data.dtype != torch.float64 else torch.float32
    param.data = torch.empty(0, dtype=other, device=data.device)
    param.data = data


def _add_folded_biases(modules: dict[str, nn.Module], slices: dict[str, list],
                       deltas: dict[str, Tensor]) -> dict[str, nn.Parameter]:
    """Add each consumer's folded constant to its bias (a new bias where it had none)."""
    new_biases: dict[str, nn.Parameter] = {}
    for name, delta in deltas.items():
        m = modules[name]
        out_idx = slices.get(name, [None, None])[0]
        if out_idx is not None:  # the consumer also lost outputs to another group
            delta = delta[out_idx.to(delta.device)]
        if m.bias is None:
            m.bias = nn.Parameter(delta.to(m.weight.dtype), requires_grad=m.weight.requires_grad)
            new_biases[name] = m.bias
        else:
            m.bias.add_(delta.to(m.bias.dtype))
    return new_biases


# Bytes of sources per gather when narrowing in place: each batch's old tensors are released
# before the next is gathered, so the peak is the model plus one batch, not twice the model, and
# the allocator can hand the freed memory to the next batch instead of faulting in fresh pages.
INPLACE_BATCH_BYTES = 64 << 20


def _batches(records: list[Remap]) -> list[list[Remap]]:
    """``records`` in consecutive runs of about ``INPLACE_BATCH_BYTES`` of source tensors each."""
    batches, batch, size = [], [], 0
    for r in records:
        batch.append(r)
        size += r.old.numel() * r.old.element_size()
        if size >= INPLACE_BATCH_BYTES:
            batches.append(batch)
            batch, size = [], 0
    return batches + [batch] if batch else batches


def _narrow_in_place(modules: dict[str, nn.Module], records: list[Remap], optimizer) -> None:
    """Point every sliced tensor slot of the model (``modules``: its named modules) at its
    gathered tensor, keeping Parameter objects.

    A parameter keeps its identity (``param.data`` is replaced), so optimisers, schedulers, hooks
    and user references stay bound to it; its ``.grad`` and optimiser state are the sliced ones.
    """
    for r in records:
        if isinstance(r.old, nn.Parameter):
            replace_data(r.old, r.new)
            r.old.grad = r.new_grad
            if optimizer is not None and r.new_state:
                optimizer.state[r.old] = r.new_state
        else:
            modules[r.owner]._buffers[r.attr] = r.new


@torch.no_grad()
def apply(model: nn.Module, pruning_plan: PruningPlan, optimizer: torch.optim.Optimizer | None = None, *,
          inplace: bool = False) -> nn.Module:
    """A physically smaller ``model`` with the channels ``pruning_plan`` removes gone.

    ``inplace=False`` (default): a new, smaller copy; ``model`` is left untouched.
    ``inplace=True``: ``model`` itself is narrowed and returned. Every module object stays (a
    Lightning module, a ``torch.compile`` or hook wrapper and your references keep working) and
    every parameter stays the same ``nn.Parameter`` object with new data, so an optimiser built
    for ``model`` stays bound to it; with ``optimizer`` its state is sliced in place too.

    Every sliced tensor (conv and linear weights and biases, BatchNorm parameters and running
    statistics), the gradients of the sliced parameters and, with ``optimizer``, their optimiser
    state are gathered with :func:`rnip_ext.ops.channel_gather_many`, each through the same
    :class:`Remap` record (old tensor, output indices, input indices): a copy in one call (the
    rest is shared-nothing deep-copied, with its ``.grad`` cloned); in place in batches of about
    ``INPLACE_BATCH_BYTES`` of old tensors, each batch's old tensors released before the next is
    gathered, so the peak memory is the model plus one batch (every gather is checked before the
    first one runs). ``num_batches_tracked``,
    ``requires_grad``, training mode, dtypes and devices are carried over. The constant output of
    removed channels is folded into the consumers' biases (see :func:`rnip_ext.pruning.plan`); in a
    residual stream group (``residual_streams=True``) that constant is the stream's: the sum of
    the constants of the BatchNorms summed into it, through the ops after each sum
    (:mod:`rnip_ext.pruning.folding`). A plan made with ``se_ratio`` also narrows the inner width
    of squeeze-and-excitation blocks (``plan.se_keep``): the reducing conv's weight rows and
    bias and the expanding conv's weight columns, in the same gather; nothing is folded there.

    ``optimizer`` (optional), built for ``model``, is **rebound in place** to the pruned
    model's parameters, so that whatever refers to it keeps working: an lr scheduler
    (``last_epoch``, milestones, ``base_lrs``), a ``GradScaler``, your own references. Its param
    groups keep their order and hyper-parameters (lr, weight decay, momentum, the paper's
    BatchNorm groups); per-parameter state shaped like the parameter (SGD ``momentum_buffer``,
    Adam/AdamW ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) is sliced with the parameter's
    indices, so removed channels' state is gone, not zeroed; ``step`` is kept; the state of
    unsliced parameters moves over unchanged. A bias created by folding joins the group of its
    layer's weight, with empty state. After the call the optimiser serves the pruned model only.
    Errors, raised before anything changes: ``ValueError`` for an optimiser holding a parameter
    that is not ``model``'s, or a sliced parameter with state of another kind (named), so that
    nothing is silently dropped; build a new optimiser in that case.

    Without ``optimizer`` a copy has new parameter objects: optimisers built for ``model`` must
    be rebuilt for it. Regularisers follow with ``RecedingRegularizer.rebind(pruned)``.
    """
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__}")
    _check_plan_fits(model, pruning_plan)
    modules = dict(model.named_modules())
    slices = module_slices(pruning_plan.groups, pruning_plan.group_keep, pruning_plan.se_blocks, pruning_plan.se_keep)
    records = _remaps(model, slices)
    if optimizer is not None:
        _check_optimizer(model, optimizer, records)

    deltas: dict[str, Tensor] = {}
    for g in pruning_plan.groups:
        removed = _removed(g.channels, pruning_plan.group_keep[g.name])
        if len(removed) == 0:
            continue
        for f in group_folds(g, removed, modules):
            c = f.consumer
            delta = fold_delta(model, c, removed, modules, value=f.value)
            if delta is not None:
                deltas[c.name] = delta if c.name not in deltas else deltas[c.name] + delta

    graphs = cached(model)  # narrowed below for the pruned model: no new trace
    if inplace:
        _check_gathers(records, optimizer)  # nothing narrowed when a gather would fail
        for batch in _batches(records):
            _gather(batch, optimizer, check_values=False)
            _narrow_in_place(modules, batch, optimizer)
        for name, (out_idx, in_idx) in slices.items():
            _resize(modules[name], out_idx, in_idx)
        new_biases = _add_folded_biases(modules, slices, deltas)
        if optimizer is not None:
            _add_to_groups(optimizer, model, new_biases)
        _hand_over(model, graphs, pruning_plan, new_biases)
        return model

    _gather(records, optimizer)
    memo: dict[int, object] = {}
    for r in records:
        if isinstance(r.old, nn.Parameter):
            new = nn.Parameter(r.new, requires_grad=r.old.requires_grad)
            new.grad = r.new_grad
            memo[id(r.old)] = new
        else:
            memo[id(r.old)] = r.new
    pruned = copy.deepcopy(model, memo)
    sliced = {id(r.old) for r in records}
    pruned_params = dict(pruned.named_parameters())
    for name, old in model.named_parameters():
        if id(old) not in sliced and old.grad is not None:
            pruned_params[name].grad = old.grad.clone()

    new_modules = dict(pruned.named_modules())
    for name, (out_idx, in_idx) in slices.items():
        _resize(new_modules[name], out_idx, in_idx)
    new_biases = _add_folded_biases(new_modules, slices, deltas)
    if optimizer is not None:
        _rebind_optimizer(optimizer, model, pruned, records, new_biases)
    _hand_over(pruned, graphs, pruning_plan, new_biases)
    return pruned


def _hand_over(pruned: nn.Module, graphs: list, pruning_plan: PruningPlan, new_biases: dict) -> None:
    """Cache the original's channel graphs, narrowed to the plan, for the pruned model (when the
    plan was made on the graph cached for it; otherwise the pruned model is traced on next use)."""
    sizes = {name: len(b) for name, b in new_biases.items()}
    narrowed = [(key, g.narrowed(pruning_plan.group_keep, sizes, pruning_plan.se_keep)) for key, g in graphs
                if [x.name for x in g.groups] == [x.name for x in pruning_plan.groups]
                and all(a.channels == b.channels for a, b in zip(g.groups, pruning_plan.groups))
                and [(b.name, b.channels) for b in g.se_blocks]
                == [(b.name, b.channels) for b in pruning_plan.se_blocks]]
    remember(pruned, narrowed)


def prune(
    model: nn.Module,
    ratio: float | None = None,
    scope: str = "global",
    min_channels: int = 3,
    *,
    example_inputs,
    target_flops: float | None = None,
    target_params: float | None = None,
    fold: str = "approximate",
    optimizer: torch.optim.Optimizer | None = None,
    inplace: bool = False,
    residual_streams: bool = False,
    se_ratio: float = 0.0,
) -> nn.Module:
    """Plan and apply in one call: ``apply(model, plan(model, ratio, ...), optimizer, inplace=inplace)``
    (see both); exactly one of ``ratio``, ``target_flops`` (fraction of FLOPs kept) and ``target_params``;
    ``se_ratio``: the fraction of each squeeze-and-excitation block's inner channels to remove (see :func:`plan`)."""
    return apply(model, plan(model, ratio, scope, min_channels, example_inputs=example_inputs,
                             target_flops=target_flops, target_params=target_params, fold=fold,
                             residual_streams=residual_streams, se_ratio=se_ratio), optimizer,
                 inplace=inplace)
