"""How much faster is a pruned network really, next to how many fewer FLOPs it has?

The paper's VGG-16 and ResNet-56 (CIFAR, 32x32 inputs, ``rnip_ext.models.vgg16_cifar`` and
``resnet56_cifar`` with :class:`~rnip_ext.BoundedBatchNorm2d`) are pruned with
``rnip_ext.pruning.plan(model, target_flops=t)`` for t in 0.7, 0.5, 0.3, 0.1 (the fraction of
the multiply-accumulates kept) and timed against the unpruned network:

* ``infer_b1``: inference latency of one image (eval mode, ``torch.no_grad``);
* ``infer_bN``: inference of a batch of ``--batch`` images (reported as images/s too);
* ``train_step``: one training step on a batch of ``--batch``: forward, cross-entropy,
  backward, SGD (momentum 0.9, Nesterov) step, gradients set to None.

Importances: trained networks are not needed to measure speed, only a realistic *shape* of the
pruned network. Every bounded BatchNorm's logit is drawn from ``N(0, 2^2)`` with ``--seed``
(importances ``sigmoid(w)`` spread over (0, 1)), so the global order mixes all layers and each
budget thins every prunable layer by a similar fraction, roughly like a network whose layers
all recede; a trained network that empties some layers more than others can time differently
at the same FLOPs. On ResNet-56 only the inner channels of each block are pruned (the residual
streams stay whole), which is why its FLOPs cannot fall as low as VGG's: a target it cannot
reach is listed under ``unreachable`` in the JSON (with the smallest reachable fraction) and
not timed.

Timing: wall clock with ``time.perf_counter`` (on CUDA with a synchronize before each reading),
``--rounds`` rounds (default 9) after ``--warmup`` untimed ones; in each round every configuration of a
model is timed once (``infer_b1`` ``--b1-repeats`` times), so that load from other processes
on a shared machine falls on all of them alike. Each row reports the median and 20th/80th
percentiles in milliseconds over all rounds, ``speedup`` = unpruned median / pruned median, and
``speedup_paired`` the median over rounds of the same ratio within a round (steadier when the
machine's load drifts; the table prints it).
The JSON (``benchmarks/results/pruned_speed_<device>.json``) records the environment (device,
``torch.get_num_threads()``, versions, commit, the 1-minute load average at the start and end:
on a busy machine every CPU number is slower and noisier, see ``machine_note``).

Run: ``python benchmarks/pruned_speed.py [--device cuda] [--batch 32] [--rounds 9] [--threads N]``.

``--latency`` answers another question, pruning to a *measured latency* (issue 22): for
``--models`` (VGG-16 CIFAR at 32x32, ResNet-50 at ``--resnet-size`` pixels, default 64 to keep
a run within minutes on 2 CPU cores) at batch ``--batch``, a
:class:`~rnip_ext.pruning.latency.LatencyTable` is measured (``round_to=8`` grid), then each
``--latency-targets`` fraction of the unpruned latency is planned with
``plan(target_latency=t, round_to=8)``, and next to it the FLOPs-budget plan (``round_to=8``)
at the same *measured* latency (``target_flops`` found by bisection on measured latency, starting
from the one whose predicted latency is the same). All of them, and
the unpruned network, eager and exported (``pruning.export`` ``.pt2``, loaded with
``torch.export.load``), are timed in interleaved rounds; rows give the target, the predicted and
measured latency (``measured_fraction`` = pruned / unpruned median in the same run, the
number the target is about), the importance each plan keeps and the speed-up. Written to
``results/pruned_speed_latency_<model>_b<batch>_<device>.json``.
``results/pruned_speed_cpu.json`` was measured with ``--threads 1`` on 2 cores shared with other
jobs (load average 4-5): with 2 threads each parallel region waits for its slowest thread, and
on oversubscribed cores that made single timings swing by 10x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, format_table, load_note, write_json  # noqa: E402

from rnip_ext import BoundedBatchNorm2d  # noqa: E402
from rnip_ext import models as M  # noqa: E402
from rnip_ext.pruning import apply, count_flops, count_params, export, plan, plan_from_keep  # noqa: E402
from rnip_ext.pruning.latency import LatencyTable, WallClockTimer  # noqa: E402
from rnip_ext.pruning.latency_plan import LATENCY_RULES, _measured, plan_to_latency  # noqa: E402
from rnip_ext.pruning.rounding import keep_best, round_width  # noqa: E402

MODELS = {"vgg16_cifar": M.vgg16_cifar, "resnet56_cifar": M.resnet56_cifar}
LATENCY_MODELS = {"vgg16_cifar": M.vgg16_cifar, "resnet50": lambda: M.resnet50(num_classes=1000)}
TARGETS = (1.0, 0.7, 0.5, 0.3, 0.1)
MEASURES = ("infer_b1", "infer_bN", "train_step")


def spread_importances(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Bounded BatchNorm logits ~ N(0, 2^2): importances spread over (0, 1), mixed across layers."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BoundedBatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) * 2.0)
    return model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    """Milliseconds of one call, pending device work finished on both sides."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


