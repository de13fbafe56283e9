"""Whole-network training step: does our bounded BN slow a real network down?

The paper's CIFAR VGG-16 (13 BatchNorm layers, 32x32 inputs) trained one step at a time, with

1. ``plain``: ``nn.BatchNorm2d``, cross-entropy only (what a user would otherwise train);
2. ``paper``: the paper's eager formulation, ``F.batch_norm(x, ..., sigmoid(w))`` with the
   receding penalty ``strength * sum s(1 - log s)`` through autograd;
3. ``ours``: ``rnip_ext.BoundedBatchNorm2d`` with an attached ``RecedingRegularizer`` (the fused
   Triton kernels on CUDA, the eager path on CPU).

A step is forward, loss (+ penalty), backward and an SGD (momentum 0.9, Nesterov) update, on one
fixed random batch already on the device (no data loading). Reported: median ms per step (p20,
p80) and images/s = batch / median, plus each variant's ratio to ``plain``. The JSON is rewritten
after every row (``"complete": false`` until the last): a run stopped by a timeout keeps its rows.
``plan()`` counts rows, timed runs and our layer's Triton compiles without a GPU (its launches
planned on ``meta`` tensors) for ``benchmarks/gpu_check.py --dry-run``.

    python benchmarks/net_speed.py --device cuda                     # batch 128, fp32 + bf16
    python benchmarks/net_speed.py --dry-run                          # CPU: batch 2, every variant
    python benchmarks/net_speed.py --dry-run --model tiny             # seconds: the test's run
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, bench, environment, format_table, write_json  # noqa: E402

import rnip_ext  # noqa: E402
from rnip_ext import functional as RF  # noqa: E402
from rnip_ext.models import vgg16_cifar, vgg_small  # noqa: E402

STRENGTH, SHIFT = 1e-3, 3.0
VARIANTS = ("plain", "paper", "ours")
# vgg_small at widths 8..16 is the smoke-test network (tests/benchmarks run it on CPU in seconds).
MODELS = {"vgg16_cifar": vgg16_cifar, "tiny": lambda bn: vgg_small(bn=bn, widths=(8, 8, 16))}
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PaperBN(nn.Module):
    """The paper's layer: functional BN with the scale ``sigmoid(weight)``; penalty via autograd."""

    def __init__(self, bn: nn.BatchNorm2d) -> None:
        super().__init__()
        ref = bn.weight
        self.weight = nn.Parameter(torch.randn(bn.num_features, device=ref.device, dtype=ref.dtype))
        self.register_buffer("running_mean", bn.running_mean.clone())
        self.register_buffer("running_var", bn.running_var.clone())

    def forward(self, x):
        return RF.bounded_batch_norm(
            x, self.running_mean, self.running_var, self.weight, None, self.training, 0.1, 1e-5
        )


def build(variant: str, device: torch.device, channels_last: bool, model_name: str = "vgg16_cifar"):
    """``(model, penalty_fn)`` for one variant on ``device``."""
    make = MODELS[model_name]
    if variant == "ours":
        model = make(bn="bounded").to(device)
        reg = rnip_ext.RecedingRegularizer(model, STRENGTH, SHIFT)
        penalty = reg
    else:
        model = make(bn="plain").to(device)
        penalty = None
        if variant == "paper":
            for name, child in list(model.features.named_children()):
                if isinstance(child, nn.BatchNorm2d):
                    model.features._modules[name] = PaperBN(child)
            layers = [m for m in model.modules() if isinstance(m, PaperBN)]

            def penalty():
                return STRENGTH * torch.stack([RF.receding_penalty(m.weight, SHIFT) for m in layers]).sum()

    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train(), penalty


def make_step(variant, device, batch, amp, channels_last, model_name="vgg16_cifar"):
    """A closure running one training step of ``variant``."""
    model, penalty = build(variant, device, channels_last, model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, 3, 32, 32, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(10, (batch,), device=device)
    dtype = AMP[amp]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(x), y)
            if penalty is not None:
                loss = loss + penalty()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default 128 on CUDA, 16 on CPU)")
    parser.add_argument("--amp", nargs="+", default=None, choices=list(AMP),
                        help="autocast dtypes (default fp32 bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--layouts", nargs="+", default=None, choices=["nchw", "channels_last"],
                        help="default: both on CUDA, nchw on CPU")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--model", default="vgg16_cifar", choices=list(MODELS),
                        help="vgg16_cifar (default) or tiny (a 3-layer VGG, for smoke tests)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON name under benchmarks/results (default net_speed_<device>.json)")
    parser.add_argument("--dry-run", action="store_true",
                        help="batch 2, one timed step per variant, no JSON: checks that every variant runs")
    return parser


