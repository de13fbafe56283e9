"""Run directories that never lose a user's files: ownership manifest, atomic writes, checkpoints.

Rule (used by ``rnip train``, ``prune``, ``report``, ``demo``): a command writes only into a
directory that does not exist, is empty, or already holds its own kind of output being continued
(``resume``) or replaced (``replace_own``). Anything else is refused with an
:class:`OutputDirError` naming the directory and what is in it, before anything is written.

Every file the project writes into a run directory is first recorded in the directory's
manifest, ``.rnip-manifest.json``::

    {"format": "rnip_ext.run/1", "kind": "train", "files": ["config.json", "last.pt", ...]}

``overwrite`` (and ``replace_own``) delete only the files and sub-runs listed there, and only
when nothing else is in the directory; the current directory and its parents are never cleared.
Every write goes to ``<name>.tmp`` first and is renamed over the target, so an interruption never
leaves a truncated file where a good one was.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import torch

__all__ = [
    "MANIFEST",
    "CheckpointError",
    "OutputDirError",
    "append_jsonl",
    "claim",
    "check",
    "load_checkpoint",
    "read_json",
    "read_manifest",
    "record",
    "release",
    "save_checkpoint",
    "write_json",
]

MANIFEST = ".rnip-manifest.json"
FORMAT = "rnip_ext.run/1"


class CheckpointError(RuntimeError):
    """A checkpoint or run file is missing, corrupt or belongs to a different run."""


class OutputDirError(ValueError):
    """An output directory cannot be used without risking files the project did not write."""


# --- atomic files ----------------------------------------------------------------------------

def _atomic(path: str, write) -> None:
    # Write beside the target and rename: an interruption never leaves a half-written file
    # where a good one was.
    tmp = f"{path}.tmp"
    write(tmp)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    """``obj`` as indented JSON with sorted keys, written atomically."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic(path, write)


def read_json(path: str) -> Any:
    """Parsed JSON; ``FileNotFoundError`` if absent, :class:`CheckpointError` if unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc


def append_jsonl(path: str, obj: Any) -> None:
    """One JSON line appended (metrics logs: a torn last line is dropped on resume)."""
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
        detail = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path} is corrupt or not an rnip checkpoint ({type(exc).__name__}: {detail})") from exc
    if not isinstance(payload, dict) or "model" not in payload:
        raise CheckpointError(f"{path} is not an rnip checkpoint (no model state)")
    return payload


# --- the manifest ----------------------------------------------------------------------------

def read_manifest(directory: str) -> dict | None:
    """The directory's manifest (``{"kind", "files"}``), or ``None`` when it has none or it is unreadable."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    return data


def record(directory: str, *names: str, kind: str | None = None) -> None:
    """Add ``names`` (paths relative to ``directory``) to its manifest, before they are written.

    A directory without a manifest gets one (``kind`` ``None`` unless given): library callers of
    :func:`rnip_ext.training.fit` get the same ownership record as the CLI.
    """
    manifest = read_manifest(directory) or {"format": FORMAT, "kind": kind, "files": []}
    if kind is not None:
        manifest["kind"] = kind
    new = [n for n in names if n not in manifest["files"]]
    if new or kind is not None or not os.path.exists(os.path.join(directory, MANIFEST)):
        manifest["files"] = manifest["files"] + new
        write_json(os.path.join(directory, MANIFEST), manifest)


