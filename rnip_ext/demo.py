"""The demo as a library call: several seeds, equal FLOPs budgets, before and after fine-tuning.

:func:`run_demo` trains the small VGG on scikit-learn's 8x8 digits (upsampled to 16x16) with the
receding regulariser (``rni``), network slimming (``l1``) and no regulariser (``none``), once per
seed (``0 .. seeds-1``), and prunes every trained network to each FLOPs target with the budget
planner (:func:`rnip_ext.pruning.plan` with ``target_flops``): ``rni`` and ``l1`` with one global
threshold on the relative score (the paper's method), ``none`` with ``scope="local"``, the
smallest uniform per-layer fraction that meets the same budget (the paper's "uniform" baseline at
equal cost, not at an equal channel fraction). Each pruned network is then fine-tuned without the
regulariser. Every row of the table is ``mean +- sd`` over the seeds (sample standard deviation,
``n - 1``; ``n/a`` with one seed); ``report.json`` keeps every seed's value.

Per method and target: test accuracy right after pruning (no fine-tuning) and after fine-tuning,
parameters, MACs (as a fraction of the unpruned network's) and inference images/s measured on
the run's device (rough: median of 5 batches of 32, see :func:`rnip_ext.benchmarking.measure_throughput`),
plus each method's unpruned row. Per trained run it also records, per prunable layer, how many
channels receded (relative score ``< RECEDED``, and the paper's absolute score ``< RECEDED``) and
how many each budget kept: a method that "wins" by whole layers receding (the next BatchNorm
renormalising them) shows as layers whose absolute scores are all below ``RECEDED`` while the
relative ones are not.

The demo does not tune anything: its strengths come from an offline sweep judged on the
validation split (``docs/demo/sweep_strengths.py``, results in ``docs/demo/sweep_results.json``).
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from . import rundir
from .data import DATASETS

__all__ = [
    "DEMO_EPOCHS",
    "DEMO_FINETUNE_EPOCHS",
    "DEMO_STRENGTH",
    "DEMO_TARGETS",
    "METHODS",
    "RECEDED",
    "aggregate",
    "format_table",
    "run_demo",
    "table_header",
]

METHODS = ("rni", "l1", "none")
# (strength, shift) per method. Chosen once, offline, by docs/demo/sweep_strengths.py on the
# validation split (never test) over rni strength {1e-2, 5e-2, 2e-1} x shift {1, 3} and l1
# strength {1e-4, 1e-3, 1e-2}, one seed, the demo's epochs and targets: rni 5e-2 / shift 1 scored
# 0.987 (next best 0.826), l1 1e-3 scored 0.817 (next 0.719); see docs/demo/sweep_results.json
# and docs/demo/sweep.md. Far stronger than the paper's (1e-3, shift 3 over 160 CIFAR epochs):
# here ~500 steps must polarise the importances.
DEMO_STRENGTH = {"rni": (5e-2, 1.0), "l1": (1e-3, 0.0), "none": (0.0, 0.0)}
# Fractions of the unpruned network's FLOPs (MACs) every method is pruned to.
DEMO_TARGETS = (0.5, 0.2, 0.1)
# Sized for the 5-minute budget on 2 CPU cores: the default demo is 3 seeds x 3 methods x
# (15 training + 3 x 4 fine-tuning epochs) = 243 epochs over ~1,100 images (the paper trains
# 160 + 160 epochs on CIFAR). Measured wall time: docs/demo/demo_output.txt.
DEMO_EPOCHS = 15
DEMO_FINETUNE_EPOCHS = 4
# A channel "receded" when its score is below this (relative score: under 1% of the layer's
# strongest channel).
RECEDED = 0.01
# The demo's fixed training recipe (the paper's, with a lower lr and batch for ~1,400 images).
RECIPE = {"lr": 0.05, "batch_size": 32, "weight_decay": 1e-4, "bn_lr_scale": 10.0, "val_fraction": 0.1}


def _label(target: float) -> str:
    return f"f{round(target * 100):g}"


def _check(seeds, targets, epochs, finetune_epochs, methods, strengths) -> None:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds must be an int >= 1, got {seeds!r}")
    if not targets:
        raise ValueError("targets must name at least one FLOPs fraction")
    for t in targets:
        if not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise ValueError(f"every target must be a FLOPs fraction in (0, 1], got {t!r}")
    if len(set(targets)) != len(targets) or len({_label(t) for t in targets}) != len(targets):
        raise ValueError(f"targets must differ by at least 1% of the FLOPs, got {list(targets)}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an int >= 0, got {finetune_epochs!r}")
    unknown = [m for m in methods if m not in strengths]
    if not methods or unknown:
        raise ValueError(f"methods must be a non-empty subset of {tuple(strengths)}, got {list(methods)}")


def _layer_analysis(run_dir: str, targets, prunes: dict) -> dict:
    """Per prunable layer of a trained run: channels, receded (relative and absolute score), kept
    per target; the scores and the removal threshold per target (for the histogram)."""
    from . import pruning
    from .cli.runs import load_checkpoint, read_json
    from .cli.train import build_model
    from .pruning.importance import group_scores

    config = read_json(os.path.join(run_dir, "config.json"))
    model = build_model(config, DATASETS[config["dataset"]][0], config["in_channels"])
    model.load_state_dict(load_checkpoint(os.path.join(run_dir, "best.pt"))["model"])
    size = config["image_size_used"]
    example = torch.zeros(1, config["in_channels"], size, size)
    scope = "local" if config["method"] == "none" else "global"
    thresholds, plan = {}, None
    for t in targets:
        # The same plan `rnip prune` made (deterministic): only its threshold is not in summary.json.
        plan = pruning.plan(model, scope=scope, example_inputs=example, target_flops=t, min_channels=3)
        thresholds[_label(t)] = plan.threshold
    paper = group_scores(model, plan.groups, "paper")
    layers = []
    for g in plan.groups:
        rel = plan.scores[g.name]
        layers.append({"layer": g.name, "channels": g.channels,
                       "receded": int((rel < RECEDED).sum()), "receded_paper_score": int((paper[g.name] < RECEDED).sum()),
                       "kept": {lab: dict((k[0], k[2]) for k in s["kept_channels"])[g.name]
                                for lab, s in prunes.items()}})
    scores = torch.cat([plan.scores[g.name] for g in plan.groups])
    return {"layers": layers, "thresholds": thresholds, "scores": scores.tolist(),
            "receded_fraction": float((scores < RECEDED).float().mean())}


def _stage(progress, bar, line: str) -> None:
    if bar is not None:
        bar.set_description(line[:60])
    elif progress:
        print(line, flush=True)


def run_demo(out: str, *, seeds: int = 3, targets=DEMO_TARGETS, epochs: int = DEMO_EPOCHS,
             finetune_epochs: int = DEMO_FINETUNE_EPOCHS, methods=METHODS, strengths=None, device: str = "auto",
             progress: bool | str = True, plots: bool = True, overwrite: bool = False,
             log_name: str = "demo_log.txt", threads: int | None = None) -> dict:
    """Run the demo into ``out`` and return its report (also written as ``out/report.json``).

    ``out`` must be new, empty, or an earlier demo's output (replaced; with ``overwrite`` any
    earlier rnip output, never files rnip did not write: :mod:`rnip_ext.rundir`). For each method
    (``strengths[method] = (strength, shift)``, default :data:`DEMO_STRENGTH`) and seed
    ``0 .. seeds-1``: ``rnip train`` into ``out/train-<method>-s<seed>``, then for each FLOPs
    target ``t`` ``rnip prune --target-flops t`` (``scope="local"`` for ``none``) with
    ``finetune_epochs`` of fine-tuning into ``out/prune-<method>-s<seed>-f<100 t>``. Everything
    those runs print goes to ``out/<log_name>``; ``progress`` shows one tqdm bar over the stages
    on a terminal (``"bar"`` forces it), one printed line per stage otherwise (``"lines"``), or
    nothing (``False``). ``threads``: CPU threads torch uses during the demo (restored
    afterwards; ``None`` keeps torch's setting). On a shared machine 1 thread can be several
    times faster than 2: the tiny network gains little from intra-op parallelism, and spinning
    OpenMP threads lose badly to other processes for the cores.

    Returns ``{"settings", "machine", "rows", "runs", "table", "wall_s"}``: ``rows`` from
    :func:`aggregate` (mean, sd and per-seed values per method and target, target ``1.0`` the
    unpruned network), ``runs`` per (method, seed) the per-layer analysis (channels, receded,
    kept per target), the scores and the removal thresholds; ``table`` the markdown of
    :func:`format_table`. With ``plots`` (needs matplotlib) the figures of
    :mod:`rnip_ext.demo_plots` are written too.
    """
    from .cli import prune as prune_cmd
    from .cli import train as train_cmd
    from .cli.errors import Interrupted
    from .cli.runs import write_json

    strengths = dict(DEMO_STRENGTH if strengths is None else strengths)
    targets = tuple(float(t) for t in targets)
    methods = tuple(methods)
    _check(seeds, targets, epochs, finetune_epochs, methods, strengths)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    if plots:
        from .cli.plots import require_matplotlib

        require_matplotlib()  # fail before hours of training, not after
    mode = rundir.check(out, "demo", overwrite=overwrite, replace_own=True)
    created = rundir.claim(out, "demo", mode)
    rundir.record(out, log_name)
    stages = len(methods) * seeds * (1 + len(targets))
    use_bar = progress == "bar" or (progress is True and sys.stdout.isatty() and sys.stderr.isatty())
    bar = None
    if use_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=stages, desc="rnip demo", unit="run")
    start = time.perf_counter()
    results, runs, done = {}, {}, 0
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    log = open(os.path.join(out, log_name), "w")
    try:
        for method in methods:
            strength, shift = strengths[method]
            for seed in range(seeds):
                name = f"train-{method}-s{seed}"
                train_dir = os.path.join(out, name)
                rundir.record(out, name)
                done += 1
                _stage(progress, bar, f"[{done}/{stages}] train {method} seed {seed} ({epochs} epochs)")
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(log):
                    trained = train_cmd.run(SimpleNamespace(
                        arch="vgg_small", dataset="digits", data_dir=None, download=False, method=method,
                        strength=strength, shift=shift, epochs=epochs, seed=seed, device=device, amp="none",
                        channels_last=False, compile=False, out=train_dir, resume=False, overwrite=False,
                        no_progress=True, **RECIPE))
                trained["wall_s"] = time.perf_counter() - t0
                if bar is not None:
                    bar.update()
                prunes = {}
                for t in targets:
                    name = f"prune-{method}-s{seed}-{_label(t)}"
                    rundir.record(out, name)
                    done += 1
                    _stage(progress, bar, f"[{done}/{stages}] prune {method} seed {seed} to {t:.0%} of the FLOPs, "
                                          f"fine-tune {finetune_epochs} epochs")
                    t0 = time.perf_counter()
                    with contextlib.redirect_stdout(log):
                        pruned = prune_cmd.run(SimpleNamespace(
                            run_dir=train_dir, ratio=None, target_flops=t, target_params=None,
                            scope="local" if method == "none" else "global", min_channels=3,
                            finetune_epochs=finetune_epochs, lr=None, device=None, out=os.path.join(out, name),
                            resume=False, overwrite=False, no_progress=True))
                    pruned["wall_s"] = time.perf_counter() - t0
                    prunes[_label(t)] = pruned
                    if bar is not None:
                        bar.update()
                results[(method, seed)] = (trained, prunes)
                runs[f"{method}-s{seed}"] = dict(_layer_analysis(train_dir, targets, prunes), method=method, seed=seed,
                                                 strength=strength, shift=shift)
        # --- budget-aware RNI run (`rnip train --target-flops`, issue 14) ---
        # One training run to each budget, no fine-tuning phase, as its own method row
        # ("rni-budget") with its total training epochs next to the others'. Added here once
        # `rnip train --target-flops` lands: append its per-seed rows to `results` under that method.
    except Interrupted:
        # Nothing to resume: the next `rnip demo` replaces this output and starts again.
        raise KeyboardInterrupt from None
    finally:
        torch.set_num_threads(old_threads)
        log.close()
        if bar is not None:
            bar.close()
        if not results:  # failed before any run finished: leave no empty --out behind
            rundir.release(out, created, keep=())
    rows = aggregate(results, targets, epochs, finetune_epochs)
    wall = time.perf_counter() - start
    report = {
        "settings": {"seeds": list(range(seeds)), "targets": list(targets), "epochs": epochs,
                     "finetune_epochs": finetune_epochs, "methods": list(methods),
                     "strengths": {m: list(strengths[m]) for m in methods}, "arch": "vgg_small", "dataset": "digits",
                     "recipe": RECIPE, "receded_below": RECEDED},
        "machine": dict(machine(), torch_threads=threads or old_threads), "wall_s": wall, "rows": rows, "runs": runs, "table": format_table(rows),
    }
    rundir.record(out, "report.md", "report.json")
    with open(os.path.join(out, "report.md.tmp"), "w") as f:
        f.write(report["table"] + "\n")
    os.replace(os.path.join(out, "report.md.tmp"), os.path.join(out, "report.md"))
    write_json(os.path.join(out, "report.json"), report)
    if plots:
        from .demo_plots import write_plots

        report["plots"] = write_plots(report, out)
    return report


def machine() -> dict:
    """Where the demo ran: CPU model (``/proc/cpuinfo``), threads torch uses, CUDA device, load."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = list(os.getloadavg())
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_average_1_5_15": load, "torch": torch.__version__, "python": platform.python_version()}


def _stats(values: list[float]) -> dict:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": mean, "sd": sd, "values": values}


def aggregate(results: dict, targets, epochs: int, finetune_epochs: int) -> list[dict]:
    """Rows of the table from ``{(method, seed): (train summary, {label: prune summary})}``.

    Per method one unpruned row (``pruned`` False, ``target`` 1.0; ``acc_pruned`` is the trained network's test
    accuracy, ``acc_finetuned`` ``None``) and one row per target. Each measured column is
    ``{"mean", "sd", "values"}`` over the seeds (``values`` in seed order; ``sd`` the sample
    standard deviation, ``None`` for one seed): ``acc_pruned``, ``acc_finetuned`` (fractions),
    ``params``, ``macs``, ``macs_fraction`` (``macs / unpruned macs``), ``images_per_s``.
    ``train_epochs`` is the total training compute in epochs over the training set
    (training + fine-tuning).
    """
    rows = []
    for method in dict.fromkeys(m for m, _ in results):
        seeds = sorted(s for m, s in results if m == method)
        per_seed = [results[(method, s)] for s in seeds]
        rows.append({
            "method": method, "pruned": False, "target": 1.0, "seeds": seeds, "train_epochs": epochs,
            "acc_pruned": _stats([t["test_accuracy"] for t, _ in per_seed]), "acc_finetuned": None,
            "params": _stats([t["params"] for t, _ in per_seed]), "macs": _stats([t["flops"] for t, _ in per_seed]),
            "macs_fraction": _stats([1.0 for _ in per_seed]),
            "images_per_s": _stats([p[_label(targets[0])]["images_per_s_before"] for _, p in per_seed]),
        })
        for t in targets:
            ps = [p[_label(t)] for _, p in per_seed]
            rows.append({
                "method": method, "pruned": True, "target": t, "seeds": seeds,
                "train_epochs": epochs + finetune_epochs,
                "acc_pruned": _stats([p["accuracy_after_pruning"] for p in ps]),
                "acc_finetuned": _stats([p["test_accuracy"] for p in ps]) if finetune_epochs else None,
                "params": _stats([p["params"] for p in ps]), "macs": _stats([p["flops"] for p in ps]),
                "macs_fraction": _stats([p["flops"] / p["flops_before"] for p in ps]),
                "images_per_s": _stats([p["images_per_s_after"] for p in ps]),
            })
    return rows


def table_header() -> list[str]:
    """The columns of :func:`format_table` (the README's table must have the same)."""
    return ["method", "FLOPs target", "MACs (% of unpruned)", "params", "test acc pruned, no fine-tune (%)",
            "test acc fine-tuned (%)", "images/s", "training epochs"]


def _pm(stats: dict | None, scale: float = 1.0, digits: int = 2) -> str:
    if stats is None:
        return "-"
    sd = "n/a" if stats["sd"] is None else f"{scale * stats['sd']:.{digits}f}"
    return f"{scale * stats['mean']:.{digits}f} ± {sd}"


def _pm_count(stats: dict) -> str:
    sd = "n/a" if stats["sd"] is None else f"{stats['sd']:,.0f}"
    return f"{stats['mean']:,.0f} ± {sd}"


def format_table(rows: list[dict]) -> str:
    """Markdown: one line per (method, target), every measured column ``mean ± sd`` over seeds."""
    head = table_header()
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        target = f"{r['target']:.0%}" if r["pruned"] else "unpruned"
        lines.append("| " + " | ".join([
            r["method"], target, _pm(r["macs_fraction"], 100, 1), _pm_count(r["params"]),
            _pm(r["acc_pruned"], 100), _pm(r["acc_finetuned"], 100), _pm_count(r["images_per_s"]),
            str(r["train_epochs"]),
        ]) + " |")
    return "\n".join(lines)
