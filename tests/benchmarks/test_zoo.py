"""benchmarks/zoo.py's bookkeeping (the zoo itself is tests/pruning/test_zoo.py's)."""

import os
import random

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def _run(seconds, works=True):
    return {"wall_s": 1.0, "ratio": {"works": works, "seconds": seconds, "plan_s": seconds / 3, "exact": True}}


def test_repeats_keep_every_run_and_report_medians(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import zoo

    times = [random.uniform(0.01, 1.0) for _ in range(5)]
    first = _run(times[0])
    for t in times[1:]:
        zoo.add_repeat(first, _run(t))
    zoo.add_repeat(first, _run(99.0, works=False))  # a failed rerun has no timing to add
    zoo.take_medians(first)
    ratio = first["ratio"]
    assert ratio["runs"]["seconds"] == times
    assert ratio["seconds"] == sorted(times)[2]
    assert abs(ratio["plan_s"] - sorted(t / 3 for t in times)[2]) < 1e-12
    assert ratio["exact"] is True and set(ratio["runs"]) == {"seconds", "plan_s"}


def test_a_single_run_is_left_as_it_is(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import zoo

    only = _run(0.5)
    zoo.take_medians(only)
    assert only == _run(0.5)
    failed = {"ratio": {"works": False, "error": "x"}}
    zoo.add_repeat(failed, _run(0.5))
    assert failed == {"ratio": {"works": False, "error": "x"}}
