"""The whole-network benchmark (on CPU, tiny settings; no timing asserted)."""

import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def test_net_speed_dry_run_runs_every_variant(monkeypatch):
    """``--dry-run --model tiny``: plain, paper and ours each take a real training step."""
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.setenv("RNIP_BACKEND", "eager")  # CPU: the layer's eager path, as a user gets it
    import net_speed

    payload = net_speed.main(["--dry-run", "--model", "tiny", "--device", "cpu"])
    (row,) = payload["rows"]
    for variant in ("plain", "paper", "ours"):
        assert row[f"{variant}_ms"] > 0 and row[f"{variant}_images_per_s"] > 0, row
    assert row["batch"] == 2 and not any(key.endswith("_error") for key in row)


def test_net_speed_rejects_a_batch_of_one():
    done = subprocess.run([sys.executable, os.path.join(BENCH, "net_speed.py"), "--batch", "1"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "--batch must be >= 2" in done.stderr
