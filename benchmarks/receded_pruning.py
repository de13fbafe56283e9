"""Does "receded" mean "removable"? Train, remove the receded channels, evaluate with no fine-tuning.

The demo's setting (small VGG on the embedded digits, 30 epochs, strength 5e-2, shift 1, SGD
lr 0.05, batch 32), once per penalty formulation (``normalize="layer"``, rnip_ext's default, and
``None``, the paper's) and seed. After training: the fraction of channels whose importance
(:func:`rnip_ext.pruning.channel_importance`, relative score) is below 0.01 and, under the
paper's absolute score, below 0.01; then the test accuracy of the network with those channels
removed (:func:`rnip_ext.pruning.plan_receded` with its default threshold 0.01 and
min_channels 3), before and after :func:`rnip_ext.pruning.recalibrate_batchnorm` on the training
images (running statistics only; no weight changes, no fine-tuning), and its share of the FLOPs.

    python benchmarks/receded_pruning.py [--seeds 0 1 2] [--epochs 30]

Writes ``benchmarks/results/receded_pruning_cpu.json``. Accuracy, not speed, is the result;
``train_s`` is recorded for reference only (one CPU thread, shared machine).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, write_json  # noqa: E402

from rnip_ext import models as M  # noqa: E402
from rnip_ext.data import load_dataset  # noqa: E402
from rnip_ext.pruning import apply, channel_importance, count_flops, plan_receded, recalibrate_batchnorm  # noqa: E402
from rnip_ext.regularizers import RecedingRegularizer  # noqa: E402
from rnip_ext.training import evaluate, make_optimizer, make_scheduler, train_epoch  # noqa: E402

STRENGTH, SHIFT, LR, BATCH = 5e-2, 1.0, 0.05, 32


def run(normalize: str | None, seed: int, epochs: int) -> dict:
    torch.manual_seed(seed)
    splits = load_dataset("digits", seed=seed, image_size=16)
    model = M.vgg_small(splits.num_classes, "bounded", in_channels=splits.in_channels)
    reg = RecedingRegularizer(model, STRENGTH, SHIFT, normalize=normalize)
    opt = make_optimizer(model, LR, 1e-4, 10.0)
    sched = make_scheduler(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        train_epoch(model, splits.train, opt, BATCH, reg, generator=gen, progress=False)
        sched.step()
    train_s = time.perf_counter() - start
    test_acc = evaluate(model, splits.test)
    x0 = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
    relative = torch.cat(list(channel_importance(model).values()))
    paper = torch.cat(list(channel_importance(model, score="paper").values()))
    receded = plan_receded(model, example_inputs=x0)
    pruned = apply(model, receded) if receded is not None else copy.deepcopy(model)  # recalibrate a copy
    acc_pruned = evaluate(pruned, splits.test)
    recalibrate_batchnorm(pruned, splits.train.batches(256))
    return {
        "normalize": normalize, "seed": seed, "epochs": epochs, "test_acc": test_acc,
        "receded_relative": float((relative < 0.01).float().mean()),
        "receded_paper_score": float((paper < 0.01).float().mean()),
        "removed_channels": 0 if receded is None else sum(g.channels - len(receded.group_keep[g.name])
                                                          for g in receded.groups), "channels": len(relative),
        "kept_per_layer": [m.num_features for m in pruned.modules() if hasattr(m, "num_features")],
        "flops_fraction": count_flops(pruned, x0) / count_flops(model, x0),
        "test_acc_pruned": acc_pruned, "test_acc_pruned_recalibrated": evaluate(pruned, splits.test),
        "train_s": train_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    rows = []
    for seed in args.seeds:
        for normalize in ("layer", None):
            rows.append(run(normalize, seed, args.epochs))
            r = rows[-1]
            print(f"normalize={str(normalize):<5} seed={seed} acc={r['test_acc']:.4f} receded={r['receded_relative']:.3f}"
                  f" (paper score {r['receded_paper_score']:.3f}) pruned: flops={r['flops_fraction']:.4f}"
                  f" acc={r['test_acc_pruned']:.4f} recalibrated={r['test_acc_pruned_recalibrated']:.4f}", flush=True)
    path = write_json("receded_pruning_cpu.json", {"environment": env, "setting": {
        "model": "vgg_small", "dataset": "digits", "strength": STRENGTH, "shift": SHIFT, "lr": LR, "batch": BATCH,
        "threshold": 0.01, "min_channels": 3}, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
