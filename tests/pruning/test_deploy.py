"""export: a torch.export program (or ONNX) of standard ATen ops that loads without rnip_ext."""

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from pruning_helpers import warmed_up
import rnip_ext
from rnip_ext import models as M
from rnip_ext.pruning import export, load, prune, save
from rnip_ext.pruning.deploy import standard_modules

# Loads every program listed in argv[1] with rnip_ext made unimportable and saves the outputs.
LOADER = textwrap.dedent('''
    import importlib.abc, sys

    class Blocked(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "rnip_ext" or name.startswith("rnip_ext."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked for this test)")
            return None

    sys.meta_path.insert(0, Blocked())
    try:
        import rnip_ext  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("rnip_ext is still importable")
    import torch

    cases = torch.load(sys.argv[1], weights_only=True)
    outputs = [torch.export.load(path).module()(x) for path, x in cases]
    assert not any(m == "rnip_ext" or m.startswith("rnip_ext.") for m in sys.modules)
    torch.save(outputs, sys.argv[2])
    print("rnip_ext blocked; loaded", len(outputs))
''')


def ops(program):
    return {str(n.target) for n in program.graph.nodes if n.op == "call_function"}


def bn_after_relu():
    """A BatchNorm after a ReLU (not foldable) and one without running statistics."""
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(6),
                          nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5, track_running_stats=False),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    rnip_ext.convert_batchnorm(model, bias=True)
    with torch.no_grad():
        model[2].bias.normal_()
    return model


def pruned_vgg_small(bn):
    model = warmed_up(M.vgg_small(widths=(8, 12, 16), bn=bn), (2, 3, 16, 16))
    return prune(model, target_flops=0.5, example_inputs=torch.randn(1, 3, 16, 16)).eval()


