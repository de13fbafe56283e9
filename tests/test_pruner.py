"""BudgetPruner in a user's own loop: own residual CNN, own DataLoader, AdamW, GradScaler, a scheduler."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from budget_helpers import X0, BrightDark, loader, own_net, train_interval
from rnip_ext import BudgetPruner, pruning
from rnip_ext.pruner import RecedingLagWarning, narrow_to


def _own_run(epochs=8, target=0.3, optimizer="adamw", update="decoupled", seed=0, stop=None, **kw):
    """The issue's new-user loop; returns everything a test looks at. ``stop``: return after that many epochs."""
    model = own_net(seed)
    params = {id(p) for p in model.parameters()}
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2) if optimizer == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    data = loader(seed)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=epochs * len(data))
    scaler = torch.amp.GradScaler("cpu")
    pruner = BudgetPruner(model, X0, target_flops=target, epochs=epochs, update=update, **kw)
    steps = []
    for _ in range(epochs if stop is None else stop):
        train_interval(model, data, opt, pruner, scaler=scaler, scheduler=sched)
        steps.append(pruner.step(opt, scheduler=sched, scaler=scaler))
    return dict(model=model, opt=opt, sched=sched, scaler=scaler, pruner=pruner, steps=steps, params=params, data=data)


def test_own_loop_reaches_the_budget_by_receding_with_the_optimizer_bound_and_sliced():
    run = _own_run()
    model, opt, pruner = run["model"], run["opt"], run["pruner"]
    original = pruner.original_flops
    assert pruning.count_flops(model, X0) <= 0.3 * original and pruner.within_budget and pruner.done
    # The same parameter objects, every one still in the optimiser, its state shaped like it.
    assert {id(p) for p in model.parameters()} == run["params"]
    assert {id(p) for g in opt.param_groups for p in g["params"]} == run["params"]
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].shape == p.shape and opt.state[p]["exp_avg_sq"].shape == p.shape
    # Under AdamW the channels receded (removed below the threshold), not only cut by the schedule.
    steps = run["steps"]
    assert sum(s.removed - s.forced for s in steps) > sum(s.forced for s in steps)
    assert [s.step for s in steps] == list(range(1, 9)) and steps[-1].fraction == pytest.approx(
        pruning.count_flops(model, X0) / original)
    # Training goes on with everything (scheduler, scaler) and the final network is a working one.
    train_interval(model, run["data"], opt, None, scaler=run["scaler"])
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 2)


def test_the_same_settings_through_the_projects_trainer_give_the_same_network_bitwise():
    from rnip_ext.callbacks import BudgetPruning
    from rnip_ext.training import fit

    own = _own_run()
    model = own_net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = loader()
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=8 * len(data))
    pruner = BudgetPruner(model, X0, target_flops=0.3, epochs=8)
    fit(model, data, epochs=8, optimizer=opt, scheduler=sched, scheduler_step="step",
        scaler=torch.amp.GradScaler("cpu"), loss=lambda out, y: F.cross_entropy(out, y, label_smoothing=0.1),
        regularizer=pruner, callbacks=[BudgetPruning(pruner)], progress=False)
    assert pruning.architecture_json(model) == pruning.architecture_json(own["model"])
    assert [s.removed for s in pruner.history] == [s.removed for s in own["steps"]]
    for (name, a), b in zip(own["model"].state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_when_nothing_recedes_the_pruner_warns_with_numbers_and_cuts_in_bounded_steps():
    # update='loss' without the penalty in the loss would be refused; a negligible strength and
    # cap keep the penalty in the loss but nothing recedes.
    with pytest.warns(RecedingLagWarning) as caught:
        run = _own_run(epochs=10, target=0.2, update="loss", strength=1e-4, max_strength=1e-4, warmup=1, settle=1)
    messages = [str(w.message) for w in caught if "still active" in str(w.message)]
    assert messages and "100.0% are still active" in messages[0] and "the strength is at its cap" in messages[0]
    assert "update='loss' cannot speed receding under AdamW" in messages[0]
    flops = [run["pruner"].original_flops] + [s.flops for s in run["steps"]]
    shares = [1 - b / a for a, b in zip(flops, flops[1:])]
    # At most max_step_removal per step, up to rounding to whole channels (8-channel layers here).
    assert max(shares) <= 0.5 + 0.15 and sum(1 for s in shares if s > 0.05) >= 3
    assert run["pruner"].within_budget


def test_penalty_in_the_loss_drives_receding_through_sgd_with_the_papers_recipe():
    from rnip_ext import param_groups

    model = own_net()
    opt = torch.optim.SGD(param_groups(model, 0.05, bn_lr_scale=10.0), lr=0.05, momentum=0.9, nesterov=True)
    pruner = BudgetPruner(model, X0, target_flops=0.3, epochs=8, update="loss")
    data = loader()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RecedingLagWarning)  # SGD: no warning about the optimiser
        steps = []
        for _ in range(8):
            train_interval(model, data, opt, pruner)
            steps.append(pruner.step(opt))
    assert pruner.within_budget and sum(s.removed - s.forced for s in steps) > 0


