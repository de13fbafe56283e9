"""Pruning the model zoo: rnip_ext and Torch-Pruning on 57 torchvision and 29 timm BatchNorm CNNs.

For every model of ``tests/zoo_models.py`` (random initialisation, BatchNorm scales drawn from
U(0.05, 1) and shifts from U(-0.1, 0.1), running statistics from one batch of 4 in training mode,
input ``zoo_models.input_size(name)`` unless ``--size``), two workers run, each in its own
subprocess with a time limit:

* ``rnip``: ``rnip_ext.pruning.plan(model, 0.3)`` then ``apply`` (both timed). Exactness: the
  removed channels' shifts are set to 0 after planning (the plan does not read them), and the
  pruned output is compared with the original whose removed channels also have their scale set
  to 0 (``max |pruned - masked| / max |masked|``; "exact" below 1e-4 in float32, or, where
  float32 rounding is larger in an ill-conditioned network, below 1e-9 in float64). FLOPs and
  parameters: the predicted ``(before, after)`` of the plan of the zeroed network (the same
  choice; it adds no fold biases) against :func:`rnip_ext.pruning.count_flops` and
  ``count_params`` on both networks.
  Then ``plan(model, target_flops=0.5)``: reachable (achieved fraction) or the error it raises.
  Warnings raised by either call are recorded.
* ``tp`` (Torch-Pruning, "the leading library"): ``tp.pruner.MagnitudePruner`` with
  ``tp.importance.BNScaleImportance()``, ``pruning_ratio=0.3``, the last ``nn.Linear`` (the
  classifier) in ``ignored_layers``; build + ``step()`` timed; it "works" when the pruned network
  runs and gives the original's output shape; MACs after with ``count_flops`` (the same counter as
  for rnip_ext). Half the MACs: reached at 0.3 already, or by stepping the same pruner to
  ``pruning_ratio=0.9`` in 18 steps until ``count_flops`` falls to half (the ratio needed is
  recorded), within what is left of the time limit.

Each library call is interrupted after ``--timeout`` seconds (SIGALRM; Torch-Pruning spends its
time in Python, so the alarm lands), the subprocess killed after twice that plus model building;
both are recorded as timeouts. Rows are written to ``--out`` atomically after every model;
models already in it are skipped (resume; ``--fresh`` to start over). One line per model is
printed (a tqdm bar on a terminal). ``--table [JSON ...]`` prints the Markdown tables of
docs/zoo.md from result files (e.g. one run per library: ``--libs rnip`` and ``--libs tp`` into
two files, merged by model).

``--residual-streams`` passes ``residual_streams=True`` to every ``plan`` of the ``rnip`` worker
(residual streams pruned, each as one channel group; recorded in the settings).

Run: ``python benchmarks/zoo.py [--family torchvision|timm|all] [--models resnet18 ...]
[--libs rnip tp] [--timeout 120] [--residual-streams] [--out benchmarks/results/zoo_cpu.json]``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)  # this checkout's rnip_ext, not an installed one

RATIO = 0.3
# Over ~60M parameters: run last, so that a run stopped early has the rest.
LARGE = {"efficientnet_b7", "efficientnet_v2_l", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_128gf", "regnet_x_16gf",
         "regnet_x_32gf", "resnet152", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2", "vgg11_bn",
         "vgg13_bn", "vgg16_bn", "vgg19_bn"}
TARGET = 0.5
EXACT_TOL = 1e-4
EXACT_TOL_64 = 1e-9


class _Timeout(BaseException):
    """The time limit (a BaseException: libraries that wrap their own errors must not swallow it)."""


def _alarm(signum, frame):
    raise _Timeout()


def _emit(stage: str, payload: dict) -> None:
    print(json.dumps({"stage": stage, **payload}), flush=True)


def _short(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}"
    return msg if len(msg) <= 400 else msg[:400] + "..."


def prepared(source: str, name: str, seed: int = 0):
    """The zoo model with spread BatchNorm scales, small shifts and one batch of running statistics."""
    import torch
    from torch import nn

    import zoo_models

    torch.manual_seed(seed)
    model = zoo_models.build(source, name)
    with torch.no_grad():
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        for m in bns:
            if m.weight is not None:
                m.weight.uniform_(0.05, 1.0)
            if m.bias is not None:
                m.bias.uniform_(-0.1, 0.1)
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
        shape = zoo_models.input_size(name)
        model.train()
        model(torch.randn(4, *shape[1:]))
        for m in bns:
            m.momentum = 0.1
    return model.eval()


def masked(model, keep: dict, shifts_only: bool = False):
    """The original with every removed channel's shift (and, unless ``shifts_only``, scale) set to 0."""
    import torch

    out = model if shifts_only else copy.deepcopy(model)
    modules = dict(out.named_modules())
    with torch.no_grad():
        for name, kept in keep.items():
            bn = modules[name]
            mask = torch.ones(bn.num_features, dtype=torch.bool)
            mask[kept] = False
            if bn.bias is not None:
                bn.bias[mask] = 0.0
            if not shifts_only:
                bn.weight[mask] = -math.inf if type(bn).__name__ == "BoundedBatchNorm2d" else 0.0
    return out


