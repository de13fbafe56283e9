"""measure_throughput: shape and sanity of the measurement (never its speed)."""

import math

import pytest
import torch
from torch import nn

from rnip_ext.app.measure import Throughput, measure_throughput


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 36, 2))


def test_result_is_consistent_and_model_untouched():
    model = _model().train()
    model[2].eval()  # a submodule's own mode must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = measure_throughput(model, torch.randn(5, 3, 8, 8), warmup=1, repeats=4)
    assert isinstance(r, Throughput)
    assert r.batch_size == 5 and r.timed_batches == 4 and r.warmup == 1 and len(r.times_s) == 4
    assert all(t > 0 for t in r.times_s)
    assert r.median_s == pytest.approx((sorted(r.times_s)[1] + sorted(r.times_s)[2]) / 2)
    assert math.isclose(r.images_per_s, 5 / r.median_s)
    assert r.device == "cpu" and r.threads == torch.get_num_threads()
    assert "images/s" in str(r)
    # Eval mode and no_grad: running statistics untouched, modes restored.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and model[1].training and not model[2].training


def test_tuple_inputs():
    class Two(nn.Module):
        def forward(self, a, b):
            return a @ b

    r = measure_throughput(Two(), (torch.randn(3, 4, 4), torch.randn(3, 4, 4)), warmup=0, repeats=1)
    assert r.batch_size == 3 and len(r.times_s) == 1


@pytest.mark.parametrize("kwargs,error,match", [
    ({"example_batch": torch.randn(2, 5, 8, 8)}, ValueError, "does not fit the model"),
    ({"example_batch": torch.randn(0, 3, 8, 8)}, ValueError, "batch dimension"),
    ({"example_batch": torch.tensor(1.0)}, ValueError, "batch dimension"),
    ({"example_batch": [1, 2]}, TypeError, "tensor or a tuple"),
    ({"repeats": 0}, ValueError, "repeats must be an int >= 1"),
    ({"warmup": -1}, ValueError, "warmup must be"),
    ({"repeats": 2.0}, ValueError, "repeats must be"),
])
def test_bad_arguments(kwargs, error, match):
    kwargs = {"example_batch": torch.randn(2, 3, 8, 8), **kwargs}
    with pytest.raises(error, match=match):
        measure_throughput(_model(), kwargs.pop("example_batch"), **kwargs)
    with pytest.raises(TypeError, match="nn.Module"):
        measure_throughput(lambda x: x, torch.randn(2, 3))
