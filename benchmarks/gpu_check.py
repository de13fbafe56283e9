"""The one GPU run: build, the GPU tests and every benchmark, time-boxed so that it cannot lose
its results. ``benchmarks/gpu_check.sh`` runs this file; ``--dry-run`` plans it on any machine.

    bash benchmarks/gpu_check.sh [--logs DIR] [--skip-build] [--budget S]   # on a CUDA machine
    bash benchmarks/gpu_check.sh --dry-run                                  # anywhere: the plan

Steps, in order (the table :data:`STEPS`; ``--dry-run`` prints it with each step's expected
compiles and seconds):

  env            python/torch/triton/numpy versions, the GPU, nvcc, the test dependencies
                 (pytest, pytest-xdist, hypothesis: a missing one is named here, not by a
                 collection error later)
  build          pip install --no-build-isolation --no-deps --no-index -e .  (C++ and CUDA op);
                 if it fails, a C++-only build (RNIP_EXT_BUILD=cpu), and if that fails too a
                 build-free install (RNIP_EXT_BUILD=none: the package falls back to index_select),
                 so that every later step has a package to import
  ext            which channel-gather op got built: C++ and CUDA, C++ only, or none
  tests          benchmarks/gpu_tests.py: only the tests a GPU adds something to, within a compile
                 budget counted on CPU
  bn_speed       the layer benchmark, the issue targets' rows first  -> bn_speed_cuda.json
  net_speed      a whole VGG-16 CIFAR training step                   -> net_speed_cuda.json
  bn_compiled    torch.compile of the paper's layer vs ours           -> bn_speed_cuda_compiled.json
  gather_speed   channel gather                                        -> gather_speed_cuda.json
  prune_speed    physical pruning                                      -> prune_speed_cuda.json

Time box: each step runs under its own timeout, all of them within ``--budget`` seconds
(:data:`BUDGET_S`); a step that would start with less than :data:`MIN_STEP_S` left is skipped.
A step that overruns is killed (its whole process group: SIGTERM, then SIGKILL after
:data:`KILL_GRACE_S`). So the run's wall time is at most ``budget + grace + the preflight
checks`` (:func:`worst_case_s`, <= 600 s = 10 minutes). The benchmarks write their JSON after
every row, so a killed step keeps every row it finished.

Logs go to DIR/<step>.log (default benchmarks/results/gpu_check_logs) and the summary to
DIR/summary.txt. Exit status: 0 when every step passed, 1 when one failed, timed out or was
skipped, 2 when there is no GPU (or no torch/triton). ``PYTHON`` names the interpreter whose
torch the steps use (default: this one).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")

BUDGET_S = 560  # every step together
KILL_GRACE_S = 10  # SIGTERM -> SIGKILL of an overrunning step
PREFLIGHT_S = 20  # the checks before the budget starts (three interpreter starts)
MIN_STEP_S = 15
LIMIT_S = 600  # the bound on the whole run's wall time, cold caches

# Cost model of the dry run, for one H100/H200 machine with cold caches (seconds). A Triton
# variant compiles in ~0.3 s there (issue 21); torch.compile of one shape of the paper's layer
# (forward + backward graphs, inductor's own Triton kernels) in several seconds.
T_PYTHON_START = 12.0  # interpreter + torch + triton + CUDA context
T_TRITON_COMPILE = 0.5
T_INDUCTOR_COMPILE = 10.0
T_BUILD = 90.0  # C++ + CUDA op, MAX_JOBS=16 (three translation units against torch's headers)


@dataclasses.dataclass
class Step:
    """One step: ``argv`` (``{py}`` is the interpreter), its timeout, and what it leaves."""

    name: str
    argv: list[str]
    timeout_s: int
    what: str
    env: dict = dataclasses.field(default_factory=dict)
    when: str = "always"  # or "build_failed": only after the previous build attempts all failed
    produces: tuple[str, ...] = ()


_PIP = ["{py}", "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]

ENV_SCRIPT = r"""
import importlib, platform, shutil
import torch
parts = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
for name in ("triton", "numpy"):
    try:
        parts.append(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        parts.append(f"{name} missing")
parts.append(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
parts.append(f"nvcc {shutil.which('nvcc') or 'not on PATH'}")
missing = []
for module, package in (("pytest", "pytest"), ("xdist", "pytest-xdist"), ("hypothesis", "hypothesis")):
    try:
        importlib.import_module(module)
    except ImportError:
        missing.append(package)
parts.append("test deps " + ("ok" if not missing else "MISSING " + ", ".join(missing)))
print(" | ".join(parts))
"""

EXT_SCRIPT = r"""
import importlib
cg = importlib.import_module("rnip_ext.ops.channel_gather")  # the module (the package exports the function)
if not cg.HAS_C_EXT:
    print("channel-gather op: NOT BUILT (index_select fallback everywhere)")
elif cg._C_HAS_CUDA:
    print("channel-gather op: C++ + CUDA")
else:
    print("channel-gather op: C++ only (CUDA tensors use the index_select fallback)")
"""

STEPS = [
    Step("env", ["{py}", "-c", ENV_SCRIPT], 60, "versions, GPU, nvcc, test dependencies"),
    Step("build", _PIP, 150, "C++ + CUDA channel-gather op", env={"RNIP_EXT_BUILD": "auto"}),
    Step("build_cpu_only", _PIP, 90, "C++ op only", env={"RNIP_EXT_BUILD": "cpu"}, when="build_failed"),
    Step("install_no_build", _PIP, 45, "the package, no compiled op", env={"RNIP_EXT_BUILD": "none"},
         when="build_failed"),  # fmt: skip
    Step("ext", ["{py}", "-c", EXT_SCRIPT], 45, "which channel-gather op is installed"),
    Step("tests", ["{py}", "benchmarks/gpu_tests.py", "--workers", "4"], 150,
         "GPU test selection (benchmarks/gpu_tests.py)", env={"RNIP_TEST_DEVICE": "cuda"}),  # fmt: skip
    Step("bn_speed", ["{py}", "benchmarks/bn_speed.py", "--device", "cuda"], 140,
         "layer: plain vs paper vs ours, targets first", produces=("bn_speed_cuda.json",)),  # fmt: skip
    Step("net_speed", ["{py}", "benchmarks/net_speed.py", "--device", "cuda"], 80,
         "VGG-16 CIFAR training step, batch 128", produces=("net_speed_cuda.json",)),  # fmt: skip
    Step("bn_compiled", ["{py}", "benchmarks/bn_speed.py", "--device", "cuda", "--sets", "vgg16_cifar",
                         "--dtypes", "fp16", "--layouts", "channels_last", "--modes", "fwdbwd",
                         "--variants", "compiled", "ours", "--out", "bn_speed_cuda_compiled.json"], 90,
         "torch.compile of the paper's layer vs ours", produces=("bn_speed_cuda_compiled.json",)),  # fmt: skip
    Step("gather_speed", ["{py}", "benchmarks/gather_speed.py", "--device", "cuda", "--repeats", "10"], 30,
         "channel gather vs index_select", produces=("gather_speed_cuda.json",)),  # fmt: skip
    Step("prune_speed", ["{py}", "benchmarks/prune_speed.py", "--device", "cuda", "--repeats", "5"], 40,
         "plan + apply vs Torch-Pruning", produces=("prune_speed_cuda.json",)),  # fmt: skip
]


def worst_case_s(budget: int = BUDGET_S) -> int:
    """The longest the whole run can take: preflight, the budget, one kill grace."""
    return PREFLIGHT_S + budget + KILL_GRACE_S


# ---------------------------------------------------------------------------------------------
# Dry run: what every step compiles and how long it should take.


def plan(python: str = sys.executable) -> list[dict]:
    """Every step with its timeout, expected Triton compiles and expected seconds (the cost model
    above applied to what the step runs, counted here on CPU; no GPU needed).

    Compiles of the benchmarks are counted exactly, by running their launchers on ``meta``
    tensors with the launches intercepted (``bn_speed.plan``, ``net_speed.plan``); the tests
    step's is its counted budget (``gpu_tests.COMPILE_BUDGET``, checked by a CPU test).
    """
    sys.path.insert(0, BENCH)
    import bn_speed
    import gpu_tests
    import net_speed

    def bench_args(step: Step) -> list[str]:
        return [a for a in step.argv[2:]]

    rows = []
    for step in STEPS:
        compiles, inductor, expected, note = 0, 0, 5.0, ""
        if step.name == "env":
            expected = T_PYTHON_START / 2
        elif step.name == "build":
            expected = T_BUILD
        elif step.when == "build_failed":
            expected = 30.0 if step.name == "build_cpu_only" else 10.0
            note = "only if the build above failed"
        elif step.name == "ext":
            expected = T_PYTHON_START / 2
        elif step.name == "tests":
            compiles = gpu_tests.COMPILE_BUDGET
            # Four workers share the compiles (files go whole to one worker); the tests
            # themselves are small. Serial (no xdist) would be four times the compile share.
            expected = T_PYTHON_START + compiles * T_TRITON_COMPILE / 2 + gpu_tests.RUN_S
            note = f"<= {compiles} variants, counted on CPU"
        elif step.name in ("bn_speed", "bn_compiled"):
            p = bn_speed.plan(bench_args(step))
            compiles, inductor = p["triton_compiles"], p["inductor_compiles"]
            expected = (T_PYTHON_START + compiles * T_TRITON_COMPILE + inductor * T_INDUCTOR_COMPILE
                        + p["bench_s"])  # fmt: skip
            note = f"{p['rows']} rows, {p['timed']} timed runs"
        elif step.name == "net_speed":
            p = net_speed.plan(bench_args(step))
            compiles = p["triton_compiles"]
            expected = T_PYTHON_START + compiles * T_TRITON_COMPILE + p["bench_s"]
            note = f"{p['rows']} rows, {p['timed']} timed runs"
        elif step.name in ("gather_speed", "prune_speed"):
            expected = T_PYTHON_START + (8.0 if step.name == "gather_speed" else 15.0)
        rows.append({"step": step.name, "timeout_s": step.timeout_s, "expected_s": round(expected, 1),
                     "triton_compiles": compiles, "inductor_compiles": inductor, "when": step.when,
                     "what": step.what, "note": note})  # fmt: skip
    return rows


def print_plan(rows: list[dict], budget: int) -> None:
    print(f"{'step':16s} {'timeout':>7s} {'expected':>8s} {'compiles':>8s}  what")
    for r in rows:
        comp = str(r["triton_compiles"]) + (f"+{r['inductor_compiles']}i" if r["inductor_compiles"] else "")
        print(f"{r['step']:16s} {r['timeout_s']:6d}s {r['expected_s']:7.0f}s {comp:>8s}  {r['what']}"
              + (f" ({r['note']})" if r["note"] else ""))  # fmt: skip
    expected = sum(r["expected_s"] for r in rows if r["when"] == "always")
    print(f"expected (every build works): {expected:.0f} s of the {budget} s budget")
    print(f"worst case: {PREFLIGHT_S} s preflight + {budget} s budget + {KILL_GRACE_S} s kill grace = "
          f"{worst_case_s(budget)} s (limit {LIMIT_S} s); a step never starts with < {MIN_STEP_S} s left")
    print("(compiles: Triton variants, +Ni: torch.compile graphs; time model in benchmarks/gpu_check.py)")


# ---------------------------------------------------------------------------------------------
# The run.


class Runner:
    def __init__(self, python: str, logs: str, budget: int) -> None:
        self.python, self.logs, self.budget = python, logs, budget
        self.start = time.monotonic()
        self.summary: list[str] = []
        self.status: dict[str, str] = {}
        self.failed = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def note(self, line: str) -> None:
        self.summary.append(line)
        self.write_summary()

    def write_summary(self) -> None:
        path = os.path.join(self.logs, "summary.txt")
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(self.summary) + "\n")
        os.replace(path + ".tmp", path)

    def run(self, step: Step) -> str:
        """Run ``step`` under its timeout and the budget; returns ``ok``/``failed``/``timeout``/``skipped``."""
        left = self.budget - self.elapsed()
        limit = int(min(step.timeout_s, left))
        if limit < MIN_STEP_S:
            self.failed = True
            self.status[step.name] = "skipped"
            self.note(f"{step.name}: SKIPPED (budget spent: {left:.0f} s left)")
            return "skipped"
        argv = [self.python if a == "{py}" else a for a in step.argv]
        print(f"== {step.name} (timeout {limit}s, {self.elapsed():.0f}s elapsed)", flush=True)
        log_path = os.path.join(self.logs, f"{step.name}.log")
        began = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, **step.env), start_new_session=True)  # fmt: skip
            try:
                rc = proc.wait(timeout=limit)
                outcome = "ok" if rc == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc, outcome = None, "timeout"
        took = time.monotonic() - began
        tail = _tail(log_path, 25)
        print(tail, flush=True)
        last = tail.strip().splitlines()[-1] if tail.strip() else ""
        if outcome == "ok":
            line = f"{step.name}: {last}" if step.name in ("env", "ext") else f"{step.name}: ok ({took:.0f}s)"
        elif outcome == "timeout":
            line = f"{step.name}: TIMEOUT after {took:.0f}s (log: {log_path})"
        else:
            line = f"{step.name}: FAILED rc={rc} ({took:.0f}s, log: {log_path})"
        if outcome != "ok":
            self.failed = True
        if step.produces and outcome != "ok":
            line += "; rows finished before it stopped are in " + ", ".join(step.produces)
        self.status[step.name] = outcome
        self.note(line)
        return outcome


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: str, lines: int) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def _preflight(python: str) -> str | None:
    """Why the run cannot start (no torch, no GPU, no triton), or None."""
    def check(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60)

    done = check("import torch")
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["?"])[-1]
        return f"{python} cannot import torch ({why}); name the interpreter that has it: PYTHON=/path/to/python"
    if check("import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)").returncode != 0:
        return f"no CUDA GPU visible to {python}'s torch (torch.cuda.is_available() is False)"
    if check("import triton").returncode != 0:
        return f"triton is not importable by {python}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the plan (no GPU needed) and exit")
    parser.add_argument("--json", action="store_true", help="with --dry-run: the plan as JSON")
    parser.add_argument("--check-only", action="store_true", help="only check for torch, a GPU and triton")
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--budget", type=int, default=BUDGET_S, help=f"seconds for all steps (default {BUDGET_S})")
    parser.add_argument("--logs", default=os.path.join(BENCH, "results", "gpu_check_logs"))
    parser.add_argument("--caller-cwd", default=os.getcwd(), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    python = os.environ.get("PYTHON") or sys.executable
    if args.dry_run:
        rows = plan(python)
        if args.json:
            print(json.dumps({"budget_s": args.budget, "worst_case_s": worst_case_s(args.budget),
                              "limit_s": LIMIT_S, "steps": rows}, indent=1))  # fmt: skip
        else:
            print_plan(rows, args.budget)
        return 0
    why = _preflight(python)
    if why:
        print(f"error: {why}", file=sys.stderr)
        return 2
    if args.check_only:
        subprocess.run([python, "-c", "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', "
                        "torch.__version__)"])  # fmt: skip
        return 0
    logs = os.path.join(args.caller_cwd, args.logs)
    os.makedirs(logs, exist_ok=True)
    os.environ.setdefault("PIP_NO_INDEX", "1")
    os.environ.setdefault("MAX_JOBS", "16")
    runner = Runner(python, logs, args.budget)
    built = False
    for step in STEPS:
        if step.name.startswith(("build", "install")) and args.skip_build:
            continue
        if step.when == "build_failed" and built:
            continue
        if step.name == "tests" and "MISSING pytest" in runner.summary[0]:
            runner.failed = True
            runner.note("tests: SKIPPED (pytest is not installed)")
            continue
        outcome = runner.run(step)
        if step.name.startswith(("build", "install")) and outcome == "ok":
            built = True
    if not args.skip_build and not built:
        runner.failed = True
    print()
    print(f"gpu_check summary ({runner.elapsed():.0f}s of {args.budget}s):")
    for line in runner.summary:
        print(f"  {line}")
    print("JSONs: benchmarks/results/*_cuda*.json -- commit them with the env line above.")
    return 1 if runner.failed else 0


if __name__ == "__main__":
    sys.exit(main())
