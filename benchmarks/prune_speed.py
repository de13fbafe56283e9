"""How long does one-shot pruning of a whole ImageNet model take: rnip_ext or Torch-Pruning?

Prunes ``rnip_ext.models.vgg16()`` (138M parameters) and ``rnip_ext.models.resnet50()`` (25.6M),
both with :class:`~rnip_ext.BoundedBatchNorm2d`, at a 50% global ratio, with a 1x3x224x224
example input, and times

* rnip_ext: ``rnip_ext.pruning.plan`` (fx trace, channel groups, scores, selection, the bias-fold
  report and one forward pass to count FLOPs) and ``rnip_ext.pruning.apply`` (every sliced tensor
  in one ``channel_gather_many`` call, then a deep copy into a new model), separately and their
  sum;
* Torch-Pruning: building its pruner (``BasePruner``: tracing the dependency graph through one
  forward pass with autograd) with ``BoundedScaleImportance`` and our ``BoundedBatchNorm2d``
  pruner (``rnip_ext.integrations.torch_pruning``), and ``pruner.step()`` (scoring every group,
  global ranking, in-place slicing), separately and their sum. Each repeat gets a fresh deep
  copy of the model (not timed), since ``step`` prunes in place. The classifier is passed as
  ``ignored_layers`` so that no time goes into finding it.

rnip_ext never modifies its input, so its repeats reuse one model. The two do not do the same
work: ``apply`` builds a new model (including copying every unpruned tensor) where Torch-Pruning
edits the model it is given, and on ResNet-50 Torch-Pruning also prunes the residual streams
(coupled through the additions), which rnip_ext leaves alone, so it removes more: each row
records the parameter and MAC counts after pruning. On VGG-16 both keep the same channels (the
JSON's ``same_channels_as_torch_pruning`` checks it on the last repeat).

Timing: warm-up runs first, then the median and 20th/80th percentiles of ``--repeats`` runs, wall
clock (on CUDA with a synchronize before each reading). The two libraries take turns within each
repeat, so that load from other processes on a shared machine falls on both alike; the JSON
keeps every run's times and the load average before and after. The JSON
(``benchmarks/results/prune_speed_<device>.json``) records device, torch/Torch-Pruning/CUDA
versions and git commit in each row.

Run: ``python benchmarks/prune_speed.py [--device cuda] [--repeats 10] [--models vgg16 resnet50]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import environment, package_version  # noqa: E402

from rnip_ext import BoundedBatchNorm2d  # noqa: E402
from rnip_ext import models as M  # noqa: E402
from rnip_ext.pruning import apply, count_flops, count_params, plan  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATIO = 0.5
INPUT_SHAPE = (1, 3, 224, 224)
MODELS: dict[str, Callable[[], torch.nn.Module]] = {"vgg16": M.vgg16, "resnet50": M.resnet50}


# ------------------------------------------------------------------------------------------------
# Environment


# ------------------------------------------------------------------------------------------------
# Timing


def seconds(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    """Wall time of one call (pending device work finished on both sides) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def summary(times: list[float]) -> dict[str, float]:
    if len(times) == 1:
        return {"median_s": times[0], "p20_s": times[0], "p80_s": times[0]}
    cuts = statistics.quantiles(times, n=5, method="inclusive")  # the 20th, 40th, 60th, 80th percentiles
    return {"median_s": statistics.median(times), "p20_s": cuts[0], "p80_s": cuts[3]}


def ours_once(model, x, device):
    """``(plan, apply)`` seconds of one rnip_ext pruning, and the pruned model."""
    t_plan, p = seconds(lambda: plan(model, RATIO, "global", example_inputs=x), device)
    t_apply, pruned = seconds(lambda: apply(model, p), device)
    return (t_plan, t_apply), pruned


def torch_pruning_once(model, x, device, rtp):
    """``(build, step)`` seconds of one Torch-Pruning pruning of a fresh copy, and the copy."""
    work = copy.deepcopy(model)
    last = last_layer(work)
    t_build, pruner = seconds(lambda: rtp.pruner(work, x, RATIO, ignored_layers=[last]), device)
    t_step, _ = seconds(pruner.step, device)
    return (t_build, t_step), work


def interleaved(model, x, device, warmup, repeats, rtp):
    """Alternate the two (and which goes first) so that both see the same machine: on shared
    cores other jobs come and go, and back-to-back blocks would charge them to one method."""
    ours, theirs, pruned = [], [], {}
    for i in range(warmup + repeats):
        order = ("ours", "theirs") if i % 2 == 0 else ("theirs", "ours")
        for who in order:
            pruned.pop(who, None)
            gc.collect()  # free the last copy outside the timed region
            if who == "ours":
                t, pruned[who] = ours_once(model, x, device)
                if i >= warmup:
                    ours.append(t)
            else:
                t, pruned[who] = torch_pruning_once(model, x, device, rtp)
                if i >= warmup:
                    theirs.append(t)
    return ours, theirs, pruned["ours"], pruned["theirs"]


