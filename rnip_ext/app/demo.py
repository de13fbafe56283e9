"""The demo as a library call: several seeds, equal FLOPs budgets, before and after fine-tuning.

:func:`run_demo` trains the small VGG on scikit-learn's 8x8 digits (upsampled to 16x16) with the
receding regulariser (``rni``), network slimming (``l1``) and no regulariser (``none``), once per
seed (``0 .. seeds-1``), and prunes every trained network to each FLOPs target with the budget
planner (:func:`rnip_ext.pruning.plan` with ``target_flops``): ``rni`` and ``l1`` with one global
threshold on the relative score (the paper's method), ``none`` with ``scope="local"``, the
smallest uniform per-layer fraction that meets the same budget (the paper's "uniform" baseline at
equal cost, not at an equal channel fraction). Each pruned network is then fine-tuned without the
regulariser. The fourth method, ``rni-budget``, is the budget-aware receding run
(:class:`rnip_ext.BudgetPruner` in the trainer): one training run per seed and target, same recipe,
data and epochs, in which receded channels leave during training and the budget is met exactly
from a third of the epochs on (the library's defaults, :data:`DEMO_BUDGET`); no fine-tuning phase follows. Every row
of the table is ``mean +- sd`` over the seeds (sample standard deviation, ``n - 1``; ``n/a`` with
one seed); ``report.json`` keeps every seed's value.

Per method and target: test accuracy right after pruning (no fine-tuning; for ``rni-budget`` the
accuracy of the run's network, which had no fine-tuning phase) and after fine-tuning (``-`` where
there is none), parameters, MACs (as a fraction of the unpruned network's), inference images/s
measured on the run's device (rough: median of 5 batches of 32, see
:func:`rnip_ext.app.measure.measure_throughput`) and the total training compute
(:func:`training_compute`), plus each method's unpruned row. Per trained run it also records,
per prunable layer, how many channels receded (relative score ``< RECEDED``, and the paper's
absolute score ``< RECEDED``) and how many each budget kept: a method that "wins" by whole layers
receding (the next BatchNorm renormalising them) shows as layers whose absolute scores are all
below ``RECEDED`` while the relative ones are not. For ``rni-budget`` it records each run's final
width per layer.

Every step is a library call (:func:`rnip_ext.training.fit`, :class:`rnip_ext.BudgetPruner`,
:func:`rnip_ext.app.runs.prune_and_measure`); each sub-run directory still holds what ``rnip
train`` / ``rnip prune`` would write (``config.json``, ``metrics.jsonl``, checkpoints,
``summary.json``, ``pruned.pt``), so ``rnip prune``, ``report`` and ``export`` work on them.

The demo does not tune anything: its strengths come from an offline sweep judged on the
validation split (``docs/demo/sweep_strengths.py``, results in ``docs/demo/sweep_results.json``).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch

from .. import pruning, rundir
from .._validation import check_int, is_int
from ..budget import BUDGET_SHIFT, START_STRENGTH, RunTooShortError, check_budget
from ..callbacks import run_callbacks
from ..data import DATASETS, load_dataset
from ..pruner import BudgetPruner
from ..pruning import count_flops, count_params, restore
from ..pruning.importance import group_scores
from ..rundir import OutputDirError, load_checkpoint, write_json
from ..training import NonFiniteLossError, bn_kind, evaluate, fit, make_optimizer, make_regularizer, make_scheduler
from .demo_plots import write_plots
from .errors import user_errors
from .measure import cpu_model, measure_throughput
from .plots import require_matplotlib
from .runs import budget_summary, build_model, image_size_for, prune_and_measure, prune_summary

__all__ = [
    "BUDGET_METHOD",
    "DEMO_BUDGET",
    "DEMO_EPOCHS",
    "DEMO_FINETUNE_EPOCHS",
    "DEMO_STRENGTH",
    "DEMO_TARGETS",
    "METHODS",
    "RECEDED",
    "aggregate",
    "demo",
    "format_table",
    "run_demo",
    "table_header",
    "training_compute",
]

# The budget-aware receding run's method name in the report and the table.
BUDGET_METHOD = "rni-budget"
METHODS = ("rni", "l1", "none", BUDGET_METHOD)
# (strength, shift) per train-prune-fine-tune method. Chosen once, offline, by docs/demo/sweep_strengths.py on the
# validation split (never test) over rni strength {1e-2, 5e-2, 2e-1} x shift {1, 3} and l1
# strength {1e-4, 1e-3, 1e-2}, one seed, the demo's epochs and targets: rni 5e-2 / shift 1 scored
# 0.987 (next best 0.826), l1 1e-3 scored 0.817 (next 0.719); see docs/demo/sweep_results.json
# and docs/demo/sweep.md. Far stronger than the paper's (1e-3, shift 3 over 160 CIFAR epochs):
# here ~500 steps must polarise the importances.
DEMO_STRENGTH = {"rni": (5e-2, 1.0), "l1": (1e-3, 0.0), "none": (0.0, 0.0)}
# The budget-aware run's settings: keyword arguments of rnip_ext.BudgetPruner (any of BUDGET_KEYS)
# over the library's defaults, which the demo uses unchanged: the penalty focused on the channels the
# planner would remove next, the focused logits moved after each optimiser step (update='decoupled'),
# the strength adapted by the controller, a geometric FLOPs schedule after 2 full-width epochs, the
# network cut to it 2 epochs behind, the budget met at a third of the epochs or later when the curve
# would remove more than half of the FLOPs in one epoch.
DEMO_BUDGET: dict = {}
BUDGET_KEYS = ("strength", "shift", "update", "budget_at", "threshold", "scope", "warmup", "settle",
               "max_step_removal")
# Fractions of the unpruned network's FLOPs (MACs) every method is pruned to.
DEMO_TARGETS = (0.5, 0.2, 0.1)
# Sized for the 5-minute budget on 2 CPU cores: the default demo is 3 seeds x (3 methods x
# (15 training + 3 x 4 fine-tuning epochs) + 3 budget-aware runs x 15 epochs) = 378 epochs over
# ~1,100 images (the paper trains 160 + 160 epochs on CIFAR). Measured: 4 min 6 s wall with
# --threads 1 on an idle 2-core machine (244 s of CPU time; docs/demo/demo_output.txt), the
# budget-aware runs 77 s of it (the sum of their epochs' wall times).
DEMO_EPOCHS = 15
DEMO_FINETUNE_EPOCHS = 4
# A channel "receded" when its score is below this (relative score: under 1% of the layer's
# strongest channel).
RECEDED = 0.01
# The demo's fixed training recipe (the paper's, with a lower lr and batch for ~1,400 images).
RECIPE = {"lr": 0.05, "batch_size": 32, "weight_decay": 1e-4, "bn_lr_scale": 10.0, "val_fraction": 0.1}
ARCH, DATASET, MIN_CHANNELS = "vgg_small", "digits", 3


def _label(target: float) -> str:
    return f"f{round(target * 100):g}"


def training_compute(macs_per_epoch, full_macs: float, epochs: int) -> float:
    """Total training compute as a fraction of full-width training for ``epochs`` epochs.

    ``sum_e macs_e * n / (epochs * full_macs * n) = sum_e macs_e / (epochs * full_macs)``, where
    ``macs_e`` is the MACs (per image, forward) of the network trained in epoch ``e`` (every
    epoch, training and fine-tuning, sees the same ``n`` training images) and ``full_macs`` the
    unpruned network's. One definition for every row of the demo: the unpruned network is
    ``1``; train ``E`` epochs, prune, fine-tune ``F`` epochs is ``(E * full + F * pruned) /
    (E * full) = 1 + (F / E) * macs_fraction`` (above 1); a budget-aware run sums its network's
    MACs at the start of each epoch (it narrows between epochs) and stays below 1.
    """
    macs = [float(m) for m in macs_per_epoch]
    if epochs < 1 or full_macs <= 0 or not macs:
        raise ValueError(f"training_compute needs epochs >= 1, full_macs > 0 and at least one epoch, got "
                         f"{epochs}, {full_macs}, {len(macs)} epochs")
    return sum(macs) / (epochs * float(full_macs))


def _check(seeds, targets, epochs, finetune_epochs, methods, strengths, budget) -> None:
    check_int("seeds", seeds, 1)
    if not targets:
        raise ValueError("targets must name at least one FLOPs fraction")

    for t in targets:
        check_budget(target_flops=t)
    if len(set(targets)) != len(targets) or len({_label(t) for t in targets}) != len(targets):
        raise ValueError(f"targets must differ by at least 1% of the FLOPs, got {list(targets)}")
    check_int("epochs", epochs, 1)
    check_int("finetune_epochs", finetune_epochs, 0)
    known = tuple(strengths) + (BUDGET_METHOD,)
    unknown = [m for m in methods if m not in known]
    if not methods or unknown or len(set(methods)) != len(methods):
        raise ValueError(f"methods must be a non-empty subset of {known}, got {list(methods)}")
    if BUDGET_METHOD in methods:
        bad = [k for k in budget if k not in BUDGET_KEYS]
        if bad:
            raise ValueError(f"budget settings must be among {BUDGET_KEYS}, got {bad}")


def _budget_pruner(model, example, target: float, epochs: int, budget: dict, device):
    """The demo's optimiser (the recipe's SGD and schedule) and a BudgetPruner bound to it."""

    optimizer = make_optimizer(model, RECIPE["lr"], RECIPE["weight_decay"], RECIPE["bn_lr_scale"])
    pruner = BudgetPruner(model, example, target_flops=target, epochs=epochs, optimizer=optimizer,
                          min_channels=MIN_CHANNELS, **budget)
    return optimizer, make_scheduler(optimizer, epochs), pruner


def _check_reachable(targets, in_channels: int, num_classes: int, size: int, *, epochs: int, methods, budget,
                     explicit: bool):
    """Before anything is written: the planner's ``ValueError`` for a target ``MIN_CHANNELS`` makes
    unreachable, and the budget runs' own checks (:class:`rnip_ext.BudgetPruner`). Returns
    ``methods``, without ``rni-budget`` when its runs are too short for a target and it was not
    asked for explicitly (a 1-epoch smoke run still works)."""

    example = torch.zeros(1, in_channels, size, size)
    model = build_model({"arch": ARCH, "method": "rni"}, num_classes, in_channels)
    for t in targets:
        pruning.plan(model, min_channels=MIN_CHANNELS, example_inputs=example, target_flops=t)
    if BUDGET_METHOD not in methods:
        return methods
    try:
        if epochs < 2:
            raise RunTooShortError(f"{BUDGET_METHOD} needs at least 2 epochs, got {epochs}")
        for t in targets:
            _budget_pruner(model, example, t, epochs, budget, "cpu")
    except RunTooShortError as exc:
        if explicit:
            raise ValueError(f"{BUDGET_METHOD}: {exc}") from exc
        return tuple(m for m in methods if m != BUDGET_METHOD)
    return methods


def _device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' but no CUDA device is available")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name))


def _layer_analysis(model, plans: dict, prunes: dict) -> dict:
    """Per prunable layer of a trained network: channels, receded (relative and absolute score),
    kept per target; the scores and the removal threshold per target (for the histogram)."""

    plan = next(iter(plans.values()))  # scores and groups do not depend on the target
    paper = group_scores(model, plan.groups, "paper")
    layers = []
    for g in plan.groups:
        rel = plan.scores[g.name]
        layers.append({"layer": g.name, "channels": g.channels,
                       "receded": int((rel < RECEDED).sum()), "receded_paper_score": int((paper[g.name] < RECEDED).sum()),
                       "kept": {lab: dict((k[0], k[2]) for k in s["kept_channels"])[g.name]
                                for lab, s in prunes.items()}})
    scores = torch.cat([plan.scores[g.name] for g in plan.groups])
    return {"layers": layers, "thresholds": {lab: p.threshold for lab, p in plans.items()}, "scores": scores.tolist(),
            "receded_fraction": float((scores < RECEDED).float().mean())}


def _stage(progress, bar, line: str) -> None:
    if bar is not None:
        bar.set_description(line[:60])
    elif progress:
        print(line, flush=True)


def _start_run(parent: str, name: str, config: dict) -> str:
    """A new sub-run directory of the demo, recorded in the demo's manifest, with its ``config.json``."""

    directory = os.path.join(parent, name)
    rundir.record(parent, name)
    rundir.claim(directory, "prune" if "source_run" in config else "train", "new")
    rundir.record(directory, "config.json")
    write_json(os.path.join(directory, "config.json"), config)
    return directory


def _finish_run(directory: str, summary: dict) -> None:

    rundir.record(directory, "summary.json")
    write_json(os.path.join(directory, "summary.json"), summary)


def _epoch_macs(directory: str, original: int, epochs: int) -> list[int]:
    """MACs of the network each epoch of a budget run trained: the original in the first, then
    the width the previous epoch left (``metrics.jsonl``'s ``flops``, measured after the epoch)."""
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        rows = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: r["epoch"])
    after = {r["epoch"]: int(r["flops"]) for r in rows}
    return [original] + [after[e] for e in range(1, epochs)]


def _load(seed: int, device: torch.device):

    return load_dataset(DATASET, None, RECIPE["val_fraction"], seed, device, image_size=image_size_for(ARCH, DATASET))


class _Demo:
    """The state of one :func:`run_demo`: data per seed, output directory, log, progress."""

    def __init__(self, out, device, epochs, finetune_epochs, log, progress, bar, stages, splits):
        self.out, self.device, self.epochs, self.finetune_epochs = out, device, epochs, finetune_epochs
        self.log, self.progress, self.bar, self.stages, self.done = log, progress, bar, stages, 0
        self.splits: dict = splits

    def stage(self, line: str) -> None:
        self.done += 1
        _stage(self.progress, self.bar, f"[{self.done}/{self.stages}] {line}")
        print(f"== {line}", file=self.log, flush=True)

    def stage_done(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def data(self, seed: int):
        if seed not in self.splits:  # the seeded split is the same for every method
            self.splits[seed] = _load(seed, self.device)
        splits = self.splits[seed]
        return splits, torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=self.device)

    def config(self, method: str, strength: float, shift: float, seed: int, model, example, splits) -> dict:
        """What ``rnip train`` records in ``config.json`` for these settings (the same
        :meth:`TrainSpec.config` and resolved fields; what the other commands read)."""
        from .spec import TrainSpec  # spec reads this module's defaults at import
        from .train import record_resolved

        spec = TrainSpec(out=self.out, arch=ARCH, dataset=DATASET, method=method, strength=strength, shift=shift,
                         epochs=self.epochs, seed=seed, device=self.device.type, **RECIPE)
        config = spec.config()
        record_resolved(config, splits, model, example, self.device, torch.get_num_threads())
        config["made_by"] = "rnip demo"
        return config

    def fit_kwargs(self, seed: int) -> dict:
        return {"lr": RECIPE["lr"], "batch_size": RECIPE["batch_size"], "weight_decay": RECIPE["weight_decay"],
                "bn_lr_scale": RECIPE["bn_lr_scale"], "seed": seed, "progress": False}

    def speed_batch(self, example) -> torch.Tensor:
        return torch.randn(min(RECIPE["batch_size"], 256), *example.shape[1:], device=self.device)

    def train(self, method: str, strength: float, shift: float, seed: int):
        """``rnip train`` for one method and seed: the trained network (best validation epoch) and its summary."""

        splits, example = self.data(seed)
        torch.manual_seed(seed)
        model = build_model({"arch": ARCH, "method": method}, splits.num_classes, splits.in_channels).to(self.device)
        directory = _start_run(self.out, f"train-{method}-s{seed}",
                               self.config(method, strength, shift, seed, model, example, splits))
        best = fit(model, splits, epochs=self.epochs, description=f"train {method}",
                   regularizer=make_regularizer(model, method, strength, shift),
                   callbacks=run_callbacks(directory, splits), **self.fit_kwargs(seed))
        restore(model, load_checkpoint(os.path.join(directory, "best.pt"))["model"])
        summary = {"kind": "train", "arch": ARCH, "dataset": DATASET, "method": method, "ratio": 0.0,
                   "best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
                   "test_accuracy": best["test_accuracy"], "params": count_params(model),
                   "flops": count_flops(model, example)}
        _finish_run(directory, summary)
        print(f"{method}: best epoch {best['epoch']} val {best['val_accuracy']:.4f} test {best['test_accuracy']:.4f}"
              f" -> {directory}", file=self.log, flush=True)
        return model, summary

    def prune(self, model, config: dict, method: str, seed: int, target: float):
        """``rnip prune --target-flops target`` with fine-tuning: the plan and the prune run's summary."""

        splits, example = self.data(seed)
        scope = "local" if method == "none" else "global"
        torch.manual_seed(seed)
        outcome = prune_and_measure(model, splits, example, target_flops=target, scope=scope,
                                    min_channels=MIN_CHANNELS, speed_batch_size=min(RECIPE["batch_size"], 256))
        print(outcome.plan, file=self.log, flush=True)
        name = f"train-{method}-s{seed}"
        directory = _start_run(self.out, f"prune-{method}-s{seed}-{_label(target)}", dict(
            config, source_run=os.path.abspath(os.path.join(self.out, name)), ratio=None, target_flops=target,
            target_params=None, scope=scope, min_channels=MIN_CHANNELS, finetune_epochs=self.finetune_epochs))
        small = outcome.small
        best = {"test_accuracy": outcome.acc_pruned, "val_accuracy": outcome.val_pruned, "epoch": 0}
        if self.finetune_epochs > 0:
            best = fit(small, splits, epochs=self.finetune_epochs, description="fine-tune",
                       callbacks=run_callbacks(directory, splits), **self.fit_kwargs(seed))
            small.load_state_dict(load_checkpoint(os.path.join(directory, "best.pt"))["model"])
        rundir.record(directory, "pruned.pt")
        pruning.save(small, os.path.join(directory, "pruned.pt"))
        summary = prune_summary(outcome, best, config=config, ratio=None, scope=scope, target_flops=target)
        _finish_run(directory, summary)
        print(f"{method} pruned to {outcome.plan.achieved_flops:.1%} of the FLOPs ({scope}): test accuracy "
              f"{outcome.acc_before:.4f} -> {outcome.acc_pruned:.4f} pruned -> {best['test_accuracy']:.4f} "
              f"fine-tuned", file=self.log, flush=True)
        return outcome.plan, summary

    def train_and_prune(self, method: str, strength: float, shift: float, seed: int, targets):
        """Train one method and seed, then prune and fine-tune it to each target: the trained run's
        summary, the prune runs' summaries per target label, and the per-layer analysis."""
        self.stage(f"train {method} seed {seed} ({self.epochs} epochs)")
        t0 = time.perf_counter()
        model, trained = self.train(method, strength, shift, seed)
        trained["wall_s"] = time.perf_counter() - t0
        self.stage_done()
        config = rundir.read_json(os.path.join(self.out, f"train-{method}-s{seed}", "config.json"))
        prunes, plans = {}, {}
        for t in targets:
            self.stage(f"prune {method} seed {seed} to {t:.0%} of the FLOPs, fine-tune {self.finetune_epochs} "
                       f"epochs")
            t0 = time.perf_counter()
            plans[_label(t)], prunes[_label(t)] = self.prune(model, config, method, seed, t)
            prunes[_label(t)]["wall_s"] = time.perf_counter() - t0
            self.stage_done()
        return trained, prunes, _layer_analysis(model, plans, prunes)

    def budget_runs(self, seed: int, targets, budget: dict) -> dict:
        """One budget-aware run per target for ``seed``: their summaries per target label."""
        summaries = {}
        for t in targets:
            self.stage(f"train {BUDGET_METHOD} seed {seed} to {t:.0%} of the FLOPs ({self.epochs} epochs, "
                       f"no fine-tuning)")
            t0 = time.perf_counter()
            summaries[_label(t)] = dict(self.budget_run(seed, t, budget), wall_s=time.perf_counter() - t0)
            self.stage_done()
        return summaries

    def budget_run(self, seed: int, target: float, budget: dict) -> dict:
        """``rnip train --target-flops target``: one budget-aware receding run, no fine-tuning; its summary."""

        splits, example = self.data(seed)
        torch.manual_seed(seed)
        model = build_model({"arch": ARCH, "method": "rni"}, splits.num_classes, splits.in_channels).to(self.device)
        original = copy.deepcopy(model)
        optimizer, scheduler, pruner = _budget_pruner(model, example, target, self.epochs, budget, self.device)
        update = budget.get("update", "decoupled")
        config = self.config("rni", budget.get("strength", START_STRENGTH[update]), budget.get("shift", BUDGET_SHIFT),
                             seed, model, example, splits)
        config.update(target_flops=target, receded_below=budget.get("threshold", 0.01), receding=update,
                      min_channels=MIN_CHANNELS,
                      budget=f"BudgetPruner({', '.join(f'{k}={v!r}' for k, v in budget.items()) or 'defaults'})")
        directory = _start_run(self.out, f"train-{BUDGET_METHOD}-s{seed}-{_label(target)}", config)
        best = fit(model, splits, epochs=self.epochs, optimizer=optimizer, scheduler=scheduler, regularizer=pruner,
                   description=f"train {BUDGET_METHOD}", callbacks=run_callbacks(directory, splits, budget=pruner),
                   **self.fit_kwargs(seed))
        # The run's network: best.pt, the best validation epoch among those within the budget
        # (model selection as in every other row), not necessarily the last epoch's width.
        state = load_checkpoint(os.path.join(directory, "best.pt"))
        chosen = restore(build_model({"arch": ARCH, "method": "rni"}, splits.num_classes, splits.in_channels),
                         state["model"], state.get("architecture")).to(self.device)
        summary = {"kind": "train", "arch": ARCH, "dataset": DATASET, "method": "rni", "best_epoch": best["epoch"],
                   "val_accuracy": best["val_accuracy"], "test_accuracy": evaluate(chosen, splits.test),
                   **budget_summary(original, chosen, example, target)}
        speed = measure_throughput(chosen, self.speed_batch(example), warmup=2, repeats=5)
        summary["images_per_s"] = speed.images_per_s
        summary["training_compute"] = training_compute(_epoch_macs(directory, summary["flops_before"], self.epochs),
                                                       summary["flops_before"], self.epochs)
        _finish_run(directory, summary)
        print(f"{BUDGET_METHOD} to {target:.0%} of the FLOPs: best epoch {best['epoch']} at "
              f"{summary['achieved_flops']:.1%} of the FLOPs, test {summary['test_accuracy']:.4f}, training compute "
              f"{summary['training_compute']:.2f} of full width -> {directory}", file=self.log, flush=True)
        return summary


