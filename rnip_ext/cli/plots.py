"""Figures people look at: importance histograms, accuracy vs pruning ratio, kept channels per layer."""

from __future__ import annotations

import os

import torch

__all__ = ["require_matplotlib", "plot_accuracy_vs_ratio", "plot_importance_histograms", "plot_kept_channels"]


def require_matplotlib():
    """``matplotlib.pyplot`` on the non-interactive backend, or a SystemExit saying what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise SystemExit("plots need matplotlib: pip install 'rnip_ext[demo]' (or matplotlib)") from exc
    return plt


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_importance_histograms(scores: dict[str, torch.Tensor], path: str) -> str:
    """One histogram per method of all prunable channels' scores (sigmoid(w) or |gamma|)."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.2), squeeze=False)
    for ax, (method, values) in zip(axes[0], scores.items()):
        ax.hist(values.numpy(), bins=40, color="tab:blue")
        ax.set_title(f"{method}: {'sigmoid(w)' if method == 'rni' else '|gamma|'}")
        ax.set_xlabel("channel importance")
        ax.set_ylabel("channels")
    return _save(plt, fig, path)


def plot_accuracy_vs_ratio(rows: list[dict], path: str) -> str:
    """Test accuracy (fine-tuned) against the pruning ratio, one line per method."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["ratio"], r["test_accuracy"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=method)
    ax.set_xlabel("pruning ratio (fraction of prunable channels removed)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def plot_kept_channels(rows: list[dict], path: str) -> str:
    """Channels kept per prunable layer, one line per (method, ratio) pruned run."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for r in sorted(rows, key=lambda r: (r["method"], r["ratio"])):
        kept = r["kept_channels"]  # [[layer, channels, kept], ...] in graph order
        ax.plot(range(len(kept)), [k[2] for k in kept], marker=".", label=f"{r['method']} {r['ratio']:.0%}")
    if rows:
        first = rows[0]["kept_channels"]
        ax.plot(range(len(first)), [k[1] for k in first], "k--", label="original")
        ax.set_xticks(range(len(first)), [k[0] for k in first], rotation=45, ha="right", fontsize=7)
    ax.set_xlabel("prunable layer (graph order)")
    ax.set_ylabel("channels kept")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(plt, fig, path)


def figure_paths(out: str) -> dict[str, str]:
    return {name: os.path.join(out, f"{name}.png") for name in ("importance_histogram", "accuracy_vs_ratio", "kept_channels")}
