"""SyncBoundedBatchNorm2d on 2 gloo ranks against BoundedBatchNorm2d on the concatenated batch.

The distributed part runs in a subprocess (``python this_file.py MODE DIR``) that spawns one
process per rank: spawned workers must import their target by path, which pytest's importlib
mode does not offer, and the subprocess gives every run a hard timeout. One launch serves all
layer cases (process start-up dominates the cost); cases and results travel as files.
"""

import copy
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import rnip_ext as R

WORLD = 2
TIMEOUT_S = 150
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# ---------------------------------------------------------------------------------------------
# Shared by the workers and the references.


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _layer_cases():
    """(name, settings, split) of every layer case; inputs are drawn from the case index."""
    cases = []
    for dtype in (torch.float64, torch.float32):
        for split in ((2, 2), (3, 1), (0, 4)):
            cases.append({"dtype": dtype, "split": split, "bias": True, "momentum": 0.1, "backend": "eager"})
    cases.append({"dtype": torch.float64, "split": (1, 3), "bias": False, "momentum": None, "backend": "eager"})
    cases.append({"dtype": torch.float32, "split": (4, 0), "bias": False, "momentum": 0.3, "backend": "eager",
                  "channels_last": True})
    # The Triton kernels (interpreter on CPU): statistics kernel, gather, normalise kernel, and the
    # receding penalty recorded by the forward with its gradient fused into the backward, whose
    # partial/combine kernels feed one all-reduce before the dx kernel.
    cases.append({"dtype": torch.float32, "split": (2, 2), "bias": True, "momentum": 0.1, "backend": "triton"})
    cases.append({"dtype": torch.float64, "split": (3, 1), "bias": False, "momentum": None, "backend": "triton"})
    cases.append({"dtype": torch.float32, "split": (3, 0), "bias": True, "momentum": 0.2, "backend": "triton",
                  "channels_last": True})
    return cases


def _case_inputs(index: int, case: dict):
    gen = torch.Generator().manual_seed(1000 + index)
    n, c = sum(case["split"]), 3
    dtype = case["dtype"]
    draw = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    x1 = 3.0 + 2.0 * draw(n, c, 3, 2)
    x2 = -1.0 + draw(n, c, 3, 2)
    g = draw(n, c, 3, 2)
    weight, bias = draw(c), draw(c)
    if case.get("channels_last"):
        x1, x2 = (t.contiguous(memory_format=torch.channels_last) for t in (x1, x2))
    return x1, x2, g, weight, bias


def _make_layer(cls, case, weight, bias):
    layer = cls(3, momentum=case["momentum"], bias=case["bias"], backend=case["backend"], dtype=case["dtype"])
    with torch.no_grad():
        layer.weight.copy_(weight)
        if layer.bias is not None:
            layer.bias.copy_(bias)
    return layer


STRENGTH, SHIFT = 0.5, 1.0


def _run_layer(layer, x1, x2, g, penalty_weight: float):
    """One step (forward, loss, backward) and a second forward; returns what the tests compare."""
    reg = R.RecedingRegularizer(layer, STRENGTH, SHIFT, normalize=None)
    x1 = x1.clone().requires_grad_(True)
    y = layer(x1)
    loss = (y * g).sum() + penalty_weight * reg()
    loss.backward()
    with torch.no_grad():
        layer(x2)
    return {
        "y": y.detach(),
        "y_channels_last": y.is_contiguous(memory_format=torch.channels_last) and y.shape[0] > 1,
        "dx": x1.grad,
        "dw": layer.weight.grad,
        "db": None if layer.bias is None else layer.bias.grad,
        "running_mean": layer.running_mean.clone(),
        "running_var": layer.running_var.clone(),
        "num_batches_tracked": layer.num_batches_tracked.clone(),
    }


def _net(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False), R.BoundedBatchNorm2d(4, bias=True), nn.ReLU(),
        nn.Conv2d(4, 5, 3, padding=1, bias=False), R.BoundedBatchNorm2d(5, momentum=None), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3),
    )  # fmt: skip
    return net.to(dtype)


def _ddp_batches(dtype, batch: int = 6, steps: int = 2):
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(batch, 3, 5, 5, generator=gen, dtype=torch.float64).to(dtype),
             torch.randint(0, 3, (batch,), generator=gen)) for _ in range(steps)]


def _train(model, net, batches, reg_strength=0.05):
    reg = R.RecedingRegularizer(net, reg_strength, SHIFT, normalize=None)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        loss = F.cross_entropy(model(x), y) + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The worker side (run as a script).


