"""The demo's figures, from the report :func:`rnip_ext.app.demo.run_demo` returns (matplotlib needed).

* ``importance_histogram.png``: per method, every seed's prunable channel scores (the score the
  planner ranks by: relative to the layer's strongest channel where the next BatchNorm
  renormalises, the absolute score elsewhere, e.g. the last layer before the pooling head) on a
  log axis, the removal threshold of each FLOPs target drawn as
  a vertical line (seed 0's plan), and the fraction of channels that receded (score below
  :data:`rnip_ext.app.demo.RECEDED`, mean over seeds) in the title.
* ``accuracy_vs_flops.png``: test accuracy against the MACs kept (fraction of the unpruned
  network's), mean with ``sd`` error bars over seeds, right after pruning (dashed) and after
  fine-tuning (solid), one colour per method; the budget-aware runs (``rni-budget``, no
  fine-tuning) as squares on a solid line.
* ``layers.png``: per method and prunable layer, channels, channels that receded (relative score,
  and the paper's absolute score, whose whole-layer receding the next BatchNorm undoes) and the
  channels each FLOPs target kept, means over seeds; for ``rni-budget`` the final width of each
  layer per target (one run per target).
"""

from __future__ import annotations

import os
import statistics

from .plots import require_matplotlib, save_figure

__all__ = ["plot_accuracy_vs_flops", "plot_importance", "plot_layers", "write_plots"]

COLORS = {"rni": "tab:blue", "l1": "tab:orange", "none": "tab:green", "rni-budget": "tab:purple"}
FIGURES = ("importance_histogram", "accuracy_vs_flops", "layers")


def _by_method(report: dict, key: str = "runs") -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for run in report.get(key, {}).values():
        runs.setdefault(run["method"], []).append(run)
    return {m: sorted(r, key=lambda r: r["seed"]) for m, r in runs.items()}


def plot_importance(report: dict, path: str) -> str:
    """Histogram of every seed's scores per method, thresholds per target, receded fraction."""
    import numpy as np

    plt = require_matplotlib()
    runs = _by_method(report)
    receded_below = report["settings"]["receded_below"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.3), squeeze=False)
    bins = np.logspace(-6, 0, 49)
    for ax, (method, mine) in zip(axes[0], runs.items()):
        for run in mine:
            values = np.clip(np.asarray(run["scores"]), 1e-6, 1.0)
            ax.hist(values, bins=bins, histtype="step", color=COLORS.get(method), alpha=0.8,
                    label=f"seed {run['seed']}")
        for i, (label, threshold) in enumerate(mine[0]["thresholds"].items()):
            if threshold is not None:
                ax.axvline(max(threshold, 1e-6), color="k", ls=("--", ":", "-.")[i % 3], lw=1,
                           label=f"removal threshold, {label[1:]}% FLOPs")
        ax.axvline(receded_below, color="tab:red", lw=1, label=f"receded below {receded_below:g}")
        receded = statistics.fmean(r["receded_fraction"] for r in mine)
        ax.set_xscale("log")
        ax.set_title(f"{method}: {receded:.0%} of channels receded", fontsize=9)
        ax.set_xlabel("importance the planner ranks by (< 1e-6 shown at 1e-6)", fontsize=8)
        ax.set_ylabel("channels")
        ax.legend(fontsize=6)
    return save_figure(plt, fig, path, dpi=110)


def plot_accuracy_vs_flops(report: dict, path: str) -> str:
    """Mean test accuracy +- sd against MACs kept, before and after fine-tuning, per method."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    methods = list(dict.fromkeys(r["method"] for r in report["rows"]))
    for method in methods:
        rows = sorted((r for r in report["rows"] if r["method"] == method), key=lambda r: r["macs_fraction"]["mean"])
        x = [100 * r["macs_fraction"]["mean"] for r in rows]
        budget_run = any(r.get("budget_run") for r in rows)
        curves = ((("acc_pruned", "-", "trained to the budget, no fine-tune"),) if budget_run else
                  (("acc_pruned", "--", "pruned, no fine-tune"), ("acc_finetuned", "-", "fine-tuned")))
        for key, style, name in curves:
            pts = [(xi, r[key] if r[key] is not None else r["acc_pruned"]) for xi, r in zip(x, rows)]
            if key == "acc_finetuned" and all(r[key] is None for r in rows):
                continue
            ax.errorbar([p[0] for p in pts], [100 * p[1]["mean"] for p in pts],
                        yerr=[100 * (p[1]["sd"] or 0.0) for p in pts], ls=style, marker="s" if budget_run else "o",
                        ms=4 if budget_run else 3, capsize=3,
                        color=COLORS.get(method), label=f"{method} {name}")
    ax.set_xscale("log")
    ticks = sorted({100 * r["target"] for r in report["rows"]})
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("MACs kept (% of the unpruned network)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"mean ± sd over {len(report['settings']['seeds'])} seed(s)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return save_figure(plt, fig, path, dpi=110)


def plot_layers(report: dict, path: str) -> str:
    """Per method, per prunable layer: channels, receded (relative / absolute score), kept per target
    (for ``rni-budget``: each target's run's final width)."""
    import numpy as np

    plt = require_matplotlib()
    runs = dict(_by_method(report), **_by_method(report, "budget_runs"))
    fig, axes = plt.subplots(1, len(runs), figsize=(4.6 * len(runs), 3.6), squeeze=False)
    for ax, (method, mine) in zip(axes[0], runs.items()):
        layers = [lay["layer"] for lay in mine[0]["layers"]]
        labels = list(mine[0]["layers"][0]["kept"])
        # (label, value, colour): the same colour for a target's kept channels in every panel.
        series = [("channels", lambda lay: lay["channels"], "C0")]
        if "receded" in mine[0]["layers"][0]:  # trained at full width, then pruned
            series += [("receded (relative < 0.01)", lambda lay: lay["receded"], "C1"),
                       ("receded (absolute < 0.01)", lambda lay: lay["receded_paper_score"], "C2")]
            name = "kept at {}% FLOPs"
        else:  # one budget-aware run per target: its final widths
            name = "final width, run to {}% FLOPs"
        series += [(name.format(lab[1:]), lambda lay, lab=lab: lay["kept"][lab], f"C{3 + i}")
                   for i, lab in enumerate(labels)]
        width = 0.8 / len(series)
        for i, (label, get, colour) in enumerate(series):
            means = [statistics.fmean(get(run["layers"][j]) for run in mine) for j in range(len(layers))]
            ax.bar(np.arange(len(layers)) + (i - (len(series) - 1) / 2) * width, means, width, label=label,
                   color=colour)
        ax.set_xticks(range(len(layers)), layers, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{method} (mean over {len(mine)} seed(s))", fontsize=9)
        ax.set_ylabel("channels")
        ax.legend(fontsize=6)
    return save_figure(plt, fig, path, dpi=110)


def write_plots(report: dict, out: str) -> dict[str, str]:
    """All three figures into ``out`` (recorded in its manifest first); ``{name: path}``."""
    from .. import rundir

    rundir.record(out, *(f"{name}.png" for name in FIGURES))
    funcs = (plot_importance, plot_accuracy_vs_flops, plot_layers)
    return {name: f(report, os.path.join(out, f"{name}.png")) for name, f in zip(FIGURES, funcs)}
