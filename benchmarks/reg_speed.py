"""How much does ``RecedingRegularizer.__call__`` cost per training step?

Times ``reg()`` forward + backward (gradients reset to None between repeats) for the 13 bounded
layers of VGG-16-CIFAR (widths 64, 64, 128, 128, 256 x 3, 512 x 6; 4224 channels, logits
``N(0, 1)``), with ``normalize="layer"`` (the default) and ``normalize=None`` on the eager path,
against ``per_layer`` -- the formulation before the penalty was batched: one
:func:`~rnip_ext.functional.relative_receding_penalty_per_channel` /
:func:`~rnip_ext.functional.receding_penalty_per_channel` per layer, summed with
``torch.stack(...).sum()``. Each row also counts the kernel-launching ATen operations of one
forward + backward (torch profiler, top-level ``aten::`` events minus allocations and views):
on a GPU each is a launch, and at these sizes launches, not arithmetic, are the cost.

Only the regulariser is timed (no convolutions): a VGG step's other work does not change.
The JSON (``benchmarks/results/reg_speed_<device>.json``) holds the environment (threads, load
average, commit) and one row per (normalize, method).

Measured on CPU (AMD EPYC, 1 thread, float32, 300 repeats, shared machine at load average ~9.6
on 2 cores, so medians are noisy; p20 in brackets), before (the per-layer regulariser, commit
a51cc53) / after, three alternating runs:

* ``normalize="layer"``: 525 -> 40 ATen ops; 7.0-11.1 ms (p20 2.6-2.9) -> 0.36-0.39 ms (p20 0.35);
* ``normalize=None``:    200 -> 19 ATen ops; 1.26-1.32 ms (p20 1.13-1.15) -> 0.24-0.26 ms (p20 0.23).

Run: ``python benchmarks/reg_speed.py [--repeats 200] [--threads 1]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench, environment, format_table, write_json  # noqa: E402

import rnip_ext  # noqa: E402
from rnip_ext import functional as RF  # noqa: E402
from rnip_ext.app.measure import kernel_launching_ops  # noqa: E402

VGG16_CIFAR_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)

def count_aten_ops(step) -> int:
    """Top-level kernel-launching ATen operations of one ``step()`` (forward + backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return len(kernel_launching_ops(prof.events()))


def per_layer(reg: rnip_ext.RecedingRegularizer):
    """The penalty as computed before batching: one eager formula per layer."""
    fn = RF.relative_receding_penalty_per_channel if reg.normalize == "layer" else RF.receding_penalty_per_channel

    def call():
        terms = [fn(m.weight, reg.shift).sum() for m in reg.layers]
        return reg.strength * torch.stack(terms).sum()

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = nn.Sequential(*[rnip_ext.BoundedBatchNorm2d(c) for c in VGG16_CIFAR_WIDTHS])
    params = [m.weight for m in model]
    rows = []
    for normalize in ("layer", None):
        reg = rnip_ext.RecedingRegularizer(model, normalize=normalize)
        for method, fn in (("reg", reg), ("per_layer", per_layer(reg))):
            def step(fn=fn):
                fn().backward()

            for p in params:
                p.grad = None
            step()
            for p in params:
                p.grad = None
            ops = count_aten_ops(step)
            timing = bench(step, device, repeats=args.repeats, warmup=10, grad_to_none=params)
            rows.append({"normalize": str(normalize), "method": method, "layers": len(params),
                         "aten_ops": ops, **timing})
    env = environment(device)
    print(format_table(rows, [("normalize", "normalize", ""), ("method", "method", ""),
                              ("ATen ops", "aten_ops", "d"), ("median ms", "median_ms", ".3f"),
                              ("p20", "p20_ms", ".3f"), ("p80", "p80_ms", ".3f")]))
    print(f"threads={env['cpu_threads']} load_average_1min={env['load_average_1min']:.2f}")
    print(write_json(f"reg_speed_{device.type}.json", {"environment": env, "rows": rows}))


if __name__ == "__main__":
    main()
