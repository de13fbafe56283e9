"""``rnip report``: the paper-style table across runs, and the plots."""

from __future__ import annotations

import argparse
import os

import torch

from ..data import DATASETS
from ..pruning import channel_importance
from .plots import figure_paths, plot_accuracy_vs_ratio, plot_importance_histograms, plot_kept_channels
from .runs import CheckpointError, load_checkpoint, read_json, write_json
from .train import build_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories from `rnip train` and `rnip prune`")
    p.add_argument("--out", default="report", help="directory for report.md, report.json and the plots")
    p.add_argument("--no-plots", action="store_true")


def collect(run_dirs: list[str]) -> list[dict]:
    """Each run's summary.json, with its directory."""
    rows = []
    for d in run_dirs:
        try:
            rows.append(dict(read_json(os.path.join(d, "summary.json")), run_dir=d))
        except FileNotFoundError as exc:
            raise SystemExit(f"error: {d} has no summary.json (is it a finished run?)") from exc
        except CheckpointError as exc:
            raise SystemExit(f"error: {exc}") from exc
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: method x ratio -> accuracies, parameters and FLOPs."""
    lines = ["| method | ratio | test acc (%) | acc pruned, before fine-tune (%) | params | FLOPs (MACs) |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["ratio"])):
        pruned = r.get("accuracy_after_pruning")
        lines.append(
            f"| {r['method']} | {r['ratio']:.0%} | {100 * r['test_accuracy']:.2f} | "
            f"{'' if pruned is None else f'{100 * pruned:.2f}'} | {r['params']:,} | {r['flops']:,} |"
        )
    return "\n".join(lines)


def importance_scores(train_rows: list[dict]) -> dict[str, torch.Tensor]:
    """All prunable channels' scores of each method's trained model (its best checkpoint)."""
    scores = {}
    for r in train_rows:
        config = read_json(os.path.join(r["run_dir"], "config.json"))
        model = build_model(config, DATASETS[config["dataset"]][0], config["in_channels"])
        model.load_state_dict(load_checkpoint(os.path.join(r["run_dir"], "best.pt"))["model"])
        scores[r["method"]] = torch.cat(list(channel_importance(model).values()))
    return scores


def write_report(rows: list[dict], out: str, plots: bool = True) -> dict[str, str]:
    os.makedirs(out, exist_ok=True)
    text = table(rows)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text + "\n")
    write_json(os.path.join(out, "report.json"), rows)
    print(text)
    if not plots:
        return {}
    paths = figure_paths(out)
    train_rows = [r for r in rows if r["kind"] == "train"]
    prune_rows = [r for r in rows if r["kind"] == "prune"]
    made = {}
    if train_rows:
        made["importance_histogram"] = plot_importance_histograms(importance_scores(train_rows), paths["importance_histogram"])
    made["accuracy_vs_ratio"] = plot_accuracy_vs_ratio(rows, paths["accuracy_vs_ratio"])
    if prune_rows:
        made["kept_channels"] = plot_kept_channels(prune_rows, paths["kept_channels"])
    for path in made.values():
        print(f"wrote {path}")
    return made


def run(args: argparse.Namespace) -> None:
    write_report(collect(args.runs), args.out, plots=not args.no_plots)
