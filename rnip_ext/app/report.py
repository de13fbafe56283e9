"""The paper-style table across finished runs (``summary.json`` of ``rnip train`` / ``rnip prune``
or :mod:`rnip_ext.app.runs`), and its figures: what ``rnip report`` does, as library calls.

Rows are grouped by ``(arch, dataset, method, scope)`` (a trained run has no scope) and sorted by
pruning ratio within a group; :func:`make_report` writes ``report.md``, ``report.json`` and the
figures of :mod:`rnip_ext.app.plots` into a folder that is new, empty or an earlier report's.
"""

from __future__ import annotations

import os

import torch

from .. import rundir
from ..data import DATASETS
from .errors import user_errors
from .runs import build_model
from ..pruning import channel_importance, restore
from ..rundir import CheckpointError, OutputDirError, load_checkpoint, read_json, write_json

__all__ = ["PRUNE_KEYS", "SUMMARY_KEYS", "RunReadError", "collect_runs", "group_key", "importance_scores",
           "make_report", "report", "report_table", "write_report"]


class RunReadError(ValueError):
    """A run folder whose summary, config or checkpoint cannot be read (the message names it)."""

# Keys every summary.json must have, and those of pruned runs on top.
SUMMARY_KEYS = ("kind", "arch", "dataset", "method", "ratio", "test_accuracy", "params", "flops")
PRUNE_KEYS = ("scope", "accuracy_after_pruning", "kept_channels")


def group_key(row: dict) -> tuple:
    """``(arch, dataset, method, scope)``: rows are compared within one; a trained run's scope is ``""``."""
    return row["arch"], row["dataset"], row["method"], row.get("scope") or ""


def collect_runs(run_dirs: list[str]) -> list[dict]:
    """Each run's ``summary.json`` with its ``run_dir`` added.

    Raises ``FileNotFoundError`` for a folder without one (not a finished run) and
    :class:`RunReadError` for a summary that is unreadable or lacks :data:`SUMMARY_KEYS` (and,
    pruned, :data:`PRUNE_KEYS`).
    """
    rows = []
    for d in run_dirs:
        path = os.path.join(d, "summary.json")
        try:
            summary = read_json(path)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"{d} has no summary.json (is it a finished run?)") from exc
        except CheckpointError as exc:
            raise RunReadError(str(exc)) from exc
        if not isinstance(summary, dict):
            raise RunReadError(f"{path} is not a run summary")
        wanted = SUMMARY_KEYS + (PRUNE_KEYS if summary.get("kind") == "prune" else ())
        missing = [k for k in wanted if k not in summary]
        if missing:
            raise RunReadError(f"{path} lacks {', '.join(missing)}: not a summary written by rnip train or prune")
        rows.append(dict(summary, run_dir=d))
    return rows


def report_table(rows: list[dict]) -> str:
    """Markdown, one row per run, grouped by :func:`group_key`, then by ratio."""
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
    """All prunable channels' scores (``sigmoid(w)`` or ``|gamma|``) of each trained model's best
    checkpoint, keyed ``"arch dataset method"``: runs of different networks or data never share a
    histogram. A run that cannot be read raises :class:`RunReadError` naming its folder."""
    scores = {}
    for r in train_rows:
        try:
            config = read_json(os.path.join(r["run_dir"], "config.json"))
            model = build_model(config, DATASETS[config["dataset"]][0], config["in_channels"])
            state = load_checkpoint(os.path.join(r["run_dir"], "best.pt"))
            restore(model, state["model"], state.get("architecture"))  # narrowed first if pruned in training
        except (FileNotFoundError, CheckpointError, KeyError, RuntimeError) as exc:
            message = str(exc) if not isinstance(exc, KeyError) else f"missing {exc}"
            raise RunReadError(f"{r['run_dir']} cannot be read: {message}") from exc
        label = " ".join(group_key(r)[:3])
        if label in scores:
            label = f"{label} ({r['run_dir']})"
        scores[label] = torch.cat(list(channel_importance(model).values()))
    return scores


def write_report(rows: list[dict], out: str, plots: bool = True,
                 scores: dict[str, torch.Tensor] | None = None) -> dict[str, str]:
    """Write ``report.md``, ``report.json`` and (``plots``) the figures into ``out``; print the
    table; return the figures written (name -> path).

    ``scores`` are the trained runs' :func:`importance_scores` when already read (else they are
    read here). Every file is recorded in ``out``'s manifest (:mod:`rnip_ext.rundir`) before it
    is written, and written atomically. ``out`` is not checked here: :func:`make_report` claims
    it first.
    """
    from . import plots as P

    os.makedirs(out, exist_ok=True)
    text = report_table(rows)
    rundir.record(out, "report.md", "report.json")

    def write_md(tmp):
        with open(tmp, "w") as f:
            f.write(text + "\n")

    rundir._atomic(os.path.join(out, "report.md"), write_md)
    write_json(os.path.join(out, "report.json"), rows)
    print(text)
    if not plots:
        return {}
    paths = P.figure_paths(out)
    train_rows = [r for r in rows if r["kind"] == "train"]
    prune_rows = [r for r in rows if r["kind"] == "prune"]
    rundir.record(out, *(os.path.basename(p) for p in paths.values()))
    made = {}
    if train_rows:
        if scores is None:
            scores = importance_scores(train_rows)
        made["importance_histogram"] = P.plot_importance_histograms(scores, paths["importance_histogram"])
    made["accuracy_vs_ratio"] = P.plot_accuracy_vs_ratio(rows, paths["accuracy_vs_ratio"])
    if prune_rows:
        made["kept_channels"] = P.plot_kept_channels(prune_rows, paths["kept_channels"])
    for path in made.values():
        print(f"wrote {path}")
    return made


def make_report(run_dirs: list[str], out: str, *, plots: bool = True, overwrite: bool = False) -> dict[str, str]:
    """``rnip report``: read ``run_dirs`` (:func:`collect_runs`), claim ``out`` and write the report
    (:func:`write_report`); return the figures written.

    ``out`` must be new, empty or an earlier report's (replaced; ``overwrite=True`` also replaces
    another rnip output, deleting only files rnip wrote) and must not overlap a run folder:
    ``rundir.OutputDirError`` (a ``ValueError``) otherwise. Everything that can fail without
    writing (unreadable summaries, configs or checkpoints: :class:`RunReadError`,
    ``FileNotFoundError``; ``ImportError`` for plots without matplotlib) fails before ``out`` is
    touched.
    """
    rows = collect_runs(run_dirs)
    scores = None
    if plots:
        from .plots import require_matplotlib

        require_matplotlib()
        scores = importance_scores([r for r in rows if r["kind"] == "train"])
    rundir.refuse_overlap(out, run_dirs)
    mode = rundir.check(out, "report", overwrite=overwrite, replace_own=True)
    rundir.claim(out, "report", mode)
    return write_report(rows, out, plots=plots, scores=scores)


def report(spec) -> dict[str, str]:
    """``rnip report``: :func:`make_report` with a :class:`~rnip_ext.app.spec.ReportSpec`; returns its paths."""
    with user_errors(FileNotFoundError, RunReadError, OutputDirError):
        return make_report(spec.runs, spec.out, plots=spec.plots, overwrite=spec.overwrite)