def _timed(fn, limit: float):
    """``(seconds, result)`` of ``fn()``, raising :class:`_Timeout` after ``limit`` seconds.

    The garbage this harness made before the call (deep copies, float64 checks) is collected
    first, for both libraries: otherwise a full collection it has made due (0.15 s with torch,
    torchvision and timm loaded) lands inside whichever call happens to allocate next."""
    gc.collect()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, max(limit, 0.01))
    start = time.perf_counter()
    try:
        result = fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return time.perf_counter() - start, result


def _attempt(stage: str, fn, limit: float, *, timeout: dict, error: dict):
    """``_timed(fn, limit)``, or ``None`` once ``stage`` is reported as timed out (``timeout`` +
    ``"timeout": True``) or failed (``error`` + the error's message)."""
    try:
        return _timed(fn, limit)
    except _Timeout:
        _emit(stage, {**timeout, "timeout": True})
    except Exception as e:  # noqa: BLE001
        _emit(stage, {**error, "error": _short(e)})
    return None


def _plan_extras(p) -> dict:
    """Whatever a plan reports beyond the counts (coverage and blockers, where the version has them)."""
    extras = {}
    for attr in ("prunable_flops", "blocked"):
        if hasattr(p, attr):
            value = getattr(p, attr)
            extras[attr] = value if isinstance(value, (int, float, str)) else str(value)
    if hasattr(p, "blockers"):
        extras["blockers"] = len(p.blockers)
    return extras