def last_layer(model: torch.nn.Module) -> torch.nn.Module:
    """The classifier of the two models here: their last registered linear layer."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]


def same_channels(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two pruned copies kept the same channels: same tensor shapes, and the same logits
    in every bounded BatchNorm (random, so equal logits mean equal channels)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        return False
    bns = [n for n, m in a.named_modules() if isinstance(m, BoundedBatchNorm2d)]
    return all(torch.equal(sa[f"{n}.weight"], sb[f"{n}.weight"]) for n in bns)


# ------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/prune_speed_<device>.json)")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")

    try:
        from rnip_ext.integrations import torch_pruning as rtp
    except ImportError as err:
        raise SystemExit(str(err)) from err
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")

    env = environment(device)
    env.update({
        "torch_pruning": package_version("torch-pruning"),
        "ratio": RATIO,
        "input_shape": list(INPUT_SHAPE),
        "repeats": args.repeats,
        "warmup": args.warmup,
    })

    rows = []
    for name in args.models:
        torch.manual_seed(args.seed)
        model = MODELS[name]().to(device).eval()
        x = torch.randn(*INPUT_SHAPE, device=device)
        params = count_params(model)
        flops = count_flops(model, x)

        ours, theirs, ours_model, their_model = interleaved(model, x, device, args.warmup, args.repeats, rtp)
        agree = same_channels(ours_model, their_model)
        after = {
            "rnip_ext": (count_params(ours_model), count_flops(ours_model, x)),
            "torch-pruning": (count_params(their_model), count_flops(their_model, x)),
        }
        del ours_model, their_model
        gc.collect()

        phases = {
            "rnip_ext": [("plan", [t[0] for t in ours]), ("apply", [t[1] for t in ours])],
            "torch-pruning": [("build", [t[0] for t in theirs]), ("step", [t[1] for t in theirs])],
        }
        totals = {"rnip_ext": [sum(t) for t in ours], "torch-pruning": [sum(t) for t in theirs]}
        phases["rnip_ext"].append(("plan+apply", totals["rnip_ext"]))
        phases["torch-pruning"].append(("build+step", totals["torch-pruning"]))
        their_total = statistics.median(totals["torch-pruning"])
        for method, entries in phases.items():
            for phase, times in entries:
                row = {
                    **env,
                    "model": name,
                    "method": method,
                    "phase": phase,
                    **summary(times),
                    "times_s": times,
                    "params_before": params,
                    "params_after": after[method][0],
                    "macs_before": flops,
                    "macs_after": after[method][1],
                    "same_channels_as_torch_pruning": agree,
                }
                if phase in ("plan+apply", "build+step"):
                    row["speedup_vs_torch_pruning"] = their_total / row["median_s"]
                    # Per repeat, both ran back to back: the median of those ratios is steadier
                    # than the ratio of medians when the machine's load drifts.
                    row["speedup_vs_torch_pruning_paired"] = statistics.median(
                        b / a for a, b in zip(totals[method], totals["torch-pruning"])
                    )
                rows.append(row)
        del model
        gc.collect()

    for row in rows:
        row["load_average_1min_end"] = os.getloadavg()[0]
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"prune_speed_{device.type}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)

    print(
        f"{env['device']} | torch {env['torch']} | torch-pruning {env['torch_pruning']} | {env['cpu_threads']} threads"
        f" | commit {str(env['git_commit'])[:10]}{' (dirty)' if env['git_dirty'] else ''}"
        f" | load {env['load_average_1min']:.2f}"
        f" | median of {args.repeats} after {args.warmup} warm-up"
    )
    header = (
        f"{'model':<9} {'method':<14} {'phase':<11} {'median s':>9} {'p20':>8} {'p80':>8} "
        f"{'params after':>13} {'vs TP':>7} {'paired':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        speedup = paired = ""
        if "speedup_vs_torch_pruning" in r:
            speedup = f"{r['speedup_vs_torch_pruning']:.2f}x"
            paired = f"{r['speedup_vs_torch_pruning_paired']:.2f}x"
        print(
            f"{r['model']:<9} {r['method']:<14} {r['phase']:<11} {r['median_s']:>9.3f} {r['p20_s']:>8.3f} "
            f"{r['p80_s']:>8.3f} {r['params_after']:>13,} {speedup:>7} {paired:>7}"
        )
    for name in args.models:
        first = next(r for r in rows if r["model"] == name)
        print(f"{name}: {first['params_before']:,} parameters; same channels kept by both: "
              f"{first['same_channels_as_torch_pruning']}")
    print(f"wrote {os.path.relpath(out, ROOT)}")


if __name__ == "__main__":
    main()
