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
from _common import environment, format_table, write_json  # noqa: E402

from rnip_ext import BoundedBatchNorm2d  # noqa: E402
from rnip_ext import models as M  # noqa: E402
from rnip_ext.pruning import apply, count_flops, count_params, plan  # noqa: E402

MODELS = {"vgg16_cifar": M.vgg16_cifar, "resnet56_cifar": M.resnet56_cifar}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
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
