"""Train to a FLOPs budget in one run vs. one-run cut vs. train-prune-fine-tune, on the digits (CPU).

    python benchmarks/budget_training.py --time-limit 3600      # the issue's settings, 3 seeds
    python benchmarks/budget_training.py --epochs 12 --seeds 0 --budgets 0.05 --methods budget adamw   # quick

Methods (small VGG, or ``--model residual`` an own residual CNN; digits at 16x16, batch 64,
``--epochs`` 30; all but ``adamw*`` use the paper's SGD recipe, lr 0.05):

* ``tpf``: train ``--epochs`` at full width with the receding regulariser (``rni``: the demo's
  5e-2, shift 1), network slimming (``l1``: 1e-3) or none, then prune to the budget with the
  planner (``target_flops``), global and per-layer (``local``) thresholds, and fine-tune
  ``--finetune`` (10) epochs without a regulariser. One training run per regulariser and seed
  serves every budget and scope; accuracy right after pruning (``pruned``) and after fine-tuning;
* ``cut``: the receding regulariser at a fixed strength (5e-2, shift 1), full width for 2/3 of
  the epochs, one cut to the budget by the planner's global ranking, the remaining epochs at the
  budget; ``cut_loss`` is the test accuracy the cut costs (BatchNorm statistics recalibrated on 4
  training batches before and after, no training in between);
* ``budget``: :class:`rnip_ext.BudgetPruner` with its defaults (``update="decoupled"``) in the
  project's trainer; ``budget-loss``: the same with ``update="loss"`` (the penalty in the loss);
* ``adamw``: the same BudgetPruner (decoupled) with AdamW (lr 1e-2, weight decay 5e-2, all
  parameters in one group, lr / 10 at 50% and 75%); ``adamw-loss``: AdamW with ``update="loss"``;
* ``pretrained``: a plain-BatchNorm network trained ``--epochs`` without a regulariser (once per
  seed), converted with :func:`rnip_ext.convert_batchnorm` (its accuracy right after the
  conversion is ``converted``), then budget-trained (defaults) for a third of the epochs.

Reported per run: final test accuracy (the last epoch; no fine-tuning phase for the one-run
methods), the best-validation epoch within the budget, the achieved FLOPs fraction, how many
channels receded vs were cut while still active, training compute (sum over the epochs trained
of the network's MACs, as a fraction of ``--epochs`` epochs of full-width training: ``tpf`` and
``pretrained`` are above 1) and wall time. Writes ``--out`` (default
``benchmarks/results/budget_training_cpu.json``, rewritten after every run) and a plot beside it.
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

from rnip_ext import BudgetPruner, convert_batchnorm, models, pruning  # noqa: E402
from rnip_ext.callbacks import Callback, run_callbacks  # noqa: E402
from rnip_ext.data import load_dataset  # noqa: E402
from rnip_ext.regularizers import RecedingRegularizer  # noqa: E402
from rnip_ext.training import bn_kind, evaluate, fit, make_optimizer, make_regularizer, make_scheduler  # noqa: E402

STRENGTH, SHIFT, LR, BATCH = 5e-2, 1.0, 0.05, 64
# AdamW: lr 1e-2 chosen on the validation split: from scratch for 30 epochs, the full network reaches
# 99.4% at lr 1e-3, 3e-3 and 1e-2 alike, a network at 2% of the FLOPs 48% / 74% / 96% (1e-3 underfits it).
ADAMW_LR, ADAMW_WD = 1e-2, 5e-2
# Train-prune-fine-tune regularisers (strength, shift): the demo's, chosen on validation by
# docs/demo/sweep_strengths.py.
TPF = {"rni": (5e-2, 1.0), "l1": (1e-3, 0.0), "none": (0.0, 0.0)}
SCOPES = ("global", "local")
METHODS = ("tpf", "cut", "budget", "budget-loss", "adamw", "adamw-loss", "pretrained")


def _rows(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _recalibrated_accuracy(model, splits, batches: int = 4) -> float:
    """Test accuracy of a copy of ``model`` with its BatchNorm statistics re-estimated on a few
    training batches (a network just cut has statistics measured with the removed channels)."""
    probe = copy.deepcopy(model)
    loader = splits.train.batches(BATCH)  # normalised float batches, in order
    pruning.recalibrate_batchnorm(probe, [b for _, b in zip(range(batches), loader)])
    return evaluate(probe, splits.test)


class _CutOnce(Callback):
    """The ``cut`` method: one cut to the budget after epoch ``at``, its cost measured."""

    def __init__(self, splits, example, budget: float, at: int, original: int) -> None:
        self.splits, self.example, self.budget, self.at, self.original = splits, example, budget, at, original
        self.cut_loss = None

    def on_epoch_end(self, trainer, metrics: dict) -> None:
        if trainer.epoch == self.at:
            before = _recalibrated_accuracy(trainer.model, self.splits)
            p = pruning.plan(trainer.model, target_flops=self.budget, example_inputs=self.example)
            pruning.apply(trainer.model, p, optimizer=trainer.optimizer, inplace=True)
            self.cut_loss = before - _recalibrated_accuracy(trainer.model, self.splits)
        flops = pruning.count_flops(trainer.model, self.example)
        metrics.update(flops=flops, flops_fraction=flops / self.original, strength=STRENGTH)


class _Block(torch.nn.Module):
    def __init__(self, c: int, bn) -> None:
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c)
        self.conv2, self.bn2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False), bn(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def residual_net(bn: str = "bounded") -> torch.nn.Module:
    """``--model residual``: a user's own small residual CNN (stem 32, a block, a strided conv to 64, a
    block, pooled linear head); only the blocks' inner channels can be removed (~18% of the FLOPs stay)."""
    from rnip_ext import BoundedBatchNorm2d

    norm = BoundedBatchNorm2d if bn == "bounded" else torch.nn.BatchNorm2d
    conv = lambda i, o, s=1: torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, s, 1, bias=False), norm(o),  # noqa: E731
                                                 torch.nn.ReLU())
    return torch.nn.Sequential(conv(1, 32), _Block(32, norm), conv(32, 64, 2), _Block(64, norm),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))


