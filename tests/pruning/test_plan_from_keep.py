"""plan_from_keep: a plan for channels chosen by the caller (used by training-time schedules)."""

import pytest
import torch

from pruning_helpers import assert_same_function, masked_copy, warmed_up
from rnip_ext import models as M
from rnip_ext.pruning import apply, count_flops, count_params, plan, plan_from_keep, plan_receded


def _model():
    return warmed_up(M.vgg_small(widths=(8, 12, 16)), (2, 3, 16, 16))


def test_same_plan_as_ratio_plan_for_the_same_channels():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    ref = plan(model, 0.4, example_inputs=x)
    got = plan_from_keep(model, ref.group_keep, example_inputs=x)
    assert got.params == ref.params and got.flops == ref.flops
    assert got.achieved_ratio == pytest.approx(ref.achieved_ratio)
    assert got.scope == "explicit"
    for name in ref.group_keep:
        assert torch.equal(got.group_keep[name], ref.group_keep[name])


def test_masks_and_unsorted_indices_apply_exactly():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    groups = plan(model, 0.0, example_inputs=x).groups
    rng = torch.Generator().manual_seed(0)
    keep = {}
    for g in groups[:-1]:
        mask = torch.rand(g.channels, generator=rng) < 0.5
        mask[0] = True
        keep[g.name] = mask
    keep[groups[-1].name] = torch.tensor([3, 1, 2, 1])  # duplicates and order do not matter
    p = plan_from_keep(model, keep, example_inputs=x)
    assert torch.equal(p.group_keep[groups[-1].name], torch.tensor([1, 2, 3]))
    pruned = apply(model, p)
    assert_same_function(pruned, masked_copy(model, p.keep), x)
    assert p.params[1] == count_params(pruned) and p.flops[1] == count_flops(pruned, x)


@pytest.mark.parametrize("keep,match", [
    ({"nope": torch.tensor([0])}, "not channel groups"),
    ("empty", "at least one channel"),
    ("outside", "outside"),
    ("badmask", "has shape"),
])
def test_bad_keep(keep, match):
    model, x = _model(), torch.randn(1, 3, 16, 16)
    name = plan(model, 0.0, example_inputs=x).groups[0].name
    if keep == "empty":
        keep = {name: torch.tensor([], dtype=torch.int64)}
    elif keep == "outside":
        keep = {name: torch.tensor([0, 8])}
    elif keep == "badmask":
        keep = {name: torch.ones(3, dtype=torch.bool)}
    with pytest.raises(ValueError, match=match):
        plan_from_keep(model, keep, example_inputs=x)


def test_keep_must_be_a_dict():
    model, x = _model(), torch.randn(1, 3, 16, 16)
    with pytest.raises(TypeError, match="keep must be a dict"):
        plan_from_keep(model, [torch.tensor([0])], example_inputs=x)


def test_plan_receded_removes_exactly_the_channels_below_the_threshold():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        model.features[1].weight[:5] = -12.0  # sigmoid < 1e-5 of the layer's strongest: receded
        model.features[4].weight[:11] = -12.0  # 11 of 12 receded: topped up to 3 with the best
        model.features[4].weight[3] = -11.0
    p = plan_receded(model, example_inputs=x)
    assert p.group_keep["features.1"].tolist() == list(range(5, 8))
    assert p.group_keep["features.4"].tolist() == [0, 3, 11]  # 11, then 3, then a tie broken by position
    assert set(p.keep) == {"features.1", "features.4"}  # no other channel is below 0.01
    assert_same_function(apply(model, p), masked_copy(model, p.keep), x)
    with torch.no_grad():
        for bn in (model.features[1], model.features[4]):
            bn.weight.fill_(2.0)
    assert plan_receded(model, example_inputs=x) is None
    with pytest.raises(ValueError, match="threshold"):
        plan_receded(model, example_inputs=x, threshold=1.0)


def test_plan_receded_rounds_widths_up_keeping_every_channel_above_the_threshold():
    model, x = _model(), torch.randn(2, 3, 16, 16)
    rng = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for bn, receded in ((model.features[1], 3), (model.features[4], 7), (model.features[8], 12)):
            bn.weight.copy_(torch.rand(bn.num_features, generator=rng) * 2)
            gone = torch.randperm(bn.num_features, generator=rng)[:receded]
            bn.weight[gone] = -12.0 - torch.rand(receded, generator=rng)
    plain = plan_receded(model, example_inputs=x)
    p = plan_receded(model, example_inputs=x, round_to=4)
    for g in p.groups:
        kept, before = p.group_keep[g.name], plain.group_keep[g.name]
        assert len(kept) % 4 == 0 or len(kept) == g.channels
        assert set(before.tolist()) <= set(kept.tolist())  # rounding up: nothing above the threshold goes
        assert len(kept) - len(before) < 4  # the narrowest allowed width holding them
    assert [len(p.group_keep[g.name]) for g in p.groups] == [8, 8, 4]  # 5 -> 8, 5 -> 8, 4 stays
    assert_same_function(apply(model, p), masked_copy(model, p.keep), x)
    with pytest.raises(ValueError, match="round_to"):
        plan_receded(model, example_inputs=x, round_to=0)