def _describe(entries: list[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(entries)[:limit])
    return shown + (f" and {len(entries) - limit} more" if len(entries) > limit else "")


def _legacy_kind(directory: str) -> str | None:
    """Runs written before manifests existed: a ``config.json`` beside ``last.pt`` or ``summary.json``."""
    try:
        config = read_json(os.path.join(directory, "config.json"))
    except (OSError, CheckpointError):
        return None
    if not isinstance(config, dict):
        return None
    if not any(os.path.exists(os.path.join(directory, f)) for f in ("last.pt", "summary.json")):
        return None
    return "prune" if "source_run" in config else "train"


def _owned(directory: str) -> tuple[list[str], list[str]]:
    """``(ours, foreign)``: paths under ``directory`` its manifest claims (sub-runs recursively,
    children before their directory, each manifest after what it lists), and entries it does not.
    ``<name>.tmp`` belongs to whoever owns ``name``."""
    manifest = read_manifest(directory)
    listed = set(manifest["files"]) if manifest else set()
    ours, foreign = [], []
    for entry in os.listdir(directory):
        path = os.path.join(directory, entry)
        base = entry[:-4] if entry.endswith(".tmp") else entry
        if entry == MANIFEST and manifest is not None:
            continue
        if base not in listed:
            foreign.append(entry)
        elif os.path.isdir(path) and not os.path.islink(path):
            sub_ours, sub_foreign = _owned(path)
            ours.extend(sub_ours)
            foreign.extend(os.path.join(entry, f) for f in sub_foreign)
            ours.append(path)
        else:
            ours.append(path)
    if manifest is not None:  # last: removed after everything it lists
        ours.append(os.path.join(directory, MANIFEST))
    return ours, foreign


def _protected(directory: str) -> bool:
    """The current directory or one of its parents (or the filesystem root)."""
    target = os.path.realpath(directory)
    cwd = os.path.realpath(os.getcwd())
    return target == cwd or cwd.startswith(target.rstrip(os.sep) + os.sep) or target == os.path.dirname(target)


# The files a run directory gets from rnip (what a run from before the manifest can be credited with).
RUN_FILES = frozenset({"config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "pruned.pt",
                       "budget_training.png"})


def refuse_overlap(directory: str, inputs) -> None:
    """:class:`OutputDirError` when ``directory`` is one of the run directories ``inputs`` a command
    reads, or contains one: replacing the output would delete the command's own input."""
    out = os.path.realpath(directory)
    for source in inputs:
        src = os.path.realpath(source)
        if src == out or src.startswith(out.rstrip(os.sep) + os.sep):
            raise OutputDirError(f"--out {directory} is (or contains) the input run {source}: choose another --out")


def check(directory: str, kind: str, *, resume: bool = False, overwrite: bool = False,
          replace_own: bool = False, hint: str = "") -> str:
    """Decide, without writing anything, how ``directory`` may be used by a command of ``kind``.

    Returns ``"new"`` (absent or empty), ``"resume"`` (holds a ``kind`` run and ``resume``) or
    ``"replace"`` (holds only files the project wrote, and ``overwrite``, or ``replace_own`` with
    a ``kind`` manifest). Raises :class:`OutputDirError` otherwise, naming what is there.
    ``hint`` is appended to the messages (e.g. which flag to pass).
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputDirError(f"{directory} exists and is not a directory")
    if not os.path.isdir(directory) or not os.listdir(directory):
        if resume:
            raise OutputDirError(f"--resume but {directory} holds no {kind} run")
        return "new"
    manifest = read_manifest(directory)
    found = manifest.get("kind") if manifest else _legacy_kind(directory)
    entries = os.listdir(directory)
    if resume:
        if found != kind:
            what = f"a {found} run" if found else _describe(entries)
            raise OutputDirError(f"--resume but {directory} holds no {kind} run (it holds {what})")
        return "resume"
    if overwrite or (replace_own and manifest is not None and found == kind):
        if _protected(directory):
            raise OutputDirError(f"refusing to clear {directory}: it is the current directory or one of its parents")
        if manifest is None:
            raise OutputDirError(f"{directory} holds files rnip did not record writing ({_describe(entries)}); "
                                 "nothing was deleted: choose another --out")
        _, foreign = _owned(directory)
        if foreign:
            raise OutputDirError(f"{directory} holds files rnip did not write ({_describe(foreign)}); nothing was "
                                 "deleted: move them away or choose another --out")
        return "replace"
    if found == kind:
        raise OutputDirError(f"{directory} already holds a {kind} run; {hint or 'choose another --out'}")
    what = f"a {found} run" if found else _describe(entries)
    raise OutputDirError(f"{directory} is not empty (it holds {what}); choose another --out")


def claim(directory: str, kind: str, mode: str) -> bool:
    """Make ``directory`` ready after :func:`check` said ``mode``; ``True`` if this call created it.

    ``"replace"`` deletes the files the manifest lists (sub-runs included), nothing else.
    """
    created = not os.path.isdir(directory)
    if mode == "replace":
        ours, foreign = _owned(directory)
        if foreign:  # changed since check(): stay safe
            raise OutputDirError(f"{directory} holds files rnip did not write ({_describe(foreign)})")
        for path in ours:  # children come before their directory
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)
            else:
                os.remove(path)
    os.makedirs(directory, exist_ok=True)
    if mode != "resume" or read_manifest(directory) is None:
        # A run written before manifests existed: record only the files rnip itself writes, never
        # the user's own files beside them (a later --overwrite deletes what is recorded).
        files = [] if mode != "resume" else [e for e in os.listdir(directory) if e in RUN_FILES]
        write_json(os.path.join(directory, MANIFEST), {"format": FORMAT, "kind": kind, "files": files})
    return created


def release(directory: str, created: bool, keep: tuple[str, ...] = ("last.pt", "best.pt", "summary.json")) -> bool:
    """After a failure: remove ``directory`` if this command created it and nothing in ``keep``
    was written there yet (so a failed command leaves no empty or useless output behind).

    Only files the manifest lists are removed, and the directory only if it is then empty.
    Returns whether the directory is gone.
    """
    if not created or not os.path.isdir(directory):
        return False
    if any(os.path.exists(os.path.join(directory, k)) for k in keep):
        return False
    ours, foreign = _owned(directory)
    if foreign:
        return False
    for path in ours:
        if os.path.isdir(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                os.rmdir(path)
        elif os.path.exists(path):
            os.remove(path)
    try:
        os.rmdir(directory)
    except OSError:
        return False
    return True
