"""benchmarks/gpu_check.sh without a GPU: it refuses, and its steps run in order under a stand-in
interpreter that answers like a CUDA machine (so the script's own logic is tested here)."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_check.sh")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


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


def fake_python(tmp_path, *, cuda_build_fails: bool, xdist: bool):
    """A stand-in interpreter: answers the script's checks like a CUDA machine, logs every call,
    and fails `pip install` unless RNIP_EXT_BUILD=cpu when ``cuda_build_fails``."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        if [ "$1" = "-c" ]; then
            case "$2" in
                *xdist*) exit {0 if xdist else 1} ;;
                *) exit 0 ;;
            esac
        fi
        if [ "$1" = "-" ]; then cat >/dev/null; echo "python 3.12 | torch fake | FakeGPU"; exit 0; fi
        echo "build=${{RNIP_EXT_BUILD:-}} dev=${{RNIP_TEST_DEVICE:-}} $*" >> {calls}
        if [ "$1 $2" = "-m pip" ] && [ "{int(cuda_build_fails)}" = 1 ] && [ "${{RNIP_EXT_BUILD:-}}" != cpu ]; then
            echo "nvcc failed" >&2; exit 1
        fi
        exit 0
        """))
    fake.chmod(0o755)
    return fake, calls


@pytest.mark.parametrize("cuda_build_fails", [False, True])
def test_gpu_check_runs_every_step_and_falls_back_to_a_cpp_build(tmp_path, cuda_build_fails):
    fake, calls = fake_python(tmp_path, cuda_build_fails=cuda_build_fails, xdist=not cuda_build_fails)
    logs = tmp_path / "logs"
    done = subprocess.run(["bash", SCRIPT, "--logs", str(logs), "--budget", "300"], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHON=str(fake)))  # fmt: skip
    summary = done.stdout[done.stdout.index("gpu_check summary"):]
    assert "env: python 3.12 | torch fake | FakeGPU" in summary
    lines = calls.read_text().splitlines()
    pips = [line for line in lines if " -m pip install " in line]
    if cuda_build_fails:
        assert done.returncode == 1
        assert "build: FAILED rc=1" in summary and "build_cpu_only: ok" in summary
        assert [p.split()[0] for p in pips] == ["build=auto", "build=cpu"]
    else:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "build: ok" in summary and "build_cpu_only" not in summary and len(pips) == 1
    (pytest_call,) = [line for line in lines if " -m pytest " in line]
    assert "dev=cuda" in pytest_call and "--maxfail=25" in pytest_call
    assert ("-n 8" in pytest_call) == (not cuda_build_fails)
    scripts = [line.split()[2] for line in lines if " benchmarks/" in line]
    assert scripts == ["benchmarks/bn_speed.py", "benchmarks/net_speed.py", "benchmarks/bn_speed.py",
                       "benchmarks/gather_speed.py", "benchmarks/prune_speed.py"]
    for step in ("tests", "bn_speed", "net_speed", "bn_compiled", "gather_speed", "prune_speed"):
        assert f"{step}: ok" in summary and (logs / f"{step}.log").exists()


def test_gpu_check_names_an_interpreter_without_torch(tmp_path):
    no_torch = tmp_path / "python"
    no_torch.write_text('#!/usr/bin/env bash\necho "ModuleNotFoundError: No module named \'torch\'" >&2\nexit 1\n')
    no_torch.chmod(0o755)
    done = subprocess.run(["bash", SCRIPT, "--logs", str(tmp_path / "logs")], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, PYTHON=str(no_torch)))  # fmt: skip
    assert done.returncode == 2 and "cannot import torch (ModuleNotFoundError" in done.stderr
    assert "PYTHON=" in done.stderr and not (tmp_path / "logs").exists()


def test_gpu_check_relative_logs_folder_is_taken_from_the_caller(tmp_path):
    fake, _ = fake_python(tmp_path, cuda_build_fails=False, xdist=False)
    done = subprocess.run(["bash", SCRIPT, "--logs", "here/logs", "--budget", "300"], capture_output=True,
                          text=True, timeout=300, cwd=tmp_path, env=dict(os.environ, PYTHON="./python"))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "here" / "logs" / "tests.log").exists()
