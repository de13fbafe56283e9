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
        "--warmup", "0", "--curve", "0.2", "0.9", "--out", str(out)])
    assert json.loads(out.read_text())["summary"] == payload["summary"]
    assert payload["environment"]["cpu_threads"] == 1 and "load_average_1min_end" in payload["environment"]
    rows = payload["seeds"][0]["rows"]
    assert [r["plan"] for r in rows][:2] == ["latency", "flops"]
    curve = [r for r in rows if r["plan"] == "curve"]
    assert 1 <= len(curve) <= 2 and all(r["target_flops"] in (0.2, 0.9) for r in curve)
    assert 0 < rows[1]["target_flops"] <= 1 and rows[0]["target_flops"] is None
    full = {"features.1": 32, "features.4": 32, "features.8": 64, "features.11": 64, "features.15": 128}
    for r in rows:
        # round_to=8: every kept width a multiple of 8 (the small VGG's full widths are too), none wider.
        assert set(r["widths"]) == set(full) and all(w % 8 == 0 and 0 < w <= full[k] for k, w in r["widths"].items())
        assert r["widths"] != full and r["flops_fraction"] < 1
        assert 0 < r["importance_kept"] < 1 and r["measured_fraction"] > 0
        assert 0 <= r["test_accuracy_pruned"] <= 1 and 0 <= r["test_accuracy_finetuned"] <= 1
    assert {s["plan"] for s in payload["summary"]} == {"latency", "flops"}
    assert json.loads(out.read_text())["against_curve"] == payload["against_curve"]


def test_values_at_a_latency_interpolate_between_the_nearest_measured_points(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    from latency_accuracy import at_latency

    points = [(0.2, 0.90), (0.5, 0.96), (0.3, 0.94), (0.6, 0.99)]
    assert at_latency(points, 0.4) == pytest.approx(0.95)  # between 0.3 and 0.5, not the outer points
    assert at_latency(points, 0.3) == pytest.approx(0.94)
    assert at_latency(points, 0.1) is None and at_latency(points, 0.7) is None


def test_leads_over_the_curve_are_per_seed_differences_at_equal_latency(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    from latency_accuracy import summarize_curve

    def row(plan, t, lat, imp, acc):
        return {"plan": plan, "target_latency": t, "measured_fraction": lat, "importance_kept": imp,
                "test_accuracy_pruned": acc, "test_accuracy_finetuned": acc}

    seeds = []
    for seed, lead in enumerate([0.01, -0.02, 0.0]):
        curve = [row("curve", None, 0.2, 0.8, 0.90), row("curve", None, 0.6, 1.0, 0.98)]
        seeds.append({"seed": seed, "rows": [row("latency", 0.5, 0.4, 0.95, 0.94 + lead),
                                             row("flops", 0.5, 0.41, 0.9, 0.5),  # the matched plan: not the curve
                                             row("latency", 0.1, 0.1, 0.5, 0.5)] + curve})  # below the curve: left out
    (summary,) = summarize_curve(seeds)
    assert summary["target_latency"] == 0.5 and summary["seeds"] == 3
    assert summary["importance_kept_lead"] == pytest.approx(0.95 - 0.9)
    assert summary["test_accuracy_finetuned_lead"] == pytest.approx((0.01 - 0.02) / 3)
    assert summary["better_equal_worse"] == [1, 1, 1]
    assert summary["test_accuracy_pruned_lead_se"] == pytest.approx(0.0088192, rel=1e-4)  # stdev / sqrt(3)


def test_bad_settings_are_refused(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)
    import latency_accuracy

    with pytest.raises(SystemExit):
        latency_accuracy.main(["--rounds", "0"])
