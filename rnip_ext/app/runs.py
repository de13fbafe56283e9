"""Train, prune, measure: the steps ``rnip train``, ``rnip prune`` and ``rnip demo`` share, as library calls.

    model = build_model({"arch": "vgg_small", "method": "rni"}, num_classes=10, in_channels=1)
    ...  # rnip_ext.training.fit(model, splits, "runs/a", ...)
    outcome = prune_and_measure(model, splits, torch.zeros(1, 1, 16, 16), target_flops=0.2)
    outcome.small                             # the pruned network; outcome.plan, accuracies, speeds

The commands only parse arguments, check their run directories and print; everything they
compute is here (or in :mod:`rnip_ext.training`, :mod:`rnip_ext.pruning`, :mod:`rnip_ext.budget`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import models
from .._validation import is_int
from .measure import Throughput, measure_throughput
from ..nn import BoundedBatchNorm2d
from ..pruning import PruningPlan, apply, count_flops, count_params, plan
from ..training import bn_kind, evaluate

__all__ = ["ARCHS", "DATASET_CHOICES", "PruneOutcome", "budget_summary", "build_model", "image_size_for",
           "load_splits", "prune_and_measure", "prune_summary", "resolve_threads"]

ARCHS = ("vgg16", "resnet56", "vgg_small")
DATASET_CHOICES = ("cifar10", "cifar100", "digits", "imagefolder")


def load_splits(config: dict, device, *, download: bool = False):
    """The :class:`~rnip_ext.data.DataSplits` a run config names: in memory on ``device`` for
    ``cifar10``/``cifar100``/``digits`` (:func:`~rnip_ext.data.load_dataset`), streamed from
    ``config["data_dir"]`` for ``imagefolder`` (:func:`~rnip_ext.data.load_image_folder` with
    ``image_size``, ``mean``, ``std``)."""
    from ..data import IMAGENET_MEAN, IMAGENET_STD, load_dataset, load_image_folder

    if config["dataset"] == "imagefolder":
        if config.get("data_dir") is None:
            raise ValueError("imagefolder needs a data directory (--data-dir DIR holding DIR/train/<class>/...)")
        return load_image_folder(config["data_dir"], config["image_size"], config.get("mean") or IMAGENET_MEAN,
                                 config.get("std") or IMAGENET_STD, val_fraction=config["val_fraction"],
                                 seed=config["seed"])
    return load_dataset(config["dataset"], config["data_dir"], config["val_fraction"], config["seed"], device,
                        download=download, image_size=config["image_size"])


def resolve_threads(threads: int | str | None) -> int:
    """CPU threads for torch: an int as given; ``"auto"`` (or ``None``) the CPUs this process may
    use minus those the 1-minute load average says are busy (at least 1), or torch's setting when
    ``OMP_NUM_THREADS`` is set (torchrun sets it to 1 per rank). Spinning OpenMP threads lose
    badly when other processes hold the cores (a 2-core machine shared with one other job ran
    the demo ~10x slower with 2 threads than with 1)."""
    import os

    if threads not in (None, "auto"):
        if not (is_int(threads) and threads >= 1):
            raise ValueError(f"threads must be an int >= 1 or 'auto', got {threads!r}")
        return threads
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except (OSError, AttributeError):
        busy = 0
    return max(1, min(usable, torch.get_num_threads() if usable > 1 else 1, usable - busy))


def build_model(config: dict, num_classes: int, in_channels: int) -> nn.Module:
    """The model a run config describes (``config["arch"]`` in :data:`ARCHS`; bounded BatchNorm
    for ``config["method"] == "rni"``, plain otherwise): the same builder for training, pruning,
    reporting and the demo."""
    if config["arch"] not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {config['arch']!r}")
    bn = bn_kind(config["method"])
    if config["arch"] == "vgg16":
        return models.vgg16_cifar(num_classes, bn, in_channels)
    if config["arch"] == "resnet56":
        return models.resnet56_cifar(num_classes, bn, in_channels)
    return models.vgg_small(num_classes, bn, in_channels=in_channels)


def image_size_for(arch: str, dataset: str) -> int | None:
    """Digits are upsampled to 32x32 for the CIFAR networks, 16x16 for the small VGG (``None``:
    the dataset's own size)."""
    if dataset != "digits":
        return None
    return 16 if arch == "vgg_small" else 32


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: b.num_features for n, b in model.named_modules() if isinstance(b, BoundedBatchNorm2d)}


def budget_summary(original: nn.Module, final: nn.Module, example, target: float) -> dict:
    """Summary keys of a run trained to a budget: the final network's counts (``params``,
    ``flops``), the original's (``params_before``, ``flops_before``), ``achieved_flops =
    flops / flops_before``, ``ratio`` = the fraction of prunable (bounded BatchNorm) channels
    removed, and ``kept_channels`` = ``[[layer, channels before, channels after], ...]``."""
    before, after = _widths(original), _widths(final)
    flops_before, flops_after = count_flops(original, example), count_flops(final, example)
    return {"params": count_params(final), "flops": flops_after, "params_before": count_params(original),
            "flops_before": flops_before, "target_flops": target, "achieved_flops": flops_after / flops_before,
            "ratio": 1 - sum(after.values()) / sum(before.values()),
            "kept_channels": [[n, before[n], after.get(n, before[n])] for n in before]}