def test_programs_load_without_rnip_ext_and_match(tmp_path):
    resnet = warmed_up(M.resnet56_cifar(), (2, 3, 32, 32))
    cases = {
        "vgg_bounded": (pruned_vgg_small("bounded"), (1, 3, 16, 16)),
        "vgg_plain": (pruned_vgg_small("plain"), (1, 3, 16, 16)),
        "resnet56_bounded": (prune(resnet, target_flops=0.5, example_inputs=torch.randn(1, 3, 32, 32)).eval(),
                             (1, 3, 32, 32)),
        "unfoldable": (warmed_up(bn_after_relu(), (2, 3, 8, 8)), (2, 3, 8, 8)),
    }
    listed, expected = [], []
    for name, (model, shape) in cases.items():
        path = str(tmp_path / f"{name}.pt2")
        program = export(model, path, torch.randn(*shape))
        found = ops(program)
        assert all(op.startswith("aten.") for op in found), found
        assert "aten.sigmoid.default" not in found  # bounded scales are baked in
        if name == "unfoldable":
            assert "aten.batch_norm.default" in found  # kept as the standard op
        else:
            assert "aten.batch_norm.default" not in found, name  # every BatchNorm folded
        x = torch.randn(3, *shape[1:])  # another batch size: the batch dimension is dynamic
        with torch.no_grad():
            expected.append(model(x))
        listed.append((path, x))
    torch.save(listed, tmp_path / "cases.pt")
    done = subprocess.run([sys.executable, "-c", LOADER, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rnip_ext blocked; loaded 4" in done.stdout
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, y, g in zip(cases, expected, got):
        scale = y.abs().max().item()
        torch.testing.assert_close(g, y, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_folding_matches_a_float64_reference():
    model = pruned_vgg_small("bounded")
    x = torch.randn(4, 3, 16, 16)
    std = standard_modules(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, rnip_ext.BoundedBatchNorm2d)) for m in std.modules())
    with torch.no_grad():
        ref = model.double()(x.double())
        got = std(x)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_model_untouched_and_atomic_write(tmp_path, monkeypatch):
    model = warmed_up(M.vgg_small(widths=(8, 12, 16)), (2, 3, 16, 16)).train()
    model.features[2].eval()
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    path = tmp_path / "m.pt2"
    path.write_bytes(b"the previous, complete file")

    def broken_save(program, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch.export, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export(model, path, torch.randn(1, 3, 16, 16), overwrite=True)
    assert path.read_bytes() == b"the previous, complete file"
    assert sorted(os.listdir(tmp_path)) == ["m.pt2"]  # no temporary file left behind
    monkeypatch.undo()

    export(model, path, torch.randn(1, 3, 16, 16), overwrite=True)
    assert torch.export.load(str(path)).module()(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert sorted(os.listdir(tmp_path)) == ["m.pt2"]
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == grads
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k  # running statistics not updated by the export's forwards


def test_no_overwrite_never_replaces_a_file_that_appears_during_the_export(tmp_path, monkeypatch):
    model = warmed_up(M.vgg_small(widths=(8, 12, 16)), (2, 3, 16, 16))
    path = tmp_path / "m.pt2"
    real_save = torch.export.save

    def save_while_someone_writes(program, f, *args, **kwargs):
        path.write_bytes(b"someone else's file")  # appears after any existence check
        return real_save(program, f, *args, **kwargs)

    monkeypatch.setattr(torch.export, "save", save_while_someone_writes)
    with pytest.raises(FileExistsError):
        export(model, path, torch.randn(1, 3, 16, 16), overwrite=False)
    assert path.read_bytes() == b"someone else's file"
    assert sorted(os.listdir(tmp_path)) == ["m.pt2"]  # no temporary file left behind
    monkeypatch.undo()
    fresh = tmp_path / "fresh.pt2"
    export(model, fresh, torch.randn(1, 3, 16, 16), overwrite=False)
    assert torch.export.load(str(fresh)).module()(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert sorted(os.listdir(tmp_path)) == ["fresh.pt2", "m.pt2"]


def test_an_existing_file_is_refused_by_default_and_replaced_only_when_asked(tmp_path):
    model = warmed_up(M.vgg_small(widths=(8, 12, 16)), (2, 3, 16, 16))
    path = tmp_path / "notes.pt2"
    path.write_bytes(b"the user's unrelated file")
    with pytest.raises(FileExistsError, match=re.escape(f"{path} already exists; nothing was written")):
        export(model, path, torch.randn(1, 3, 16, 16))
    assert path.read_bytes() == b"the user's unrelated file"
    assert sorted(os.listdir(tmp_path)) == ["notes.pt2"]
    export(model, path, torch.randn(1, 3, 16, 16), overwrite=True)
    assert torch.export.load(str(path)).module()(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(TypeError, match="overwrite must be True or False"):
        export(model, path, torch.randn(1, 3, 16, 16), overwrite="yes")


def test_path_errors_name_the_users_path_not_the_temporary_file(tmp_path, monkeypatch):
    model = warmed_up(M.vgg_small(widths=(8, 12, 16)), (2, 3, 16, 16))
    x = torch.randn(1, 3, 16, 16)
    missing = tmp_path / "no" / "such" / "a.pt2"
    with pytest.raises(FileNotFoundError, match=re.escape(f"the folder of {missing} does not exist")) as caught:
        export(model, missing, x)
    folder = tmp_path / "folder.pt2"
    folder.mkdir()
    with pytest.raises(IsADirectoryError, match=re.escape(f"{folder} is a directory")) as caught_dir:
        export(model, folder, x, overwrite=True)
    assert ".tmp" not in str(caught.value) + str(caught_dir.value)

    def no_permission(src, dst):
        raise PermissionError(13, "Permission denied", src)

    monkeypatch.setattr(os, "replace", no_permission)
    target = tmp_path / "m.pt2"
    with pytest.raises(PermissionError) as denied:
        export(model, target, x, overwrite=True)
    assert denied.value.filename == str(target) and ".tmp" not in str(denied.value)
    assert not os.listdir(tmp_path / "folder.pt2") and sorted(os.listdir(tmp_path)) == ["folder.pt2"]


def test_norm_activation_layers_keep_their_activation(tmp_path):
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), rnip_ext.BoundedBatchNormAct2d(6, bias=True, act=nn.SiLU()),
        nn.Conv2d(6, 4, 1), rnip_ext.BoundedBatchNormAct2d(4, act=nn.Hardtanh(0.0, 0.7)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    model = warmed_up(model, (2, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    program = export(model, tmp_path / "m.pt2", x)  # checks the outputs before writing
    found = ops(program)
    assert "aten.silu.default" in found and "aten.hardtanh.default" in found
    assert not any("batch_norm" in op for op in found)  # both folded into their convolutions
    torch.testing.assert_close(torch.export.load(str(tmp_path / "m.pt2")).module()(x), model(x))


@pytest.mark.parametrize("inputs,match", [
    (torch.randn(1, 4, 16, 16), "do not fit the model"),
    (torch.randn(1, 3), "do not fit the model"),
    ("image.png", "tensor or a tuple of tensors"),
    ((), "tensor or a tuple of tensors"),
])
def test_bad_example_inputs(tmp_path, inputs, match):
    model = M.vgg_small(widths=(8, 12, 16))
    with pytest.raises(ValueError, match=match):
        export(model, tmp_path / "m.pt2", inputs)
    assert not os.listdir(tmp_path)
    with pytest.raises(ValueError, match="format must be one of"):
        export(model, tmp_path / "m.pt2", torch.randn(1, 3, 16, 16), format="tflite")
    with pytest.raises(TypeError, match="nn.Module"):
        export("model", tmp_path / "m.pt2", torch.randn(1, 3, 16, 16))


def test_load_of_a_foreign_model_points_to_export(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    save(model, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=r"pass model=.*rnip_ext\.pruning\.export\(model, path, example_inputs\)"):
        load(tmp_path / "m.pt")


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript", reason="ONNX export needs the onnx extra (onnx, onnxscript)")
    ort = pytest.importorskip("onnxruntime", reason="checking the ONNX file needs onnxruntime")
    model = pruned_vgg_small("bounded")
    path = tmp_path / "m.onnx"
    export(model, path, torch.randn(1, 3, 16, 16), format="onnx")
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, 16, 16)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        y = model(x)
    torch.testing.assert_close(torch.from_numpy(got), y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


def test_onnx_without_the_extra_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as on a machine without the onnx extra
    with pytest.raises(ImportError, match=r'pip install "rnip_ext\[onnx\]"'):
        export(M.vgg_small(widths=(8, 12, 16)), tmp_path / "m.onnx", torch.randn(1, 3, 16, 16), format="onnx")
    assert not os.listdir(tmp_path)


class ConvReadTwice(nn.Module):
    """The conv's output feeds its BatchNorm and a residual addition: folding would change the addition."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = rnip_ext.BoundedBatchNorm2d(4, bias=True)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))


def test_only_exact_folds():
    model = warmed_up(ConvReadTwice(), (2, 4, 8, 8))
    with torch.no_grad():
        model.bn.bias.normal_()
    std = standard_modules(model)
    assert type(std.bn) is nn.BatchNorm2d and isinstance(std.bn2, nn.Identity)
    torch.testing.assert_close(std.bn.weight, torch.sigmoid(model.bn.weight))
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        ref = model.double()(x.double())
    torch.testing.assert_close(std(x).double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