class Workload:
    """The three timed calls of one (model, target) configuration."""

    def __init__(self, model: torch.nn.Module, batch: int, device: torch.device, gen: torch.Generator):
        self.model = model.to(device)
        self.x1 = torch.randn(1, 3, 32, 32, generator=gen).to(device)
        self.xn = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        self.y = torch.randint(10, (batch,), generator=gen).to(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)

    def infer(self, x: torch.Tensor) -> None:
        self.model.eval()
        with torch.no_grad():
            self.model(x)

    def train_step(self) -> None:
        self.model.train()
        loss = F.cross_entropy(self.model(self.xn), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def run(self, measure: str) -> None:
        if measure == "infer_b1":
            self.infer(self.x1)
        elif measure == "infer_bN":
            self.infer(self.xn)
        else:
            self.train_step()


def quantiles(samples: list[float]) -> dict:
    cuts = statistics.quantiles(samples, n=5, method="inclusive") if len(samples) > 1 else [samples[0]] * 4
    return {"median_ms": statistics.median(samples), "p20_ms": cuts[0], "p80_ms": cuts[3], "samples": len(samples)}


def bench_model(name: str, args, device: torch.device, unreachable: list) -> list[dict]:
    torch.manual_seed(args.seed)
    base = spread_importances(MODELS[name](), args.seed).eval()
    example = torch.randn(1, 3, 32, 32)
    flops0, params0 = count_flops(base, example), count_params(base)
    configs = []
    for t in TARGETS:
        if t == 1.0:
            model, achieved = base, (1.0, 1.0, 0.0)
        else:
            try:
                p = plan(base, target_flops=t, example_inputs=example)
            except ValueError as exc:  # e.g. ResNet-56 at 10%: its residual streams stay whole
                unreachable.append({"model": name, "target_flops": t, "error": str(exc)})
                print(f"  {name}: skipping target {t}: {exc}")
                continue
            model, achieved = apply(base, p), (p.achieved_flops, p.achieved_params, p.achieved_ratio)
        assert abs(count_flops(model, example) / flops0 - achieved[0]) < 1e-12
        gen = torch.Generator().manual_seed(args.seed)
        configs.append((t, achieved, Workload(model, args.batch, device, gen)))

    times = {(t, m): [] for t, _, _ in configs for m in MEASURES}
    for round_ in range(args.warmup + args.rounds):
        for t, _, work in configs:
            for measure in MEASURES:
                reps = args.b1_repeats if measure == "infer_b1" else 1
                for _ in range(reps):
                    ms = _timed(lambda: work.run(measure), device)
                    if round_ >= args.warmup:
                        times[(t, measure)].append(ms)
        print(f"  {name}: round {round_ + 1}/{args.warmup + args.rounds} done", flush=True)

    rows = []
    for t, achieved, work in configs:
        for measure in MEASURES:
            stats = quantiles(times[(t, measure)])
            base_median = statistics.median(times[(1.0, measure)])
            batch = 1 if measure == "infer_b1" else args.batch
            rows.append({
                "model": name, "target_flops": t, "measure": measure, "batch": batch,
                "flops": round(achieved[0] * flops0), "flops_before": flops0, "achieved_flops": achieved[0],
                "flops_reduction": 1.0 / achieved[0], "achieved_params": achieved[1],
                "params": count_params(work.model), "params_before": params0, "channels_removed": achieved[2],
                **stats, "images_per_s": batch / (stats["median_ms"] * 1e-3),
                "speedup": base_median / stats["median_ms"],
                # Within a round the configurations ran back to back: the median of the per-round
                # ratios is steadier than the ratio of medians when the machine's load drifts.
                "speedup_paired": statistics.median(
                    b / a for a, b in zip(times[(t, measure)], times[(1.0, measure)])),
                "times_ms": times[(t, measure)],
            })
    return rows


# -- --latency: pruning to a measured latency ---------------------------------------------------

def flops_plan_rounded(model, target_flops: float, example, round_to: int, min_channels: int,
                       residual_streams: bool = False):
    """``plan(target_flops=...)`` with every group's kept count rounded to ``round_to`` (nearest
    allowed width, the best channels kept): the FLOPs-budget plan on the same widths grid."""
    p = plan(model, target_flops=target_flops, example_inputs=example, min_channels=min_channels,
             residual_streams=residual_streams)
    keep = {}
    for g in p.groups:
        w = round_width(len(p.group_keep[g.name]), g.channels, round_to, min_channels)
        if w < g.channels:
            keep[g.name] = keep_best(p.scores[g.name], w)
    return plan_from_keep(model, keep, example_inputs=example, residual_streams=residual_streams)


def widths_of(p) -> dict[str, int]:
    return {g.name: len(p.group_keep[g.name]) for g in p.groups}


def importance_kept(p) -> float:
    """The fraction of the summed channel importance (the plan's scores) that the plan keeps."""
    total = sum(float(p.scores[g.name].double().sum()) for g in p.groups)
    return sum(float(p.scores[g.name][p.group_keep[g.name]].double().sum()) for g in p.groups) / total


def flops_at_latency(model, table: LatencyTable, latency: float, example, round_to: int, min_channels: int,
                     iterations: int = 14, residual_streams: bool = False):
    """The rounded FLOPs-budget plan whose predicted latency is closest to ``latency`` from
    below (bisection on ``target_flops``; predicted latency falls with it, up to rounding)."""
    lo, hi, best = 0.0, 1.0, None
    for _ in range(iterations):
        mid = (lo + hi) / 2
        try:
            p = flops_plan_rounded(model, mid, example, round_to, min_channels, residual_streams)
        except ValueError:  # below the smallest reachable FLOPs
            lo = mid
            continue
        predicted = table.predict(widths_of(p))
        if predicted <= latency:
            best, lo = (p, mid, predicted), mid
        else:
            hi = mid
    return best


def flops_at_measured(model, table: LatencyTable, latency_plan, example, args, timer):
    """The rounded FLOPs-budget plan at the latency plan's *measured* latency: the first guess
    matches the predicted latency, then a bisection on ``target_flops`` over measured latency
    (``_measured``: pruned / unpruned in back-to-back pairs), ``--match-steps`` measurements in
    all; the candidate measured closest to the goal."""
    goal = latency_plan.latency[2] or latency_plan.latency[1]
    streams = getattr(args, "residual_streams", False)
    first = flops_at_latency(model, table, latency_plan.latency[1], example, args.round_to, 3,
                             residual_streams=streams)
    lo, hi, tried = 0.0, 1.0, []
    for step in range(args.match_steps):
        f = first[1] if step == 0 and first is not None else (lo + hi) / 2
        try:
            p = flops_plan_rounded(model, f, example, args.round_to, 3, streams)
        except ValueError:  # below the smallest reachable FLOPs
            lo = f
            continue
        measured = _measured(model, apply(model, p), (example,), timer, "target_latency", table.full)
        tried.append((abs(measured / goal - 1), (p, f, table.predict(widths_of(p)))))
        if abs(measured / goal - 1) <= 0.02:
            break
        if measured > goal:
            hi = f
        else:
            lo = f
    return min(tried, key=lambda x: x[0])[1] if tried else None


def _loaded_program(model, example, folder: str, name: str):
    path = os.path.join(folder, f"{name}.pt2")
    export(model, path, example)
    return torch.export.load(path).module()


def bench_latency(name: str, args, device: torch.device) -> dict:
    """One model at one batch size: table, plans, interleaved timings (see the module docstring)."""
    import tempfile

    torch.manual_seed(args.seed)
    model = spread_importances(LATENCY_MODELS[name](), args.seed).eval().to(device)
    size = 32 if name.endswith("cifar") else args.resnet_size
    example = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(args.seed)).to(device)
    t0 = time.perf_counter()
    timer = WallClockTimer(warmup=args.table_warmup, repeats=args.table_repeats)
    table = LatencyTable.build(model, example, points=args.points, round_to=args.round_to, timer=timer,
                               residual_streams=args.residual_streams)
    table_s = time.perf_counter() - t0
    print(f"  {name} b{args.batch}: table in {table_s:.0f} s, unpruned {table.full * 1e3:.2f} ms, "
          f"interpolation check {table.interpolation_error}", flush=True)
    flops0 = count_flops(model, example)
    plans, unreachable = [("unpruned", None, None, model, None)], []
    for t in args.latency_targets:
        try:
            p = plan_to_latency(model, example_inputs=example, target_latency=t, latency_table=table,
                                round_to=args.round_to, refine=args.refine, timer=timer,
                                residual_streams=args.residual_streams, rule=args.rule)
        except ValueError as exc:  # e.g. ResNet-50 at 30%: its residual streams stay whole
            unreachable.append({"target_latency": t, "error": str(exc)})
            print(f"  {name} b{args.batch}: target {t} not reachable: {exc}", flush=True)
            continue
        plans.append(("latency", t, p, apply(model, p), p.latency[1]))
        found = flops_at_measured(model, table, p, example, args, timer)
        if found is not None:
            fp, f, predicted = found
            plans.append(("flops", t, fp, apply(model, fp), predicted))
            plans[-1][2].target_flops = f
    with tempfile.TemporaryDirectory() as folder:
        runners = []
        for i, (kind, t, p, m, _) in enumerate(plans):
            runners.append((i, "eager", m))
            runners.append((i, "pt2", _loaded_program(m, example, folder, f"m{i}")))
        times = {(i, mode): [] for i, mode, _ in runners}
        reps = args.b1_repeats if args.batch == 1 else 1
        with torch.no_grad():
            for round_ in range(args.warmup + args.rounds):
                for i, mode, m in runners:
                    for _ in range(reps):
                        ms = _timed(lambda: m(example), device)
                        if round_ >= args.warmup:
                            times[(i, mode)].append(ms)
                print(f"  {name} b{args.batch}: round {round_ + 1}/{args.warmup + args.rounds}", flush=True)
    rows = []
    for i, (kind, t, p, m, predicted) in enumerate(plans):
        row = {"model": name, "batch": args.batch, "input": [3, size, size], "plan": kind, "target_latency": t,
               "target_flops": None if p is None else p.target_flops,
               "predicted_ms": (table.full if p is None else predicted) * 1e3,
               "measured_while_planning_ms": (None if p is None or getattr(p, "latency", None) is None
                                              else p.latency[2] * 1e3),
               "flops_fraction": 1.0 if p is None else p.achieved_flops,
               "importance_kept": 1.0 if p is None else importance_kept(p),
               "widths": None if p is None else widths_of(p)}
        for mode in ("eager", "pt2"):
            stats = quantiles(times[(i, mode)])
            base = times[(0, mode)]
            fraction = statistics.median(a / b for a, b in zip(times[(i, mode)], base))
            row[mode] = {**stats, "measured_fraction": fraction, "speedup": 1.0 / fraction,
                         "vs_target": None if t is None else fraction / t - 1.0}
        rows.append(row)
    return {"model": name, "batch": args.batch, "input": [3, size, size], "table_build_s": table_s,
            "table_full_ms": table.full * 1e3, "table_rest_ms": table.rest * 1e3,
            "interpolation_error": table.interpolation_error, "table_settings": table.settings,
            "grid": table.grid, "flops_before": flops0, "rows": rows, "unreachable": unreachable}


