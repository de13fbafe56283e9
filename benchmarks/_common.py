"""Helpers shared by the benchmark scripts: timing, environment record, JSON output, tables."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch

from rnip_ext.app.measure import cpu_model

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def package_version(name: str) -> str | None:
    """A distribution's version from its metadata (some packages' ``__version__`` lags)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    """What the numbers were measured on: device, library versions, commit, machine load.

    ``git_dirty`` says whether tracked files differed from the commit (numbers from uncommitted
    code). ``load_average_1min`` says how busy the machine was: other processes on the cores
    stall torch's parallel regions and make every CPU row slower.
    """
    status = _git("status", "--porcelain", "--untracked-files=no")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    return {
        "device": name, "device_type": device.type, "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "triton": package_version("triton"), "cuda": torch.version.cuda,
        "python": platform.python_version(), "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status), "load_average_1min": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _quantiles(samples: list[float]) -> dict:
    samples = sorted(samples)
    q = statistics.quantiles(samples, n=10, method="inclusive") if len(samples) > 1 else [samples[0]] * 9
    return {"median_ms": statistics.median(samples), "p20_ms": q[1], "p80_ms": q[7], "repeats": len(samples)}


def bench(fn: Callable[[], object], device: torch.device, repeats: int = 20, warmup: int = 3,
          grad_to_none: list | None = None) -> dict:
    """Median, p20 and p80 milliseconds of ``fn()`` after ``warmup`` calls.

    On CUDA ``triton.testing.do_bench`` (CUDA events, cache flush between runs, gradients reset
    to None outside the timed region); on CPU wall-clock with ``time.perf_counter``.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        q = do_bench(fn, warmup=25, rep=max(50, repeats * 5), grad_to_none=grad_to_none,
                     quantiles=[0.5, 0.2, 0.8], return_mode="median")
        return {"median_ms": q[0], "p20_ms": q[1], "p80_ms": q[2], "repeats": None}
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return _quantiles(samples)


def copy_bandwidth(device: torch.device, numel: int = 1 << 26) -> float:
    """Measured device-to-device (or RAM-to-RAM) copy bandwidth in GB/s: read + write bytes per second."""
    src = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    stats = bench(lambda: dst.copy_(src), device, repeats=10)
    return 2 * src.numel() * src.element_size() / (stats["median_ms"] * 1e-3) / 1e9


def write_json(name: str, payload: dict) -> str:
    """Write ``payload`` to ``benchmarks/results/<name>`` atomically (:func:`write_json_at`)."""
    os.makedirs(RESULTS, exist_ok=True)
    return write_json_at(os.path.join(RESULTS, name), payload)


def write_json_at(path: str, payload: dict) -> str:
    """Write ``payload`` to ``path`` atomically (a temporary file, then a rename): scripts
    rewrite their JSON after every row, and a kill mid-write keeps the last one."""
    with open(path + ".tmp", "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Plain-text table: ``columns`` are (header, key, format spec)."""
    head = [h for h, _, _ in columns]
    body = [[("" if r.get(k) is None else format(r[k], f)) for _, k, f in columns] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)

def load_note(load_start: float, load_end: float, cores: int | None = None) -> str:
    """One line on how busy the machine was: quiet when the 1-minute load average stayed within
    about one process (the benchmark's own, single-threaded) per core, shared otherwise."""
    cores = cores or os.cpu_count() or 1
    busy = max(load_start, load_end) > cores * 0.75 + 0.25
    what = ("shared machine (other jobs running): CPU timings are noisy" if busy
            else "quiet machine (no other jobs: the load is this benchmark's own)")
    return (f"{what}; 1-minute load average {load_start:.2f} at the start and {load_end:.2f} at the end on "
            f"{cores} cores; ratios are medians of per-round ratios within one run")