def run_demo(out: str, *, seeds: int = 3, targets=DEMO_TARGETS, epochs: int = DEMO_EPOCHS,
             finetune_epochs: int = DEMO_FINETUNE_EPOCHS, methods=None, strengths=None, budget=None,
             device: str = "auto", progress: bool | str = True, plots: bool = True, overwrite: bool = False,
             log_name: str = "demo_log.txt", threads: int | None = 1) -> dict:
    """Run the demo into ``out`` and return its report (also written as ``out/report.json``).

    ``out`` must be new, empty, or an earlier demo's output (replaced; with ``overwrite`` any
    earlier rnip output, never files rnip did not write: :mod:`rnip_ext.rundir`). For each
    train-prune-fine-tune method (``strengths[method] = (strength, shift)``, default
    :data:`DEMO_STRENGTH`) and seed ``0 .. seeds-1``: train (:func:`rnip_ext.training.fit`) into
    ``out/train-<method>-s<seed>``, then for each FLOPs target ``t`` prune
    (:func:`rnip_ext.app.runs.prune_and_measure`, ``scope="local"`` for ``none``) and fine-tune
    ``finetune_epochs`` into ``out/prune-<method>-s<seed>-f<100 t>``. ``methods`` defaults to
    :data:`METHODS`, without ``rni-budget`` when ``epochs`` are too few for its schedule to reach
    a target (:class:`rnip_ext.budget.RunTooShortError`; a note says it was left out, so a short
    smoke run still works; naming it explicitly then is a ``ValueError``). For ``rni-budget``, per seed and target one
    budget run of ``epochs`` (:class:`rnip_ext.BudgetPruner` in :func:`rnip_ext.training.fit`) into
    ``out/train-rni-budget-s<seed>-f<100 t>`` with ``budget`` (keyword arguments of
    ``BudgetPruner`` among :data:`BUDGET_KEYS`, over :data:`DEMO_BUDGET`). Every sub-run is
    written as ``rnip train`` / ``rnip prune`` would write it. A log of the runs goes to
    ``out/<log_name>``; ``progress`` shows one tqdm bar over the stages on a terminal (``"bar"``
    forces it), one printed line per stage otherwise (``"lines"``), or nothing (``False``).
    ``threads``: CPU threads torch uses during the demo (restored afterwards; ``None`` keeps
    torch's setting). The default, 1, is robust: the tiny network gains little from intra-op
    parallelism, and spinning OpenMP threads lose badly to other processes for the cores (2
    threads ran the demo ~10x slower than 1 on a 2-core machine another job was using).
    Bad settings (and a target ``min_channels=3`` makes
    unreachable) raise ``ValueError``, a missing scikit-learn ``ImportError``, before anything
    is written.

    Returns ``{"settings", "machine", "rows", "runs", "budget_runs", "table", "wall_s"}``:
    ``rows`` from :func:`aggregate` (mean, sd and per-seed values per method and target, target
    ``1.0`` the unpruned network), ``runs`` per (method, seed) the per-layer analysis (channels,
    receded, kept per target), the scores and the removal thresholds, ``budget_runs`` per seed of
    ``rni-budget`` the final width of every layer per target; ``table`` the markdown of
    :func:`format_table`. With ``plots`` (needs matplotlib) the figures of
    :mod:`rnip_ext.app.demo_plots` are written too.
    """

    strengths = dict(DEMO_STRENGTH if strengths is None else strengths)
    budget = dict(DEMO_BUDGET, **(budget or {}))
    targets = tuple(float(t) for t in targets)
    explicit = methods is not None
    methods = METHODS if methods is None else tuple(methods)
    _check(seeds, targets, epochs, finetune_epochs, methods, strengths, budget)
    if threads is not None and not (is_int(threads) and threads >= 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    dev = _device(device)
    num_classes, in_channels = DATASETS[DATASET][0], 1
    asked = methods
    methods = _check_reachable(targets, in_channels, num_classes, 16, epochs=epochs, methods=methods, budget=budget,
                               explicit=explicit)
    left_out = methods != asked
    if plots:
        require_matplotlib()  # fail before hours of training, not after
    splits = {0: _load(0, dev)}  # a missing scikit-learn fails here, before anything is written
    mode = rundir.check(out, "demo", overwrite=overwrite, replace_own=True)
    created = rundir.claim(out, "demo", mode)
    rundir.record(out, log_name)
    tpf = [m for m in methods if m != BUDGET_METHOD]
    if left_out and progress:
        print(f"note: {BUDGET_METHOD} left out (its runs need more epochs to reach these targets)", flush=True)
    stages = len(tpf) * seeds * (1 + len(targets)) + (seeds * len(targets) if BUDGET_METHOD in methods else 0)
    use_bar = progress == "bar" or (progress is True and sys.stdout.isatty() and sys.stderr.isatty())
    bar = None
    if use_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=stages, desc="rnip demo", unit="run")
    start = time.perf_counter()
    results, runs, budget_runs = {}, {}, {}
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    log = open(os.path.join(out, log_name), "w")
    demo = _Demo(out, dev, epochs, finetune_epochs, log, progress, bar, stages, splits)
    try:
        for method in methods:
            for seed in range(seeds):
                if method == BUDGET_METHOD:
                    # One training run to each budget, no fine-tuning phase: its own row per target.
                    summaries = demo.budget_runs(seed, targets, budget)
                    results[(method, seed)] = (None, summaries)
                    budget_runs[f"{method}-s{seed}"] = _final_widths(method, seed, summaries)
                    continue
                strength, shift = strengths[method]
                trained, prunes, analysis = demo.train_and_prune(method, strength, shift, seed, targets)
                results[(method, seed)] = (trained, prunes)
                runs[f"{method}-s{seed}"] = dict(analysis, method=method, seed=seed, strength=strength, shift=shift)
    finally:
        torch.set_num_threads(old_threads)
        log.close()
        if bar is not None:
            bar.close()
        if not results:  # failed before any run finished: leave no empty --out behind
            rundir.release(out, created, keep=())
    rows = aggregate(results, targets, epochs, finetune_epochs)
    wall = time.perf_counter() - start
    report = {
        "settings": {"seeds": list(range(seeds)), "targets": list(targets), "epochs": epochs,
                     "finetune_epochs": finetune_epochs, "methods": list(methods),
                     "strengths": {m: list(strengths[m]) for m in tpf},
                     "budget": budget if BUDGET_METHOD in methods else None, "arch": ARCH, "dataset": DATASET,
                     "recipe": RECIPE, "receded_below": RECEDED, "min_channels": MIN_CHANNELS},
        "machine": dict(machine(), torch_threads=threads or old_threads), "wall_s": wall, "rows": rows, "runs": runs,
        "budget_runs": budget_runs, "table": format_table(rows),
    }
    _write_report(out, report)
    if plots:
        report["plots"] = write_plots(report, out)
    return report


