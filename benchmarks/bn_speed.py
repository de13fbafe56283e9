"""How fast is the bounded BatchNorm? Four variants side by side, in one run.

1. ``plain``:    ``torch.nn.BatchNorm2d`` (what users know; no bounded scale, no penalty)
2. ``paper``:    the paper's eager formulation (``rnip_ext.functional.bounded_batch_norm``, i.e.
                 ``F.batch_norm(x, ..., weight.sigmoid())``) plus
                 ``strength * receding_penalty(weight, shift)`` through autograd
3. ``compiled``: ``torch.compile`` of (2)
4. ``ours``:     ``rnip_ext.BoundedBatchNorm2d`` with an attached ``RecedingRegularizer`` (the fused
                 Triton kernels on CUDA; on CPU the eager path, so there it measures our overhead)

Modes: ``fwd`` (training forward), ``fwdbwd`` (a layer's training step: forward, penalty, backward)
and ``eval``. Next to the times each row shows the GPU path's model for ours (``model_traffic``):
which path the launchers take (``single``-pass or ``chunked``), its HBM traffic in units of
S = one activation tensor's bytes and in MB, and its Triton launches per call (the regulariser's
few other ATen operations not included); the minimum is 2S forward, 3S backward. Reported: median ms with p20/p80, effective GB/s at the minimal traffic (forward:
read x, write y; backward: read x and dy, write dx; so fwdbwd moves 5 tensors' bytes, fwd and eval
2), the fraction of the measured copy bandwidth, and ratios of ours against each baseline.

Rows run in order of importance and the JSON is rewritten after every row (``"complete": false``
until the last), so a run stopped by a timeout keeps what it measured. On CUDA the default
matrix (:func:`combos`) puts the issue targets first -- the VGG-16 CIFAR training steps (ours vs
the paper's layer), then the large ResNet-50 steps (bandwidth) -- then the other training steps
and the forwards; each ``ours`` training-step row also checks ``y``, ``dx``, ``dw`` against the
float64 eager reference (``ours_err_*``: max abs error / max abs value).

Host cost: ``host_us`` is our own Python per training step of a layer (the launchers
``train_forward`` + ``train_backward``: planning, allocations, argument packing), with every
kernel launch intercepted and recorded (nothing runs); ``host_own_us`` the same with each launch a
bare no-op (without the recording's own ~0.4 us a launch); ``host_layer_us`` the whole layer step
the same way as ``host_us``
(module forward, custom-op dispatch, autograd, regulariser, backward). On CPU these use the
Triton path with the interpreter's kernel objects (launches intercepted), so they measure the
host code a GPU run executes. ``plan()`` gives the row count, timed runs and compiles without a GPU
(``benchmarks/gpu_check.py --dry-run``).

    python benchmarks/bn_speed.py                   # CPU: a small set, under a minute
    python benchmarks/bn_speed.py --device cuda     # GPU: CIFAR VGG-16, ResNet-50 (targets first)
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, bench, copy_bandwidth, environment, format_table, write_json  # noqa: E402

import rnip_ext  # noqa: E402
from rnip_ext import functional as RF  # noqa: E402

STRENGTH, SHIFT = 1e-3, 3.0
SHAPES = {
    # The reference batches: CIFAR VGG-16 at 128, ResNet-50 at 64.
    "vgg16_cifar": [(128, 64, 32, 32), (128, 128, 16, 16), (128, 256, 8, 8), (128, 512, 4, 4),
                    (128, 512, 2, 2)],
    "resnet50_imagenet": [(64, 64, 56, 56), (64, 256, 56, 56), (64, 128, 28, 28), (64, 512, 28, 28),
                          (64, 256, 14, 14), (64, 1024, 14, 14), (64, 512, 7, 7), (64, 2048, 7, 7)],
    "small_c_high_res": [(8, 16, 256, 256), (16, 8, 512, 512)],
}
CPU_SHAPES = {"cpu_small": [(32, 64, 16, 16), (32, 256, 8, 8), (8, 16, 64, 64)]}
# ResNet-50's shapes of >= 12M elements: the bandwidth target's rows.
LARGE = [(64, 64, 56, 56), (64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14)]
# The CUDA default, sized for gpu_check's time box: the training steps (the targets), both sets.
GPU_DEFAULT = {"sets": ["vgg16_cifar", "resnet50_imagenet"], "modes": ["fwdbwd"], "repeats": 10}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "fwdbwd", "eval")
VARIANTS = ("plain", "paper", "compiled", "ours")
# Tensors of x's size moved at the minimum per mode.
TRAFFIC = {"fwd": 2, "fwdbwd": 5, "eval": 2}


class PaperBN(nn.Module):
    """The paper's formulation: plain functional BN with the sigmoid scale, penalty via autograd."""

    def __init__(self, c: int, device) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(c, device=device))
        self.register_buffer("running_mean", torch.zeros(c, device=device))
        self.register_buffer("running_var", torch.ones(c, device=device))

    def forward(self, x):
        return RF.bounded_batch_norm(x, self.running_mean, self.running_var, self.weight, None, self.training, 0.1, 1e-5)

    def penalty(self):
        return STRENGTH * RF.receding_penalty(self.weight, SHIFT)


