"""Run directories: config, metrics, checkpoints (atomic writes, ``weights_only`` reads).

The implementation lives in :mod:`rnip_ext.rundir` (the library's); this module keeps the names
the commands import, plus :func:`versions`.
"""

from __future__ import annotations

import platform
from typing import Any

import torch

from .. import __version__
from ..rundir import CheckpointError, append_jsonl, load_checkpoint, read_json, save_checkpoint, write_json

__all__ = ["CheckpointError", "append_jsonl", "load_checkpoint", "read_json", "save_checkpoint", "versions", "write_json"]


def versions() -> dict[str, Any]:
    """Library, torch and platform versions recorded with every run."""
    info = {"rnip_ext": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info
