"""Build script: the Python package plus the optional compiled channel-gather op.

Install with ``pip install --no-build-isolation .`` (or ``-e .``) into an environment that already
has torch. What gets compiled is chosen by ``RNIP_EXT_BUILD``:

* ``auto`` (default): the C++ op when torch is importable, plus the CUDA op when this torch was
  built with CUDA (``torch.version.cuda``) and a CUDA toolkit (``nvcc``) is found;
* ``cpu``: the C++ op only;
* ``cuda``: C++ and CUDA, failing loudly if either is impossible;
* ``none``: no compiled code (the package falls back to ``index_select``).

``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are honoured by torch's build helpers. Nothing here asks
for a GPU (``torch.cuda.is_available()``), runs git or reaches the network.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
BUILD_MODES = ("auto", "cpu", "cuda", "none")


def _log(msg: str) -> None:
    print(f"rnip_ext setup: {msg}", file=sys.stderr)


def _build_mode() -> str:
    mode = os.environ.get("RNIP_EXT_BUILD", "auto").strip().lower()
    if mode not in BUILD_MODES:
        raise SystemExit(f"RNIP_EXT_BUILD must be one of {'|'.join(BUILD_MODES)}, got {mode!r}")
    return mode


def _find_nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _sources(pattern: str) -> list[str]:
    # Relative paths: setuptools rejects absolute source paths in sdists and editable builds.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", pattern)))


def _extensions():
    """The ``rnip_ext._C`` extension (C++ always, CUDA sources when wanted), or nothing."""
    mode = _build_mode()
    if mode == "none":
        _log("RNIP_EXT_BUILD=none: building no compiled extension")
        return [], {}
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

    cpp_sources = _sources("*.cpp")
    if not cpp_sources:
        _log("no C++ sources under csrc/: building no compiled extension")
        return [], {}
    # Sources whose name ends in _cuda.cpp hold the CUDA binding; the rest is host-only.
    host_sources = [s for s in cpp_sources if not s.endswith("_cuda.cpp")]
    cuda_sources = [s for s in cpp_sources if s.endswith("_cuda.cpp")] + _sources("*.cu")

    with_cuda = False
    if mode in ("auto", "cuda") and cuda_sources:
        nvcc = _find_nvcc()
        if torch.version.cuda is None or nvcc is None:
            why = "this torch has no CUDA" if torch.version.cuda is None else "nvcc not found"
            if mode == "cuda":
                raise SystemExit(f"RNIP_EXT_BUILD=cuda but {why}")
            _log(f"{why}: building the C++ op without CUDA")
        else:
            with_cuda = True
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
