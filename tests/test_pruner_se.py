"""BudgetPruner(se_ratio=...): squeeze-and-excitation inner widths cut once, at the first step, to
their final width, counted in the budget; checkpoints, EMA copies and the optimiser follow.

References: the expected widths computed here from the original widths; the kept inner channels
from an independent loop over the weights (gain through the bottleneck); FLOPs and parameters
counted on the trained network; a run without interruption for the resumed one (bitwise on CPU).
"""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budget_helpers import loader, train_interval
from rnip_ext import BoundedBatchNorm2d, BudgetPruner, pruning
from rnip_ext.pruner import narrow_to

X0 = torch.zeros(1, 1, 8, 8)
INNER = {"se1.reduce": 12, "se2.reduce": 7, "se3.reduce": 4}


class SE(nn.Module):
    def __init__(self, c, inner, bias=True):
        super().__init__()
        self.reduce, self.act, self.expand = nn.Conv2d(c, inner, 1, bias=bias), nn.ReLU(), nn.Conv2d(inner, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(self.act(self.reduce(x.mean((2, 3), keepdim=True)))))


def _layer(cin, cout, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), BoundedBatchNorm2d(cout), nn.ReLU())


class SENet(nn.Module):
    """Three conv layers, each followed by an SE block of inner width 12, 7 (no reduce bias), 4."""

    def __init__(self):
        super().__init__()
        self.stem = _layer(1, 8)
        self.c1, self.se1 = _layer(8, 16), SE(16, 12)
        self.c2, self.se2 = _layer(16, 16), SE(16, 7, bias=False)
        self.c3, self.se3 = _layer(16, 8, 1), SE(8, 4)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.se1(self.c1(self.stem(x)))
        x = self.se3(self.c3(self.se2(self.c2(x))))
        return self.head(x.mean((2, 3)))


def se_net(seed=0):
    torch.manual_seed(seed)
    return SENet()


def expected_width(width, se_ratio=0.5, min_channels=3):
    return max(width - math.floor(se_ratio * width), min(min_channels, width))


def se_widths(model):
    return {name: (model.get_submodule(name).out_channels,
                   model.get_submodule(name.replace("reduce", "expand")).in_channels) for name in INNER}