def model_traffic(shape, dtype: torch.dtype, layout: str, mode: str) -> dict:
    """Modelled HBM traffic and launches of our GPU path for one call (pure Python, no GPU).

    Single-pass (``kernels/_config.single_pass_config``): forward 2S in 1 launch, backward 3S in
    1. Chunked: forward 3S in 3 launches (partials read x; combine; normalise reads x, writes y),
    backward 5S in 3 (partials read x, dy; combine; dx reads x, dy, writes dx). Eval: 2S, 1.
    Per-channel vectors and chunk partials (<= 3.1% of S, ``kernels/_config``) are ignored.
    """
    from rnip_ext.kernels._config import single_pass_config

    n, c, h, w = shape
    elem = torch.empty((), dtype=dtype).element_size()
    cl = layout == "channels_last" and c > 1 and h * w > 1
    single = single_pass_config(n * h * w, c, h * w, cl, elem) is not None
    fwd, bwd = ((2, 1), (3, 1)) if single else ((3, 3), (5, 3))
    units, launches = {"fwd": fwd, "fwdbwd": (fwd[0] + bwd[0], fwd[1] + bwd[1]), "eval": (2, 1)}[mode]
    return {"path": "single" if single else "chunked", "model_S": units,
            "model_MB": units * math.prod(shape) * elem / 1e6, "launches": launches}


def combos(sets: dict, dtypes, layouts, modes) -> list[tuple]:
    """``(set, shape, dtype, layout, mode)`` rows, most important first: training steps before
    forwards before eval; within a mode the VGG-16 CIFAR set (the 2x-the-paper target), then the
    large ResNet-50 shapes (the bandwidth target), then the rest."""
    def rank(row):
        set_name, shape, _, _, mode = row
        target = 0 if set_name == "vgg16_cifar" else 1 if tuple(shape) in LARGE else 2
        return (list(MODES).index(mode) if mode != "fwdbwd" else -1, target)

    rows = [(s, shape, d, lay, mode) for s, shapes in sets.items() for shape in shapes for d in dtypes
            for lay in layouts for mode in modes]  # fmt: skip
    return sorted(rows, key=rank)  # stable: the given order within a rank


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets", nargs="+", default=None, choices=list(SHAPES),
                        help=f"shape sets (GPU; default {' '.join(GPU_DEFAULT['sets'])})")  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", default=None, choices=list(DTYPES))
    parser.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    parser.add_argument("--modes", nargs="+", default=None, choices=list(MODES),
                        help=f"default: {' '.join(GPU_DEFAULT['modes'])} on CUDA, all on CPU")  # fmt: skip
    parser.add_argument("--variants", nargs="+", default=["plain", "paper", "ours"], choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="JSON file name under benchmarks/results")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    return parser


def _resolve(args, cuda: bool) -> tuple[dict, list, list, int]:
    """``(sets, dtypes, modes, repeats)`` after the device's defaults."""
    sets = {k: SHAPES[k] for k in (args.sets or GPU_DEFAULT["sets"])} if cuda else CPU_SHAPES
    dtypes = args.dtypes or (list(DTYPES) if cuda else ["fp32"])
    modes = args.modes or (GPU_DEFAULT["modes"] if cuda else list(MODES))
    repeats = args.repeats or (GPU_DEFAULT["repeats"] if cuda else 60)
    return sets, dtypes, modes, repeats


