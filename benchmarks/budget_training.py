"""Train to a FLOPs budget in one run vs. the simplest one-run cut, on the digits (CPU).

    python benchmarks/budget_training.py                        # the issue's settings (slow on CPU)
    python benchmarks/budget_training.py --epochs 12 --seeds 0 1 --budgets 0.05 0.02   # reduced

Methods (small VGG, digits at 16x16, the paper's SGD recipe, lr 0.05, batch 64):

* ``cut``: the simplest one-run schedule (the issue's (b)): the receding regulariser at a fixed
  strength (the demo's 5e-2, shift 1), full width for 2/3 of the epochs, then one cut to the
  budget by the planner's global ranking (:func:`rnip_ext.pruning.plan` with ``target_flops``,
  optimiser state carried), the remaining epochs at the budget;
* ``budget``: :func:`rnip_ext.budget.train_to_budget` (the issue's (c)): ``cost="flops"``
  receding regulariser starting at 5e-2 (shift 1), the strength adapted by the
  :class:`~rnip_ext.pruning.BudgetController`, receded channels removed every epoch, the budget
  enforced from half the epochs on.

The train-prune-fine-tune baselines of the issue's (a) are not run here (they are what
``rnip demo`` and ``rnip prune --target-flops`` measure). Reported per run: final test accuracy
(the last epoch, no fine-tuning), accuracy of the best-validation epoch within the budget,
achieved FLOPs fraction, training compute (sum over epochs of the network's MACs x samples,
as a fraction of full-width training for the same epochs) and wall time. Writes
``benchmarks/results/budget_training_cpu.json`` and ``budget_training_cpu.png``.
"""

from __future__ import annotations

import argparse
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
from rnip_ext.budget import train_to_budget  # noqa: E402
from rnip_ext.data import load_dataset  # noqa: E402
from rnip_ext.regularizers import RecedingRegularizer  # noqa: E402
from rnip_ext.training import fit  # noqa: E402

STRENGTH, SHIFT, LR, BATCH = 5e-2, 1.0, 0.05, 64


def _rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_cut(splits, example, budget: float, epochs: int, seed: int, out: str) -> dict:
    torch.manual_seed(seed)
    model = models.vgg_small(10, "bounded", in_channels=1)
    original = pruning.count_flops(model, example)
    cut_at = max(1, round(2 * epochs / 3))
    flops_now = {"value": original}

    def cut(state):
        if state.epoch == cut_at:
            p = pruning.plan(state.model, target_flops=budget, example_inputs=example)
            state.model = pruning.apply(state.model, p, optimizer=state.optimizer)
        flops_now["value"] = pruning.count_flops(state.model, example)
        state.metrics.update(flops=flops_now["value"], flops_fraction=flops_now["value"] / original,
                             strength=STRENGTH)

    reg = RecedingRegularizer(model, STRENGTH, SHIFT)
    best = fit(model, splits, out, epochs=epochs, lr=LR, batch_size=BATCH, seed=seed, regularizer=reg,
               progress=False, on_epoch_end=cut,
               selectable=lambda m: pruning.count_flops(m, example) <= budget * original)
    return {"best": best, "rows": _rows(out), "original": original}


def run_budget(splits, example, budget: float, epochs: int, seed: int, out: str) -> dict:
    torch.manual_seed(seed)
    model = models.vgg_small(10, "bounded", in_channels=1)
    original = pruning.count_flops(model, example)
    best = train_to_budget(model, splits, out, target_flops=budget, epochs=epochs, example_inputs=example,
                           strength=STRENGTH, shift=SHIFT, lr=LR, batch_size=BATCH, seed=seed, progress=False)
    return {"best": {k: best[k] for k in ("val_accuracy", "epoch", "test_accuracy")}, "rows": _rows(out),
            "original": original}


def summarise(method: str, budget: float, seed: int, result: dict, wall: float) -> dict:
    rows, original = result["rows"], result["original"]
    # The network trained in epoch e is the one left after epoch e - 1 (full width in epoch 1).
    trained = [original] + [r["flops"] for r in rows[:-1]]
    return {
        "method": method, "budget": budget, "seed": seed, "epochs": len(rows),
        "final_test_accuracy": rows[-1]["test_accuracy"], "best_in_budget": result["best"],
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
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.10, 0.05, 0.02])
    p.add_argument("--methods", nargs="+", default=["cut", "budget"], choices=["cut", "budget"])
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    splits = load_dataset("digits", seed=0, image_size=16)
    example = torch.zeros(1, 1, 16, 16)
    records = []
    runners = {"cut": run_cut, "budget": run_budget}
    for budget in args.budgets:
        for seed in args.seeds:
            for method in args.methods:
                with tempfile.TemporaryDirectory() as d:
                    start = time.perf_counter()
                    result = runners[method](splits, example, budget, args.epochs, seed, os.path.join(d, "run"))
                    rec = summarise(method, budget, seed, result, time.perf_counter() - start)
                records.append(rec)
                print(f"{method:6s} budget {budget:.0%} seed {seed}: final test {100 * rec['final_test_accuracy']:.2f}%"
                      f" at {rec['achieved_flops']:.4f} FLOPs, compute {rec['training_compute']:.3f}, "
                      f"{rec['wall_s']:.0f} s", flush=True)
                _write(args, splits, device, records, [])  # after every run: an interrupted run keeps its rows
    _write(args, splits, device, records, _table(args, records))
    try:
        plot(records, os.path.join(RESULTS, "budget_training_cpu.png"))
    except ImportError:
        print("matplotlib missing: no plot")


def _table(args, records: list[dict]) -> list[dict]:
    table = []
    for budget in args.budgets:
        for method in args.methods:
            accs = [100 * r["final_test_accuracy"] for r in records if r["budget"] == budget and r["method"] == method]
            comp = [r["training_compute"] for r in records if r["budget"] == budget and r["method"] == method]
            if not accs:
                continue
            table.append({"method": method, "budget": budget, "n": len(accs), "mean": statistics.mean(accs),
                          "sd": statistics.stdev(accs) if len(accs) > 1 else None,
                          "training_compute": statistics.mean(comp)})
            sd = f" +- {table[-1]['sd']:.2f}" if table[-1]["sd"] is not None else ""
            print(f"{method:6s} {budget:.0%}: {table[-1]['mean']:.2f}{sd} (n={len(accs)}), compute "
                  f"{table[-1]['training_compute']:.3f}")
    return table


def _write(args, splits, device, records: list[dict], table: list[dict]) -> None:
    os.makedirs(RESULTS, exist_ok=True)
    payload = {"environment": environment(device), "settings": vars(args) | {
        "dataset": f"digits 16x16 ({len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test)",
        "model": "vgg_small", "strength": STRENGTH, "shift": SHIFT, "lr": LR, "batch_size": BATCH},
        "summary": table, "runs": records}
    with open(os.path.join(RESULTS, "budget_training_cpu.json"), "w") as f:
        json.dump(payload, f, indent=1)


if __name__ == "__main__":
    main()
