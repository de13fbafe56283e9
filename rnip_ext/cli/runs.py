"""Run directories: config, metrics, checkpoints (atomic writes, ``weights_only`` reads)."""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import torch

from .. import __version__

__all__ = ["CheckpointError", "append_jsonl", "load_checkpoint", "read_json", "save_checkpoint", "versions", "write_json"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or belongs to a different run."""


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


def _atomic(path: str, write) -> None:
    # Write beside the target and rename: an interruption never leaves a half-written file
    # where a good one was.
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic(path, write)


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc


def append_jsonl(path: str, obj: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")


def save_checkpoint(path: str, payload: dict) -> None:
    """``torch.save`` of plain tensors and containers only, so it loads with ``weights_only=True``."""
    _atomic(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; a clear :class:`CheckpointError` if it is broken."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is corrupt or not an rnip checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path} is not an rnip checkpoint (no model state)")
    return payload
