"""Pruning the torchvision and timm BatchNorm CNNs of tests/zoo_models.py.

Each model is prepared as a trained network looks to the pruner: BatchNorm scales drawn from
U(0.05, 1), shifts from U(-0.1, 0.1), running statistics from one batch. Then, at ``ratio=0.3``:

* a model the pruner supports is pruned **exactly**: the removed channels' shifts are set to 0
  after planning (a zero-scale channel then outputs 0, nothing is left to fold), and the pruned
  output equals the original with the removed channels' scales also set to 0, to float32 rounding;
  the plan's predicted FLOPs and parameters equal those counted on both networks;
* no silent no-op: a plan keeping more than 95% of the FLOPs warns, naming what is kept whole
  (the plan's ``blocked``), and no other plan warns so; whether ratio 0.3 cuts at least 10% of
  the FLOPs is pinned per model (``NEAR_NOOP``, with the construct that blocks the rest);
* a model it does not support raises the documented error (``ValueError`` or
  ``PruningTraceError``) whose message is pinned in ``REFUSED``: never another
  exception;
* ``target_flops=0.5`` is reached, or refused with the ``ValueError`` naming the smallest
  reachable fraction and what is kept whole, as pinned in ``UNREACHABLE``.

Conversion (``convert_batchnorm``) over the same zoo is tests/nn/test_convert_zoo.py's. CI runs
``CI_MODELS`` (11 models: 47 s of CPU time on the loaded 2-core machine for the first 10,
``ese_vovnet19b_dw``, for concatenations, adds 1.3 s); ``RNIP_ZOO=all`` runs all 86 (see
docs/zoo.md and ``benchmarks/zoo.py`` for the table with Torch-Pruning side by side).
Skipped with a reason when torchvision or timm is not installed (optional test dependencies).
"""

import copy
import math
import os
import re
import warnings

import pytest
import torch

import zoo_models
from pruning_helpers import zero_removed as _zero_removed
from pruning_helpers import zoo_prepared as prepared
from rnip_ext.pruning import apply, count_flops, count_params, plan
from rnip_ext.pruning.plan import NO_OP  # plan warns above this share of the FLOPs kept

ALL = [("torchvision", n) for n in zoo_models.TORCHVISION_MODELS] + [("timm", n) for n in zoo_models.TIMM_MODELS]
CI_MODELS = {
    ("torchvision", "resnet18"), ("torchvision", "mobilenet_v3_small"), ("torchvision", "shufflenet_v2_x0_5"),
    ("torchvision", "regnet_y_400mf"), ("torchvision", "googlenet"),
    ("timm", "regnetx_002"), ("timm", "lcnet_050"), ("timm", "tf_efficientnet_b0"), ("timm", "skresnet18"),
    ("timm", "repvgg_a2"), ("timm", "ese_vovnet19b_dw"),
}  # fmt: skip
RUN_ALL = os.environ.get("RNIP_ZOO", "") == "all"

# Pinned from benchmarks/results/zoo_cpu.json (docs/zoo.md). A model the pruner cannot handle
# raises the documented error (ValueError or PruningTraceError) with the message it gives:
REFUSED = {
    # RepVGG's identity-branch BatchNorm reads the block's input, the others feed additions.
    ("timm", "repvgg_a2"): (ValueError, r"ByobNet has no prunable BatchNorm2d .*; kept whole: residual addition"),
}
# Pruned, but ratio=0.3 of the prunable channels removes < 10% of the FLOPs: the construct named
# here (part of the plan's ``blocked``) keeps most of the network whole.
NEAR_NOOP = {
    ("timm", "res2net50_26w_4s"): "split",
    ("timm", "mixnet_s"): "no conv of its own before it", ("timm", "ghostnet_100"): "concatenation into",
}  # fmt: skip
# Pruned, but target_flops=0.5 is out of reach (the error names the smallest reachable fraction
# and what is kept whole).
UNREACHABLE = set(NEAR_NOOP)
# Ill-conditioned in float32 (random initialisation, one-batch statistics): the masked original
# itself moves by 1.8e-2 (efficientnet_v2_l) and 3.5e-4 (resnet152) of its output between float32
# and float64; compared in float64.
FLOAT64 = {("torchvision", "efficientnet_v2_l"), ("torchvision", "resnet152")}

PARAMS = [pytest.param(s, n, id=f"{s}-{n}") for s, n in ALL if RUN_ALL or (s, n) in CI_MODELS]


