"""apply(..., inplace=True): the model object itself narrows; parameters, optimiser, scheduler stay bound.

Reference: the copy path (``inplace=False``) on an identical deep copy of the model and optimiser.
Both gather the same tensors through the same indices, so the narrowed model, its gradients and
its optimiser state must equal the copy's bitwise, and one more optimiser step must too.
"""

import copy
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning_helpers import ARCHITECTURES, assert_same_function, masked_copy, warmed_up
from rnip_ext import param_groups
from rnip_ext import models as M
from rnip_ext.pruning import apply, count_flops, plan, prune

apply_module = sys.modules["rnip_ext.pruning.apply"]  # the module, not the function of that name

OPTIMIZERS = {
    "sgd_nesterov": lambda groups: torch.optim.SGD(groups, momentum=0.9, nesterov=True),
    "adamw": lambda groups: torch.optim.AdamW(groups),
}


def _trained(opt_name):
    """A vgg_small after three steps, so the optimiser has state; with a MultiStepLR."""
    model = M.vgg_small(widths=(8, 12, 16)).train()
    opt = OPTIMIZERS[opt_name](param_groups(model, lr=0.01, weight_decay=1e-3))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    for _ in range(3):
        x, y = torch.randn(8, 3, 16, 16), torch.randint(10, (8,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    return model, opt, sched


def _state_of(model, opt):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v for k, v in s.items()} for p, s in opt.state.items()}


@pytest.mark.parametrize("batch_bytes", [None, 1], ids=["one_gather", "gather_per_tensor"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_inplace_equals_the_copy_and_keeps_every_object(opt_name, batch_bytes, monkeypatch):
    if batch_bytes is not None:  # each tensor gathered and released on its own
        monkeypatch.setattr(apply_module, "INPLACE_BATCH_BYTES", batch_bytes)
    model, opt, sched = _trained(opt_name)
    x = torch.randn(4, 3, 16, 16)
    p = plan(model, 0.4, min_channels=2, example_inputs=x[:1])
    twin, twin_opt, twin_sched = copy.deepcopy((model, opt, sched))  # one memo: twin_sched drives twin_opt
    for a, b in zip(model.parameters(), twin.parameters()):  # deepcopy leaves .grad behind
        b.grad = None if a.grad is None else a.grad.clone()
    params_before = {n: q for n, q in model.named_parameters()}
    modules_before = dict(model.named_modules())

    copied = apply(twin, plan(twin, 0.4, min_channels=2, example_inputs=x[:1]), optimizer=twin_opt)
    result = apply(model, p, optimizer=opt, inplace=True)

    assert result is model
    assert dict(model.named_modules()) == modules_before  # the same module objects
    for n, q in model.named_parameters():
        assert q is params_before[n]  # the same Parameter objects, new data
    assert {id(q) for g in opt.param_groups for q in g["params"]} == {id(q) for q in model.parameters()}
    ours, theirs = model.state_dict(), copied.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    for (n, a), b in zip(model.named_parameters(), copied.parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), n
    s_ours, s_theirs = _state_of(model, opt), _state_of(copied, twin_opt)
    assert s_ours.keys() == s_theirs.keys()
    for n in s_ours:
        for k, v in s_ours[n].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s_theirs[n][k])), (n, k)

    # One more step of each (scheduler included) stays bitwise equal.
    xb, yb = torch.randn(8, 3, 16, 16), torch.randint(10, (8,))
    for m, o, s in ((model, opt, sched), (copied, twin_opt, twin_sched)):
        o.zero_grad()
        F.cross_entropy(m(xb), yb).backward()
        o.step()
        s.step()
    for (n, a), b in zip(model.named_parameters(), copied.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("name,build,shape", ARCHITECTURES, ids=[a[0] for a in ARCHITECTURES])
def test_inplace_computes_the_masked_original(name, build, shape):
    model = warmed_up(build("plain"), shape)
    x = torch.randn(*shape)
    p = plan(model, 0.3, example_inputs=x[:1])
    masked = masked_copy(model, p.keep)
    flops = p.flops[1]
    apply(model, p, inplace=True)
    assert_same_function(model, masked, x)
    assert count_flops(model, x[:1]) == flops


def test_inplace_folds_into_new_biases_that_join_the_optimizer():
    model = warmed_up(M.vgg_small(widths=(8, 12, 16), bn="plain", in_channels=1), (2, 1, 16, 16))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.bias.uniform_(-1, 1)  # removed channels output a constant to fold
    x = torch.randn(2, 1, 16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    p = plan(model, 0.4, example_inputs=x[:1])
    reference = apply(model, p)
    prune(model, 0.4, example_inputs=x[:1], optimizer=opt, inplace=True)
    assert_same_function(model, reference, x)
    assert {id(q) for g in opt.param_groups for q in g["params"]} == {id(q) for q in model.parameters()}


def test_compiled_wrapper_follows_the_narrowed_model():
    model = M.vgg_small(widths=(8, 12, 16)).eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = torch.compile(model, backend="eager")
    compiled(x)
    prune(model, 0.5, example_inputs=x[:1], inplace=True)
    torch.testing.assert_close(compiled(x), model(x))


def test_inplace_must_be_a_bool():
    model = M.vgg_small(widths=(8, 12, 16))
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(TypeError, match="inplace must be a bool"):
        apply(model, plan(model, 0.5, example_inputs=x), inplace="yes")


def test_a_gather_that_would_fail_leaves_the_model_untouched(monkeypatch):
    """In place, the tensors are gathered in batches; all are checked before the first one, so a
    bad index in the last batch changes nothing in the earlier ones."""
    monkeypatch.setattr(apply_module, "INPLACE_BATCH_BYTES", 1)
    model, opt, _ = _trained("sgd_nesterov")
    p = plan(model, 0.4, min_channels=2, example_inputs=torch.randn(1, 3, 16, 16))
    real = apply_module.module_slices

    def corrupted(*args):
        slices = real(*args)
        last = list(slices)[-1]
        out_idx, in_idx = slices[last]
        bad = torch.tensor([10**6])
        slices[last] = [out_idx, bad] if in_idx is not None else [bad, None]
        return slices

    monkeypatch.setattr(apply_module, "module_slices", corrupted)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    state_before = {n: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
                    for n, s in _state_of(model, opt).items()}
    with pytest.raises(ValueError, match="out of range|must lie in"):
        apply(model, p, optimizer=opt, inplace=True)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for n, t in before.items():
        assert torch.equal(t, after[n]), n
    for n, s in _state_of(model, opt).items():
        for k, v in s.items():
            assert torch.equal(v, state_before[n][k]) if torch.is_tensor(v) else v == state_before[n][k]
