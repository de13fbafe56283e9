"""Latency-budget plan vs. FLOPs-budget plan at equal measured latency: importance and accuracy.

Per seed: the demo's small VGG trained on the digits (16x16) with the receding regulariser
(``--strength``, default the demo's :data:`rnip_ext.app.demo.DEMO_STRENGTH`) and the demo's recipe
(:data:`rnip_ext.app.demo.RECIPE`) through :func:`rnip_ext.training.fit`, for ``--epochs`` epochs.
The trained network is then pruned to each ``--targets`` fraction of its measured latency (batch
``--batch``, one latency table per seed) by :func:`rnip_ext.pruning.plan_to_latency`
(``round_to=8``), and by FLOPs-budget plans (``plan(target_flops=t)`` rounded to multiples of 8):

* the one whose measured latency matches the latency plan's (``benchmarks/pruned_speed.py``'s
  ``flops_at_measured``: ``t`` bisected on measured latency), and
* one at every ``--curve`` target: their measured latencies and accuracies make a curve, read
  at each latency plan's measured latency by linear interpolation between the nearest points
  either side (:func:`against_curve`), so that a loose match does not decide the comparison.

For every plan: importance kept (the plan's scores), test accuracy right after pruning and after
``--finetune`` epochs of the same recipe without the regulariser (same epochs and seed for all
plans), and the latency of every pruned network, timed in interleaved rounds with the unpruned one
(median of the per-round ratios).

    python benchmarks/latency_accuracy.py [--seeds 0 1 2] [--epochs 15] [--finetune 3] [--strength 1e-3 3]

Writes ``benchmarks/results/latency_accuracy_cpu.json`` (``--out``), after every seed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, format_table, write_json, write_json_at  # noqa: E402
from pruned_speed import _timed, flops_at_measured, flops_plan_rounded, importance_kept, widths_of  # noqa: E402

from rnip_ext.app.demo import ARCH, DATASET, DEMO_STRENGTH, MIN_CHANNELS, RECIPE  # noqa: E402
from rnip_ext.app.runs import build_model, image_size_for  # noqa: E402
from rnip_ext.data import load_dataset  # noqa: E402
from rnip_ext.pruning import apply  # noqa: E402
from rnip_ext.pruning.latency import LatencyTable, WallClockTimer  # noqa: E402
from rnip_ext.pruning.latency_plan import LATENCY_RULES, plan_to_latency  # noqa: E402
from rnip_ext.training import evaluate, fit, make_regularizer  # noqa: E402


def fit_kwargs(seed: int) -> dict:
    """The demo's training recipe as ``training.fit`` keywords (no progress bars)."""
    return {"lr": RECIPE["lr"], "batch_size": RECIPE["batch_size"], "weight_decay": RECIPE["weight_decay"],
            "bn_lr_scale": RECIPE["bn_lr_scale"], "seed": seed, "progress": False}


def time_rounds(nets: list, example: torch.Tensor, rounds: int, warmup: int) -> list[list[float]]:
    """Milliseconds per forward pass of every net, ``rounds`` interleaved rounds after ``warmup``."""
    times = [[] for _ in nets]
    with torch.no_grad():
        for r in range(warmup + rounds):
            for i, net in enumerate(nets):
                ms = _timed(lambda: net(example), example.device)
                if r >= warmup:
                    times[i].append(ms)
    return times


def flops_curve(model, example, targets: list[float], round_to: int) -> list[tuple]:
    """``("curve", None, plan, target_flops)`` for the rounded FLOPs plan at every target,
    duplicates (the same widths) and unreachable targets left out."""
    out, seen = [], set()
    for f in targets:
        try:
            p = flops_plan_rounded(model, f, example, round_to, MIN_CHANNELS)
        except ValueError:  # below the smallest reachable FLOPs
            continue
        key = tuple(sorted(widths_of(p).items()))
        if key not in seen:
            seen.add(key)
            out.append(("curve", None, p, f))
    return out