def _library(source):
    return zoo_models.torchvision_models() if source == "torchvision" else zoo_models.timm_module()


@pytest.mark.parametrize("source,name", PARAMS)
def test_zoo_prunes_exactly_or_refuses_clearly(source, name):
    if _library(source) is None:
        pytest.skip(reason=f"{source} is not installed (optional test dependency)")
    model = prepared(source, name)
    x = torch.randn(*zoo_models.input_size(name))
    if (source, name) in REFUSED:
        error, message = REFUSED[(source, name)]
        with pytest.raises(error, match=message):
            plan(model, 0.3, example_inputs=x)
        return

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = plan(model, 0.3, example_inputs=x)
    assert p.keep and 0.25 < p.achieved_ratio <= 0.3
    assert 0.0 < p.prunable_flops <= 1.0
    # No silent no-op: a plan that keeps almost everything says so, naming what blocks the rest.
    noop = [w for w in caught if "of the FLOPs of" in str(w.message)]
    assert bool(noop) == (p.achieved_flops > NO_OP), [str(w.message) for w in caught]
    if noop:
        assert "kept whole: " + p.blocked in str(noop[0].message)
    assert (p.achieved_flops > 0.9) == ((source, name) in NEAR_NOOP), p.achieved_flops
    if (source, name) in NEAR_NOOP:
        assert NEAR_NOOP[(source, name)] in p.blocked

    _zero_removed(model, p.keep, scales=False)
    # The choice reads scales only; the predicted parameters count the biases the folds will add.
    p0, p = p, plan(model, 0.3, example_inputs=x)
    assert p.keep.keys() == p0.keep.keys() and all(torch.equal(p.keep[k], p0.keep[k]) for k in p.keep)
    pruned = apply(model, p)
    masked = copy.deepcopy(model)
    _zero_removed(masked, p.keep, scales=True)
    x = torch.randn(*zoo_models.input_size(name))
    if (source, name) in FLOAT64:
        pruned, masked, x = pruned.double(), masked.double(), x.double()
    with torch.no_grad():
        got, want = pruned(x), masked(x)
    scale = want.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * scale)

    x = x.float()
    pruned.float()
    assert p.flops == (count_flops(model, x), count_flops(pruned, x))
    assert p.params == (count_params(model), count_params(pruned))

    if (source, name) in UNREACHABLE:
        unreachable = r"target_flops=0\.5 cannot be met: .*smallest reachable fraction.*kept whole: "
        with pytest.raises(ValueError, match=unreachable):
            plan(model, target_flops=0.5, example_inputs=x)
    else:
        b = plan(model, target_flops=0.5, example_inputs=x)
        assert b.achieved_flops <= 0.5
        assert b.flops[0] == p.flops[0] and math.isclose(b.achieved_flops, b.flops[1] / b.flops[0])


def test_expectations_name_only_zoo_models():
    listed = set(ALL)
    for table in (REFUSED, NEAR_NOOP, UNREACHABLE, FLOAT64):
        assert set(table) <= listed, set(table) - listed
    assert not set(REFUSED) & (set(NEAR_NOOP) | UNREACHABLE)
    assert all(re.compile(m) for _, m in REFUSED.values())


# residual_streams=True: RepVGG (refused above) and a ResNet prune their streams, each as one
# channel group, to half the FLOPs, exactly. Two models keep the CI time small.
STREAM_MODELS = [("timm", "repvgg_a2"), ("torchvision", "resnet18")]


@pytest.mark.parametrize("source,name", [pytest.param(s, n, id=f"{s}-{n}") for s, n in STREAM_MODELS])
def test_zoo_residual_streams_reach_half_the_flops_exactly(source, name):
    if _library(source) is None:
        pytest.skip(reason=f"{source} is not installed (optional test dependency)")
    model = prepared(source, name)
    x = torch.randn(*zoo_models.input_size(name))
    p = plan(model, target_flops=0.5, example_inputs=x, residual_streams=True)
    assert p.achieved_flops <= 0.5 and any(g.residual for g in p.groups)
    _zero_removed(model, p.keep, scales=False)
    p = plan(model, target_flops=0.5, example_inputs=x, residual_streams=True)
    pruned = apply(model, p)
    masked = copy.deepcopy(model)
    _zero_removed(masked, p.keep, scales=True)
    with torch.no_grad():
        got, want = pruned(x), masked(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert p.flops == (count_flops(model, x), count_flops(pruned, x))
    assert p.params == (count_params(model), count_params(pruned))
