"""Options more than one command takes."""

from __future__ import annotations

import argparse


def add_threads_argument(p: argparse.ArgumentParser, default: str) -> None:
    """``--threads``: a count or ``auto`` (resolved by :func:`rnip_ext.app.spec.parse_threads`)."""
    p.add_argument("--threads", default=default,
                   help="CPU threads for torch: a number, or 'auto' (the CPUs not busy by the load average; torch's "
                        "setting when OMP_NUM_THREADS is set)")