def _checkpoint(run):
    return copy.deepcopy({"model": run["model"].state_dict(), "opt": run["opt"].state_dict(),
                          "sched": run["sched"].state_dict(), "scaler": run["scaler"].state_dict(),
                          "pruner": run["pruner"].state_dict()})


def test_a_mid_run_checkpoint_restores_the_narrowed_network_onto_a_fresh_one_and_continues():
    full = _own_run()
    part = _own_run(stop=4)
    assert part["steps"][-1].removed > 0  # the network was already narrowed
    saved = _checkpoint(part)
    g = part["data"].generator.get_state()
    # A fresh, unpruned instance (other initial weights), its optimiser built before the load.
    model = own_net(seed=7)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    params = {id(p) for p in model.parameters()}
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=8 * len(part["data"]))
    scaler = torch.amp.GradScaler("cpu")
    pruner = BudgetPruner(model, X0, target_flops=0.3, epochs=8, optimizer=opt)
    pruner.load_state_dict(saved["pruner"])  # narrows the model first
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    sched.load_state_dict(saved["sched"])
    scaler.load_state_dict(saved["scaler"])
    assert {id(p) for p in model.parameters()} == params
    data = loader()
    data.generator.set_state(g)
    torch.manual_seed(0)
    for _ in range(4):
        train_interval(model, data, opt, pruner, scaler=scaler, scheduler=sched)
        pruner.step(opt, scheduler=sched, scaler=scaler)
    assert pruning.architecture_json(model) == pruning.architecture_json(full["model"])
    assert pruner.state_dict()["history"] == full["pruner"].state_dict()["history"]
    for (name, a), b in zip(full["model"].state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)  # bitwise on CPU


def test_ema_copies_and_a_compiled_wrapper_follow_the_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    model = own_net()
    compiled = torch.compile(model, backend="eager")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = BudgetPruner(compiled, X0, target_flops=0.3, epochs=6, optimizer=opt)
    assert pruner.model is model
    data = loader()
    for epoch in range(6):
        for x, y in data:
            opt.zero_grad()
            F.cross_entropy(compiled(x), y).backward()
            opt.step()
            ema.update_parameters(model)
        if epoch == 0:
            with pytest.raises(ValueError, match="EMA copy does not match"):
                pruner.step(opt, ema=AveragedModel(own_net(width=6)))
        pruner.step(opt, ema=ema)
    assert pruner.within_budget
    assert pruning.architecture_json(ema.module) == pruning.architecture_json(model)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(compiled(x), model(x))


