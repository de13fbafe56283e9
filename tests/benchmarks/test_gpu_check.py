"""benchmarks/gpu_check.sh without a GPU: it refuses, its dry run proves the time box, and its
steps run in order, time-boxed, under a stand-in interpreter that answers like a CUDA machine
(so the runner's own logic is tested here)."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_gpu_check_script_parses_and_refuses_without_a_gpu():
    assert subprocess.run(["bash", "-n", SCRIPT]).returncode == 0
    done = subprocess.run(["bash", SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "usage" in done.stdout.lower() and "set -u" not in done.stdout
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable)
    done = subprocess.run(["bash", SCRIPT, "--check-only"], capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip
    if done.returncode == 0:
        pytest.skip(reason="a CUDA GPU is visible here: the script would run for real")
    assert done.returncode == 2 and "error: no CUDA GPU visible" in done.stderr


def test_dry_run_lists_every_step_and_fits_ten_minutes():
    """The plan: every step with its timeout, expected compiles and time; the worst case (budget
    + kill grace + preflight) <= 600 s, the expected run well inside the budget, no step expected
    to reach its timeout; the benchmarks' compiles counted from their launches (meta tensors)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bn_speed
    import gpu_check
    import gpu_tests

    done = subprocess.run(["bash", SCRIPT, "--dry-run", "--json"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable))  # fmt: skip
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    steps = {r["step"]: r for r in plan["steps"]}
    assert list(steps) == [s.name for s in gpu_check.STEPS]
    assert plan["worst_case_s"] <= plan["limit_s"] == 600
    always = [r for r in plan["steps"] if r["when"] == "always"]
    assert sum(r["expected_s"] for r in always) <= 0.85 * plan["budget_s"]
    for r in plan["steps"]:
        assert 0 < r["expected_s"] <= 0.9 * r["timeout_s"], r
    assert steps["tests"]["triton_compiles"] == gpu_tests.COMPILE_BUDGET
    bench = bn_speed.plan(["--device", "cuda"])
    assert steps["bn_speed"]["triton_compiles"] == bench["triton_compiles"] > 20
    assert steps["bn_compiled"]["inductor_compiles"] == 5 and steps["net_speed"]["triton_compiles"] > 0
    text = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHON=sys.executable)).stdout  # fmt: skip
    assert "worst case" in text and all(name in text for name in steps)


def test_bn_speed_puts_the_targets_first():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bn_speed

    rows = bn_speed.combos({k: bn_speed.SHAPES[k] for k in ("resnet50_imagenet", "vgg16_cifar")},
                           ["fp32"], ["nchw"], ["fwd", "fwdbwd"])  # fmt: skip
    sets = [(s, tuple(shape), mode) for s, shape, _, _, mode in rows]
    assert all(mode == "fwdbwd" for _, _, mode in sets[:13]) and sets[13][2] == "fwd"
    assert [s for s, _, _ in sets[:5]] == ["vgg16_cifar"] * 5
    assert {shape for _, shape, _ in sets[5:9]} == set(bn_speed.LARGE)


def fake_python(tmp_path, *, builds_fail: int = 0, hang: str = "", pytest_missing: bool = False):
    """A stand-in interpreter: runs benchmarks/gpu_check.py with the real one, answers the other
    calls like a CUDA machine and logs them; the first ``builds_fail`` pip installs fail; a
    ``hang`` script sleeps (in a child process) until killed."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    deps = "MISSING pytest" if pytest_missing else "ok"
    fake.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        case "$1" in *gpu_check.py) exec {sys.executable} "$@" ;; esac
        if [ "$1" = "-c" ]; then
            case "$2" in
                *"test deps"*) echo "python 3.12 | torch fake | FakeGPU | test deps {deps}" ;;
                *channel-gather*) echo "channel-gather op: $(cat {tmp_path}/built 2>/dev/null || echo none)" ;;
            esac
            exit 0
        fi
        echo "build=${{RNIP_EXT_BUILD:-}} dev=${{RNIP_TEST_DEVICE:-}} $*" >> {calls}
        if [ "$1 $2" = "-m pip" ]; then
            n=$(grep -c -- "-m pip" {calls})
            if [ "$n" -le {builds_fail} ]; then echo "nvcc failed" >&2; exit 1; fi
            echo "$RNIP_EXT_BUILD" > {tmp_path}/built
        fi
        case "$1" in *{hang or "no-such-script"}*) sleep 300 & echo $! > {tmp_path}/sleep.pid; wait ;; esac
        exit 0
        """))
    fake.chmod(0o755)
    return fake, calls


def run_script(tmp_path, fake, *args, timeout=300):
    start = time.monotonic()
    done = subprocess.run(["bash", SCRIPT, "--logs", str(tmp_path / "logs"), *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHON=str(fake)))  # fmt: skip
    assert "gpu_check summary" in done.stdout, done.stdout + done.stderr
    return done, done.stdout[done.stdout.index("gpu_check summary"):], time.monotonic() - start