def at_latency(points: list[tuple[float, float]], latency: float) -> float | None:
    """The value at ``latency`` linearly interpolated between the measured ``(latency, value)``
    points nearest below and above it; ``None`` when no point lies on one side."""
    below = [p for p in points if p[0] <= latency]
    above = [p for p in points if p[0] >= latency]
    if not below or not above:
        return None
    (x0, y0), (x1, y1) = max(below), min(above)
    return y0 if x1 == x0 else y0 + (y1 - y0) * (latency - x0) / (x1 - x0)


def run_seed(seed: int, args) -> dict:
    splits = load_dataset(DATASET, seed=seed, image_size=image_size_for(ARCH, DATASET))
    torch.manual_seed(seed)
    model = build_model({"arch": ARCH, "method": "rni"}, splits.num_classes, splits.in_channels)
    t0 = time.perf_counter()
    fit(model, splits, epochs=args.epochs, regularizer=make_regularizer(model, "rni", *args.strength),
        **fit_kwargs(seed))
    train_s = time.perf_counter() - t0
    model.eval()
    acc = evaluate(model, splits.test)
    size = splits.image_size
    example = torch.randn(args.batch, splits.in_channels, size, size, generator=torch.Generator().manual_seed(seed))
    timer = WallClockTimer(warmup=args.table_warmup, repeats=args.table_repeats)
    t0 = time.perf_counter()
    table = LatencyTable.build(model, example, points=args.points, round_to=args.round_to, timer=timer,
                               min_channels=MIN_CHANNELS, progress=False)
    table_s = time.perf_counter() - t0
    print(f"seed {seed}: trained {args.epochs} epochs in {train_s:.0f} s, test {acc:.4f}; table {table_s:.0f} s, "
          f"unpruned {table.full * 1e3:.2f} ms", flush=True)
    match = SimpleNamespace(round_to=args.round_to, match_steps=args.match_steps)
    plans, unreachable = [], []
    for t in args.targets:
        try:
            lp = plan_to_latency(model, example_inputs=example, target_latency=t, latency_table=table,
                                 round_to=args.round_to, min_channels=MIN_CHANNELS, refine=args.refine, timer=timer,
                                 progress=False, rule=args.rule)
        except ValueError as exc:
            unreachable.append({"target_latency": t, "error": str(exc)})
            print(f"seed {seed}: target {t} not reachable: {exc}", flush=True)
            continue
        plans.append(("latency", t, lp, None))
        found = flops_at_measured(model, table, lp, example, match, timer)
        if found is not None:
            plans.append(("flops", t, found[0], found[1]))
    plans += flops_curve(model, example, args.curve, args.round_to)
    nets = [model] + [apply(model, p).eval() for _, _, p, _ in plans]
    times = time_rounds(nets, example, args.rounds, args.warmup)
    rows = []
    for (kind, t, p, target_flops), net, ms in zip(plans, nets[1:], times[1:]):
        acc_pruned = evaluate(net, splits.test)
        if args.finetune > 0:
            torch.manual_seed(seed)
            fit(net, splits, epochs=args.finetune, **fit_kwargs(seed))
        rows.append({
            "seed": seed, "plan": kind, "target_latency": t, "target_flops": target_flops,
            "measured_fraction": statistics.median(a / b for a, b in zip(ms, times[0])),
            "median_ms": statistics.median(ms), "unpruned_median_ms": statistics.median(times[0]),
            "measured_while_planning": p.latency[2] / table.full if kind == "latency" and p.latency[2] else None,
            "flops_fraction": p.achieved_flops, "importance_kept": importance_kept(p), "widths": widths_of(p),
            "test_accuracy_pruned": acc_pruned, "test_accuracy_finetuned": evaluate(net, splits.test)})
        r = rows[-1]
        if kind == "curve":
            continue
        print(f"seed {seed} {kind:<7} target {t}: latency {r['measured_fraction']:.3f} importance "
              f"{r['importance_kept']:.3f} acc {acc_pruned:.4f} -> {r['test_accuracy_finetuned']:.4f}", flush=True)
    return {"seed": seed, "train_s": train_s, "table_s": table_s, "test_accuracy": acc,
            "table_full_ms": table.full * 1e3, "interpolation_error": table.interpolation_error,
            "rows": rows, "unreachable": unreachable}