# Seconds of one timed CUDA benchmark (``_common.bench``: 25 ms warm-up, >= 50 ms of repeats, the
# estimate runs, the step's setup), for the dry run's cost model.
T_BENCH_CUDA = 0.15


def plan(argv=None) -> dict:
    """What a CUDA run with these arguments does, counted without a GPU: rows, timed runs,
    distinct Triton compiles of ``ours`` (its launches planned on ``meta`` tensors), inductor
    compiles of ``compiled``, and the seconds of timing (``T_BENCH_CUDA`` per timed run)."""
    from rnip_ext.kernels._variants import step_launches, variant_key

    args = _parser().parse_args(argv)
    sets, dtypes, modes, _ = _resolve(args, cuda=True)
    rows = combos(sets, dtypes, args.layouts, modes)
    keys = set()
    if "ours" in args.variants:
        for _, shape, dname, layout, mode in rows:
            for launch in step_launches(shape, DTYPES[dname], layout == "channels_last", (mode,)):
                keys.add(variant_key(*launch))
    timed = len(rows) * len(args.variants)
    return {"rows": len(rows), "timed": timed, "triton_compiles": len(keys),
            "inductor_compiles": len(rows) if "compiled" in args.variants else 0,
            "bench_s": timed * T_BENCH_CUDA}  # fmt: skip


def host_step_us(shape, dtype, memory_format, device, repeats: int = 200) -> dict:
    """Median host microseconds of one layer training step with every kernel launch intercepted:
    ``host_us`` our launchers alone (``train_forward`` + ``train_backward``), ``host_layer_us``
    the module step (forward with the fused penalty, ``reg()``, autograd backward), each launch
    recorded; ``host_own_us`` the launchers with each launch a bare no-op (their own Python alone:
    the recording costs ~0.4 us a launch, 6 in a chunked step)."""
    from rnip_ext.kernels import bn_train
    from rnip_ext.kernels._variants import recorded_launches

    n, c, h, w = shape
    x = torch.empty(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    weight = torch.zeros(c, device=device)
    running = (torch.zeros(c, device=device), torch.ones(c, device=device))
    nbt = torch.zeros((), dtype=torch.long, device=device)
    g = torch.ones((), device=device).expand(c)
    layer = rnip_ext.BoundedBatchNorm2d(c, device=device, backend="triton")
    reg = rnip_ext.RecedingRegularizer(nn.Sequential(layer), STRENGTH, SHIFT, normalize=None)
    xg = x.clone().requires_grad_(True)
    one = torch.ones((), device=device)

    def launchers():
        y, mean, var, _ = bn_train.train_forward(x, weight, None, 1e-5, SHIFT, True, running=running,
                                                 momentum=0.1, num_batches_tracked=nbt)  # fmt: skip
        bn_train.train_backward(x, x, mean, var, weight, g, 1e-5, SHIFT, True, (True, True, False))

    def layer_step():  # autograd.grad: no AccumulateGrad copy into a leaf's .grad (not ours)
        torch.autograd.grad([layer(xg), reg()], [xg, layer.weight], [x, one])

    out = {}
    for key, fn, record in (("host_us", launchers, True), ("host_own_us", launchers, False),
                            ("host_layer_us", layer_step, True)):  # fmt: skip
        with recorded_launches(run=False, record=record) as launches:
            for _ in range(20):
                fn()
            samples = []
            for _ in range(repeats):
                launches.clear()  # the record would keep every step's tensors alive (and the GC busy)
                start = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - start) * 1e6)
            launches.clear()
            out[key] = statistics.median(samples)
    return out


