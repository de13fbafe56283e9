"""Build script: the Python package plus the optional compiled channel-gather op.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) into an environment that already
has torch. What gets compiled is chosen by ``RNIP_EXT_BUILD``:

* ``auto`` (default): the C++ op when torch is importable, plus the CUDA op when this torch was
  built with CUDA (``torch.version.cuda``) and a CUDA toolkit (``nvcc``) is found;
* ``cpu``: the C++ op only;
* ``cuda``: C++ and CUDA, failing loudly if either is impossible;
* ``none``: no compiled code (the package falls back to ``index_select``).

``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are honoured by torch's build helpers. Without
``TORCH_CUDA_ARCH_LIST``, torch compiles for the GPUs it sees; where it sees none (a build machine
without a GPU) this script sets ``DEFAULT_CUDA_ARCHS`` instead of letting torch's helper fail. The
CUDA toolkit is ``CUDA_HOME`` (or ``CUDA_PATH``), else the one the ``nvcc`` on ``PATH`` belongs to,
followed through symlinks and wrapper scripts; a toolkit without ``include/cuda_runtime.h`` counts
as not found. Nothing here runs git or reaches the network.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import setuptools
from setuptools import find_packages, setup

# pyproject.toml's SPDX `license = "MIT"` (PEP 639) is read from setuptools 77 on; older ones stop
# with an obscure schema error, and --no-build-isolation builds use whatever setuptools is there.
MIN_SETUPTOOLS = (77, 0)
_found = tuple(int(p) if p.isdigit() else 0 for p in setuptools.__version__.split(".")[:2])
if _found < MIN_SETUPTOOLS:
    raise SystemExit(
        f"rnip_ext needs setuptools >= {'.'.join(map(str, MIN_SETUPTOOLS))} to build (found "
        f"{setuptools.__version__}): pip install -U 'setuptools>=77', then build again"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_MODES = ("auto", "cpu", "cuda", "none")
# Compute capabilities built when no GPU is visible and TORCH_CUDA_ARCH_LIST is unset: Turing to
# Hopper (every one CUDA 12 and 13 still compile for), plus PTX that newer GPUs JIT-compile.
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;8.9;9.0+PTX"


def _log(msg: str) -> None:
    print(f"rnip_ext setup: {msg}", file=sys.stderr)


def _build_mode() -> str:
    mode = os.environ.get("RNIP_EXT_BUILD", "auto").strip().lower()
    if mode not in BUILD_MODES:
        raise SystemExit(f"RNIP_EXT_BUILD must be one of {'|'.join(BUILD_MODES)}, got {mode!r}")
    return mode


def _toolkit_root(nvcc: str) -> str:
    """The CUDA toolkit an ``nvcc`` belongs to: ``<root>/bin/nvcc`` after symlinks, else the
    ``TOP`` a dry run reports (``nvcc`` can be a wrapper script, e.g. ``exec /opt/cuda/bin/nvcc``)."""
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _has_headers(root):
        return root
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return root
    top = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(top.group(1).strip()) if top else root


def _has_headers(home: str) -> bool:
    """``cuda_runtime.h`` in ``include/`` or, as conda's CUDA 12+ packages lay it out, in
    ``targets/<platform>/include/``."""
    return os.path.exists(os.path.join(home, "include", "cuda_runtime.h")) or bool(
        glob.glob(os.path.join(home, "targets", "*", "include", "cuda_runtime.h"))
    )


def _find_cuda_home() -> tuple[str | None, str]:
    """``(toolkit root, "")`` when a CUDA toolkit with its headers is found, else ``(None, why)``."""
    var = "CUDA_HOME" if os.environ.get("CUDA_HOME") else "CUDA_PATH"
    home = os.environ.get(var)
    if home:
        where = f"{var}={home}"
    else:
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            return None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
        home, where = _toolkit_root(nvcc), f"the toolkit of {nvcc}"
    if not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return None, f"no bin/nvcc under {where} ({home})"
    if not _has_headers(home):
        return None, f"no include/cuda_runtime.h under {where} ({home}): set CUDA_HOME"
    return home, ""


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute source paths in sdists and editable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def _extensions():
    """The ``rnip_ext._C`` extension (C++ always, CUDA sources when wanted), or nothing."""
    mode = _build_mode()
    if mode == "none":
        _log("RNIP_EXT_BUILD=none: building no compiled extension")
        return [], {}
    cuda_home, no_cuda_why = _find_cuda_home() if mode in ("auto", "cuda") else (None, "")
    if mode in ("auto", "cuda") and cuda_home is None:
        _log(f"no CUDA toolkit: {no_cuda_why}")
    if cuda_home is not None:
        _log(f"CUDA toolkit: {cuda_home}")
        # torch's build helpers read the toolkit from here when they are imported.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        if mode != "auto":
            raise SystemExit(
                f"RNIP_EXT_BUILD={mode} needs torch in the build environment: install torch first "
                "and build with `pip install --no-build-isolation .`"
            )
        _log("torch is not importable here (build isolation?): building no compiled extension")
        return [], {}
    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home  # in case torch imported its helpers before us

    cpp_sources = _sources("*.cpp")
    if not cpp_sources:
        _log("no C++ sources under csrc/: building no compiled extension")
        return [], {}
    # Sources whose name ends in _cuda.cpp hold the CUDA binding; the rest is host-only.
    host_sources = [s for s in cpp_sources if not s.endswith("_cuda.cpp")]
    cuda_sources = [s for s in cpp_sources if s.endswith("_cuda.cpp")] + _sources("*.cu")

    with_cuda = False
    if mode in ("auto", "cuda") and cuda_sources:
        if torch.version.cuda is None or cuda_home is None:
            why = "this torch has no CUDA" if torch.version.cuda is None else no_cuda_why
            if mode == "cuda":
                raise SystemExit(f"RNIP_EXT_BUILD=cuda but {why}")
            _log(f"{why}: building the C++ op without CUDA")
        else:
            with_cuda = True
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
            if archs in ("", "native") and not torch.cuda.is_available():
                # torch would compile for the visible GPUs, and with none its helper fails.
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
                _log(f"no GPU visible and TORCH_CUDA_ARCH_LIST={archs or 'unset'}: building for "
                     f"{DEFAULT_CUDA_ARCHS}")
    elif mode == "cuda":
        raise SystemExit("RNIP_EXT_BUILD=cuda but there are no CUDA sources under csrc/")

    cxx_flags = ["-O3", "-std=c++17"]
    # at::parallel_for is an inline template: without -fopenmp at compile time the CPU kernel
    # runs on one thread. Only compile with it; the symbols resolve against torch's own libgomp.
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        cxx_flags.append("-fopenmp")
    # torch's extension builder defines Py_LIMITED_API itself for py_limited_api=True builds.
    macros = []
    if with_cuda:
        macros.append(("RNIP_EXT_WITH_CUDA", None))
        ext = cpp_extension.CUDAExtension(
            "rnip_ext._C",
            host_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            define_macros=macros,
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            "rnip_ext._C",
            host_sources,
            extra_compile_args={"cxx": cxx_flags},
            define_macros=macros,
            py_limited_api=True,
        )
    _log(f"building rnip_ext._C ({'C++ + CUDA' if with_cuda else 'C++'})")
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["rnip_ext", "rnip_ext.*"])
    + ["rnip_ext.kernels" + sub[len("kernels") :] for sub in find_packages(include=["kernels*"])],
    # The Triton kernels live in the top-level kernels/ folder but install as rnip_ext.kernels:
    # a top-level `kernels` package would clash with an unrelated PyPI project.
    package_dir={"rnip_ext": "rnip_ext", "rnip_ext.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