def _write_report(out: str, report: dict) -> None:
    rundir.record(out, "report.md", "report.json")
    with open(os.path.join(out, "report.md.tmp"), "w") as f:
        f.write(report["table"] + "\n")
    os.replace(os.path.join(out, "report.md.tmp"), os.path.join(out, "report.md"))
    write_json(os.path.join(out, "report.json"), report)


def _final_widths(method: str, seed: int, summaries: dict) -> dict:
    """Per layer of a seed's budget runs: its channels and the width each target's run ended at."""
    return {"method": method, "seed": seed,
            "layers": [{"layer": layer, "channels": channels,
                        "kept": {lab: next(k[2] for k in s["kept_channels"] if k[0] == layer)
                                 for lab, s in summaries.items()}}
                       for layer, channels, _ in next(iter(summaries.values()))["kept_channels"]]}


def demo(spec) -> dict:
    """``rnip demo``: :func:`run_demo` with a :class:`~rnip_ext.app.spec.DemoSpec`, the table and where
    everything went printed; returns the report."""
    with user_errors(OutputDirError, ValueError, NonFiniteLossError, ImportError):
        report = run_demo(spec.out, seeds=spec.seeds, targets=spec.target_flops, epochs=spec.epochs,
                          finetune_epochs=spec.finetune_epochs, device=spec.device, progress=spec.progress,
                          plots=spec.plots, overwrite=spec.overwrite, threads=spec.threads)
    print(report["table"])
    m = report["machine"]
    print(f"\n{len(report['settings']['seeds'])} seed(s), {report['wall_s']:.0f} s on {m['cpu']} "
          f"({m['torch_threads']} torch threads{', ' + m['cuda'] if m['cuda'] else ''}); full report: "
          f"{spec.out}/report.json, run logs: {spec.out}/demo_log.txt")
    for path in report.get("plots", {}).values():
        print(f"wrote {path}")
    return report