def check_ours(shape, dtype, memory_format, device) -> dict:
    """Max abs error / max abs value of our layer's ``y``, ``dx``, ``dw`` (fused penalty included)
    against the float64 eager reference, on fresh inputs: the compiled kernels' correctness on
    exactly the shapes benchmarked."""
    c = shape[1]
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format) * 2 + 1
    dy = torch.randn_like(x)
    layer = rnip_ext.BoundedBatchNorm2d(c, device=device)
    reg = rnip_ext.RecedingRegularizer(nn.Sequential(layer), STRENGTH, SHIFT, normalize=None)
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    torch.autograd.backward([y, reg()], [dy, torch.ones((), device=device)])
    xd = x.double().requires_grad_(True)
    wd = layer.weight.detach().double().requires_grad_(True)
    yd = RF.bounded_batch_norm(xd, None, None, wd, None, True, 0.0, layer.eps)
    torch.autograd.backward([yd, STRENGTH * RF.receding_penalty(wd, SHIFT)], [dy.double(), torch.ones((), device=device, dtype=torch.float64)])

    def err(a, b):
        return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    return {"ours_err_y": err(y, yd), "ours_err_dx": err(xg.grad, xd.grad), "ours_err_dw": err(layer.weight.grad, wd.grad)}


def make_step(variant: str, shape, dtype, memory_format, mode: str, device):
    """A closure running one measured call, plus the tensors whose grads reset between calls."""
    n, c, h, w = shape
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    dy = torch.randn_like(x)
    if variant == "plain":
        layer = nn.BatchNorm2d(c, device=device)
        penalty = None
    elif variant in ("paper", "compiled"):
        layer = PaperBN(c, device)
        penalty = layer.penalty
    else:
        layer = rnip_ext.BoundedBatchNorm2d(c, device=device)
        penalty = rnip_ext.RecedingRegularizer(nn.Sequential(layer), STRENGTH, SHIFT, normalize=None)
    layer.train(mode != "eval")
    params = list(layer.parameters())

    def fwd():
        return layer(x)

    def fwdbwd():
        x.grad = None
        y = layer(x)
        if penalty is not None:
            torch.autograd.backward([y, penalty()], [dy, torch.ones((), device=device)])
        else:
            y.backward(dy)

    if mode == "fwdbwd":
        x.requires_grad_(True)
    fn = fwdbwd if mode == "fwdbwd" else fwd
    if variant == "compiled":
        fn = torch.compile(fn)
    if mode == "eval":
        inner = fn

        def fn():
            with torch.no_grad():
                return inner()

    return fn, params + ([x] if mode == "fwdbwd" else [])


def bench_interleaved(variants, shape, dtype, memory_format, mode, device, repeats, row) -> dict:
    """CPU timing, round-robin: one call of each variant per round, ``repeats`` rounds.

    On a shared machine load comes in bursts; interleaving exposes every variant to the same
    bursts, so the ratios stay meaningful where back-to-back blocks of calls would not.
    """
    steps = {}
    for variant in variants:
        try:
            fn, grads = make_step(variant, shape, dtype, memory_format, mode, device)
            for _ in range(3):
                fn()
            steps[variant] = (fn, grads if mode == "fwdbwd" else [])
        except Exception as exc:  # record, never hide
            row[f"{variant}_error"] = f"{type(exc).__name__}: {exc}"[:200]
    samples = {variant: [] for variant in steps}
    for _ in range(repeats):
        for variant, (fn, grads) in steps.items():
            for t in grads:
                t.grad = None
            start = time.perf_counter()
            fn()
            samples[variant].append((time.perf_counter() - start) * 1e3)
    out = {}
    for variant, values in samples.items():
        q = statistics.quantiles(sorted(values), n=10, method="inclusive")
        out[variant] = {"median_ms": statistics.median(values), "p20_ms": q[1], "p80_ms": q[7]}
    return out


