"""Physical channel pruning: importance, a pruning plan, a smaller network, saving and loading.

    plan = rnip_ext.pruning.plan(model, 0.5, example_inputs=torch.randn(1, 3, 32, 32))
    print(plan)
    small = rnip_ext.pruning.apply(model, plan)      # or rnip_ext.prune(model, 0.5, ...)
    rnip_ext.pruning.export(small, "small.pt2", torch.randn(1, 3, 32, 32))  # loads without rnip_ext

To a measured latency: ``plan(model, target_latency=0.5, round_to=8, example_inputs=...)``
times the network's layers on its device first (:class:`LatencyTable`, save it for reuse).

During training, :class:`rnip_ext.BudgetPruner` removes receded channels between epochs and
``apply(..., optimizer=opt)`` carries the optimiser's state over. Every function here reads the
model's :class:`ChannelGraph` (one trace per model, cached; see docs/pruning.md).
"""

from .apply import apply, prune
from .deploy import export
from .channels import ChannelGraph, channel_graph
from .flops import channel_costs, count_flops, count_params
from .graph import ChannelGroup, PruningTraceError, find_channel_groups
from .importance import channel_importance
from .io import architecture_json, load, restore, save
from .latency import LatencyTable, WallClockTimer
from .latency_plan import plan_to_latency
from .plan import PruningPlan, plan, plan_from_keep, plan_receded
from .recalibrate import recalibrate_batchnorm

__all__ = [
    "ChannelGraph",
    "ChannelGroup",
    "LatencyTable",
    "PruningPlan",
    "PruningTraceError",
    "WallClockTimer",
    "apply",
    "architecture_json",
    "channel_costs",
    "channel_graph",
    "channel_importance",
    "count_flops",
    "count_params",
    "export",
    "find_channel_groups",
    "load",
    "plan",
    "plan_from_keep",
    "plan_receded",
    "plan_to_latency",
    "prune",
    "recalibrate_batchnorm",
    "restore",
    "save",
]
