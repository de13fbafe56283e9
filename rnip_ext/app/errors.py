"""How the ``rnip`` command reports mistakes: one ``error: ...`` line and exit status 2.

Commands raise :class:`UserError` for anything the user has to fix (arguments, data, output
directories, run files); :func:`rnip_ext.cli.main` prints it as one line on stderr, without a
traceback. :func:`user_errors` turns the library's own exceptions for bad input into it.
"""

from __future__ import annotations

import contextlib

__all__ = ["Interrupted", "UserError", "user_errors"]


class UserError(Exception):
    """A mistake the user can fix; printed as ``error: <message>``, exit status 2."""


class Interrupted(Exception):
    """Ctrl-C during training: ``saved`` says whether ``run_dir`` holds a resumable checkpoint."""

    def __init__(self, run_dir: str, saved: bool, removed: bool = False) -> None:
        super().__init__(run_dir)
        self.run_dir, self.saved, self.removed = run_dir, saved, removed


@contextlib.contextmanager
def user_errors(*types: type[BaseException], prefix: str = ""):
    """Re-raise ``types`` raised in the block as :class:`UserError` (``prefix`` + their message)."""
    try:
        yield
    except types as exc:
        message = str(exc) if not isinstance(exc, KeyError) else f"missing {exc}"
        raise UserError(prefix + message) from exc