MODEL = "vgg_small"


def _vgg(seed: int, bn: str = "bounded"):
    torch.manual_seed(seed)
    return residual_net(bn) if MODEL == "residual" else models.vgg_small(10, bn, in_channels=1)


def run_cut(splits, example, budget: float, epochs: int, seed: int, out: str) -> dict:
    model = _vgg(seed)
    original = pruning.count_flops(model, example)
    cut = _CutOnce(splits, example, budget, max(1, round(2 * epochs / 3)), original)
    callbacks = run_callbacks(out, splits)
    callbacks[1].selectable = lambda m: pruning.count_flops(m, example) <= budget * original
    best = fit(model, splits, epochs=epochs, lr=LR, batch_size=BATCH, seed=seed,
               regularizer=RecedingRegularizer(model, STRENGTH, SHIFT), progress=False,
               callbacks=[*callbacks[:2], cut, *callbacks[2:]])
    return {"best": best, "rows": _rows(out), "original": original, "cut_loss": cut.cut_loss}


def _budget_fit(model, splits, example, budget: float, epochs: int, seed: int, out: str, *, optimizer: str = "sgd",
                update: str = "decoupled") -> dict:
    if optimizer == "sgd":
        opt = make_optimizer(model, LR)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR, weight_decay=ADAMW_WD)
    pruner = BudgetPruner(model, example, target_flops=budget, epochs=epochs, optimizer=opt, update=update)
    best = fit(model, splits, epochs=epochs, optimizer=opt, scheduler=make_scheduler(opt, epochs), regularizer=pruner,
               batch_size=BATCH, seed=seed, progress=False, callbacks=run_callbacks(out, splits, budget=pruner))
    return {"best": {k: best[k] for k in ("val_accuracy", "epoch", "test_accuracy")}, "rows": _rows(out),
            "original": pruner.original_flops}