@dataclass
class PruneOutcome:
    """What :func:`prune_and_measure` did: the ``plan``, the pruned network ``small``, test
    accuracy before (``acc_before``) and right after pruning (``acc_pruned``, no fine-tuning),
    the pruned network's validation accuracy (``val_pruned``) and the measured inference speed
    of both networks (``speed_before``, ``speed_after``)."""

    plan: PruningPlan
    small: nn.Module
    acc_before: float
    acc_pruned: float
    val_pruned: float
    speed_before: Throughput
    speed_after: Throughput


def prune_and_measure(model: nn.Module, splits, example_inputs: torch.Tensor, *, ratio: float | None = None,
                      target_flops: float | None = None, target_params: float | None = None, scope: str = "global",
                      min_channels: int = 3, speed_batch_size: int = 64, target_latency: float | None = None,
                      round_to: int | None = None, latency_table=None, latency_rule: str = "knapsack",
                      residual_streams: bool = False) -> PruneOutcome:
    """Prune ``model`` once (:func:`rnip_ext.pruning.plan` with these arguments, then
    :func:`~rnip_ext.pruning.apply`, which leaves ``model`` unchanged) and measure it.

    ``latency_table`` (a :class:`~rnip_ext.pruning.LatencyTable` or a path) and ``latency_rule``
    are the planner's, for ``target_latency``. Test accuracy of ``model`` and of the pruned network (on ``splits.test``; ``splits.val`` when
    there is no test split), and a rough
    inference speed of both on their device (:func:`rnip_ext.app.measure.measure_throughput`:
    median of 5 batches of ``speed_batch_size`` random images after 2 warm-up batches). Bad
    budgets raise the planner's ``ValueError`` before anything else runs.
    """
    device = example_inputs.device
    test = splits.test if splits.test is not None else splits.val  # an image folder may have no test split
    acc_before = evaluate(model, test)
    pruning_plan = plan(model, ratio, scope, min_channels, example_inputs=example_inputs, target_flops=target_flops,
                        target_params=target_params, target_latency=target_latency, round_to=round_to,
                        latency_table=latency_table, latency_rule=latency_rule, residual_streams=residual_streams)
    small = apply(model, pruning_plan)
    batch = torch.randn(speed_batch_size, *example_inputs.shape[1:], device=device)
    speed_before, speed_after = (measure_throughput(m, batch, warmup=2, repeats=5) for m in (model, small))
    return PruneOutcome(pruning_plan, small, acc_before, evaluate(small, test), evaluate(small, splits.val),
                        speed_before, speed_after)


def prune_summary(outcome: PruneOutcome, best: dict, *, config: dict, ratio: float | None, scope: str,
                  target_flops: float | None = None, target_params: float | None = None,
                  target_latency: float | None = None, round_to: int | None = None) -> dict:
    """The ``summary.json`` of a prune run: ``outcome`` (:func:`prune_and_measure`) and ``best``
    (:func:`rnip_ext.training.fit`'s result of the fine-tuning, or the pruned network's own
    accuracies with ``epoch`` 0 when there was none); ``config`` gives ``arch``, ``dataset``,
    ``method``. ``ratio`` is the channel ratio asked for, or the one a budget led to (tables sort
    by it); ``kept_channels`` is ``[[layer, channels, kept], ...]`` in graph order; ``latency_rule``
    the plan's (``None`` for a plan without a latency budget)."""
    p, speed = outcome.plan, (outcome.speed_before, outcome.speed_after)
    return {
        "kind": "prune", "arch": config["arch"], "dataset": config["dataset"], "method": config["method"],
        "ratio": ratio if ratio is not None else p.achieved_ratio,
        "achieved_ratio": p.achieved_ratio, "scope": scope,
        "target_flops": target_flops, "target_params": target_params, "target_latency": target_latency,
        "latency_rule": p.latency_rule, "round_to": round_to, "residual_streams": p.residual_streams,
        "latency_s": None if p.latency is None else list(p.latency),
        "achieved_flops": p.achieved_flops, "achieved_params": p.achieved_params,
        "images_per_s_before": speed[0].images_per_s, "images_per_s_after": speed[1].images_per_s,
        "speed_batch_size": speed[0].batch_size, "speed_device": speed[0].device,
        "accuracy_before_pruning": outcome.acc_before, "accuracy_after_pruning": outcome.acc_pruned,
        "test_accuracy": best["test_accuracy"], "val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
        "params": p.params[1], "params_before": p.params[0], "flops": p.flops[1],
        "flops_before": p.flops[0],
        "kept_channels": [[g.name, g.channels, len(p.group_keep[g.name])] for g in p.groups],
    }