def _worker(rank: int, world: int, mode: str, folder: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        if mode == "layer":
            for i, case in enumerate(_layer_cases()):
                x1, x2, g, weight, bias = _case_inputs(i, case)
                lo = sum(case["split"][:rank])
                hi = lo + case["split"][rank]
                layer = _make_layer(R.SyncBoundedBatchNorm2d, case, weight, bias)
                results[i] = _run_layer(layer, x1[lo:hi], x2[lo:hi], g[lo:hi], 1.0)
        elif mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            for dtype in (torch.float64, torch.float32):
                net = R.convert_sync_batchnorm(_net(dtype))
                batches = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in _ddp_batches(dtype)]
                results[str(dtype)] = _train(DDP(net), net, batches)
        torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _launch(mode: str, folder) -> list:
    """Run ``mode`` on WORLD gloo ranks in a subprocess, bounded by TIMEOUT_S; per-rank results."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), TRITON_INTERPRET="1",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, mode, str(folder)], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"workers failed:\n{proc.stdout}\n{proc.stderr}"
    return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------------------------------------
# Tests.


@pytest.fixture(scope="module")
def layer_results(tmp_path_factory):
    start = time.perf_counter()
    results = _launch("layer", tmp_path_factory.mktemp("sync_layer"))
    print(f"layer workers: {time.perf_counter() - start:.1f} s")
    return results


def _tol(dtype):
    return {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-5}


@pytest.mark.parametrize("index", range(len(_layer_cases())),
                         ids=[f"{c['backend']}-{str(c['dtype'])[6:]}-{c['split'][0]}+{c['split'][1]}"
                              for c in _layer_cases()])
def test_matches_single_process_on_concatenated_batch(layer_results, index):
    case = _layer_cases()[index]
    x1, x2, g, weight, bias = _case_inputs(index, case)
    ref_case = dict(case, backend="eager")
    ref = _run_layer(_make_layer(R.BoundedBatchNorm2d, ref_case, weight, bias), x1, x2, g, float(WORLD))
    ranks = [r[index] for r in layer_results]
    tol = _tol(case["dtype"])
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), ref["y"], **tol)
    torch.testing.assert_close(torch.cat([r["dx"] for r in ranks]), ref["dx"], **tol)
    # nn.SyncBatchNorm's convention: each rank holds its local share of the parameter gradient,
    # and each rank's loss carries the whole penalty (hence WORLD times it in the reference).
    torch.testing.assert_close(sum(r["dw"] for r in ranks), ref["dw"], **tol)
    if case["bias"]:
        torch.testing.assert_close(sum(r["db"] for r in ranks), ref["db"], **tol)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], ref["running_mean"], **tol)
        torch.testing.assert_close(r["running_var"], ref["running_var"], **tol)
        assert int(r["num_batches_tracked"]) == int(ref["num_batches_tracked"]) == 2
        assert r["y"].dtype == case["dtype"] and torch.isfinite(r["dx"]).all()
        if case.get("channels_last"):
            assert r["y_channels_last"] or r["y"].shape[0] <= 1


def test_ddp_two_steps_match_single_process_on_doubled_batch(tmp_path):
    start = time.perf_counter()
    ranks = _launch("ddp", tmp_path)
    print(f"ddp workers: {time.perf_counter() - start:.1f} s")
    for dtype in (torch.float64, torch.float32):
        net = _net(dtype)
        ref = _train(net, net, _ddp_batches(dtype))
        for r in ranks:
            got = r[str(dtype)]
            assert got.keys() == ref.keys()
            for key in ref:
                torch.testing.assert_close(got[key], ref[key], **_tol(dtype), msg=f"{dtype} {key}")


def test_without_process_group_behaves_like_bounded_batchnorm():
    assert not dist.is_initialized()
    case = {"dtype": torch.float64, "bias": True, "momentum": 0.1, "backend": "eager"}
    x1, x2, g, weight, bias = _case_inputs(0, dict(case, split=(2, 3)))
    got = _run_layer(_make_layer(R.SyncBoundedBatchNorm2d, case, weight, bias), x1, x2, g, 1.0)
    ref = _run_layer(_make_layer(R.BoundedBatchNorm2d, case, weight, bias), x1, x2, g, 1.0)
    for key, value in ref.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("track", [True, False])
def test_eval_mode_behaves_like_bounded_batchnorm(track):
    ref = R.BoundedBatchNorm2d(4, track_running_stats=track, bias=True, dtype=torch.float64)
    with torch.no_grad():
        if track:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2)
    layer = R.convert_sync_batchnorm(copy.deepcopy(ref)).eval()
    ref.eval()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=0)


def test_convert_and_revert_keep_state_and_parameters():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), R.BoundedBatchNorm2d(4, bias=True, momentum=None, backend="eager"),
                        nn.Sequential(R.BoundedBatchNorm2d(4, track_running_stats=False)))
    net(torch.randn(2, 3, 2, 2))
    reg = R.RecedingRegularizer(net, 1e-3, 2.0, normalize=None)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    net.eval()
    assert R.convert_sync_batchnorm(net) is net
    assert type(net[1]) is R.SyncBoundedBatchNorm2d and type(net[2][0]) is R.SyncBoundedBatchNorm2d
    assert isinstance(net[1], R.BoundedBatchNorm2d)  # regulariser, pruning and importance still apply
    assert all(a is b for a, b in zip(net.parameters(), params))  # optimisers stay valid
    assert opt.param_groups[0]["params"][2] is net[1].weight
    assert not net[1].training and net[1].backend == "eager" and net[1].momentum is None
    assert net[1].penalty_shift == 2.0 and net[2][0].running_mean is None
    state = net.state_dict()
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in before)
    assert reg.penalty().isfinite()
    assert R.convert_sync_batchnorm(net) is net and type(net[1]) is R.SyncBoundedBatchNorm2d
    assert R.revert_sync_batchnorm(net) is net
    assert type(net[1]) is R.BoundedBatchNorm2d and type(net[2][0]) is R.BoundedBatchNorm2d
    assert all(a is b for a, b in zip(net.parameters(), params))
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)
    # A bare layer comes back as the new layer; a deep copy drops a custom process group.
    single = R.convert_sync_batchnorm(R.BoundedBatchNorm2d(2), process_group="placeholder")
    assert type(single) is R.SyncBoundedBatchNorm2d and single.process_group == "placeholder"
    assert copy.deepcopy(single).process_group is None
    assert type(R.revert_sync_batchnorm(single)) is R.BoundedBatchNorm2d
    # state_dict round trip between the two classes.
    plain = R.BoundedBatchNorm2d(2)
    plain.load_state_dict(single.state_dict())


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        R.convert_sync_batchnorm(object())
    with pytest.raises(TypeError, match="nn.Module"):
        R.revert_sync_batchnorm(None)
    with pytest.raises(ValueError, match="backend"):
        R.SyncBoundedBatchNorm2d(3, backend="cuda")
    with pytest.raises(ValueError, match="num_features"):
        R.SyncBoundedBatchNorm2d(0)
    with pytest.raises(ValueError, match="4D"):
        R.SyncBoundedBatchNorm2d(3)(torch.randn(2, 3))
    with pytest.raises(ValueError, match="channels"):
        R.SyncBoundedBatchNorm2d(3)(torch.randn(2, 4, 1, 1))


@pytest.mark.skipif(not torch.cuda.is_available() or not dist.is_nccl_available(), reason="needs CUDA and NCCL")
def test_single_rank_cuda_path_with_nccl(tmp_path):
    script = (
        "import torch, torch.distributed as dist, rnip_ext as R\n"
        "dist.init_process_group('nccl', rank=0, world_size=1)\n"
        "torch.manual_seed(0)\n"
        "for dtype in (torch.float32, torch.float16):\n"
        "    ref = R.BoundedBatchNorm2d(8, bias=True).cuda()\n"
        "    layer = R.convert_sync_batchnorm(R.BoundedBatchNorm2d(8, bias=True).cuda())\n"
        "    layer.load_state_dict(ref.state_dict())\n"
        "    x = (torch.randn(4, 8, 5, 7, device='cuda') + 3).to(dtype)\n"
        "    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()\n"
        "    ya, yb = layer._forward_sync(a, 1), ref(b)\n"
        "    g = torch.randn_like(ya)\n"
        "    (ya.float() * g).sum().backward(); (yb.float() * g).sum().backward()\n"
        "    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.float16 else dict(rtol=1e-4, atol=1e-4)\n"
        "    torch.testing.assert_close(ya, yb, **tol); torch.testing.assert_close(a.grad, b.grad, **tol)\n"
        "    torch.testing.assert_close(layer.weight.grad, ref.weight.grad, **tol)\n"
        "    torch.testing.assert_close(layer.running_var, ref.running_var, **tol)\n"
        "dist.destroy_process_group()\n"
    )
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr


if __name__ == "__main__":
    torch.multiprocessing.spawn(_worker, args=(WORLD, sys.argv[1], sys.argv[2]), nprocs=WORLD, join=True)
