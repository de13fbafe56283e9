"""`rnip export RUN_DIR --out model.pt2` for training and pruning runs."""

import json

import pytest
import torch

from data_helpers import write_cifar
from rnip_ext import models as M
from rnip_ext.cli import main
from rnip_ext.rundir import load_checkpoint
from rnip_ext.pruning import load


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    write_cifar(root / "data", "cifar10", n_per_file=24)
    run, pruned = root / "run", root / "pruned"
    assert main(["train", "--arch", "vgg_small", "--dataset", "cifar10", "--data-dir", str(root / "data"),
                 "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.2", "--out", str(run),
                 "--no-progress"]) == 0
    assert main(["prune", str(run), "--target-flops", "0.5", "--finetune-epochs", "0", "--out", str(pruned),
                 "--no-progress"]) == 0
    return run, pruned


def same_output(path, model):
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = model.eval()(x)
        got = torch.export.load(str(path)).module()(x)
    torch.testing.assert_close(got, y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


def test_export_train_and_prune_runs(runs, tmp_path, capsys):
    run, pruned = runs
    out = tmp_path / "trained.pt2"
    assert main(["export", str(run), "--out", str(out)]) == 0
    config = json.loads((run / "config.json").read_text())
    model = M.vgg_small(config["num_classes"], "bounded", in_channels=3)
    model.load_state_dict(load_checkpoint(str(run / "best.pt"))["model"])
    same_output(out, model)
    assert "torch.export.load(path).module()" in capsys.readouterr().out

    out = tmp_path / "pruned.pt2"
    assert main(["export", str(pruned), "--out", str(out)]) == 0
    small = load(str(pruned / "pruned.pt"))
    same_output(out, small)
    summary = json.loads((pruned / "summary.json").read_text())
    assert sum(p.numel() for p in small.parameters()) == summary["params"]


def test_onnx_by_extension(runs, tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra (onnx, onnxscript)")
    out = tmp_path / "pruned.onnx"
    assert main(["export", str(runs[1]), "--out", str(out)]) == 0
    assert out.read_bytes()[:2] != b"PK"  # an ONNX protobuf, not the .pt2 zip archive


def test_refuses_to_overwrite_and_bad_run(runs, tmp_path, capsys):
    out = tmp_path / "model.pt2"
    out.write_bytes(b"precious")
    assert main(["export", str(runs[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "already exists" in err
    assert out.read_bytes() == b"precious"

    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "new.pt2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "is not a finished" in err
    assert main(["export", str(runs[0]), "--out", str(tmp_path / "no" / "such" / "dir.pt2")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2"]
