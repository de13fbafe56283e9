"""rnip_ext.app.demo: the demo pipeline's report, its statistics, and the README's table."""

import json
import os
import re
import statistics

import numpy as np
import pytest

from rnip_ext.app import demo
from rnip_ext.budget import START_STRENGTH
from rnip_ext.rundir import MANIFEST

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fake_results(rng, methods, seeds, targets):
    """Summaries shaped like `rnip train` / `rnip prune`'s (and the budget runs'), with random numbers."""
    results = {}
    for method in methods:
        for seed in seeds:
            flops0 = int(rng.integers(10**6, 10**7))
            if method == demo.BUDGET_METHOD:
                results[(method, seed)] = (None, {f"f{round(t * 100):g}": {
                    "test_accuracy": float(rng.random()), "params": int(rng.integers(100, 1000)),
                    "flops": int(t * flops0 * rng.uniform(0.8, 1.0)), "flops_before": flops0,
                    "images_per_s": float(rng.uniform(1e3, 1e5)), "training_compute": float(rng.uniform(0.3, 1)),
                } for t in targets})
                continue
            train = {"test_accuracy": float(rng.random()), "params": int(rng.integers(1000, 10**5)), "flops": flops0}
            prunes = {}
            for t in targets:
                prunes[f"f{round(t * 100):g}"] = {
                    "accuracy_after_pruning": float(rng.random()), "test_accuracy": float(rng.random()),
                    "params": int(rng.integers(100, 1000)), "flops": int(t * flops0 * rng.uniform(0.8, 1.0)),
                    "flops_before": flops0, "images_per_s_before": float(rng.uniform(1e3, 1e4)),
                    "images_per_s_after": float(rng.uniform(1e3, 1e5)),
                }
            results[(method, seed)] = (train, prunes)
    return results


def test_aggregate_is_mean_and_sample_sd_over_seeds():
    rng = np.random.default_rng(int(np.random.randint(2**31)))
    targets = (0.5, 0.1)
    results = _fake_results(rng, ("rni", "none", demo.BUDGET_METHOD), (0, 1, 2), targets)
    rows = demo.aggregate(results, targets, epochs=7, finetune_epochs=3)
    assert [(r["method"], r["pruned"], r["target"]) for r in rows] == [
        ("rni", False, 1.0), ("rni", True, 0.5), ("rni", True, 0.1),
        ("none", False, 1.0), ("none", True, 0.5), ("none", True, 0.1),
        (demo.BUDGET_METHOD, True, 0.5), (demo.BUDGET_METHOD, True, 0.1)]
    for r in rows:
        per_seed = [results[(r["method"], s)] for s in (0, 1, 2)]
        if r["budget_run"]:
            bs = [p[f"f{round(r['target'] * 100)}"] for _, p in per_seed]
            expect = {"acc_pruned": [b["test_accuracy"] for b in bs],
                      "training_compute": [b["training_compute"] for b in bs],
                      "macs_fraction": [b["flops"] / b["flops_before"] for b in bs]}
            assert r["acc_finetuned"] is None and r["train_epochs"] == 7
        elif r["pruned"]:
            ps = [p[f"f{round(r['target'] * 100)}"] for _, p in per_seed]
            frac = [p["flops"] / p["flops_before"] for p in ps]
            # (7 epochs x full MACs + 3 fine-tuning epochs x pruned MACs) / (7 x full MACs)
            expect = {"acc_pruned": [p["accuracy_after_pruning"] for p in ps],
                      "acc_finetuned": [p["test_accuracy"] for p in ps], "macs_fraction": frac,
                      "training_compute": [(7 * p["flops_before"] + 3 * p["flops"]) / (7 * p["flops_before"])
                                           for p in ps]}
            assert r["train_epochs"] == 10
        else:
            expect = {"acc_pruned": [t["test_accuracy"] for t, _ in per_seed]}
            assert r["acc_finetuned"] is None and r["train_epochs"] == 7
            assert r["training_compute"]["values"] == [1.0, 1.0, 1.0]
        for key, values in expect.items():
            v = np.asarray(values, dtype=np.float64)
            assert r[key]["values"] == pytest.approx(values, rel=1e-12)
            assert r[key]["mean"] == pytest.approx(v.mean(), rel=1e-12)
            assert r[key]["sd"] == pytest.approx(v.std(ddof=1), rel=1e-12)
    table = demo.format_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + len(rows)
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    acc = rows[0]["acc_pruned"]
    assert first[:2] == ["rni", "unpruned"]
    assert first[4] == f"{100 * acc['mean']:.2f} ± {100 * acc['sd']:.2f}"
    assert first[5] == "-"
    assert first[7] == "1.00 ± 0.00"
    budget = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert budget[:2] == [demo.BUDGET_METHOD, "10%"] and budget[5] == "-" and budget[8] == "7"
    tc = rows[-1]["training_compute"]
    assert budget[7] == f"{tc['mean']:.2f} ± {tc['sd']:.2f}"
    # One seed: the sd is not defined, and the table says so.
    one = demo.aggregate({k: v for k, v in results.items() if k[1] == 0}, targets, 7, 3)
    assert one[1]["acc_pruned"]["sd"] is None and "± n/a" in demo.format_table(one)


