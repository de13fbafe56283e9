"""save/load of pruned models: JSON architecture plus a weights_only state_dict."""

import json

import pytest
import torch

from pruning_helpers import warmed_up
from rnip_ext import models as M
from rnip_ext import prune
from rnip_ext.pruning import load, save


def pruned_model():
    model = warmed_up(M.resnet56_cifar(), (2, 3, 32, 32))
    return prune(model, 0.6, example_inputs=torch.randn(1, 3, 32, 32)).eval()


def test_round_trip_from_the_builder(tmp_path):
    small = pruned_model()
    path = tmp_path / "small.pt"
    save(small, path)
    payload = torch.load(path, weights_only=True)
    arch = json.loads(payload["architecture"])
    assert arch["builder"]["name"] == "resnet56_cifar"
    assert arch["modules"]["layer1.0.bn1"]["features"] == small.layer1[0].bn1.num_features
    loaded = load(path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    for key, value in small.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_round_trip_into_a_given_model_and_errors(tmp_path):
    small = pruned_model()
    del small.rnip_builder  # a user's own model: no builder recorded
    path = tmp_path / "small.pt"
    save(small, path)
    with pytest.raises(ValueError, match="pass model="):
        load(path)
    loaded = load(path, model=M.resnet56_cifar()).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), small(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not have"):
        load(path, model=M.vgg16_cifar())
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint written by rnip_ext.pruning.save"):
        load(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt")


def test_load_refuses_a_model_with_other_classes_or_input_channels(tmp_path):
    small = pruned_model()
    del small.rnip_builder
    path = tmp_path / "small.pt"
    save(small, path)
    with pytest.raises(ValueError, match=r"not pruned from this model.*'fc' has 10 outputs in the checkpoint, 100"):
        load(path, model=M.resnet56_cifar(num_classes=100))
    with pytest.raises(ValueError, match=r"'conv1' reads 3 input channels in the checkpoint, 1 in the model"):
        load(path, model=M.resnet56_cifar(in_channels=1))
    with pytest.raises(ValueError, match="rnip_ext.pruning.export"):
        load(path)  # no builder: pass model=, or use export for a self-contained file


def test_load_returns_eval_mode_whatever_mode_was_saved(tmp_path):
    small = pruned_model().train()
    path = tmp_path / "small.pt"
    save(small, path)
    loaded = load(path)
    assert not any(m.training for m in loaded.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), small.eval()(x), rtol=0, atol=0)
    del small.rnip_builder
    save(small.train(), path)
    assert not any(m.training for m in load(path, model=M.resnet56_cifar()).modules())


def test_restore_narrows_a_fresh_model_from_a_training_checkpoint_architecture():
    from rnip_ext.pruning import architecture_json, restore

    torch.manual_seed(0)
    model = M.vgg_small(widths=(8, 12, 16)).eval()
    x0 = torch.randn(1, 3, 16, 16)
    small = prune(model, 0.4, example_inputs=x0).eval()
    arch = architecture_json(small)
    fresh = restore(M.vgg_small(widths=(8, 12, 16)), small.state_dict(), arch).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), small(x), rtol=0, atol=0)
    # Without an architecture it is load_state_dict (older checkpoints of unpruned models).
    plain = restore(M.vgg_small(widths=(8, 12, 16)), model.state_dict()).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not an architecture"):
        restore(M.vgg_small(widths=(8, 12, 16)), small.state_dict(), '{"format": "other"}')
    with pytest.raises(ValueError, match="not pruned from this model"):
        restore(M.vgg_small(widths=(4, 4, 4)), small.state_dict(), arch)


@pytest.mark.parametrize("builder", [{"name": "os", "kwargs": {}}, {"name": "vgg", "kwargs": {}},
                                     {"name": "vgg16_cifar", "kwargs": []}, "vgg16_cifar"])
def test_load_refuses_an_unknown_builder(tmp_path, builder):
    path = tmp_path / "m.pt"
    save(M.vgg_small(widths=(4, 4, 8)), path)
    payload = torch.load(path, weights_only=True)
    arch = json.loads(payload["architecture"])
    arch["builder"] = builder
    payload["architecture"] = json.dumps(arch)
    torch.save(payload, path)
    with pytest.raises(ValueError, match="unknown model builder"):
        load(path)


def test_load_refuses_a_non_dict_architecture(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"architecture": json.dumps([1, 2]), "state_dict": {}}, path)
    with pytest.raises(ValueError, match="has format"):
        load(path)