def test_timm_model_ema_follows_the_model():
    from zoo_models import timm_module

    timm = timm_module()
    if timm is None:
        pytest.skip(reason="timm is not installed")
    from timm.utils import ModelEmaV3

    model = own_net()
    ema = ModelEmaV3(model, decay=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner = BudgetPruner(model, X0, target_flops=0.3, epochs=6, optimizer=opt)
    for _ in range(6):
        for x, y in loader():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            ema.update(model)
        pruner.step(opt, ema=ema)
    assert pruning.architecture_json(ema.module) == pruning.architecture_json(model) and pruner.within_budget


def test_misuse_is_refused_with_what_to_do():
    model = own_net()
    data = loader()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = BudgetPruner(model, X0, target_flops=0.5, epochs=4, warmup=0, update="loss")
    with pytest.raises(TypeError, match=r"needs the optimizer .* pruner.step\(optimizer\)"):
        pruner.step()
    with pytest.raises(ValueError, match="built for another model"):
        pruner.step(torch.optim.SGD(own_net().parameters(), lr=0.01))
    train_interval(model, data, opt, None)  # no penalty in the loss
    with pytest.raises(RuntimeError, match=r"needs loss = task_loss \+ pruner.penalty\(\)"):
        pruner.step(opt)
    other = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.raises(ValueError, match="not the optimizer the pruner was bound to"):
        pruner.step(other)
    sched = torch.optim.lr_scheduler.StepLR(other, 1)
    train_interval(model, data, opt, pruner)
    with pytest.raises(ValueError, match="scheduler drives another optimizer"):
        pruner.step(opt, scheduler=sched)
    pruner.step(opt)  # the failed calls changed nothing
    with pytest.raises(RuntimeError, match="no optimiser step since the last pruner.step"):
        pruner.step(opt)
    train_interval(model, data, opt, pruner)
    pruner.step(opt)
    pruning.prune(model, 0.2, example_inputs=X0, optimizer=opt, inplace=True)  # behind the pruner's back
    with pytest.raises(RuntimeError, match="changed shape outside the pruner"):
        pruner.penalty()  # the next training step says so, not a shape error
    train_interval(model, data, opt, None)
    with pytest.raises(RuntimeError, match="changed shape outside the pruner"):
        pruner.step(opt)

    model = own_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pruner = BudgetPruner(model, X0, target_flops=0.5, steps=8, every=4, optimizer=opt)
    for _ in range(2):  # 2 optimiser steps, not every=4
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.randint(2, (4,))).backward()
        opt.step()
    with pytest.raises(RuntimeError, match="came after 2 optimiser steps; it was built for one every 4"):
        pruner.step(opt)


def test_constructor_errors_name_the_argument():
    model = own_net()
    cases = [({"epochs": 4}, "give exactly one budget"),
             ({"target_flops": 0.5, "target_params": 0.5, "epochs": 4}, "give exactly one budget"),
             ({"target_flops": 1.5, "epochs": 4}, r"target_flops must be a fraction in \(0, 1\]"),
             ({"target_flops": 0.5}, "give the schedule's length"),
             ({"target_flops": 0.5, "epochs": 4, "every": 2}, "every= goes with steps="),
             ({"target_flops": 0.5, "epochs": 1}, "epochs must be an int >= 2"),
             ({"target_flops": 0.5, "steps": 10, "every": 6}, "steps // every must be >= 2"),
             ({"target_flops": 0.5, "epochs": 4, "update": "adam"}, "update must be one of"),
             ({"target_flops": 0.5, "epochs": 4, "threshold": 1.0}, r"threshold must be a number in \(0, 1\)"),
             ({"target_flops": 0.5, "epochs": 4, "scope": "layer"}, "scope must be one of"),
             ({"target_flops": 0.5, "epochs": 4, "lag_tolerance": True}, r"lag_tolerance must be a fraction"),
             ({"target_flops": 0.5, "epochs": 4, "lag_tolerance": 1.5}, r"lag_tolerance must be a fraction"),
             ({"target_flops": 0.5, "epochs": 4, "min_channels": 0}, "min_channels must be an int >= 1"),
             ({"target_flops": 0.001, "epochs": 30}, "cannot be met")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            BudgetPruner(model, X0, **kwargs)
    with pytest.raises(ValueError, match="example_inputs is required"):
        BudgetPruner(model, None, target_flops=0.5, epochs=4)


def test_a_params_budget_and_steps_mode():
    model = own_net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = BudgetPruner(model, X0, target_params=0.4, steps=8 * 4, every=4, optimizer=opt)
    data = loader()  # 4 batches: one pruner step per pass
    for _ in range(8):
        train_interval(model, data, opt, pruner)
        pruner.step(opt)
    assert pruning.count_params(model) <= 0.4 * pruner.original and "params_fraction" in pruner.history[-1].metrics()
    with pytest.raises(RuntimeError, match="all have run"):
        pruner.step(opt)


def test_state_dict_refuses_other_settings_and_networks():
    a = BudgetPruner(own_net(), X0, target_flops=0.3, epochs=8)
    with pytest.raises(ValueError, match=r"other settings \(target: 0.3 vs 0.5"):
        BudgetPruner(own_net(), X0, target_flops=0.5, epochs=8).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="fresh instance of the same network"):
        BudgetPruner(own_net(width=6), X0, target_flops=0.3, epochs=8).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="not a BudgetPruner state"):
        a.load_state_dict({"original_flops": 3})
    state = a.state_dict()
    assert torch.load  # plain values only: a weights_only round trip
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == state


