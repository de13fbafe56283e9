"""How fast is physical channel pruning of a whole model's weights?

Gathers the kept channels of every conv/linear weight of ImageNet VGG-16 (138M parameters) and
ResNet-50 (25.5M), half of the channels kept (random sorted indices), with

* ``channel_gather`` called once per tensor,
* ``channel_gather_many`` called once for the whole model,
* ``index_select`` twice per tensor (dim 0, then dim 1),
* advanced indexing ``w[o][:, i]``.

The weight shapes are written out here (no torchvision). VGG-16's channels are pruned consistently
(the kept outputs of one layer are the kept inputs of the next; the first linear layer keeps the
7x7 block of every kept channel); ResNet-50's indices are drawn per tensor. The RGB input and the
1000 classes are never pruned.

Timing: ``_common.bench`` (warm-up, then median and 20th/80th percentiles; CUDA events via
``triton.testing.do_bench`` on a GPU), one method at a time. GB/s counts the minimal traffic: bytes
of the kept elements read plus the same bytes written. The JSON
(``benchmarks/results/gather_speed_<device>.json``) holds the environment (device, torch/CUDA/Triton
versions, git commit, threads, load average, whether ``_C`` was compiled with OpenMP) and one row
per model, which repeats the device, versions and commit.

Measured on CPU (AMD EPYC, 2 threads, float32, idle machine, ``_C`` compiled with ``-fopenmp``),
medians in ms for per tensor / many / index_select x2 / advanced indexing:

* VGG-16:    42.6 / 44.6 / 125.2 / 121.9  -- ours ~2.8x faster than either baseline;
* ResNet-50:  3.3 /  2.6 /   4.6 /  10.2  -- the many-form 1.8x faster than index_select x2.

**Which form is faster on CPU:** ``channel_gather_many``. On VGG-16 (16 big tensors) the two forms
tie (0.96x, within noise); on ResNet-50 (54 mostly small tensors) the many-form is 1.3x faster
than ``channel_gather`` per tensor: it pays the Python wrapper, dispatch and parallel-region
start-up once instead of 54 times. Under load from other processes the gap widens (each OpenMP
region can wait a scheduler tick for a sleeping worker; the many-form opens one region).

Caveats from the same machine: single-threaded, or with ``_C`` compiled without OpenMP (then
``at::parallel_for`` is serial), ResNet-50 gives about 6.7 / 5.4 / 5.2 ms: small 1x1 and 3x3
weights are where one fused gather gains least over two ``index_select`` calls. Interleaving the
methods within each repeat made ours slower, as its outputs then landed on freshly faulted pages;
a one-shot prune pays those faults whichever method it uses.

Run: ``python benchmarks/gather_speed.py [--device cuda] [--repeats 20] [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import statistics
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import bench, copy_bandwidth, environment, format_table, write_json  # noqa: E402

from rnip_ext.ops import HAS_C_EXT, channel_gather, channel_gather_many  # noqa: E402

# The module (rnip_ext.ops re-exports a function of the same name).
_gather_module = importlib.import_module("rnip_ext.ops.channel_gather")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP = 0.5


# ------------------------------------------------------------------------------------------------
# Models: (shape, index spec) per weight


def vgg16_layers(gen: torch.Generator, device: torch.device) -> list[tuple[tuple, object, object]]:
    """ImageNet VGG-16 (configuration D): 13 3x3 convs and 3 linear layers, pruned consistently."""
    cfg = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    layers = []
    in_ch, in_keep = 3, None  # the RGB input keeps all three channels
    for out_ch in cfg:
        out_keep = _keep(out_ch, gen, device)
        layers.append(((out_ch, in_ch, 3, 3), out_keep, in_keep))
        in_ch, in_keep = out_ch, out_keep
    # The first linear layer sees the flattened 512x7x7 map: a kept channel keeps its 49 columns.
    flat_keep = (in_keep[:, None] * 49 + torch.arange(49, device=device)).reshape(-1)
    fc1_keep = _keep(4096, gen, device)
    fc2_keep = _keep(4096, gen, device)
    layers.append(((4096, 512 * 7 * 7), fc1_keep, flat_keep))
    layers.append(((4096, 4096), fc2_keep, fc1_keep))
    layers.append(((1000, 4096), None, fc2_keep))  # the 1000 classes stay
    return layers


def resnet50_layers(gen: torch.Generator, device: torch.device) -> list[tuple[tuple, object, object]]:
    """ImageNet ResNet-50: stem, 16 bottlenecks (1x1, 3x3, 1x1 convs, 4 downsample 1x1s), fc."""
    layers = [((64, 3, 7, 7), _keep(64, gen, device), None)]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes = [(width, in_ch, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if b == 0:
                shapes.append((4 * width, in_ch, 1, 1))
            for shape in shapes:
                layers.append((shape, _keep(shape[0], gen, device), _keep(shape[1], gen, device)))
            in_ch = 4 * width
    layers.append(((1000, 2048), None, _keep(2048, gen, device)))
    return layers


MODELS = {"vgg16": vgg16_layers, "resnet50": resnet50_layers}


def _keep(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    idx = torch.randperm(n, generator=gen)[: max(1, int(n * KEEP))].sort().values
    return idx.to(device)


# ------------------------------------------------------------------------------------------------
# Methods: each prunes the whole list of weights


def ours_per_tensor(ws, outs, ins):
    """``channel_gather`` once per weight."""
    return [channel_gather(w, o, i) for w, o, i in zip(ws, outs, ins)]


def ours_many(ws, outs, ins):
    """One ``channel_gather_many`` call for all weights."""
    return channel_gather_many(ws, outs, ins)


def index_select_twice(ws, outs, ins):
    """``index_select`` along dim 0, then along dim 1, per weight."""
    res = []
    for w, o, i in zip(ws, outs, ins):
        if o is not None:
            w = w.index_select(0, o)
        if i is not None:
            w = w.index_select(1, i)
        res.append(w)
    return res


def advanced_indexing(ws, outs, ins):
    """``w[o][:, i]`` per weight (also the reference the other methods must match)."""
    res = []
    for w, o, i in zip(ws, outs, ins):
        if o is not None:
            w = w[o]
        if i is not None:
            w = w[:, i]
        res.append(w)
    return res


METHODS: dict[str, Callable] = {
    "per_tensor": ours_per_tensor,
    "many": ours_many,
    "index_select2": index_select_twice,
    "indexing": advanced_indexing,
}
OURS = ("per_tensor", "many")
BASELINES = ("index_select2", "indexing")


# ------------------------------------------------------------------------------------------------
# Environment and main


def main() -> None:
    """Times every method on every model, prints the table and writes the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "float64"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--channels-last", action="store_true", help="store the conv weights channels_last")
    parser.add_argument(
        "--out", default=None, help="JSON name under benchmarks/results (default gather_speed_<device>.json)"
    )
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    dtype = getattr(torch, args.dtype)
    env = environment(device)
    env.update(
        has_c_ext=HAS_C_EXT,
        # Without OpenMP at compile time at::parallel_for runs serially (setup.py's cxx flags).
        c_ext_openmp=bool(getattr(_gather_module._C, "WITH_OPENMP", 0)),
        c_ext_cuda=bool(getattr(_gather_module._C, "WITH_CUDA", 0)),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
    )
    bandwidth = copy_bandwidth(device)
    row_env = {k: env[k] for k in ("device", "torch", "triton", "cuda", "git_commit")}

    rows = []
    for model in args.models:
        gen = torch.Generator().manual_seed(args.seed)
        layers = MODELS[model](gen, device)
        ws = [
            torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
            for shape, _, _ in layers
        ]
        if args.channels_last:
            ws = [w.to(memory_format=torch.channels_last) if w.dim() == 4 else w for w in ws]
        outs = [o for _, o, _ in layers]
        ins = [i for _, _, i in layers]

        # All methods must agree before any of them is timed.
        expected = advanced_indexing(ws, outs, ins)
        for name, method in METHODS.items():
            for got, ref in zip(method(ws, outs, ins), expected):
                if not torch.equal(got, ref):
                    raise SystemExit(f"{name} disagrees with advanced indexing on {model}")
        kept_bytes = sum(r.numel() * r.element_size() for r in expected)
        del expected

        row = {**row_env, "model": model, "tensors": len(ws), "params": sum(w.numel() for w in ws),
               "dtype": args.dtype, "channels_last": args.channels_last, "threads": torch.get_num_threads(),
               "kept_bytes": kept_bytes}
        # One method at a time, not interleaved: the methods allocate very differently (index_select
        # x2 frees an intermediate per tensor), and interleaving makes one method's first-touch page
        # faults depend on what the previous one freed.
        for name, method in METHODS.items():
            stats = bench(functools.partial(method, ws, outs, ins), device, repeats=args.repeats)
            row[f"{name}_ms"] = stats["median_ms"]
            row[f"{name}_p20_ms"] = stats["p20_ms"]
            row[f"{name}_p80_ms"] = stats["p80_ms"]
            # Minimal traffic: the kept elements read once and written once.
            row[f"{name}_gbps"] = 2 * kept_bytes / (stats["median_ms"] * 1e-3) / 1e9
        for ours in OURS:
            for base in BASELINES:
                row[f"{ours}_speedup_vs_{base}"] = row[f"{base}_ms"] / row[f"{ours}_ms"]
            row[f"{ours}_fraction_of_copy_bw"] = row[f"{ours}_gbps"] / bandwidth
        row["many_speedup_vs_per_tensor"] = row["per_tensor_ms"] / row["many_ms"]
        rows.append(row)

    print(f"{env['device']} | torch {env['torch']} | "
          f"{torch.get_num_threads()} threads | {args.dtype}{' channels_last' if args.channels_last else ''} | "
          f"C ext {HAS_C_EXT} (OpenMP {env['c_ext_openmp']}) | copy {bandwidth:.1f} GB/s | "
          f"load {env['load_average_1min']:.2f} | commit {str(env['git_commit'])[:10]}"
          f"{' (dirty)' if env['git_dirty'] else ''}")
    columns = [("model", "model", "")]
    for name in METHODS:
        columns += [(f"{name} ms", f"{name}_ms", ".2f"), ("p20", f"{name}_p20_ms", ".2f"),
                    ("p80", f"{name}_p80_ms", ".2f"), ("GB/s", f"{name}_gbps", ".1f")]
    print(format_table(rows, columns))
    print(format_table(rows, [("model", "model", "")] + [
        (f"{ours} vs {base}", f"{ours}_speedup_vs_{base}", ".2f") for ours in OURS for base in BASELINES
    ] + [("many vs per_tensor", "many_speedup_vs_per_tensor", ".2f")]))
    summary = {
        key: statistics.median(r[key] for r in rows)
        for key in [f"{o}_speedup_vs_{b}" for o in OURS for b in BASELINES] + ["many_speedup_vs_per_tensor"]
    }
    path = write_json(args.out or f"gather_speed_{device.type}.json",
                      {"environment": env, "copy_bandwidth_gbps": bandwidth, "summary": summary, "rows": rows})
    print(f"wrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