def _run(epochs=8, stop=None, seed=0, ema=False, **kw):
    model = se_net(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = loader(seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * len(data))
    kw = {"target_flops": 0.3, **kw}
    pruner = BudgetPruner(model, X0, epochs=epochs, optimizer=opt, **kw)
    averaged = torch.optim.swa_utils.AveragedModel(model) if ema else None
    before_first = None
    for i in range(epochs if stop is None else stop):
        train_interval(model, data, opt, pruner, scheduler=sched)
        if i == 0:
            before_first = copy.deepcopy(model)
        pruner.step(opt, scheduler=sched, ema=averaged)
    return dict(model=model, opt=opt, sched=sched, pruner=pruner, data=data, ema=averaged, before_first=before_first)


def test_se_widths_are_cut_once_at_the_first_step_by_their_gain_and_the_budget_is_met():
    run = _run(ema=True, se_ratio=0.5)
    model, opt, pruner, history = run["model"], run["opt"], run["pruner"], run["pruner"].history
    widths = {name: expected_width(w) for name, w in INNER.items()}
    assert widths == {"se1.reduce": 6, "se2.reduce": 4, "se3.reduce": 3}  # se3: min_channels=3 kept
    assert se_widths(model) == {name: (w, w) for name, w in widths.items()}
    assert history[0].se_removed == sum(INNER[n] - widths[n] for n in INNER) == 10
    assert all(s.se_removed == 0 for s in history[1:]) and history[0].changed
    assert "se_removed" in history[0].metrics()
    # The FLOPs budget is met with the SE cut in it; the other layers were cut by the schedule too.
    original = pruning.count_flops(se_net(), X0)
    assert pruner.original_flops == original and pruning.count_flops(model, X0) <= 0.3 * original
    assert pruner.within_budget and pruner.done and sum(s.removed for s in history) > 0
    # Step 1 removed no BatchNorm channel (warm-up): the SE convs are the old ones, sliced at the
    # lowest-gain inner channels only.
    old = run["before_first"]
    assert history[0].removed == 0
    first = copy.deepcopy(old)
    for name, width in widths.items():
        w_r = old.get_submodule(name).weight.detach()
        w_e = old.get_submodule(name.replace("reduce", "expand")).weight.detach()
        gain = torch.tensor([float(w_r[c].norm() * w_e[:, c].norm()) for c in range(INNER[name])])
        kept = torch.sort(torch.argsort(gain, stable=True)[INNER[name] - width:]).values
        pruning.apply(first, pruning.plan_from_keep(first, {}, example_inputs=X0, se_keep={name: kept}),
                      inplace=True)
    after_first = _run(stop=1, se_ratio=0.5)["model"]
    for (name, a), b in zip(after_first.state_dict().items(), first.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    # The optimiser was sliced with every parameter, the EMA copy narrowed alike.
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape
    assert pruning.architecture_json(run["ema"].module) == pruning.architecture_json(model)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 2)


def test_a_params_budget_counts_the_se_cut_with_round_to():
    model = se_net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = BudgetPruner(model, X0, target_params=0.4, steps=8 * 4, every=4, optimizer=opt, se_ratio=0.5,
                          round_to=4, min_channels=2)
    data = loader()
    for _ in range(8):
        train_interval(model, data, opt, pruner)
        pruner.step(opt)
    # 12 -> 6 -> 8; 7 -> 4 (a multiple); 4 -> 2 -> 4, whole: untouched
    assert se_widths(model) == {"se1.reduce": (8, 8), "se2.reduce": (4, 4), "se3.reduce": (4, 4)}
    assert pruner.history[0].se_removed == 4 + 3
    assert pruning.count_params(model) <= 0.4 * pruning.count_params(se_net())
    for m in model.modules():
        if isinstance(m, BoundedBatchNorm2d):
            assert m.num_features % 4 == 0 or m.num_features in (8, 16)


def test_se_ratio_zero_leaves_the_se_blocks_whole_and_the_run_unchanged():
    default, zero = _run(), _run(se_ratio=0.0)
    assert se_widths(zero["model"]) == {n: (w, w) for n, w in INNER.items()}
    assert pruning.architecture_json(zero["model"]) == pruning.architecture_json(default["model"])
    for (name, a), b in zip(default["model"].state_dict().items(), zero["model"].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    assert [s.se_removed for s in zero["pruner"].history] == [0] * 8
    assert zero["pruner"].state_dict()["settings"]["se_ratio"] == 0.0
    assert "se_ratio" not in repr(zero["pruner"]) and "se_ratio=0.5" in repr(_run(stop=1, se_ratio=0.5)["pruner"])


def _checkpoint(run):
    buf = io.BytesIO()  # through torch.save / weights_only load, as a real checkpoint
    torch.save({"model": run["model"].state_dict(), "opt": run["opt"].state_dict(), "sched": run["sched"].state_dict(),
                "pruner": run["pruner"].state_dict()}, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("stop", [0, 3])
def test_a_checkpoint_resumes_onto_a_fresh_network_with_the_se_widths_and_continues_bitwise(stop):
    full = _run(se_ratio=0.5)
    part = _run(stop=stop, se_ratio=0.5)
    saved = _checkpoint(part)
    g = part["data"].generator.get_state()
    model = se_net(seed=7)  # other weights, full widths
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    params = {id(p) for p in model.parameters()}
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=8 * len(part["data"]))
    pruner = BudgetPruner(model, X0, target_flops=0.3, epochs=8, optimizer=opt, se_ratio=0.5)
    pruner.load_state_dict(saved["pruner"])  # narrows the model first
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    assert {id(p) for p in model.parameters()} == params
    assert pruning.architecture_json(model) == pruning.architecture_json(part["model"])
    want = {n: (expected_width(w),) * 2 for n, w in INNER.items()} if stop else {n: (w, w) for n, w in INNER.items()}
    assert se_widths(model) == want
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), part["model"].eval()(x), rtol=0, atol=0)
    data = loader()
    data.generator.set_state(g)
    torch.manual_seed(0)
    for _ in range(8 - stop):
        train_interval(model, data, opt, pruner, scheduler=sched)
        pruner.step(opt, scheduler=sched)
    assert pruning.architecture_json(model) == pruning.architecture_json(full["model"])
    assert pruner.state_dict()["history"] == full["pruner"].state_dict()["history"]
    assert sum(s.se_removed for s in pruner.history) == 10  # cut once, by whichever run took step 1
    for (name, a), b in zip(full["model"].state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_narrow_to_rebuilds_the_se_convs_of_a_pruned_network():
    model, small = se_net(1), pruning.prune(se_net(), target_flops=0.4, example_inputs=X0, se_ratio=0.5)
    assert se_widths(small) == {n: (expected_width(w),) * 2 for n, w in INNER.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    assert narrow_to(model, pruning.architecture_json(small), opt)
    for name in INNER:
        for conv in (name, name.replace("reduce", "expand")):
            assert model.get_submodule(conv).weight.shape == small.get_submodule(conv).weight.shape
    assert model.se2.reduce.bias is None
    model.load_state_dict(small.state_dict())
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), small.eval()(x), rtol=0, atol=0)


def test_settings_and_bad_values_are_refused():
    a = BudgetPruner(se_net(), X0, target_flops=0.3, epochs=8, se_ratio=0.5)
    with pytest.raises(ValueError, match=r"other settings \(se_ratio: 0.5 vs 0.0\)"):
        BudgetPruner(se_net(), X0, target_flops=0.3, epochs=8).load_state_dict(a.state_dict())
    old = a.state_dict()
    del old["settings"]["se_ratio"]  # a state written before se_ratio existed: the blocks were kept whole
    with pytest.raises(ValueError, match=r"other settings \(se_ratio: 0.0 vs 0.5\)"):
        BudgetPruner(se_net(), X0, target_flops=0.3, epochs=8, se_ratio=0.5).load_state_dict(old)
    BudgetPruner(se_net(), X0, target_flops=0.3, epochs=8).load_state_dict(old)
    for bad in (1.0, -0.1, "0.5", None, True, float("nan")):
        with pytest.raises(ValueError, match="se_ratio must be a float in"):
            BudgetPruner(se_net(), X0, target_flops=0.3, epochs=8, se_ratio=bad)
    # Refused before a latency table would be measured (none is given here).
    with pytest.raises(ValueError, match="se_ratio is not supported with a latency budget"):
        BudgetPruner(se_net(), X0, target_latency=0.5, epochs=8, se_ratio=0.5)
