"""Which implementation of bounded BN runs: the Triton kernels or the eager PyTorch reference.

:func:`resolve_backend` decides per input. The choice comes from the caller (a module's
``backend=`` argument) when given, else from the environment variable ``RNIP_BACKEND``
(``triton``, ``eager`` or ``auto``; default ``auto``):

* ``auto``: Triton for CUDA tensors when Triton is importable, eager otherwise;
* ``eager``: always the PyTorch reference (``rnip_ext.functional``);
* ``triton``: always the kernels. On CPU tensors that needs the Triton interpreter
  (``TRITON_INTERPRET=1``, set before ``rnip_ext.kernels`` is first imported): slow, for tests.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

__all__ = ["BACKENDS", "ENV_VAR", "resolve_backend", "triton_available", "require_triton"]

BACKENDS = ("triton", "eager", "auto")
ENV_VAR = "RNIP_BACKEND"


_triton_ok: bool | None = None  # the cached answer of triton_available()


def _probe_triton() -> bool:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception:  # ImportError, or a broken install raising something else at import
        return False
    return True


# A constant to torch.compile: Dynamo must not trace the import machinery inside a module's
# forward (it refuses importlib), and the answer cannot change within a process anyway.
@torch.compiler.assume_constant_result
def triton_available() -> bool:
    """Whether ``import triton`` works here (cached: checked once per process)."""
    global _triton_ok
    if _triton_ok is None:
        _triton_ok = _probe_triton()
    return _triton_ok


def require_triton() -> None:
    """Raise a ``RuntimeError`` with the fix when Triton cannot be imported."""
    if not triton_available():
        raise RuntimeError(
            "the Triton backend of rnip_ext needs Triton, which is not importable here: "
            "`pip install triton` (or `pip install rnip_ext[triton]`), or use the eager backend "
            f"({ENV_VAR}=eager, or backend='eager')"
        )


def _normalise(value: object, source: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {value!r}")
    return value.strip().lower()


def resolve_backend(x: Tensor, requested: str | None = None) -> str:
    """``"triton"`` or ``"eager"`` for input ``x``.

    Args:
        x: the input tensor (its device decides ``auto``).
        requested: ``"triton"``, ``"eager"``, ``"auto"`` or ``None``; ``None`` defers to the
            ``RNIP_BACKEND`` environment variable (read on every call), which defaults to ``auto``.

    Raises:
        ValueError: an unknown backend name, or ``"triton"`` for a CPU tensor without
            ``TRITON_INTERPRET=1``.
        RuntimeError: ``"triton"`` requested but Triton is not importable.
    """
    if requested is None:
        from_env = os.environ.get(ENV_VAR)
        # Unset is the common case: skip the parsing (this runs on every layer forward).
        choice = "auto" if not from_env else _normalise(from_env, f"the {ENV_VAR} environment variable")
    else:
        choice = _normalise(requested, "backend")
    if choice == "eager":
        return "eager"
    if choice == "auto":
        return "triton" if x.is_cuda and triton_available() else "eager"
    require_triton()
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            "the triton backend was requested for a CPU tensor: Triton kernels run on CPU only "
            "under the interpreter (set TRITON_INTERPRET=1 before rnip_ext.kernels is imported; "
            "slow, meant for tests); use backend='eager' or 'auto' for CPU tensors"
        )
    return "triton"