def worker_rnip(source: str, name: str, size: int | None, limit: float, residual_streams: bool = False) -> None:
    import functools

    import torch

    import zoo_models
    from rnip_ext.pruning import apply, count_flops, count_params, plan

    if residual_streams:
        plan = functools.partial(plan, residual_streams=True)

    torch.set_grad_enabled(False)
    model = prepared(source, name)
    shape = (1, 3, size, size) if size else zoo_models.input_size(name)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    # worker_tp runs the model once on x before its timer starts (for the output shape): so does
    # this one, so that both libraries are timed from the same warm state of torch's kernels.
    model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t_plan, p = _timed(lambda: plan(model, RATIO, example_inputs=x), limit)
            masked(model, p.keep, shifts_only=True)
            t_apply, pruned = _timed(lambda: apply(model, p), limit - t_plan)
        except _Timeout:
            _emit("ratio", {"works": False, "timeout": True, "warnings": [str(w.message) for w in caught]})
            return
        except Exception as e:  # noqa: BLE001 - the error is the result
            _emit("ratio", {"works": False, "error": _short(e), "warnings": [str(w.message) for w in caught]})
            return
    # The plan counts the biases its folds will add; with the removed shifts now 0 there is nothing
    # to fold, so the exactness and count checks use the plan of the zeroed network (same choice).
    p_timed, p = p, plan(model, RATIO, example_inputs=x)
    same_choice = p.keep.keys() == p_timed.keep.keys() and all(torch.equal(p.keep[k], p_timed.keep[k]) for k in p.keep)
    pruned = apply(model, p)
    ref = masked(model, p.keep)
    ya, yb = pruned(x), ref(x)
    err = ((ya - yb).abs().max() / yb.abs().max().clamp_min(1e-30)).item()
    err64 = None
    if err > EXACT_TOL:  # rounding or a real difference? float64 tells (deep random nets are ill-conditioned)
        ya, yb = copy.deepcopy(pruned).double()(x.double()), copy.deepcopy(ref).double()(x.double())
        err64 = ((ya - yb).abs().max() / yb.abs().max().clamp_min(1e-300)).item()
    counted = (count_flops(model, x), count_flops(pruned, x))
    params = (count_params(model), count_params(pruned))
    # Torch-Pruning edits the model it is given (its copy is not timed): so does apply(inplace=True).
    target = copy.deepcopy(model)
    t_inplace, _ = _timed(lambda: apply(target, p_timed, inplace=True), limit)
    _emit("ratio", {
        "works": True, "plan_s": t_plan, "apply_s": t_apply, "seconds": t_plan + t_apply,
        "apply_inplace_s": t_inplace, "seconds_inplace": t_plan + t_inplace,
        "achieved_ratio": p.achieved_ratio, "groups": len(p.groups), "pruned_bns": len(p.keep),
        "flops_planned": list(p.flops), "flops_counted": list(counted),
        "flops_match": tuple(p.flops) == counted, "flops_kept": counted[1] / counted[0],
        "params": list(p.params), "params_match": tuple(p.params) == params, "same_choice": same_choice,
        "rel_err": err, "rel_err_float64": err64,
        "exact": err <= EXACT_TOL or (err64 is not None and err64 <= EXACT_TOL_64),
        "approx_folds_planned": len(p_timed.inexact_folds),
        "warnings": [str(w.message) for w in caught], **_plan_extras(p),
    })
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            t, pb = _timed(lambda: plan(model, target_flops=TARGET, example_inputs=x), limit)
            _emit("budget", {"reachable": pb.achieved_flops <= TARGET, "achieved_flops": pb.achieved_flops,
                             "seconds": t, "warnings": [str(w.message) for w in caught]})
        except _Timeout:
            _emit("budget", {"reachable": None, "timeout": True})
        except Exception as e:  # noqa: BLE001
            _emit("budget", {"reachable": False, "error": _short(e), "warnings": [str(w.message) for w in caught]})


def _classifier(model):
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:] if linears else []