def main_latency(args, device: torch.device) -> None:
    env = environment(device)
    for name in args.models:
        start = time.perf_counter()
        result = bench_latency(name, args, device)
        load_end = os.getloadavg()[0]
        note = load_note(env["load_average_1min"], load_end)
        payload = {"benchmark": "pruned_speed_latency",
                   "environment": {**env, "load_average_1min_end": load_end, "cpu_count": os.cpu_count(),
                                   "machine_note": note},
                   "settings": {"rounds": args.rounds, "warmup": args.warmup, "b1_repeats": args.b1_repeats,
                                "round_to": args.round_to, "residual_streams": args.residual_streams, "rule": args.rule,
                                "points": args.points, "seed": args.seed,
                                "refine": args.refine, "match_steps": args.match_steps, "threads": torch.get_num_threads(),
                                "table_timer": {"warmup": args.table_warmup, "repeats": args.table_repeats},
                                "importances": "bounded BatchNorm logits ~ N(0, 2^2), seed above",
                                "wall_s": time.perf_counter() - start},
                   **result}
        streams = "_streams" if args.residual_streams else ""
        rule = "" if args.rule == "knapsack" else f"_{args.rule}"
        path = write_json(f"pruned_speed_latency_{name}_b{args.batch}{streams}{rule}_{device.type}.json", payload)
        print(f"{env['device']} | torch {env['torch']} | {env['cpu_threads']} threads | {note}")
        table = []
        for r in result["rows"]:
            table.append({"plan": r["plan"], "target": r["target_latency"], "tflops": r["target_flops"],
                          "pred": r["predicted_ms"], "eager": r["eager"]["median_ms"],
                          "frac": r["eager"]["measured_fraction"], "pt2": r["pt2"]["median_ms"],
                          "pt2frac": r["pt2"]["measured_fraction"], "flops": r["flops_fraction"],
                          "imp": r["importance_kept"]})
        print(format_table(table, [
            ("plan", "plan", "s"), ("target", "target", ".2f"), ("target_flops", "tflops", ".3f"),
            ("predicted ms", "pred", ".2f"), ("eager ms", "eager", ".2f"), ("eager fraction", "frac", ".3f"),
            (".pt2 ms", "pt2", ".2f"), (".pt2 fraction", "pt2frac", ".3f"), ("FLOPs kept", "flops", ".3f"),
            ("importance kept", "imp", ".3f")]))
        print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--models", nargs="+", default=None, choices=sorted(set(MODELS) | set(LATENCY_MODELS)),
                        help=f"default {list(MODELS)}, with --latency {list(LATENCY_MODELS)}")
    parser.add_argument("--latency", action="store_true", help="prune to measured latency targets (see above)")
    parser.add_argument("--latency-targets", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--residual-streams", action="store_true",
                        help="--latency: plan with residual_streams=True (the residual streams are pruned too)")
    parser.add_argument("--refine", type=int, default=3, help="plan_to_latency(refine=...)")
    parser.add_argument("--rule", choices=LATENCY_RULES, default=LATENCY_RULES[0],
                        help="--latency: the latency plans' rule (plan_to_latency(rule=...))")
    parser.add_argument("--match-steps", type=int, default=6,
                        help="measurements to match the FLOPs plan's latency to the latency plan's")
    parser.add_argument("--points", type=int, default=5, help="latency table: widths measured per group")
    parser.add_argument("--table-warmup", type=int, default=2)
    parser.add_argument("--table-repeats", type=int, default=7)
    parser.add_argument("--resnet-size", type=int, default=64, help="--latency: ResNet-50 input size")
    parser.add_argument("--batch", type=int, default=32, help="batch of infer_bN and train_step")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--b1-repeats", type=int, default=3, help="batch-1 inferences timed per round")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="file name under benchmarks/results "
                                                   "(default pruned_speed_<device>.json)")
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0 or args.batch < 1 or args.b1_repeats < 1:
        raise SystemExit("--rounds, --batch and --b1-repeats must be >= 1, --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")

    if args.latency:
        args.models = args.models or list(LATENCY_MODELS)
        wrong = [m for m in args.models if m not in LATENCY_MODELS]
        if wrong:
            raise SystemExit(f"--latency runs {list(LATENCY_MODELS)}, not {wrong}")
        main_latency(args, device)
        return
    args.models = args.models or list(MODELS)
    wrong = [m for m in args.models if m not in MODELS]
    if wrong:
        raise SystemExit(f"without --latency the models are {list(MODELS)}, not {wrong}")
    env = environment(device)
    start = time.perf_counter()
    rows, unreachable = [], []
    for name in args.models:
        rows += bench_model(name, args, device, unreachable)
    load_end = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    busiest = max(env["load_average_1min"], load_end)
    note = (f"machine not idle: 1-minute load average {env['load_average_1min']:.2f} at the start and "
            f"{load_end:.2f} at the end on {cores} cores (other processes were running); CPU timings are "
            "slower and noisier than on an idle machine, the interleaved rounds share that load between "
            "configurations" if device.type == "cpu" and busiest > 0.5 else "machine idle within the load average")
    payload = {
        "benchmark": "pruned_speed",
        "environment": {**env, "load_average_1min_end": load_end, "cpu_count": cores, "machine_note": note},
        "settings": {"batch": args.batch, "rounds": args.rounds, "warmup": args.warmup,
                     "b1_repeats": args.b1_repeats, "seed": args.seed, "input": [3, 32, 32],
                     "importances": "bounded BatchNorm logits ~ N(0, 2^2), seed above",
                     "targets_flops": list(TARGETS), "wall_s": time.perf_counter() - start},
        "rows": rows,
        "unreachable": unreachable,
    }
    path = write_json(args.out or f"pruned_speed_{device.type}.json", payload)

    print(f"{env['device']} | torch {env['torch']} | {env['cpu_threads']} threads | batch {args.batch} | "
          f"median of {args.rounds} rounds | {note}")
    table = []
    for name in args.models:
        for t in TARGETS:
            r = {m: next((x for x in rows if x["model"] == name and x["target_flops"] == t and x["measure"] == m),
                         None) for m in MEASURES}
            if r["infer_b1"] is None:
                continue
            table.append({
                "model": name, "target": t, "flops_kept": r["infer_b1"]["achieved_flops"],
                "flops_x": r["infer_b1"]["flops_reduction"], "params_kept": r["infer_b1"]["achieved_params"],
                "b1_ms": r["infer_b1"]["median_ms"], "b1_x": r["infer_b1"]["speedup_paired"],
                "bN_ips": r["infer_bN"]["images_per_s"], "bN_x": r["infer_bN"]["speedup_paired"],
                "train_ms": r["train_step"]["median_ms"], "train_x": r["train_step"]["speedup_paired"],
            })
    print(format_table(table, [
        ("model", "model", "s"), ("target", "target", ".1f"), ("FLOPs kept", "flops_kept", ".3f"),
        ("FLOPs x fewer", "flops_x", ".2f"), ("params kept", "params_kept", ".3f"),
        ("b1 ms", "b1_ms", ".2f"), ("b1 speed-up", "b1_x", ".2f"),
        (f"b{args.batch} img/s", "bN_ips", ".0f"), (f"b{args.batch} speed-up", "bN_x", ".2f"),
        ("train ms", "train_ms", ".1f"), ("train speed-up", "train_x", ".2f"),
    ]))
    for u in unreachable:
        print(f"not measured: {u['model']} at target {u['target_flops']}: {u['error']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