@pytest.mark.parametrize("bad", [dict(seeds=0), dict(targets=()), dict(targets=(0.5, 1.5)), dict(epochs=0),
                                 dict(targets=(0.5, 0.501)), dict(methods=("rni", "slimming")),
                                 dict(epochs=1, methods=demo.METHODS),  # the budget-aware runs need 3 and more
                                 dict(epochs=4, targets=(0.05,), methods=(demo.BUDGET_METHOD,)),
                                 dict(budget={"strenght": 1e-2}), dict(targets=(0.5, 1e-4)),  # unreachable
                                 dict(device="tpu")])
def test_run_demo_refuses_bad_settings_before_writing(tmp_path, bad):
    with pytest.raises(ValueError):
        demo.run_demo(str(tmp_path / "d"), plots=False, progress=False, **bad)
    assert not (tmp_path / "d").exists()


def test_demo_pipeline_tiny(tmp_path, capsys):
    """1 seed, 3 epochs: every method and budget has a row, before and after fine-tuning, every
    pruned network (and every budget-aware run's network) meets its FLOPs budget, the training
    compute follows its definition, and report.json keeps per-seed values."""
    pytest.importorskip("sklearn", reason="the demo's digits ship with scikit-learn")
    from rnip_ext import pruning
    from rnip_ext.app.runs import build_model
    from rnip_ext.rundir import load_checkpoint

    out = tmp_path / "demo"
    targets = (0.5, 0.2)
    import torch

    threads = torch.get_num_threads()
    # 3 epochs: enough for the budget runs when one step may remove 85% of the FLOPs (default 50%).
    report = demo.run_demo(str(out), seeds=1, targets=targets, epochs=3, finetune_epochs=1, progress="lines",
                           plots=False, threads=1, budget={"max_step_removal": 0.85})
    printed = capsys.readouterr().out
    assert torch.get_num_threads() == threads  # threads=1 held only during the demo
    # Not a terminal: one line per stage (3 trainings, 6 prunings, 2 budget runs), no carriage returns.
    assert len([line for line in printed.splitlines() if line.startswith("[")]) == 11 and "\r" not in printed
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(report["rows"]))
    keys = [(r["method"], r["pruned"], r["target"]) for r in report["rows"]]
    tpf = [m for m in demo.METHODS if m != demo.BUDGET_METHOD]
    assert keys == [(m, p, t) for m in tpf for p, t in [(False, 1.0)] + [(True, t) for t in targets]] + [
        (demo.BUDGET_METHOD, True, t) for t in targets]
    unpruned_compute = {r["method"]: r["training_compute"]["mean"] for r in report["rows"] if not r["pruned"]}
    assert unpruned_compute == {m: 1.0 for m in tpf}
    for r in report["rows"]:
        assert r["seeds"] == [0]
        assert len(r["acc_pruned"]["values"]) == 1 and 0 <= r["acc_pruned"]["mean"] <= 1
        compute = r["training_compute"]["values"][0]
        if r["budget_run"]:
            assert r["acc_finetuned"] is None and r["train_epochs"] == 3
            # Narrowed during training: less than the full-width runs' compute, never nothing.
            assert 0 < compute < min(unpruned_compute.values()) and compute <= 1
        elif r["pruned"]:
            assert 0 <= r["acc_finetuned"]["mean"] <= 1
            assert compute == pytest.approx(1 + r["macs_fraction"]["values"][0] / 3, rel=1e-12)
        if r["pruned"]:
            assert r["macs_fraction"]["values"][0] <= r["target"] + 1e-12
    for method in tpf:
        for t in targets:
            summary = json.loads((out / f"prune-{method}-s0-f{round(t * 100)}" / "summary.json").read_text())
            assert summary["flops"] <= t * summary["flops_before"]
            assert summary["scope"] == ("local" if method == "none" else "global")
        run = report["runs"][f"{method}-s0"]
        assert set(run["thresholds"]) == {"f50", "f20"}
        for layer in run["layers"]:
            assert 0 <= layer["receded"] <= layer["channels"] and 1 <= layer["kept"]["f20"] <= layer["kept"]["f50"]
        assert len(run["scores"]) == sum(layer["channels"] for layer in run["layers"])
    x = torch.zeros(1, 1, 16, 16)
    for t in targets:
        # The budget-aware run's network as saved (best.pt, narrowed during training) meets the budget.
        run_dir = out / f"train-{demo.BUDGET_METHOD}-s0-f{round(t * 100)}"
        config = json.loads((run_dir / "config.json").read_text())
        state = load_checkpoint(str(run_dir / "best.pt"))
        net = pruning.restore(build_model(config, config["num_classes"], config["in_channels"]), state["model"],
                              state["architecture"])
        full = pruning.count_flops(build_model(config, config["num_classes"], config["in_channels"]), x)
        assert pruning.count_flops(net, x) <= t * full
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["flops"] == pruning.count_flops(net, x) and summary["flops_before"] == full
        assert config["target_flops"] == t and config["strength"] == START_STRENGTH["decoupled"]
        # Its compute from its metrics: epoch 1 at full width, then the width the epoch before left.
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert summary["training_compute"] == pytest.approx((full + rows[0]["flops"] + rows[1]["flops"]) / (3 * full),
                                                            rel=1e-12)
    budget_run = report["budget_runs"][f"{demo.BUDGET_METHOD}-s0"]
    for layer in budget_run["layers"]:
        assert 1 <= layer["kept"]["f20"] <= layer["channels"] and 1 <= layer["kept"]["f50"] <= layer["channels"]
    header = [c.strip() for c in report["table"].splitlines()[0].strip("|").split("|")]
    assert header == demo.table_header()
    for line, r in zip(report["table"].splitlines()[2:], report["rows"]):
        assert line.count("± n/a") == (6 if r["pruned"] and not r["budget_run"] else 5), line
    assert (out / "report.md").read_text().strip() == report["table"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["kind"] == "demo" and "train-rni-s0" in manifest["files"] and "demo_log.txt" in manifest["files"]
    # The runs' own output went to the log, not the terminal.
    assert "PruningPlan" in (out / "demo_log.txt").read_text() and "PruningPlan" not in printed
    # A rerun replaces the earlier demo's output (a one-method, one-target demo: old sub-runs go),
    # here with the terminal's progress bar: no stage lines, a tqdm bar on stderr.
    demo.run_demo(str(out), seeds=1, targets=(0.5,), epochs=1, finetune_epochs=0, methods=("none",),
                  progress="bar", plots=False, threads=1)
    captured = capsys.readouterr()
    assert "rnip demo" in captured.err and "2/2" in captured.err and "[1/2]" not in captured.out
    assert sorted(os.listdir(out)) == sorted(["train-none-s0", "prune-none-s0-f50", "demo_log.txt", "report.md",
                                              "report.json", MANIFEST])


def test_demo_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from rnip_ext.app.demo_plots import write_plots

    rng = np.random.default_rng(int(np.random.randint(2**31)))
    targets = (0.5, 0.1)
    results = _fake_results(rng, demo.METHODS, (0, 1), targets)
    runs = {}
    for m in [m for m in demo.METHODS if m != demo.BUDGET_METHOD]:
        for s in (0, 1):
            layers = [{"layer": f"bn{i}", "channels": 8, "receded": int(rng.integers(0, 8)),
                       "receded_paper_score": int(rng.integers(0, 8)), "kept": {"f50": 5, "f10": 3}} for i in range(3)]
            runs[f"{m}-s{s}"] = {"method": m, "seed": s, "layers": layers, "thresholds": {"f50": 0.1, "f10": None},
                                 "scores": rng.random(24).tolist(), "receded_fraction": 0.25}
    budget_runs = {f"{demo.BUDGET_METHOD}-s{s}": {
        "method": demo.BUDGET_METHOD, "seed": s,
        "layers": [{"layer": f"bn{i}", "channels": 8, "kept": {"f50": 6, "f10": 2}} for i in range(3)]} for s in (0, 1)}
    report = {"rows": demo.aggregate(results, targets, 2, 1), "runs": runs, "budget_runs": budget_runs,
              "settings": {"seeds": [0, 1], "receded_below": demo.RECEDED}}
    made = write_plots(report, str(tmp_path))
    assert sorted(made) == ["accuracy_vs_flops", "importance_histogram", "layers"]
    for path in made.values():
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == sorted([f"{n}.png" for n in made] + [MANIFEST])


def _table_cells(text):
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.strip().splitlines()]


