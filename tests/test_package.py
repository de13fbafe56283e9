"""Packaging: one version source, imports without optional parts, the build knobs."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rnip_ext

if sys.version_info >= (3, 11):
    import tomllib
else:  # the package supports Python 3.10, whose standard library has no TOML reader
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

ROOT = Path(__file__).resolve().parents[1]


def test_single_version_source():
    assert importlib.metadata.version("rnip_ext") == rnip_ext.__version__
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "rnip_ext._version.__version__"


def test_build_requirements_never_pull_torch():
    # A torch in build-system.requires would make pip fetch a fresh CUDA torch into build isolation.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not any(r.lower().startswith("torch") for r in pyproject["build-system"]["requires"])
    assert "torch>=2.6" in pyproject["project"]["dependencies"]


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import rnip_ext, torch\n"
        "m = rnip_ext.BoundedBatchNorm2d(3)\n"
        "print(tuple(m(torch.randn(2, 3, 4, 4)).shape))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(2, 3, 4, 4)"


def test_kernels_install_inside_the_package_namespace():
    import rnip_ext.kernels

    assert rnip_ext.kernels.__name__ == "rnip_ext.kernels"
    assert Path(rnip_ext.kernels.__file__).parent.name == "kernels"


def run_setup(mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RNIP_EXT_BUILD=mode)
    return subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_setup_rejects_an_unknown_build_mode():
    out = run_setup("bogus")
    assert out.returncode != 0
    assert "RNIP_EXT_BUILD must be one of auto|cpu|cuda|none" in out.stdout + out.stderr


def test_setup_build_none_compiles_nothing():
    out = run_setup("none")
    assert out.returncode == 0, out.stderr
    assert "building no compiled extension" in out.stderr
    assert out.stdout.strip().splitlines()[-1] == rnip_ext.__version__


def test_setup_names_a_too_old_setuptools():
    pretend = ("import runpy, sys, setuptools; setuptools.__version__ = '65.5.0'; "
               "sys.argv = ['setup.py', '--version']; runpy.run_path('setup.py', run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", pretend], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "rnip_ext needs setuptools >= 77.0 to build (found 65.5.0)" in out.stderr


def test_setup_finds_the_toolkit_behind_an_nvcc_wrapper_script(tmp_path):
    # Some images put a wrapper script on PATH (`exec /opt/cuda-X/bin/nvcc "$@"`); torch's own
    # guess would then take the wrapper's folder as the toolkit and miss its headers.
    toolkit = tmp_path / "cuda-x"
    (toolkit / "include").mkdir(parents=True)
    (toolkit / "include" / "cuda_runtime.h").write_text("")
    (toolkit / "bin").mkdir()
    real = toolkit / "bin" / "nvcc"
    real.write_text(f'#!/bin/sh\necho "#$ TOP={toolkit}/bin/.." >&2\n')
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    for script in (real, wrap / "nvcc"):
        script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH")}
    env.update(RNIP_EXT_BUILD="auto", PATH=f"{wrap}{os.pathsep}{env.get('PATH', '')}")
    out = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert f"CUDA toolkit: {toolkit}\n" in out.stderr


def test_setup_names_a_toolkit_without_headers(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (tmp_path / "bin" / "nvcc").chmod(0o755)
    env = dict(os.environ, RNIP_EXT_BUILD="auto", CUDA_HOME=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "setup.py", "--version"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert f"no CUDA toolkit: no include/cuda_runtime.h under CUDA_HOME={tmp_path}" in out.stderr


def test_tiny_train_example_runs_and_reports_importances():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "tiny_train.py"), "--steps", "20"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "importance sigmoid(weight) after training:" in out.stdout
    assert "test accuracy" in out.stdout