def worker_tp(source: str, name: str, size: int | None, limit: float) -> None:
    import torch
    import torch_pruning as tp

    import zoo_models
    from rnip_ext.pruning import count_flops

    model = prepared(source, name)
    shape = (1, 3, size, size) if size else zoo_models.input_size(name)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_shape = tuple(model(x).shape)
    before = count_flops(model, x)
    ref_copy = copy.deepcopy(model)

    def run(pruner_model, ratio, steps):
        pruner = tp.pruner.MagnitudePruner(pruner_model, x, importance=tp.importance.BNScaleImportance(),
                                           pruning_ratio=ratio, iterative_steps=steps,
                                           ignored_layers=_classifier(pruner_model))
        return pruner

    start = time.perf_counter()
    timed = _attempt("ratio", lambda: run(model, RATIO, 1).step(), limit,
                     timeout={"works": False}, error={"works": False})
    if timed is None:
        return
    t = timed[0]
    try:
        with torch.no_grad():
            got = tuple(model(x).shape)
        after = count_flops(model, x)
        tp_macs = tp.utils.count_ops_and_params(model, x)[0]
    except Exception as e:  # noqa: BLE001
        _emit("ratio", {"works": False, "seconds": t, "error": "pruned network fails: " + _short(e)})
        return
    works = got == out_shape
    _emit("ratio", {"works": works, "seconds": t, "flops": [before, after], "flops_kept": after / before,
                    "tp_macs_after": tp_macs, "output_shape": list(got),
                    **({} if works else {"error": f"output shape {got} != {out_shape}"})})
    if not works:
        return
    if after <= TARGET * before:
        _emit("half", {"reaches_half": True, "ratio": RATIO, "flops_kept": after / before, "seconds": t})
        return
    left = limit - (time.perf_counter() - start)
    model = ref_copy
    steps = 18

    def stepping():
        pruner = run(model, 0.9, steps)
        for k in range(1, steps + 1):
            pruner.step()
            kept = count_flops(model, x) / before
            if kept <= TARGET:
                return 0.9 * k / steps, kept
        return None, kept

    timed = _attempt("half", stepping, left, timeout={"reaches_half": None}, error={"reaches_half": False})
    if timed is None:
        return
    t2, (ratio, kept) = timed
    _emit("half", {"reaches_half": ratio is not None, "ratio": ratio, "flops_kept": kept, "seconds": t2})


def run_worker(lib: str, source: str, name: str, size: int | None, limit: float,
               residual_streams: bool = False) -> dict:
    """Run one library on one model in a subprocess; the stages it reported, or how it died."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, source, name, "--timeout", str(limit)]
    if size:
        cmd += ["--size", str(size)]
    if residual_streams:
        cmd += ["--residual-streams"]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=2 * limit + 300, cwd=ROOT)
        stdout, died = proc.stdout, (None if proc.returncode == 0 else f"exit code {proc.returncode}")
        stderr = proc.stderr
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr, died = "", "killed after the subprocess time limit"
    result = {"wall_s": time.perf_counter() - start}
    for line in stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            result[rec.pop("stage")] = rec
    if died:
        result["died"] = died
        if stderr:
            result["stderr_tail"] = stderr[-600:]
    return result


TIMING_KEYS = ("plan_s", "apply_s", "apply_inplace_s", "seconds", "seconds_inplace")


def add_repeat(result: dict, again: dict) -> None:
    """Record the timings of ``again`` (a rerun of the same worker) under ``result["ratio"]["runs"]``."""
    ratio, more = result.get("ratio"), again.get("ratio")
    if not ratio or not more or not ratio.get("works") or not more.get("works"):
        return
    runs = ratio.setdefault("runs", {k: [ratio[k]] for k in TIMING_KEYS if k in ratio})
    for k in runs:
        if k in more:
            runs[k].append(more[k])


def take_medians(result: dict) -> None:
    """Each timing of the ratio stage becomes the median of its runs (the runs stay listed)."""
    ratio = result.get("ratio") or {}
    for k, values in ratio.get("runs", {}).items():
        ratio[k] = statistics.median(values)


def summary_line(row: dict) -> str:
    def fmt(lib):
        r = row.get(lib, {}).get("ratio")
        if r is None:
            return f"{lib}: " + (row.get(lib, {}).get("died") or "no result")
        if r.get("timeout"):
            return f"{lib}: timeout"
        if not r.get("works"):
            return f"{lib}: fails ({(r.get('error') or '')[:60]})"
        extra = ""
        if lib == "rnip":
            b = row[lib].get("budget", {})
            extra = f" exact={r['exact']} flops_ok={r['flops_match']} half={b.get('reachable')}"
        else:
            extra = f" half={row[lib].get('half', {}).get('reaches_half')}"
        return f"{lib}: {r['flops_kept']:.3f} kept {r['seconds']:.2f}s{extra}"

    return f"{row['source']}/{row['name']}: " + " | ".join(fmt(lib) for lib in ("rnip", "tp") if lib in row)


def _load(path: str) -> dict:
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _write(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _family_stats(rows: list[dict]) -> dict:
    """Counts per family for the summary table."""
    def ratio(r, lib):
        return r.get(lib, {}).get("ratio") or {}

    rn = [ratio(r, "rnip") for r in rows]
    tpr = [ratio(r, "tp") for r in rows]
    rn_ok = [r for r in rn if r.get("works")]
    tp_ok = [r for r in tpr if r.get("works")]
    budget = [r.get("rnip", {}).get("budget", {}) for r in rows]
    half = [r.get("tp", {}).get("half", {}) for r in rows]
    both = [(a, b) for a, b in zip(rn, tpr) if a.get("works") and b.get("works")]
    return {
        "models": len(rows),
        "rnip_works": len(rn_ok), "rnip_exact": sum(bool(r.get("exact")) for r in rn_ok),
        "rnip_flops_match": sum(bool(r.get("flops_match")) and r.get("params_match", True) for r in rn_ok),
        "rnip_cut10": sum(r["flops_kept"] <= 0.9 for r in rn_ok),
        "rnip_median_kept": statistics.median([r["flops_kept"] for r in rn_ok]) if rn_ok else None,
        "rnip_reachable": sum(bool(b.get("reachable")) for b in budget),
        "rnip_timeouts": sum(bool(r.get("timeout")) for r in rn),
        "rnip_median_s": statistics.median([r["seconds"] for r in rn_ok]) if rn_ok else None,
        "tp_run_on": sum("tp" in r for r in rows), "tp_works": len(tp_ok),
        "tp_median_kept": statistics.median([r["flops_kept"] for r in tp_ok]) if tp_ok else None,
        "tp_half": sum(bool(h.get("reaches_half")) for h in half),
        "tp_timeouts": sum(bool(r.get("timeout")) for r in tpr) + sum(bool(h.get("timeout")) for h in half),
        "tp_median_s": statistics.median([r["seconds"] for r in tp_ok]) if tp_ok else None,
        "both_work": len(both),
        "rnip_faster": sum(a["seconds"] < b["seconds"] for a, b in both),
        "inplace_rows": sum("seconds_inplace" in a for a, _ in both),
        "rnip_inplace_median_s": statistics.median([a["seconds_inplace"] for a, _ in both if "seconds_inplace" in a])
        if any("seconds_inplace" in a for a, _ in both) else None,
        "rnip_inplace_faster": sum(a["seconds_inplace"] < b["seconds"] for a, b in both if "seconds_inplace" in a),
        "half_where_tp_half": sum(bool(b.get("reachable")) for b, h in zip(budget, half) if h.get("reaches_half")),
    }


def table(payload: dict) -> str:
    """The Markdown tables of docs/zoo.md: a summary per family, then one row per model."""
    import zoo_models

    everything = ([("timm", n) for n in zoo_models.TIMM_MODELS]
                  + [("torchvision", n) for n in zoo_models.TORCHVISION_MODELS])
    # rnip_ext is the subject: a model counts once rnip_ext has run on it (Torch-Pruning's row beside it).
    rows = [payload["rows"][f"{s}/{n}"] for s, n in everything if "rnip" in payload["rows"].get(f"{s}/{n}", {})]
    missing = [f"{s}/{n}" for s, n in everything if "rnip" not in payload["rows"].get(f"{s}/{n}", {})]
    fams = [("torchvision", [r for r in rows if r["source"] == "torchvision"]),
            ("timm", [r for r in rows if r["source"] == "timm"])]
    fams = [(f, rs) for f, rs in fams if rs]
    stats = {f: _family_stats(rs) for f, rs in fams}

    def num(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    lines = ["| | " + " | ".join(f"{f} ({stats[f]['models']})" for f, _ in fams) + " |",
             "|---|" + "---|" * len(fams)]
    spec = [
        ("rnip_ext ratio 0.3: runs / exact vs masked original / predicted FLOPs and parameters = counted",
         lambda s: f"{s['rnip_works']} / {s['rnip_exact']} / {s['rnip_flops_match']}"),
        ("... FLOPs cut by >= 10% / median FLOPs kept",
         lambda s: f"{s['rnip_cut10']} / {num(s['rnip_median_kept'])}"),
        ("rnip_ext `target_flops=0.5` reachable", lambda s: f"{s['rnip_reachable']}"),
        ("Torch-Pruning ratio 0.3: run on / runs, output shape right / median MACs kept",
         lambda s: f"{s['tp_run_on']} / {s['tp_works']} / {num(s['tp_median_kept'])}"),
        ("Torch-Pruning reaches half the MACs", lambda s: f"{s['tp_half']}"),
        ("rnip_ext reaches 0.5 where Torch-Pruning reaches half",
         lambda s: f"{s['half_where_tp_half']} / {s['tp_half']}"),
        ("timeouts (rnip_ext / Torch-Pruning)", lambda s: f"{s['rnip_timeouts']} / {s['tp_timeouts']}"),
        ("median seconds, plan+apply / Torch-Pruning build+step",
         lambda s: f"{num(s['rnip_median_s'], '.2f')} / {num(s['tp_median_s'], '.2f')}"),
        ("rnip_ext faster, of the models both run", lambda s: f"{s['rnip_faster']} / {s['both_work']}"),
        ("plan + `apply(inplace=True)`: median seconds / faster than Torch-Pruning, of the models timed",
         lambda s: f"{num(s['rnip_inplace_median_s'], '.2f')} / {s['rnip_inplace_faster']} of {s['inplace_rows']}"),
    ]
    for label, f in spec:
        lines.append(f"| {label} | " + " | ".join(f(stats[fam]) for fam, _ in fams) + " |")

    lines += ["", "| model | rnip_ext: FLOPs kept | exact | FLOPs, params = counted | 0.5 reachable | s | "
              "prunable FLOPs / warned | Torch-Pruning: MACs kept | half | s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rn = r.get("rnip", {})
        a, b = rn.get("ratio") or {}, rn.get("budget") or {}
        t = r.get("tp", {})
        c, h = t.get("ratio") or {}, t.get("half") or {}

        def state(d, died):
            if d.get("timeout"):
                return "timeout"
            if not d:
                return died or "-"
            return "fails"

        if a.get("works"):
            exact = ("no" if not a["exact"] else "yes" if a.get("rel_err_float64") is None else
                     f"float64 (float32: {a['rel_err']:.0e})")
            rn_cells = [f"{a['flops_kept']:.3f}", exact if a["exact"] else f"no ({a['rel_err']:.1e})",
                        "yes" if a["flops_match"] and a.get("params_match", True) else "no",
                        ("yes" if b.get("reachable") else
                         ("timeout" if b.get("timeout") else "no" if b else "-")),
                        f"{a['seconds']:.2f}",
                        (f"{a['prunable_flops']:.3f}" if "prunable_flops" in a else "-")
                        + (" / warned" if a.get("warnings") else "")]
        else:
            err = (a.get("error") or "").replace("|", "/").split("\n")[0][:90]
            rn_cells = [state(a, rn.get("died")) + (f": {err}" if err else ""), "", "", "", "", ""]
        if c.get("works"):
            tp_cells = [f"{c['flops_kept']:.3f}",
                        ("yes" if h.get("reaches_half") else "timeout" if h.get("timeout") else "no" if h else "-")
                        + (f" (ratio {h['ratio']:.2f})" if h.get("reaches_half") and h.get("ratio") != RATIO else ""),
                        f"{c['seconds']:.2f}"]
        else:
            err = (c.get("error") or "").replace("|", "/").split("\n")[0][:60]
            tp_cells = [state(c, t.get("died")) + (f": {err}" if err else ""), "", ""]
        lines.append(f"| {r['source']}/{r['name']} | " + " | ".join(rn_cells + tp_cells) + " |")
    if missing:
        lines += ["", f"Not run yet ({len(missing)}): " + ", ".join(missing) + "."]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["torchvision", "timm", "all"], default="all")
    parser.add_argument("--models", nargs="*", help="only these model names (of the chosen families)")
    parser.add_argument("--libs", nargs="*", choices=["rnip", "tp"], default=["rnip", "tp"])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per library call")
    parser.add_argument("--size", type=int, default=None, help="input side (default: zoo_models.input_size)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "zoo_cpu.json"))
    parser.add_argument("--fresh", action="store_true", help="ignore rows already in --out")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each library this many times per model, alternating; timings are medians")
    parser.add_argument("--residual-streams", action="store_true",
                        help="rnip_ext: plan with residual_streams=True (streams pruned as one group each)")
    parser.add_argument("--table", nargs="*", metavar="JSON",
                        help="print the Markdown tables of these result files (rows merged, later files' "
                             "libraries win; default --out) and exit")
    parser.add_argument("--worker", nargs=3, metavar=("LIB", "SOURCE", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        lib, source, name = args.worker
        try:
            if lib == "rnip":
                worker_rnip(source, name, args.size, args.timeout, args.residual_streams)
            else:
                worker_tp(source, name, args.size, args.timeout)
        except Exception:  # noqa: BLE001 - building the model failed: say so on stderr
            traceback.print_exc()
            sys.exit(3)
        return
    if args.table is not None:
        merged: dict = {"rows": {}}
        for path in args.table or [args.out]:
            for key, row in _load(path).get("rows", {}).items():
                merged["rows"].setdefault(key, {}).update(row)
        print(table(merged))
        return

    import torch

    import zoo_models
    from _common import environment, package_version

    todo = []
    for source, names in (("timm", zoo_models.TIMM_MODELS), ("torchvision", zoo_models.TORCHVISION_MODELS)):
        if args.family in (source, "all"):
            todo += [(source, n) for n in names if not args.models or n in args.models]
    todo.sort(key=lambda sn: sn[1] in LARGE)  # stable: timm, torchvision, then the largest models
    payload = {} if args.fresh else _load(args.out)
    env = environment(torch.device("cpu"))
    env["torch_pruning"] = package_version("torch-pruning")
    env["timm"] = package_version("timm")
    env["torchvision"] = package_version("torchvision")
    payload.setdefault("environment", env)
    payload["settings"] = {"ratio": RATIO, "target_flops": TARGET, "timeout_s": args.timeout, "size": args.size,
                           "exact_tol": EXACT_TOL, "residual_streams": args.residual_streams, "repeat": args.repeat}
    payload.setdefault("rows", {})
    todo = [(s, n) for s, n in todo if f"{s}/{n}" not in payload["rows"]
            or any(lib not in payload["rows"][f"{s}/{n}"] for lib in args.libs)]

    bar = None
    if sys.stdout.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="model")
    for source, name in todo:
        key = f"{source}/{name}"
        row = payload["rows"].get(key, {"source": source, "name": name})
        for lib in args.libs:
            if lib not in row:
                row[lib] = run_worker(lib, source, name, args.size, args.timeout, args.residual_streams)
        # Reruns alternate the libraries, so that a change of machine load reaches both alike.
        for _ in range(args.repeat - 1):
            for lib in args.libs:
                add_repeat(row[lib], run_worker(lib, source, name, args.size, args.timeout, args.residual_streams))
        for lib in args.libs:
            take_medians(row[lib])
        row["git_commit"] = env["git_commit"]
        row["load_average_1min"] = os.getloadavg()[0]
        payload["rows"][key] = row
        _write(args.out, payload)
        line = summary_line(row)
        if bar is not None:
            bar.write(line)
            bar.update()
        else:
            print(line, flush=True)
    if bar is not None:
        bar.close()


if __name__ == "__main__":
    main()