def test_readme_demo_table_has_the_rows_and_columns_rnip_demo_prints():
    path = os.path.join(ROOT, "README.md")
    if not os.path.isfile(path):
        pytest.skip(reason="not a source checkout (no README.md)")
    readme = open(path, encoding="utf-8").read()
    found = re.search(r"<!-- demo-table:start -->\n(.*?)<!-- demo-table:end -->", readme, re.S)
    assert found, "README.md has no <!-- demo-table:start --> ... <!-- demo-table:end --> block"
    readme_cells = _table_cells(found.group(1))
    # What `rnip demo` prints with its defaults (numbers aside: any values give the same rows).
    from rnip_ext.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    targets = tuple(sub.choices["demo"].get_default("target_flops"))
    seeds = range(sub.choices["demo"].get_default("seeds"))
    rng = np.random.default_rng(0)
    printed = _table_cells(demo.format_table(demo.aggregate(_fake_results(rng, demo.METHODS, seeds, targets),
                                                            targets, demo.DEMO_EPOCHS, demo.DEMO_FINETUNE_EPOCHS)))
    assert readme_cells[0] == printed[0]  # the columns
    assert [row[:2] for row in readme_cells[2:]] == [row[:2] for row in printed[2:]]  # the rows
    assert [row[-1] for row in readme_cells[2:]] == [row[-1] for row in printed[2:]]  # epochs per row
    # "-" (no fine-tuning) exactly where rnip demo prints it
    assert [row[5] == "-" for row in readme_cells[2:]] == [row[5] == "-" for row in printed[2:]]
    for row in readme_cells[2:]:
        assert all(("±" in c) for c in row[2:5] + row[6:8]), row
    assert statistics.mode(len(r) for r in readme_cells) == len(printed[0])
