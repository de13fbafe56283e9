"""rnip_ext.app.spec: run specs validate before anything runs, with the command's option names."""

import argparse

import pytest

from rnip_ext.app.errors import UserError
from rnip_ext.app.spec import DemoSpec, ExportSpec, PruneSpec, TrainSpec, check_option


@pytest.mark.parametrize("kwargs, message", [
    ({"epochs": 0}, r"^--epochs must be >= 1, got 0$"),
    ({"lr": 0.0}, r"^--lr must be > 0, got 0.0$"),
    ({"val_fraction": 1.0}, r"^--val-fraction must be in \(0, 1\), got 1.0$"),
    ({"receding": "loss"}, r"^--receded-below and --receding need --target-flops$"),
    ({"target_flops": 0.5, "method": "l1"}, r"--target-flops .* needs --method rni, got l1$"),
    ({"dataset": "cifar10"}, r"^--dataset cifar10 needs --data-dir"),
    ({"resume": True, "overwrite": True}, r"pass one of them$"),
])
def test_train_spec_refuses_bad_settings_naming_the_option(kwargs, message):
    with pytest.raises(UserError, match=message):
        TrainSpec(out="runs/a", **kwargs).config()


def test_train_spec_fills_in_the_papers_defaults_and_a_budget_runs_settings():
    config = TrainSpec(out="runs/a", arch="vgg_small").config()
    assert (config["strength"], config["shift"], config["image_size"]) == (1e-3, 3.0, 16)
    assert config["target_flops"] is None and "budget" not in config
    budget = TrainSpec(out="runs/a", target_flops=0.2).config()
    assert (budget["receded_below"], budget["receding"], budget["min_channels"]) == (0.01, "decoupled", 3)


def test_prune_spec_defaults_to_half_the_channels_and_checks_its_budget():
    assert PruneSpec(run_dir="a", out="b").ratio == 0.5
    assert PruneSpec(run_dir="a", out="b", target_flops=0.3).ratio is None
    with pytest.raises(UserError, match=r"^--target-params must be in \(0, 1\], got 1.5$"):
        PruneSpec(run_dir="a", out="b", target_params=1.5)
    with pytest.raises(UserError, match=r"^--min-channels must be >= 1, got 0$"):
        PruneSpec(run_dir="a", out="b", min_channels=0)


def test_specs_from_parsed_arguments():
    args = argparse.Namespace(run_dir="a", out="m.ONNX", format=None, unrelated=1)
    assert ExportSpec.from_args(args) == ExportSpec(run_dir="a", out="m.ONNX", format="onnx")
    assert ExportSpec(run_dir="a", out="m.pt2").format == "pt2"
    args = argparse.Namespace(out="d", seeds=2, epochs=3, finetune_epochs=0, target_flops=[0.5], device="cpu",
                              threads="1", no_plots=True, no_progress=True, overwrite=False)
    spec = DemoSpec.from_args(args)
    assert (spec.plots, spec.progress, spec.threads, spec.seeds) == (False, False, 1, 2)
    with pytest.raises(UserError, match=r"^--target-flops must differ by at least 0.01"):
        DemoSpec(target_flops=[0.5, 0.501], plots=False)


def test_check_option_rejects_non_finite_values():
    with pytest.raises(UserError, match=r"^--shift must be a finite number, got nan$"):
        check_option("shift", float("nan"))
    check_option("shift", -3.0)