def run_budget(splits, example, budget, epochs, seed, out, *, optimizer="sgd", update="decoupled") -> dict:
    return _budget_fit(_vgg(seed), splits, example, budget, epochs, seed, out, optimizer=optimizer, update=update)


def train_plain(splits, epochs: int, seed: int, workdir: str):
    """The ``pretrained`` arm's starting point: a plain-BatchNorm network trained without a regulariser."""
    model = _vgg(seed, "plain")
    start = time.perf_counter()
    fit(model, splits, epochs=epochs, lr=LR, batch_size=BATCH, seed=seed, progress=False,
        callbacks=run_callbacks(os.path.join(workdir, f"plain-s{seed}"), splits))
    return model, evaluate(model, splits.test), time.perf_counter() - start


def run_pretrained(splits, example, budget, epochs, seed, out, *, trained) -> dict:
    model, accuracy, _ = trained
    model = convert_batchnorm(copy.deepcopy(model))
    converted = evaluate(model, splits.test)
    result = _budget_fit(model, splits, example, budget, max(3, epochs // 3), seed, out)
    return dict(result, converted=converted, plain=accuracy)


def run_tpf(splits, example, budgets, epochs: int, finetune: int, seed: int, workdir: str) -> list[dict]:
    """One full-width training run per regulariser, then prune to every budget with both scopes and
    fine-tune. Returns one record per (regulariser, scope, budget)."""
    records = []
    for reg_name, (strength, shift) in TPF.items():
        model = _vgg(seed, bn_kind(reg_name))
        original = pruning.count_flops(model, example)
        reg = make_regularizer(model, reg_name, strength, shift)
        start = time.perf_counter()
        out = os.path.join(workdir, f"{reg_name}-train")
        fit(model, splits, epochs=epochs, lr=LR, batch_size=BATCH, seed=seed, regularizer=reg, progress=False,
            callbacks=run_callbacks(out, splits))
        train_wall = time.perf_counter() - start
        unpruned = _rows(out)[-1]["test_accuracy"]
        for scope in SCOPES:
            for budget in budgets:
                start = time.perf_counter()
                p = pruning.plan(model, target_flops=budget, scope=scope, example_inputs=example)
                pruned = pruning.apply(model, p)
                after_prune = evaluate(pruned, splits.test)
                ft = os.path.join(workdir, f"{reg_name}-{scope}-{budget}")
                fit(pruned, splits, epochs=finetune, lr=LR, batch_size=BATCH, seed=seed, progress=False,
                    callbacks=run_callbacks(ft, splits))
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


def summarise(method: str, budget: float, seed: int, result: dict, wall: float, full_epochs: int,
              extra_compute: float = 0.0) -> dict:
    """One record of a one-run method. ``extra_compute``: epochs of full-width training before the
    run (the ``pretrained`` arm's plain training), counted into the training compute."""
    rows, original = result["rows"], result["original"]
    # The network trained in epoch e is the one left after epoch e - 1 (full width in epoch 1).
    trained = [original] + [r["flops"] for r in rows[:-1]]
    return {
        "method": method, "budget": budget, "seed": seed, "epochs": len(rows),
        "final_test_accuracy": rows[-1]["test_accuracy"], "final_val_accuracy": rows[-1]["val_accuracy"],
        "best_in_budget": result["best"], "cut_loss": result.get("cut_loss"),
        "converted_test_accuracy": result.get("converted"), "plain_test_accuracy": result.get("plain"),
        "receded_channels": sum(r.get("removed", 0) - r.get("forced", 0) for r in rows),
        "forced_channels": sum(r.get("forced", 0) for r in rows),
        "final_channels": rows[-1].get("channels"), "achieved_flops": rows[-1]["flops"] / original,
        "training_compute": (extra_compute * original + sum(trained)) / (original * full_epochs), "wall_s": wall,
        "per_epoch": [{k: r.get(k) for k in ("epoch", "flops_fraction", "strength", "test_accuracy", "val_accuracy",
                                              "train_accuracy", "active_flops_fraction", "removed", "forced")}
                      for r in rows],
    }


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in records if not r["method"].startswith("tpf") and r["seed"] == records[0]["seed"]]
    if not records:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for r in records:
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
        a.legend(fontsize=6)
    fig.suptitle(f"seed {records[0]['seed']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--finetune", type=int, default=10, help="fine-tuning epochs of the tpf baselines")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.10, 0.05, 0.02])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--model", choices=("vgg_small", "residual"), default="vgg_small",
                   help="the project's small VGG, or an own residual CNN (budgets >= 0.2: its residual stream stays)")
    p.add_argument("--train-size", type=int, default=None, help="use only the first N training images (tests)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds: start no new run after this long (the results so far are kept)")
    p.add_argument("--out", default=os.path.join(RESULTS, "budget_training_cpu.json"))
    return p.parse_args(argv)