def against_curve(seed: dict) -> list[dict]:
    """Each latency plan of one seed against the FLOPs plans' curve at its measured latency:
    the curve's importance and accuracies interpolated there (:func:`at_latency`)."""
    curve = [r for r in seed["rows"] if r["plan"] == "curve"]
    out = []
    for r in seed["rows"]:
        if r["plan"] != "latency":
            continue
        at = {k: at_latency([(c["measured_fraction"], c[k]) for c in curve], r["measured_fraction"])
              for k in ("importance_kept", "test_accuracy_pruned", "test_accuracy_finetuned")}
        if at["importance_kept"] is not None:
            out.append({"seed": seed["seed"], "target_latency": r["target_latency"],
                        "measured_fraction": r["measured_fraction"],
                        **{f"{k}_lead": r[k] - v for k, v in at.items()}})
    return out


def summarize_curve(seeds: list[dict]) -> list[dict]:
    """Per target: the latency plan's lead over the FLOPs curve at equal measured latency, mean
    over seeds, its standard error, and the seeds with the lead > 0, = 0, < 0 (fine-tuned)."""
    leads = [x for s in seeds for x in against_curve(s)]
    out = []
    for t in sorted({x["target_latency"] for x in leads}, reverse=True):
        sel = [x for x in leads if x["target_latency"] == t]
        row = {"target_latency": t, "seeds": len(sel)}
        for k in ("importance_kept_lead", "test_accuracy_pruned_lead", "test_accuracy_finetuned_lead"):
            v = [x[k] for x in sel]
            row[k] = statistics.fmean(v)
            row[k + "_se"] = statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else None
        ft = [x["test_accuracy_finetuned_lead"] for x in sel]
        row["better_equal_worse"] = [sum(v > 1e-9 for v in ft), sum(abs(v) <= 1e-9 for v in ft),
                                     sum(v < -1e-9 for v in ft)]
        out.append(row)
    return out


def summarize(seeds: list[dict]) -> list[dict]:
    """Per target and plan: mean over seeds, and per seed the latency plan's lead over the FLOPs plan."""
    out = []
    rows = [r for s in seeds for r in s["rows"] if r["plan"] != "curve"]
    for t in sorted({r["target_latency"] for r in rows}, reverse=True):
        for kind in ("latency", "flops"):
            sel = [r for r in rows if r["target_latency"] == t and r["plan"] == kind]
            if not sel:
                continue
            out.append({"target_latency": t, "plan": kind, "seeds": len(sel), **{
                k: statistics.fmean(r[k] for r in sel) for k in (
                    "measured_fraction", "flops_fraction", "importance_kept", "test_accuracy_pruned",
                    "test_accuracy_finetuned")}})
    return out


