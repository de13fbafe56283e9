"""benchmarks/latency_accuracy.py on its smallest setting: both plans run, are pruned, fine-tuned and reported."""

import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(ROOT, "benchmarks")


def test_the_smallest_setting_reports_both_plans(tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn")
    monkeypatch.syspath_prepend(BENCH)
    import latency_accuracy

    out = tmp_path / "la.json"
    payload = latency_accuracy.main([
        "--seeds", "0", "--epochs", "1", "--finetune", "1", "--targets", "0.6", "--points", "2",
        "--table-warmup", "0", "--table-repeats", "1", "--refine", "0", "--match-steps", "1", "--rounds", "1",
        "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == payload["summary"]
    assert payload["environment"]["cpu_threads"] == 1 and "load_average_1min_end" in payload["environment"]
    rows = payload["seeds"][0]["rows"]
    assert [r["plan"] for r in rows] == ["latency", "flops"]
    assert 0 < rows[1]["target_flops"] <= 1 and rows[0]["target_flops"] is None
    full = {"features.1": 32, "features.4": 32, "features.8": 64, "features.11": 64, "features.15": 128}
    for r in rows:
        # round_to=8: every kept width a multiple of 8 (the small VGG's full widths are too), none wider.
        assert set(r["widths"]) == set(full) and all(w % 8 == 0 and 0 < w <= full[k] for k, w in r["widths"].items())
        assert r["widths"] != full and r["flops_fraction"] < 1
        assert 0 < r["importance_kept"] < 1 and r["measured_fraction"] > 0
        assert 0 <= r["test_accuracy_pruned"] <= 1 and 0 <= r["test_accuracy_finetuned"] <= 1
    assert {s["plan"] for s in payload["summary"]} == {"latency", "flops"}


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import latency_accuracy

    with pytest.raises(SystemExit):
        latency_accuracy.main(["--rounds", "0"])
