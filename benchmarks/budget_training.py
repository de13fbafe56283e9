"""Train to a FLOPs budget in one run vs. one-run cut vs. train-prune-fine-tune, on the digits (CPU).

    python benchmarks/budget_training.py                        # the issue's settings (~7 min, idle 2 cores)
    python benchmarks/budget_training.py --epochs 12 --seeds 0 --budgets 0.05 --methods budget   # quick

Methods (small VGG, digits at 16x16, the paper's SGD recipe, lr 0.05, batch 64, ``--epochs`` 30):

* ``tpf`` (the issue's (a)): train ``--epochs`` at full width with the receding regulariser
  (``rni``: the demo's 5e-2, shift 1), network slimming (``l1``: 1e-3) or none, then prune to the
  budget with the planner (:func:`rnip_ext.pruning.plan` with ``target_flops``), global
  (``scope="global"``) and per-layer (``scope="local"``, the smallest uniform fraction) thresholds,
  and fine-tune ``--finetune`` (10) epochs without a regulariser. One training run per
  regulariser and seed serves every budget and scope. Accuracy is reported right after pruning
  (``pruned``) and after fine-tuning (``final``);
* ``cut`` (the issue's (b)): the simplest one-run schedule: the receding regulariser at a fixed
  strength (5e-2, shift 1), full width for 2/3 of the epochs, then one cut to the budget by the
  planner's global ranking (optimiser state carried), the remaining epochs at the budget;
* ``budget`` (the issue's (c)): :func:`rnip_ext.budget.train_to_budget` with its defaults (the
  focused, FLOPs-weighted receding regulariser, strength adapted by the
  :class:`~rnip_ext.pruning.BudgetController` starting at ``--budget-strength``, receded channels
  removed every epoch, the budget met at a third of the epochs). ``cut_loss`` is the test
  accuracy lost by the cut that meets the budget (the epoch's network before the cut vs after,
  the BatchNorm statistics recalibrated on 4 training batches, no training in between): what
  "receded means removable" is worth.

Reported per run: final test accuracy (the last epoch; for ``budget``/``cut`` no fine-tuning
phase), the best-validation epoch within the budget, achieved FLOPs fraction, training compute
(sum over epochs of the trained network's MACs x samples, as a fraction of ``--epochs`` epochs of
full-width training: ``tpf`` is above 1) and wall time. Writes
``benchmarks/results/budget_training_cpu.json`` (after every run) and ``budget_training_cpu.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, environment  # noqa: E402

from rnip_ext import models, pruning  # noqa: E402
from rnip_ext.budget import BUDGET_START_STRENGTH, BudgetPruning, train_to_budget  # noqa: E402
from rnip_ext.data import load_dataset  # noqa: E402
from rnip_ext.regularizers import RecedingRegularizer  # noqa: E402
from rnip_ext.training import bn_kind, evaluate, fit, make_regularizer  # noqa: E402

STRENGTH, SHIFT, LR, BATCH = 5e-2, 1.0, 0.05, 64
# Where the budget run's strength starts (train_to_budget's default; its controller adapts it).
BUDGET_STRENGTH = BUDGET_START_STRENGTH
# Train-prune-fine-tune regularisers (strength, shift): the demo's, chosen on validation by
# docs/demo/sweep_strengths.py.
TPF = {"rni": (5e-2, 1.0), "l1": (1e-3, 0.0), "none": (0.0, 0.0)}
SCOPES = ("global", "local")


def _rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _recalibrated_accuracy(model, splits, batches: int = 4) -> float:
    """Test accuracy of a copy of ``model`` with its BatchNorm statistics re-estimated on a few
    training batches (a network just cut has statistics measured with the removed channels)."""
    probe = copy.deepcopy(model)
    loader = splits.train.batches(BATCH)  # normalised float batches, in order
    pruning.recalibrate_batchnorm(probe, [next(loader) for _ in range(batches)])
    return evaluate(probe, splits.test)


def run_cut(splits, example, budget: float, epochs: int, seed: int, out: str, **_) -> dict:
    torch.manual_seed(seed)
    model = models.vgg_small(10, "bounded", in_channels=1)
    original = pruning.count_flops(model, example)
    cut_at = max(1, round(2 * epochs / 3))
    extra = {}

    def cut(state):
        if state.epoch == cut_at:
            before = _recalibrated_accuracy(state.model, splits)
            p = pruning.plan(state.model, target_flops=budget, example_inputs=example)
            state.model = pruning.apply(state.model, p, optimizer=state.optimizer)
            extra["cut_loss"] = before - _recalibrated_accuracy(state.model, splits)
        flops = pruning.count_flops(state.model, example)
        state.metrics.update(flops=flops, flops_fraction=flops / original, strength=STRENGTH)

    reg = RecedingRegularizer(model, STRENGTH, SHIFT)
    best = fit(model, splits, out, epochs=epochs, lr=LR, batch_size=BATCH, seed=seed, regularizer=reg,
               progress=False, on_epoch_end=cut,
               selectable=lambda m: pruning.count_flops(m, example) <= budget * original)
    return {"best": best, "rows": _rows(out), "original": original, **extra}


class _MeasuredCut(BudgetPruning):
    """BudgetPruning that also measures the test accuracy lost by the cut that meets the budget."""

    splits = None
    cut_loss = None

    def __call__(self, state) -> None:
        before = _recalibrated_accuracy(state.model, self.splits) if state.epoch == self.cut_epoch else None
        super().__call__(state)
        if before is not None:
            self.cut_loss = before - _recalibrated_accuracy(state.model, self.splits)


def run_budget(splits, example, budget: float, epochs: int, seed: int, out: str, *, budget_strength: float,
               **_) -> dict:
    torch.manual_seed(seed)
    model = models.vgg_small(10, "bounded", in_channels=1)
    original = pruning.count_flops(model, example)
    callback = _MeasuredCut(example, budget, epochs)
    callback.splits = splits
    best = train_to_budget(model, splits, out, target_flops=budget, epochs=epochs, example_inputs=example,
                           strength=budget_strength, shift=SHIFT, lr=LR, batch_size=BATCH, seed=seed,
                           progress=False, callback=callback)
    return {"best": {k: best[k] for k in ("val_accuracy", "epoch", "test_accuracy")}, "rows": _rows(out),
            "original": original, "cut_loss": callback.cut_loss}


def run_tpf(splits, example, budgets, epochs: int, finetune: int, seed: int, workdir: str) -> list[dict]:
    """The issue's (a): one full-width training run per regulariser, then prune to every budget
    with both scopes and fine-tune. Returns one record per (regulariser, scope, budget)."""
    records = []
    for reg_name, (strength, shift) in TPF.items():
        torch.manual_seed(seed)
        model = models.vgg_small(10, bn_kind(reg_name), in_channels=1)
        original = pruning.count_flops(model, example)
        reg = make_regularizer(model, reg_name, strength, shift)
        start = time.perf_counter()
        out = os.path.join(workdir, f"{reg_name}-train")
        fit(model, splits, out, epochs=epochs, lr=LR, batch_size=BATCH, seed=seed, regularizer=reg, progress=False)
        train_wall = time.perf_counter() - start
        unpruned = _rows(out)[-1]["test_accuracy"]
        for scope in SCOPES:
            for budget in budgets:
                start = time.perf_counter()
                p = pruning.plan(model, target_flops=budget, scope=scope, example_inputs=example)
                pruned = pruning.apply(model, p)
                after_prune = evaluate(pruned, splits.test)
                ft = os.path.join(workdir, f"{reg_name}-{scope}-{budget}")
                fit(pruned, splits, ft, epochs=finetune, lr=LR, batch_size=BATCH, seed=seed, progress=False)
                rows = _rows(ft)
                flops = pruning.count_flops(pruned, example)
                records.append({
                    "method": f"tpf-{reg_name}-{scope}", "budget": budget, "seed": seed,
                    "epochs": epochs + finetune, "unpruned_test_accuracy": unpruned,
                    "pruned_test_accuracy": after_prune, "final_test_accuracy": rows[-1]["test_accuracy"],
                    "achieved_flops": flops / original,
                    "training_compute": (epochs * original + finetune * flops) / (epochs * original),
                    "wall_s": train_wall + time.perf_counter() - start,
                    "per_epoch": [{k: r.get(k) for k in ("epoch", "test_accuracy", "val_accuracy", "train_accuracy")}
                                  for r in rows],
                })
    return records


def summarise(method: str, budget: float, seed: int, result: dict, wall: float) -> dict:
    rows, original = result["rows"], result["original"]
    # The network trained in epoch e is the one left after epoch e - 1 (full width in epoch 1).
    trained = [original] + [r["flops"] for r in rows[:-1]]
    return {
        "method": method, "budget": budget, "seed": seed, "epochs": len(rows),
        "final_test_accuracy": rows[-1]["test_accuracy"], "final_val_accuracy": rows[-1]["val_accuracy"],
        "best_in_budget": result["best"], "cut_loss": result.get("cut_loss"),
        "final_channels": rows[-1].get("channels"),
        "achieved_flops": rows[-1]["flops"] / original,
        "training_compute": sum(trained) / (original * len(rows)), "wall_s": wall,
        "per_epoch": [{k: r.get(k) for k in ("epoch", "flops_fraction", "strength", "test_accuracy",
                                              "val_accuracy", "train_accuracy", "active_flops_fraction")}
                      for r in rows],
    }


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    records = [r for r in records if r["method"] in ("cut", "budget")]
    if not records:
        return
    for r in records:
        if r["seed"] != records[0]["seed"]:
            continue
        label = f"{r['method']} {r['budget']:.0%}"
        e = [p["epoch"] for p in r["per_epoch"]]
        axes[0].plot(e, [p["flops_fraction"] for p in r["per_epoch"]], marker=".", label=label)
        axes[1].plot(e, [p["strength"] for p in r["per_epoch"]], marker=".", label=label)
        axes[2].plot(e, [100 * p["test_accuracy"] for p in r["per_epoch"]], marker=".", label=label)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("FLOPs / original (after the epoch)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("regulariser strength")
    axes[2].set_ylabel("test accuracy (%)")
    for a in axes:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"seed {records[0]['seed']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--finetune", type=int, default=10, help="fine-tuning epochs of the tpf baselines")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.10, 0.05, 0.02])
    p.add_argument("--methods", nargs="+", default=["tpf", "cut", "budget"], choices=["tpf", "cut", "budget"])
    p.add_argument("--budget-strength", type=float, default=BUDGET_STRENGTH,
                   help="where the budget run's controller starts")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    splits = load_dataset("digits", seed=0, image_size=16)
    example = torch.zeros(1, 1, 16, 16)
    records = []
    runners = {"cut": run_cut, "budget": run_budget}
    for seed in args.seeds:
        if "tpf" in args.methods:
            with tempfile.TemporaryDirectory() as d:
                for rec in run_tpf(splits, example, args.budgets, args.epochs, args.finetune, seed, d):
                    records.append(rec)
                    print(f"{rec['method']:16s} budget {rec['budget']:.0%} seed {seed}: pruned "
                          f"{100 * rec['pruned_test_accuracy']:.2f}% -> fine-tuned {100 * rec['final_test_accuracy']:.2f}%"
                          f" at {rec['achieved_flops']:.4f} FLOPs, compute {rec['training_compute']:.3f}", flush=True)
            _write(args, splits, device, records, [])
        for budget in args.budgets:
            for method in (m for m in args.methods if m != "tpf"):
                with tempfile.TemporaryDirectory() as d:
                    start = time.perf_counter()
                    result = runners[method](splits, example, budget, args.epochs, seed, os.path.join(d, "run"),
                                             budget_strength=args.budget_strength)
                    rec = summarise(method, budget, seed, result, time.perf_counter() - start)
                records.append(rec)
                loss = f", cut loses {100 * rec['cut_loss']:.2f} pt" if rec["cut_loss"] is not None else ""
                print(f"{method:16s} budget {budget:.0%} seed {seed}: final test {100 * rec['final_test_accuracy']:.2f}%"
                      f" at {rec['achieved_flops']:.4f} FLOPs, compute {rec['training_compute']:.3f}{loss}, "
                      f"{rec['wall_s']:.0f} s", flush=True)
                _write(args, splits, device, records, [])  # after every run: an interrupted run keeps its rows
    _write(args, splits, device, records, _table(args, records))
    try:
        plot(records, os.path.join(RESULTS, "budget_training_cpu.png"))
    except ImportError:
        print("matplotlib missing: no plot")


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def _table(args, records: list[dict]) -> list[dict]:
    table = []
    methods = sorted({r["method"] for r in records}, key=lambda m: (m != "budget", m != "cut", m))
    for budget in args.budgets:
        for method in methods:
            rs = [r for r in records if r["budget"] == budget and r["method"] == method]
            if not rs:
                continue
            mean, sd = _mean_sd([100 * r["final_test_accuracy"] for r in rs])
            pruned, _ = _mean_sd([100 * r["pruned_test_accuracy"] for r in rs if "pruned_test_accuracy" in r])
            cut_loss, _ = _mean_sd([100 * r["cut_loss"] for r in rs if r.get("cut_loss") is not None])
            row = {"method": method, "budget": budget, "n": len(rs), "mean": mean, "sd": sd,
                   "pruned_mean": pruned, "cut_loss_mean": cut_loss,
                   "achieved_flops": statistics.mean(r["achieved_flops"] for r in rs),
                   "training_compute": statistics.mean(r["training_compute"] for r in rs),
                   "wall_s": statistics.mean(r["wall_s"] for r in rs)}
            table.append(row)
            sd_text = f" +- {sd:.2f}" if sd is not None else ""
            extra = f", right after pruning {pruned:.2f}" if pruned is not None else ""
            extra += f", the budget cut loses {cut_loss:.2f} pt" if cut_loss is not None else ""
            print(f"{method:16s} {budget:.0%}: {mean:.2f}{sd_text} (n={len(rs)}) at {row['achieved_flops']:.4f} FLOPs, "
                  f"compute {row['training_compute']:.3f}{extra}")
    return table


def _write(args, splits, device, records: list[dict], table: list[dict]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    payload = {"environment": environment(device), "settings": vars(args) | {
        "dataset": f"digits 16x16 ({len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test)",
        "model": "vgg_small", "cut_strength": STRENGTH, "shift": SHIFT, "lr": LR, "batch_size": BATCH,
        "tpf_regularisers": TPF},
        "summary": table, "runs": records}
    path = os.path.join(RESULTS, "budget_training_cpu.json")
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