def main(argv=None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)")
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if not cuda:  # host timing runs the launchers on CPU tensors, launches intercepted
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sets, dtypes, modes, repeats = _resolve(args, cuda)
    torch._dynamo.config.cache_size_limit = 256
    env = environment(device)
    bandwidth = copy_bandwidth(device, 1 << 26 if cuda else 1 << 23)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | copy bandwidth {bandwidth:.0f} GB/s")

    rows = []
    todo = combos(sets, dtypes, args.layouts, modes)
    out_name = args.out or f"bn_speed_{device.type}.json"
    try:
        from tqdm.auto import tqdm
    except ImportError:
        def tqdm(it, **_):
            return it
    for index, (set_name, shape, dname, layout, mode) in enumerate(tqdm(todo, desc="bn_speed")):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        row = {"set": set_name, "shape": list(shape), "dtype": dname, "layout": layout, "mode": mode}
        row.update(model_traffic(shape, DTYPES[dname], layout, mode))
        nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dname]).element_size()
        measured = {}
        if cuda:
            for variant in args.variants:
                try:
                    fn, grads = make_step(variant, shape, DTYPES[dname], fmt, mode, device)
                    measured[variant] = bench(fn, device, repeats=repeats,
                                              grad_to_none=grads if mode == "fwdbwd" else None)  # fmt: skip
                except Exception as exc:  # record, never hide: e.g. a dtype a baseline does not support
                    row[f"{variant}_error"] = f"{type(exc).__name__}: {exc}"[:200]
        else:
            measured = bench_interleaved(args.variants, shape, DTYPES[dname], fmt, mode, device, repeats, row)
        for variant, stats in measured.items():
            row[f"{variant}_ms"] = stats["median_ms"]
            row[f"{variant}_p20_ms"] = stats["p20_ms"]
            row[f"{variant}_p80_ms"] = stats["p80_ms"]
            row[f"{variant}_gbps"] = TRAFFIC[mode] * nbytes / (stats["median_ms"] * 1e-3) / 1e9
        for base in ("plain", "paper", "compiled"):
            if "ours_ms" in row and f"{base}_ms" in row:
                row[f"speedup_vs_{base}"] = row[f"{base}_ms"] / row["ours_ms"]
        if "ours_gbps" in row:
            row["ours_fraction_of_copy_bw"] = row["ours_gbps"] / bandwidth
        if "ours" in args.variants and mode == "fwdbwd":
            for what, fn in (("host", host_step_us), ("check", check_ours if cuda else None)):
                if fn is None:
                    continue
                try:
                    row.update(fn(shape, DTYPES[dname], fmt, device))
                except Exception as exc:  # record, never hide
                    row[f"{what}_error"] = f"{type(exc).__name__}: {exc}"[:200]
        rows.append(row)
        torch._dynamo.reset()
        write_json(out_name, _payload(env, bandwidth, rows, args.modes or modes, complete=index + 1 == len(todo),
                                      planned=len(todo)))  # fmt: skip

    columns = [("set", "set", ""), ("shape", "shape", ""), ("dtype", "dtype", ""), ("layout", "layout", ""),
               ("mode", "mode", ""), ("path", "path", ""), ("S", "model_S", "d"), ("MB", "model_MB", ".1f"),
               ("launches", "launches", "d")]
    columns += [(f"{v} ms", f"{v}_ms", ".3f") for v in args.variants]
    columns += [("ours GB/s", "ours_gbps", ".0f"), ("x plain", "speedup_vs_plain", ".2f"),
                ("x paper", "speedup_vs_paper", ".2f"), ("x compiled", "speedup_vs_compiled", ".2f"),
                ("host us", "host_us", ".1f"), ("own us", "host_own_us", ".1f"), ("layer us", "host_layer_us", ".0f")]
    printable = [dict(r, shape="x".join(map(str, r["shape"]))) for r in rows]
    print(format_table(printable, columns))
    for key, value in _summary(rows, modes).items():
        print(f"{key}: {value:.2f}" + ("" if "host" in key else "x"))
    print(f"wrote {os.path.join(RESULTS, out_name)}")


def _summary(rows: list[dict], modes) -> dict:
    summary = {}
    for mode in modes:
        for base in ("plain", "paper", "compiled"):
            ratios = [r[f"speedup_vs_{base}"] for r in rows if r["mode"] == mode and f"speedup_vs_{base}" in r]
            if ratios:
                summary[f"{mode}_median_speedup_vs_{base}"] = statistics.median(ratios)
    for key in ("host_us", "host_own_us", "host_layer_us"):
        values = [r[key] for r in rows if key in r]
        if values:
            summary[f"median_{key}"] = statistics.median(values)
    return summary


def _payload(env, bandwidth, rows, modes, complete: bool, planned: int) -> dict:
    return {"environment": env, "copy_bandwidth_gbps": bandwidth, "complete": complete, "planned_rows": planned,
            "summary": _summary(rows, modes), "rows": rows}


if __name__ == "__main__":
    main()
