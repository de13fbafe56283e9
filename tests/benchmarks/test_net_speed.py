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


def test_net_speed_writes_each_row_as_it_finishes(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    monkeypatch.setenv("RNIP_BACKEND", "eager")
    import net_speed

    written = []
    monkeypatch.setattr(net_speed, "write_json",
                        lambda name, payload: written.append((name, dict(payload, rows=list(payload["rows"])))))
    net_speed.main(["--model", "tiny", "--device", "cpu", "--batch", "2", "--repeats", "1", "--amp", "fp32", "bf16"])
    assert [(name, len(p["rows"]), p["complete"]) for name, p in written] == [
        ("net_speed_cpu.json", 1, False), ("net_speed_cpu.json", 2, True)]
    assert all(r["ours_ms"] > 0 for r in written[-1][1]["rows"])
