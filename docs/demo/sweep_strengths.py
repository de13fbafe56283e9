"""Offline sweep of the demo's regulariser strengths, judged on the validation split only.

Run once (results committed as ``docs/demo/sweep_results.json`` and ``docs/demo/sweep.md``); the
demo itself never sweeps, it cites the values chosen here (``rnip_ext.app.demo.DEMO_STRENGTH``).

For each (method, strength, shift) of a small grid, one seed of the demo's pipeline
(:func:`rnip_ext.app.demo.run_demo` with that strength only): train with the demo's epochs, prune to
each of the demo's FLOPs targets with the budget planner, fine-tune with the demo's epochs. The
score of a setting is the mean over targets of the validation accuracy right after pruning (no
fine-tuning: what the regulariser is for) and of the pruned-and-fine-tuned network's best
validation accuracy, weighted equally; the test split is never read. Fine-tuned accuracy alone
does not separate the settings on digits (all within a few validation images), and with it the
near-tie rule below would pick a regulariser too weak to make any channel recede. Near-ties (scores within half a validation image, ``0.5 / val_size``) go to the
weaker regulariser (smaller strength, then smaller shift).

    python docs/demo/sweep_strengths.py [--out DIR] [--threads 1]
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

from rnip_ext import pruning
from rnip_ext.app import demo
from rnip_ext.rundir import load_checkpoint
from rnip_ext.app.runs import build_model
from rnip_ext.data import load_dataset
from rnip_ext.training import evaluate
from rnip_ext.rundir import read_json, write_json

GRID = {
    "rni": [(s, b) for s in (1e-2, 5e-2, 2e-1) for b in (1.0, 3.0)],
    "l1": [(s, 0.0) for s in (1e-4, 1e-3, 1e-2)],
}


def score_setting(out: str, method: str, strength: float, shift: float, threads: int | None) -> dict:
    """One seed of the demo pipeline for one setting; validation accuracies only."""
    report = demo.run_demo(out, seeds=1, methods=(method,), strengths={method: (strength, shift)}, plots=False,
                           progress=False, threads=threads)
    run = report["runs"][f"{method}-s0"]
    val = {}
    for t in demo.DEMO_TARGETS:
        label = f"f{round(t * 100):g}"
        val[label] = read_json(os.path.join(out, f"prune-{method}-s0-{label}", "summary.json"))["val_accuracy"]
    trained = read_json(os.path.join(out, f"train-{method}-s0", "summary.json"))
    config = read_json(os.path.join(out, f"train-{method}-s0", "config.json"))
    splits = load_dataset("digits", None, config["val_fraction"], 0, torch.device("cpu"),
                          image_size=config["image_size"])
    val_pruned = {}
    for t in demo.DEMO_TARGETS:
        # The plan `rnip prune` made (deterministic), evaluated on validation before fine-tuning.
        model = build_model(config, splits.num_classes, splits.in_channels)
        model.load_state_dict(load_checkpoint(os.path.join(out, f"train-{method}-s0", "best.pt"))["model"])
        example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size)
        plan = pruning.plan(model, scope="local" if method == "none" else "global", example_inputs=example,
                            target_flops=t, min_channels=3)
        val_pruned[f"f{round(t * 100):g}"] = evaluate(pruning.apply(model, plan), splits.val)
    val_size = read_json(os.path.join(out, f"train-{method}-s0", "config.json"))["val_size"]
    return {
        "method": method, "strength": strength, "shift": shift, "val_unpruned": trained["val_accuracy"],
        "val_size": val_size,
        "val_pruned": val_pruned, "val_finetuned": val,
        "score": (statistics.fmean(val_pruned.values()) + statistics.fmean(val.values())) / 2,
        "receded_fraction": run["receded_fraction"],
        "layers_receded_entirely_absolute_score": [lay["layer"] for lay in run["layers"]
                                                   if lay["receded_paper_score"] == lay["channels"]],
        "wall_s": report["wall_s"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep_results.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as tmp:
        for method, grid in GRID.items():
            for strength, shift in grid:
                rows.append(score_setting(os.path.join(tmp, f"{method}-{strength:g}-{shift:g}"), method, strength,
                                          shift, args.threads))
                r = rows[-1]
                print(f"{method} strength {strength:g} shift {shift:g}: mean val {r['score']:.4f} "
                      f"pruned {r['val_pruned']} fine-tuned {r['val_finetuned']} receded {r['receded_fraction']:.0%} ({r['wall_s']:.0f} s)", flush=True)
    chosen = {}
    for method in GRID:
        mine = [r for r in rows if r["method"] == method]
        best = max(r["score"] for r in mine)
        chosen[method] = min((r for r in mine if r["score"] >= best - 0.5 / r["val_size"]),
                             key=lambda r: (r["strength"], r["shift"]))
    result = {
        "what": "one seed (0) of the demo pipeline per setting; score = (mean over the FLOPs targets of the "
                "validation accuracy right after pruning + mean of the fine-tuned network's best validation "
                "accuracy) / 2; test split never read",
        "settings": {"epochs": demo.DEMO_EPOCHS, "finetune_epochs": demo.DEMO_FINETUNE_EPOCHS,
                     "targets": list(demo.DEMO_TARGETS), "seeds": [0], "threads": args.threads},
        "machine": demo.machine(), "wall_s": time.perf_counter() - start, "grid": rows,
        "chosen": {m: [r["strength"], r["shift"]] for m, r in chosen.items()},
    }
    write_json(args.out, result)
    print(json.dumps(result["chosen"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