@pytest.mark.parametrize("builds_fail", [0, 1, 2])
def test_gpu_check_runs_every_step_and_falls_back_to_cheaper_installs(tmp_path, builds_fail):
    fake, calls = fake_python(tmp_path, builds_fail=builds_fail)
    done, summary, _ = run_script(tmp_path, fake)
    assert "env: python 3.12 | torch fake | FakeGPU | test deps ok" in summary
    lines = calls.read_text().splitlines()
    pips = [line.split()[0] for line in lines if " -m pip install " in line]
    assert pips == ["build=auto", "build=cpu", "build=none"][: builds_fail + 1]
    installed = ["auto", "cpu", "none"][builds_fail]
    assert f"ext: channel-gather op: {installed}" in summary  # which op the later steps use
    assert done.returncode == (1 if builds_fail else 0), done.stdout + done.stderr
    if builds_fail:
        assert "build: FAILED rc=1" in summary
    (tests_call,) = [line for line in lines if "gpu_tests.py" in line]
    assert "dev=cuda" in tests_call and "--workers 4" in tests_call
    scripts = [line.split()[2] for line in lines if " benchmarks/" in line]
    assert scripts == ["benchmarks/gpu_tests.py", "benchmarks/bn_speed.py", "benchmarks/net_speed.py",
                       "benchmarks/bn_speed.py", "benchmarks/gather_speed.py", "benchmarks/prune_speed.py"]
    for step in ("tests", "bn_speed", "net_speed", "bn_compiled", "gather_speed", "prune_speed"):
        assert f"{step}: ok" in summary and (tmp_path / "logs" / f"{step}.log").exists()
    assert (tmp_path / "logs" / "summary.txt").read_text().splitlines()[0].startswith("env: python 3.12")


def test_gpu_check_kills_a_hung_step_and_keeps_to_its_budget(tmp_path):
    """A step that never ends is killed (its child processes too) when the budget runs out; the
    steps after it are skipped and named, and the run ends within budget + grace."""
    fake, calls = fake_python(tmp_path, hang="net_speed.py")
    done, summary, took = run_script(tmp_path, fake, "--budget", "25")
    assert done.returncode == 1
    assert "net_speed: TIMEOUT" in summary and "net_speed_cuda.json" in summary  # rows kept
    for step in ("bn_compiled", "gather_speed", "prune_speed"):
        assert f"{step}: SKIPPED (budget spent" in summary
    assert took < 25 + 10 + 15
    sleeper = int((tmp_path / "sleep.pid").read_text())  # the hung step's child: killed with it
    time.sleep(1)
    status = f"/proc/{sleeper}/status"
    assert not os.path.exists(status) or "zombie" in open(status).read()


def test_gpu_check_names_missing_test_dependencies(tmp_path):
    fake, calls = fake_python(tmp_path, pytest_missing=True)
    done, summary, _ = run_script(tmp_path, fake, "--skip-build")
    assert "test deps MISSING pytest" in summary and "tests: SKIPPED (pytest is not installed)" in summary
    assert done.returncode == 1 and "bn_speed: ok" in summary
    assert not any("-m pip" in line for line in calls.read_text().splitlines())


def test_gpu_check_names_an_interpreter_without_torch(tmp_path):
    no_torch = tmp_path / "python"
    no_torch.write_text('#!/usr/bin/env bash\necho "ModuleNotFoundError: No module named \'torch\'" >&2\nexit 1\n')
    no_torch.chmod(0o755)
    done = subprocess.run(["bash", SCRIPT, "--logs", str(tmp_path / "logs")], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHON=str(no_torch)))  # fmt: skip
    assert done.returncode == 2 and "cannot import torch (ModuleNotFoundError" in done.stderr
    assert "PYTHON=" in done.stderr and not (tmp_path / "logs").exists()


def test_gpu_check_relative_logs_folder_is_taken_from_the_caller(tmp_path):
    fake, _ = fake_python(tmp_path)
    done = subprocess.run(["bash", SCRIPT, "--logs", "here/logs", "--budget", "300"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=dict(os.environ, PYTHON="./python"))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "here" / "logs" / "tests.log").exists()


def test_gpu_test_selection_stays_within_its_compile_budget():
    """benchmarks/gpu_tests.py --count: the GPU test step's selection, run here under the
    interpreter, passes and launches at most COMPILE_BUDGET distinct compiled variants."""
    from rnip_ext._backend import triton_available
    from rnip_ext.kernels._variants import internals_supported

    if not (triton_available() and internals_supported()):
        pytest.skip(reason="counting variants uses Triton internals checked from triton 3.6 on")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_tests.py"), "--count"],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    counted = [line for line in done.stdout.splitlines() if line.startswith("compiled variants:")]
    assert counted and int(counted[0].split()[2]) > 100, done.stdout[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout
