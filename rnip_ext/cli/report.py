"""``rnip report``: the paper-style table across runs, and the plots."""

from __future__ import annotations

import argparse
import os

import torch

from .. import rundir
from ..data import DATASETS
from ..pruning import channel_importance, restore
from ..rundir import OutputDirError
from .errors import UserError, user_errors
from .plots import figure_paths, plot_accuracy_vs_ratio, plot_importance_histograms, plot_kept_channels, require_matplotlib
from .runs import CheckpointError, load_checkpoint, read_json, write_json
from .train import build_model

# Keys every summary.json must have, and those of pruned runs on top.
SUMMARY_KEYS = ("kind", "arch", "dataset", "method", "ratio", "test_accuracy", "params", "flops")
PRUNE_KEYS = ("scope", "accuracy_after_pruning", "kept_channels")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories from `rnip train` and `rnip prune`")
    p.add_argument("--out", default="report",
                   help="directory for report.md, report.json and the plots: new, empty or an earlier report's "
                        "(which is replaced)")
    p.add_argument("--no-plots", action="store_true", help="skip the plots (no matplotlib needed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace any earlier rnip output in --out (only files rnip wrote are deleted)")


def group_key(row: dict) -> tuple:
    """Rows are compared within one (arch, dataset, method, scope); a trained run has no scope."""
    return row["arch"], row["dataset"], row["method"], row.get("scope") or ""


def collect(run_dirs: list[str]) -> list[dict]:
    """Each run's summary.json, with its directory; a :class:`UserError` if one is missing or incomplete."""
    rows = []
    for d in run_dirs:
        path = os.path.join(d, "summary.json")
        try:
            summary = read_json(path)
        except FileNotFoundError as exc:
            raise UserError(f"{d} has no summary.json (is it a finished run?)") from exc
        except CheckpointError as exc:
            raise UserError(str(exc)) from exc
        if not isinstance(summary, dict):
            raise UserError(f"{path} is not a run summary")
        wanted = SUMMARY_KEYS + (PRUNE_KEYS if summary.get("kind") == "prune" else ())
        missing = [k for k in wanted if k not in summary]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}: not a summary written by rnip train or prune")
        rows.append(dict(summary, run_dir=d))
    return rows


def table(rows: list[dict]) -> str:
    """Markdown, one row per run, grouped by (arch, dataset, method, scope), then by ratio."""
    lines = ["| arch | dataset | method | scope | ratio | test acc (%) | acc pruned, before fine-tune (%) | params "
             "| FLOPs (MACs) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (group_key(r), r["ratio"])):
        pruned = r.get("accuracy_after_pruning")
        lines.append(
            f"| {r['arch']} | {r['dataset']} | {r['method']} | {r.get('scope') or '-'} | {r['ratio']:.0%} | "
            f"{100 * r['test_accuracy']:.2f} | {'' if pruned is None else f'{100 * pruned:.2f}'} | "
            f"{r['params']:,} | {r['flops']:,} |"
        )
    return "\n".join(lines)


def importance_scores(train_rows: list[dict]) -> dict[str, torch.Tensor]:
    """All prunable channels' scores of each trained model (its best checkpoint), keyed by
    ``"arch dataset method"``: runs of different networks or data never share a histogram."""
    scores = {}
    for r in train_rows:
        with user_errors(FileNotFoundError, CheckpointError, KeyError, RuntimeError,
                         prefix=f"{r['run_dir']} cannot be read: "):
            config = read_json(os.path.join(r["run_dir"], "config.json"))
            model = build_model(config, DATASETS[config["dataset"]][0], config["in_channels"])
            state = load_checkpoint(os.path.join(r["run_dir"], "best.pt"))
            restore(model, state["model"], state.get("architecture"))  # narrowed first if pruned in training
        label = " ".join(group_key(r)[:3])
        if label in scores:
            label = f"{label} ({r['run_dir']})"
        scores[label] = torch.cat(list(channel_importance(model).values()))
    return scores


def write_report(rows: list[dict], out: str, plots: bool = True) -> dict[str, str]:
    """Write ``report.md``, ``report.json`` and (``plots``) the figures into ``out``; print the table.

    Every file is recorded in ``out``'s manifest (:mod:`rnip_ext.rundir`) before it is written.
    """
    os.makedirs(out, exist_ok=True)
    text = table(rows)
    rundir.record(out, "report.md", "report.json")
    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    rundir._atomic(os.path.join(out, "report.md"), write_md)
    write_json(os.path.join(out, "report.json"), rows)
    print(text)
    if not plots:
        return {}
    paths = figure_paths(out)
    train_rows = [r for r in rows if r["kind"] == "train"]
    prune_rows = [r for r in rows if r["kind"] == "prune"]
    rundir.record(out, *(os.path.basename(p) for p in paths.values()))
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
    rows = collect(args.runs)
    if not args.no_plots:
        with user_errors(ImportError):
            require_matplotlib()  # before --out is touched
    with user_errors(OutputDirError):
        rundir.refuse_overlap(args.out, args.runs)
        mode = rundir.check(args.out, "report", overwrite=getattr(args, "overwrite", False), replace_own=True)
        rundir.claim(args.out, "report", mode)
    write_report(rows, args.out, plots=not args.no_plots)