def test_narrow_to_keeps_parameter_objects_and_refuses_wider_layers():
    model = own_net()
    small = pruning.prune(own_net(), target_flops=0.4, example_inputs=X0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {n: p for n, p in model.named_parameters()}
    assert narrow_to(model, pruning.architecture_json(small), opt)
    assert {n: p for n, p in model.named_parameters()} == before
    model.load_state_dict(small.state_dict())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model.eval()(x), small.eval()(x), rtol=0, atol=0)
    assert not narrow_to(model, pruning.architecture_json(small))
    with pytest.raises(ValueError, match="cannot come from this network"):
        narrow_to(small, pruning.architecture_json(own_net()))
    with pytest.raises(ValueError, match="not this network's"):
        narrow_to(model, pruning.architecture_json(nn.Sequential(nn.Conv2d(1, 2, 3))))


def _ddp_worker(rank, port, results):
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = own_net()  # identical on both ranks (DDP also broadcasts rank 0's)
        ddp = DDP(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        pruner = BudgetPruner(ddp, X0, target_flops=0.3, epochs=6, optimizer=opt)  # unwraps the DDP wrapper
        data = BrightDark(64, seed=rank)  # each rank its own share
        rebuilt = 0
        for _ in range(6):
            for i in range(0, 64, 16):
                opt.zero_grad()
                F.cross_entropy(ddp(data.x[i:i + 16]), data.y[i:i + 16]).backward()
                opt.step()
            if pruner.step(opt).changed:  # DDP keeps gradient buckets of the old shapes: a new wrapper
                ddp = DDP(model)
                rebuilt += 1
        results[rank] = (pruning.architecture_json(model), [p.detach().clone() for p in model.parameters()],
                         pruner.within_budget, rebuilt)
    finally:
        dist.destroy_process_group()


def test_under_ddp_both_ranks_narrow_alike_and_a_rebuilt_wrapper_trains_on():
    import socket

    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip(reason="torch.distributed is not available")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, results), nprocs=2)
    (arch0, params0, ok0, rebuilt0), (arch1, params1, ok1, rebuilt1) = results[0], results[1]
    assert ok0 and ok1 and arch0 == arch1 and rebuilt0 == rebuilt1 >= 2
    for a, b in zip(params0, params1):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # DDP kept the ranks in step across narrowings


def test_a_pruner_that_is_gone_stops_pushing_the_optimizers_parameters():
    import gc

    model = own_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the decoupled update could move a logit
    pruner = BudgetPruner(model, X0, target_flops=0.3, epochs=6, optimizer=opt, warmup=1)
    data = loader()
    train_interval(model, data, opt, pruner)
    pruner.step(opt)  # focused from here on
    logits = [m.weight.detach().clone() for m in pruner.regularizer.layers]
    train_interval(model, data, opt, pruner)
    assert any(not torch.equal(a, m.weight) for a, m in zip(logits, pruner.regularizer.layers))
    layers = pruner.regularizer.layers
    del pruner
    gc.collect()
    logits = [m.weight.detach().clone() for m in layers]
    train_interval(model, data, opt, None)
    assert all(torch.equal(a, m.weight) for a, m in zip(logits, layers))
