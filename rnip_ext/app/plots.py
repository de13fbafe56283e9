"""Figures people look at: importance histograms, accuracy vs pruning ratio, kept channels per
layer, a budget run over epochs. Needs matplotlib (the ``demo`` extra); every figure is written
atomically and closed."""

from __future__ import annotations

import os

import torch

__all__ = ["figure_paths", "plot_accuracy_vs_ratio", "plot_budget_training", "plot_importance_histograms",
           "plot_kept_channels", "require_matplotlib", "save_figure"]


def require_matplotlib():
    """``matplotlib.pyplot`` on the non-interactive backend, or an ``ImportError`` saying what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'rnip_ext[demo]' (or matplotlib)") from exc
    return plt


def save_figure(plt, fig, path: str, dpi: int = 120) -> str:
    """Lay out, write ``fig`` to ``path`` atomically (format from the suffix) and close it."""
    from ..rundir import _atomic

    fig.tight_layout()
    # Atomic, like every file rnip writes; the format is named because the temporary name hides it.
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=os.path.splitext(path)[1][1:] or "png"))
    plt.close(fig)
    return path


def _label(ax, xlabel: str, ylabel: str) -> None:
    """The axis titles, a light grid and a small legend every line plot here carries."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_importance_histograms(scores: dict[str, torch.Tensor], path: str) -> str:
    """One histogram per trained run (label -> all prunable channels' scores: sigmoid(w) or |gamma|)."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.2), squeeze=False)
    for ax, (label, values) in zip(axes[0], scores.items()):
        ax.hist(values.numpy(), bins=40, color="tab:blue")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("sigmoid(w)" if label.split(" ")[2:3] == ["rni"] else "|gamma|")
        ax.set_ylabel("channels")
    return save_figure(plt, fig, path)


def _key(r: dict) -> tuple:
    return r["arch"], r["dataset"], r["method"], r.get("scope") or ""


def plot_accuracy_vs_ratio(rows: list[dict], path: str) -> str:
    """Test accuracy (fine-tuned) against the pruning ratio, one line per (arch, dataset, method,
    scope); a trained run is the 0% point of each scope pruned from its (arch, dataset, method)."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    lines = {_key(r) for r in rows if r.get("kind") == "prune"}
    lines |= {_key(r) for r in rows if r.get("kind") != "prune" and not any(k[:3] == _key(r)[:3] for k in lines)}
    for key in sorted(lines):
        pts = sorted((r["ratio"], r["test_accuracy"]) for r in rows
                     if _key(r) == key or (r.get("kind") != "prune" and _key(r)[:3] == key[:3]))
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=" ".join(k for k in key if k))
    _label(ax, "pruning ratio (fraction of prunable channels removed)", "test accuracy (%)")
    return save_figure(plt, fig, path)


def plot_kept_channels(rows: list[dict], path: str) -> str:
    """Channels kept per prunable layer: one panel per (arch, dataset), one line per pruned run."""
    plt = require_matplotlib()
    panels = sorted({(r["arch"], r["dataset"]) for r in rows})
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.5 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        mine = [r for r in rows if (r["arch"], r["dataset"]) == panel]
        for r in sorted(mine, key=lambda r: (_key(r), r["ratio"])):
            kept = r["kept_channels"]  # [[layer, channels, kept], ...] in graph order
            ax.plot(range(len(kept)), [k[2] for k in kept], marker=".",
                    label=f"{r['method']} {r.get('scope') or ''} {r['ratio']:.0%}")
        first = mine[0]["kept_channels"]
        ax.plot(range(len(first)), [k[1] for k in first], "k--", label="original")
        ax.set_xticks(range(len(first)), [k[0] for k in first], rotation=45, ha="right", fontsize=7)
        ax.set_title(" ".join(panel), fontsize=9)
        _label(ax, "prunable layer (graph order)", "channels kept")
    return save_figure(plt, fig, path)


def plot_budget_training(rows: list[dict], path: str) -> str:
    """A budget run over epochs (``metrics.jsonl`` rows of ``rnip train --target-flops``): FLOPs as a
    fraction of the original (kept, active, and the controller's schedule), the regulariser's
    strength (log scale) and the validation/test accuracy."""
    plt = require_matplotlib()
    epochs = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    ax = axes[0]
    ax.plot(epochs, [r.get("flops_fraction") for r in rows], marker="o", label="network")
    ax.plot(epochs, [r.get("active_flops_fraction") for r in rows], marker=".", label="active (not receded)")
    ax.plot(epochs, [r.get("flops_schedule") for r in rows], "k--", label="schedule")
    ax.set_yscale("log")
    ax.set_ylabel("FLOPs / original")
    ax.legend(fontsize=7)
    axes[1].plot(epochs, [r.get("strength") for r in rows], marker="o", color="tab:red")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("regulariser strength")
    for key in ("val_accuracy", "test_accuracy"):
        axes[2].plot(epochs, [100 * r[key] if r.get(key) is not None else None for r in rows], marker="o",
                     label=key.split("_")[0])
    axes[2].set_ylabel("accuracy (%)")
    axes[2].legend(fontsize=7)
    for a in axes:
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
    return save_figure(plt, fig, path)


def figure_paths(out: str) -> dict[str, str]:
    """Where :func:`rnip_ext.app.report.write_report` puts each figure in ``out``."""
    return {name: os.path.join(out, f"{name}.png") for name in ("importance_histogram", "accuracy_vs_ratio", "kept_channels")}