def machine() -> dict:
    """Where the demo ran: CPU model (``/proc/cpuinfo``), threads torch uses, CUDA device, load."""
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = list(os.getloadavg())
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_1_5_15": load, "torch": torch.__version__, "python": platform.python_version()}


def _stats(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": mean, "sd": sd, "values": values}


def aggregate(results: dict, targets, epochs: int, finetune_epochs: int) -> list[dict]:
    """Rows of the table from ``{(method, seed): (train summary, {label: prune summary})}``
    (for ``rni-budget``: ``(None, {label: budget run summary})``).

    Per train-prune-fine-tune method one unpruned row (``pruned`` False, ``target`` 1.0;
    ``acc_pruned`` is the trained network's test accuracy, ``acc_finetuned`` ``None``) and one
    row per target; per target one ``rni-budget`` row (``pruned`` True, ``budget_run`` True,
    ``acc_pruned`` the run's network's test accuracy, ``acc_finetuned`` ``None``: there is no
    fine-tuning phase). Each measured column is ``{"mean", "sd", "values"}`` over the seeds
    (``values`` in seed order; ``sd`` the sample standard deviation, ``None`` for one seed):
    ``acc_pruned``, ``acc_finetuned`` (fractions), ``params``, ``macs``, ``macs_fraction`` (``macs
    / unpruned macs``), ``images_per_s``, ``training_compute`` (:func:`training_compute`: 1 for
    the unpruned rows, ``1 + finetune_epochs / epochs * macs_fraction`` after pruning and
    fine-tuning, the sum over a budget run's epochs of its network's MACs for ``rni-budget``).
    ``train_epochs`` is the number of training epochs (training + fine-tuning).
    """
    rows = []
    for method in dict.fromkeys(m for m, _ in results):
        seeds = sorted(s for m, s in results if m == method)
        per_seed = [results[(method, s)] for s in seeds]
        if method == BUDGET_METHOD:
            for t in targets:
                bs = [p[_label(t)] for _, p in per_seed]
                rows.append({
                    "method": method, "pruned": True, "budget_run": True, "target": t, "seeds": seeds,
                    "train_epochs": epochs, "acc_pruned": _stats([b["test_accuracy"] for b in bs]),
                    "acc_finetuned": None, "params": _stats([b["params"] for b in bs]),
                    "macs": _stats([b["flops"] for b in bs]),
                    "macs_fraction": _stats([b["flops"] / b["flops_before"] for b in bs]),
                    "images_per_s": _stats([b["images_per_s"] for b in bs]),
                    "training_compute": _stats([b["training_compute"] for b in bs]),
                })
            continue
        rows.append({
            "method": method, "pruned": False, "budget_run": False, "target": 1.0, "seeds": seeds,
            "train_epochs": epochs, "acc_pruned": _stats([t["test_accuracy"] for t, _ in per_seed]),
            "acc_finetuned": None, "params": _stats([t["params"] for t, _ in per_seed]),
            "macs": _stats([t["flops"] for t, _ in per_seed]), "macs_fraction": _stats([1.0 for _ in per_seed]),
            "images_per_s": _stats([p[_label(targets[0])]["images_per_s_before"] for _, p in per_seed]),
            "training_compute": _stats([training_compute([t["flops"]] * epochs, t["flops"], epochs)
                                        for t, _ in per_seed]),
        })
        for t in targets:
            ps = [p[_label(t)] for _, p in per_seed]
            rows.append({
                "method": method, "pruned": True, "budget_run": False, "target": t, "seeds": seeds,
                "train_epochs": epochs + finetune_epochs,
                "acc_pruned": _stats([p["accuracy_after_pruning"] for p in ps]),
                "acc_finetuned": _stats([p["test_accuracy"] for p in ps]) if finetune_epochs else None,
                "params": _stats([p["params"] for p in ps]), "macs": _stats([p["flops"] for p in ps]),
                "macs_fraction": _stats([p["flops"] / p["flops_before"] for p in ps]),
                "images_per_s": _stats([p["images_per_s_after"] for p in ps]),
                "training_compute": _stats([
                    training_compute([p["flops_before"]] * epochs + [p["flops"]] * finetune_epochs, p["flops_before"],
                                     epochs) for p in ps]),
            })
    return rows


def table_header() -> list[str]:
    """The columns of :func:`format_table` (the README's table must have the same)."""
    return ["method", "FLOPs target", "MACs (% of unpruned)", "params", "test acc pruned, no fine-tune (%)",
            "test acc fine-tuned (%)", "images/s", "training compute (x full-width training)", "training epochs"]


def _pm(stats: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if stats is None:
        return "-"
    sd = "n/a" if stats["sd"] is None else f"{scale * stats['sd']:.{digits}f}"
    return f"{scale * stats['mean']:.{digits}f} ± {sd}"


def _pm_count(stats: dict) -> str:
    sd = "n/a" if stats["sd"] is None else f"{stats['sd']:,.0f}"
    return f"{stats['mean']:,.0f} ± {sd}"


def format_table(rows: list[dict]) -> str:
    """Markdown: one line per (method, target), every measured column ``mean ± sd`` over seeds
    (``-``: not applicable, e.g. the fine-tuned accuracy of a network that had no fine-tuning)."""
    head = table_header()
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        target = f"{r['target']:.0%}" if r["pruned"] else "unpruned"
        lines.append("| " + " | ".join([
            r["method"], target, _pm(r["macs_fraction"], 100, 1), _pm_count(r["params"]),
            _pm(r["acc_pruned"], 100), _pm(r["acc_finetuned"], 100), _pm_count(r["images_per_s"]),
            _pm(r["training_compute"]), str(r["train_epochs"]),
        ]) + " |")
    return "\n".join(lines)