def _settings(args, cuda: bool) -> tuple[int, list, list, int]:
    """``(batch, amps, layouts, repeats)`` after the device's defaults."""
    batch = 2 if args.dry_run else (args.batch or (128 if cuda else 16))
    amps = args.amp or (["fp32", "bf16"] if cuda else ["fp32"])
    layouts = args.layouts or (["nchw", "channels_last"] if cuda else ["nchw"])
    repeats = 1 if args.dry_run else (args.repeats or (30 if cuda else 5))
    return batch, amps, layouts, repeats


# Seconds of one timed CUDA step benchmark (warm-up, >= 150 ms of repeats, the model's setup).
T_BENCH_CUDA = 0.6


def plan(argv=None) -> dict:
    """What a CUDA run with these arguments does, counted without a GPU: rows, timed runs,
    distinct Triton compiles of ``ours`` (every bounded layer's training step, planned on
    ``meta`` tensors with the input shapes a forward on ``meta`` gives), seconds of timing."""
    from rnip_ext.kernels._variants import step_launches, variant_key

    args = _parser().parse_args(argv)
    batch, amps, layouts, _ = _settings(args, cuda=True)
    shapes = []
    model = MODELS[args.model](bn="bounded").to("meta")
    hooks = [m.register_forward_pre_hook(lambda m, inp: shapes.append(tuple(inp[0].shape)))
             for m in model.modules() if isinstance(m, rnip_ext.BoundedBatchNorm2d)]  # fmt: skip
    with torch.no_grad():
        model.eval()(torch.empty(batch, 3, 32, 32, device="meta"))
    for hook in hooks:
        hook.remove()
    keys = set()
    if "ours" in args.variants:
        for amp in amps:
            for layout in layouts:
                for shape in set(shapes):  # autocast hands the layers its dtype (fp32 parameters)
                    for launch in step_launches(shape, AMP[amp] or torch.float32, layout == "channels_last",
                                                penalty=False):  # fmt: skip
                        keys.add(variant_key(*launch))
    rows = len(amps) * len(layouts)
    return {"rows": rows, "timed": rows * len(args.variants), "triton_compiles": len(keys),
            "bench_s": rows * len(args.variants) * T_BENCH_CUDA}  # fmt: skip


def main(argv=None) -> dict:
    parser = _parser()
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    cuda = device.type == "cuda"
    if args.batch is not None and args.batch < 2:
        parser.error("--batch must be >= 2 (BatchNorm needs more than one value per channel)")
    batch, amps, layouts, repeats = _settings(args, cuda)
    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | batch {batch}")

    rows = []
    out_name = args.out or f"net_speed_{device.type}.json"
    planned = [(amp, layout) for amp in amps for layout in layouts]
    for amp, layout in planned:
        row = {"model": args.model, "batch": batch, "amp": amp, "layout": layout}
        for variant in args.variants:
            try:
                step = make_step(variant, device, batch, amp, layout == "channels_last", args.model)
                stats = bench(step, device, repeats=repeats, warmup=1 if args.dry_run else 3)
            except Exception as exc:  # record, never hide
                row[f"{variant}_error"] = f"{type(exc).__name__}: {exc}"[:200]
                print(f"{variant} {amp} {layout}: {row[f'{variant}_error']}", file=sys.stderr)
                continue
            row[f"{variant}_ms"] = stats["median_ms"]
            row[f"{variant}_p20_ms"] = stats["p20_ms"]
            row[f"{variant}_p80_ms"] = stats["p80_ms"]
            row[f"{variant}_images_per_s"] = batch / (stats["median_ms"] * 1e-3)
        for variant in ("paper", "ours"):
            if f"{variant}_ms" in row and "plain_ms" in row:
                row[f"{variant}_vs_plain"] = row["plain_ms"] / row[f"{variant}_ms"]
        if "ours_ms" in row and "paper_ms" in row:
            row["ours_vs_paper"] = row["paper_ms"] / row["ours_ms"]
        rows.append(row)
        if not args.dry_run:
            write_json(out_name, {"environment": env, "complete": len(rows) == len(planned), "rows": rows})

    columns = [("amp", "amp", ""), ("layout", "layout", "")]
    columns += [(f"{v} ms", f"{v}_ms", ".2f") for v in args.variants]
    columns += [(f"{v} img/s", f"{v}_images_per_s", ".0f") for v in args.variants]
    columns += [("ours/plain", "ours_vs_plain", ".2f"), ("ours/paper", "ours_vs_paper", ".2f")]
    print(format_table(rows, columns))
    payload = {"environment": env, "complete": True, "rows": rows}
    if args.dry_run:
        failed = [k for r in rows for k in r if k.endswith("_error")]
        if failed:
            raise SystemExit(f"error: variants failed: {', '.join(failed)}")
        print("dry run: every variant ran; no JSON written")
    else:
        print(f"wrote {os.path.join(RESULTS, out_name)}")
    return payload


if __name__ == "__main__":
    main()