def main(argv=None) -> dict:
    global MODEL
    args = parse_args(argv)
    MODEL = args.model
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    splits = load_dataset("digits", seed=0, image_size=16)
    if args.train_size is not None:
        splits.train = splits.train.subset(torch.arange(args.train_size))
    example = torch.zeros(1, 1, 16, 16)
    records: list[dict] = []
    started = time.perf_counter()
    stopped = False

    def time_left() -> bool:
        return args.time_limit is None or time.perf_counter() - started < args.time_limit

    one_run = {"cut": lambda *a: run_cut(*a),
               "budget": lambda *a: run_budget(*a),
               "budget-loss": lambda *a: run_budget(*a, update="loss"),
               "adamw": lambda *a: run_budget(*a, optimizer="adamw"),
               "adamw-loss": lambda *a: run_budget(*a, optimizer="adamw", update="loss")}
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:
            if "tpf" in args.methods and time_left():
                for rec in run_tpf(splits, example, args.budgets, args.epochs, args.finetune, seed,
                                   os.path.join(workdir, f"tpf-s{seed}")):
                    records.append(rec)
                    print(f"{rec['method']:18s} budget {rec['budget']:.0%} seed {seed}: pruned "
                          f"{100 * rec['pruned_test_accuracy']:.2f}% -> fine-tuned {100 * rec['final_test_accuracy']:.2f}%"
                          f" at {rec['achieved_flops']:.4f} FLOPs, compute {rec['training_compute']:.3f}", flush=True)
                _write(args, splits, device, records, [], stopped)
            trained = None
            if "pretrained" in args.methods and time_left():
                trained = train_plain(splits, args.epochs, seed, workdir)
            for budget in args.budgets:
                for method in (m for m in args.methods if m != "tpf"):
                    if not time_left():
                        stopped = True
                        break
                    if method == "pretrained" and trained is None:
                        continue
                    out = os.path.join(workdir, f"{method}-s{seed}-{budget}")
                    start = time.perf_counter()
                    if method == "pretrained":
                        result = run_pretrained(splits, example, budget, args.epochs, seed, out, trained=trained)
                        wall = time.perf_counter() - start + trained[2]
                        rec = summarise(method, budget, seed, result, wall, args.epochs, extra_compute=args.epochs)
                    else:
                        result = one_run[method](splits, example, budget, args.epochs, seed, out)
                        rec = summarise(method, budget, seed, result, time.perf_counter() - start, args.epochs)
                    records.append(rec)
                    extra = f", the cut loses {100 * rec['cut_loss']:.2f} pt" if rec["cut_loss"] is not None else ""
                    if rec["converted_test_accuracy"] is not None:
                        extra += (f", plain {100 * rec['plain_test_accuracy']:.2f}% -> converted "
                                  f"{100 * rec['converted_test_accuracy']:.2f}%")
                    print(f"{method:18s} budget {budget:.0%} seed {seed}: final test "
                          f"{100 * rec['final_test_accuracy']:.2f}% at {rec['achieved_flops']:.4f} FLOPs, receded "
                          f"{rec['receded_channels']} / cut {rec['forced_channels']} channels, compute "
                          f"{rec['training_compute']:.3f}{extra}, {rec['wall_s']:.0f} s", flush=True)
                    _write(args, splits, device, records, [], stopped)  # an interrupted run keeps its rows
    if stopped:
        print(f"time limit of {args.time_limit:g} s reached: later runs were not started", flush=True)
    payload = _write(args, splits, device, records, _table(args, records), stopped)
    try:
        plot(records, os.path.splitext(args.out)[0] + ".png")
    except ImportError:
        print("matplotlib missing: no plot")
    return payload


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def _table(args, records: list[dict]) -> list[dict]:
    table = []
    order = {m: i for i, m in enumerate(("budget", "adamw", "pretrained", "budget-loss", "adamw-loss", "cut"))}
    methods = sorted({r["method"] for r in records}, key=lambda m: (order.get(m, len(order)), m))
    for budget in args.budgets:
        for method in methods:
            rs = [r for r in records if r["budget"] == budget and r["method"] == method]
            if not rs:
                continue
            mean, sd = _mean_sd([100 * r["final_test_accuracy"] for r in rs])
            pruned, _ = _mean_sd([100 * r["pruned_test_accuracy"] for r in rs if "pruned_test_accuracy" in r])
            cut_loss, _ = _mean_sd([100 * r["cut_loss"] for r in rs if r.get("cut_loss") is not None])
            converted, _ = _mean_sd([100 * r["converted_test_accuracy"] for r in rs
                                     if r.get("converted_test_accuracy") is not None])
            row = {"method": method, "budget": budget, "n": len(rs), "mean": mean, "sd": sd,
                   "pruned_mean": pruned, "cut_loss_mean": cut_loss, "converted_mean": converted,
                   "receded_channels": statistics.mean(r.get("receded_channels", 0) for r in rs),
                   "forced_channels": statistics.mean(r.get("forced_channels", 0) for r in rs),
                   "achieved_flops": statistics.mean(r["achieved_flops"] for r in rs),
                   "training_compute": statistics.mean(r["training_compute"] for r in rs),
                   "wall_s": statistics.mean(r["wall_s"] for r in rs)}
            table.append(row)
            sd_text = f" +- {sd:.2f}" if sd is not None else ""
            extra = f", right after pruning {pruned:.2f}" if pruned is not None else ""
            extra += f", the cut loses {cut_loss:.2f} pt" if cut_loss is not None else ""
            extra += f", converted {converted:.2f}" if converted is not None else ""
            print(f"{method:18s} {budget:.0%}: {mean:.2f}{sd_text} (n={len(rs)}) at {row['achieved_flops']:.4f} FLOPs, "
                  f"compute {row['training_compute']:.3f}{extra}")
    return table


def _write(args, splits, device, records: list[dict], table: list[dict], stopped: bool) -> dict:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    payload = {"environment": environment(device), "settings": vars(args) | {
        "dataset": f"digits 16x16 ({len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test)",
        "model": args.model, "cut_strength": STRENGTH, "shift": SHIFT, "lr": LR, "batch_size": BATCH,
        "adamw": {"lr": ADAMW_LR, "weight_decay": ADAMW_WD}, "tpf_regularisers": TPF,
        "stopped_by_time_limit": stopped},
        "summary": table, "runs": records}
    with open(args.out + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(args.out + ".tmp", args.out)
    return payload


if __name__ == "__main__":
    main()