def plot(payload: dict, path: str) -> None:
    """Importance kept and test accuracy (pruned; fine-tuned) against measured latency, every
    seed: the FLOPs plans' curve points grey, the latency plans coloured by target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for s in payload["seeds"] for r in s["rows"] if r["plan"] in ("curve", "latency")]
    keys = [("importance_kept", "importance kept"), ("test_accuracy_pruned", "test accuracy, pruned (%)"),
            ("test_accuracy_finetuned", "test accuracy, fine-tuned (%)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    curve = [r for r in rows if r["plan"] == "curve"]
    targets = sorted({r["target_latency"] for r in rows if r["plan"] == "latency"}, reverse=True)
    for ax, (k, label) in zip(axes, keys):
        scale = 1 if k == "importance_kept" else 100
        ax.scatter([r["measured_fraction"] for r in curve], [scale * r[k] for r in curve], s=6, c="0.6",
                   label="FLOPs plans (round_to=8)")
        for t in targets:
            sel = [r for r in rows if r["plan"] == "latency" and r["target_latency"] == t]
            ax.scatter([r["measured_fraction"] for r in sel], [scale * r[k] for r in sel], s=12,
                       label=f"latency plan, target {t:g}")
        ax.set_xlabel("measured latency / unpruned")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    st = payload["settings"]
    fig.suptitle(f"{st['arch']} on {st['dataset']}, strength {st['strength'][0]:g} shift {st['strength'][1]:g}, "
                 f"{len(payload['seeds'])} seeds, batch {st['batch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15, help="receding training epochs (the demo's 15)")
    parser.add_argument("--finetune", type=int, default=3, help="fine-tuning epochs, the same for both plans")
    parser.add_argument("--strength", type=float, nargs=2, default=list(DEMO_STRENGTH["rni"]),
                        metavar=("STRENGTH", "SHIFT"),
                        help="the receding regulariser's strength and shift (default: the demo's; the paper's "
                             "for VGG-16 is 1e-3 3)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--batch", type=int, default=32, help="batch size the latency is measured at")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--rule", choices=LATENCY_RULES, default=LATENCY_RULES[0],
                        help="the latency plan's rule (plan_to_latency(rule=...))")
    parser.add_argument("--points", type=int, default=4, help="latency table: widths measured per group")
    parser.add_argument("--table-warmup", type=int, default=2)
    parser.add_argument("--table-repeats", type=int, default=5)
    parser.add_argument("--refine", type=int, default=3)
    parser.add_argument("--match-steps", type=int, default=6)
    parser.add_argument("--curve", type=float, nargs="*", default=[i / 40 for i in range(2, 25)],
                        help="target_flops of the FLOPs plans whose measured latencies make the curve "
                             "each latency plan is compared against (none: no curve)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None,
                        help="output path (default benchmarks/results/latency_accuracy_cpu.json)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.finetune < 0 or args.rounds < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--epochs, --rounds and --batch must be >= 1, --finetune and --warmup >= 0")
    torch.set_num_threads(args.threads)
    env = environment(torch.device("cpu"))
    env["cpu_count"] = os.cpu_count()
    start = time.perf_counter()
    seeds = []
    payload = {}
    for seed in args.seeds:
        seeds.append(run_seed(seed, args))
        payload = {"benchmark": "latency_accuracy", "environment": {**env, "load_average_1min_end": os.getloadavg()[0]},
                   "settings": {**vars(args), "arch": ARCH, "dataset": DATASET,
                                "recipe": RECIPE, "min_channels": MIN_CHANNELS, "threads": torch.get_num_threads(),
                                "wall_s": time.perf_counter() - start},
                   "summary": summarize(seeds), "against_curve": summarize_curve(seeds), "seeds": seeds}
        if args.out is None:
            path = write_json("latency_accuracy_cpu.json", payload)
        else:
            path = write_json_at(args.out, payload)
    e = payload["environment"]
    print(f"{e['device']} | torch {e['torch']} | {e['cpu_threads']} thread(s) | load average "
          f"{env['load_average_1min']:.2f} -> {e['load_average_1min_end']:.2f} on {os.cpu_count()} cores")
    print(format_table(payload["summary"], [
        ("target", "target_latency", ".2f"), ("plan", "plan", "s"), ("seeds", "seeds", "d"),
        ("measured latency", "measured_fraction", ".3f"), ("FLOPs kept", "flops_fraction", ".3f"),
        ("importance kept", "importance_kept", ".3f"), ("acc pruned", "test_accuracy_pruned", ".4f"),
        ("acc fine-tuned", "test_accuracy_finetuned", ".4f")]))
    if payload["against_curve"]:
        print("latency plan minus the FLOPs curve at its measured latency (mean over seeds, standard error):")
        print(format_table([{**r, "better/equal/worse": "/".join(map(str, r["better_equal_worse"]))}
                            for r in payload["against_curve"]], [
            ("target", "target_latency", ".2f"), ("seeds", "seeds", "d"),
            ("importance", "importance_kept_lead", "+.4f"), ("s.e.", "importance_kept_lead_se", ".4f"),
            ("acc pruned", "test_accuracy_pruned_lead", "+.4f"), ("s.e.", "test_accuracy_pruned_lead_se", ".4f"),
            ("acc fine-tuned", "test_accuracy_finetuned_lead", "+.4f"),
            ("s.e.", "test_accuracy_finetuned_lead_se", ".4f"), ("better/equal/worse", "better/equal/worse", "s")]))
    print(f"wrote {path}")
    try:
        plot(payload, os.path.splitext(path)[0] + ".png")
    except ImportError:
        print("matplotlib missing: no plot")
    return payload


if __name__ == "__main__":
    main()
