"""`rnip train` under torchrun: 2 gloo ranks on CPU, tiny CIFAR-format data, bounded by a timeout."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from data_helpers import write_cifar
from rnip_ext.rundir import load_checkpoint
from rnip_ext.distributed import ShardedDataset, context_from_env
from rnip_ext.data import InMemoryDataset

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def test_torchrun_two_ranks_train(tmp_path):
    write_cifar(tmp_path / "data", "cifar10", n_per_file=24)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # CPU tensors take the eager path anyway
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rnip_ext", "train", "--arch", "vgg_small", "--dataset", "cifar10", "--data-dir",
           str(tmp_path / "data"), "--epochs", "1", "--batch-size", "8", "--val-fraction", "0.2",
           "--device", "cpu", "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert proc.stdout.count("best epoch") == 1  # rank 0 alone reports
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["train_size"] == 96
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in rows] == [1] and rows[0]["penalty"] > 0
    last = load_checkpoint(str(run / "last.pt"))
    assert int(last["epoch"]) == 0
    # The checkpoint is the plain model's: it loads without the synchronised layers.
    assert not any(k.startswith("module.") for k in last["model"])
    assert json.loads((run / "summary.json").read_text())["kind"] == "train"


def _torchrun(tmp_path, out, *extra_env, epochs=3):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    env.update(extra_env)
    # With RNIP_TEST_CRASH_AT the entry point is the test helper that adds the crashing callback.
    entry = [os.path.join(os.path.dirname(os.path.dirname(__file__)), "crash_train.py")] if any(
        k == "RNIP_TEST_CRASH_AT" for k, _ in extra_env) else ["-m", "rnip_ext"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.2",
           *entry, "train", "--arch", "vgg_small", "--dataset", "cifar10", "--data-dir",
           str(tmp_path / "data"), "--epochs", str(epochs), "--batch-size", "8", "--val-fraction", "0.2",
           "--device", "cpu", "--out", str(out), "--no-progress"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_restart_after_a_worker_dies_resumes_from_the_checkpoint(tmp_path):
    """Rank 1 is SIGKILLed at the 2nd step of epoch 2 (after epoch 1's checkpoint); torchrun
    restarts the group, which continues from last.pt without --resume and ends as an
    uninterrupted run does."""
    write_cifar(tmp_path / "data", "cifar10", n_per_file=24)
    full = _torchrun(tmp_path, tmp_path / "full")
    assert full.returncode == 0, f"{full.stdout}\n{full.stderr}"
    cut = _torchrun(tmp_path, tmp_path / "cut", ("RNIP_TEST_CRASH_AT", "1:2:2"))
    assert cut.returncode == 0, f"{cut.stdout}\n{cut.stderr}"
    assert "SIGKILL" in cut.stderr or "Signal 9" in cut.stderr or "exitcode: -9" in cut.stderr, cut.stderr
    rows = {}
    for name in ("full", "cut"):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = [json.loads(line) for line in lines if line.strip()]
    assert [r["epoch"] for r in rows["cut"]] == [1, 2, 3]  # every epoch once
    for a, b in zip(rows["full"], rows["cut"]):
        for key in ("train_loss", "train_accuracy", "penalty", "val_accuracy", "test_accuracy", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["epoch"], key)
    a = load_checkpoint(str(tmp_path / "full" / "last.pt"))["model"]
    b = load_checkpoint(str(tmp_path / "cut" / "last.pt"))["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    cut_config = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert cut_config["elastic_run_id"]


def test_context_from_env():
    assert context_from_env({}) is None and context_from_env({"WORLD_SIZE": "1"}) is None
    ctx = context_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (2, 4, 0, False)
    with pytest.raises(ValueError, match="RANK"):
        context_from_env({"WORLD_SIZE": "2", "RANK": "2"})


def test_sharded_dataset_splits_each_global_batch():
    images = torch.arange(11, dtype=torch.uint8).view(11, 1, 1, 1).expand(11, 1, 2, 2).contiguous()
    data = InMemoryDataset(images, torch.arange(11), (0.0,), (1.0,), augment_flips=False)
    shards = [ShardedDataset(data, r, 2) for r in range(2)]
    assert len(shards[0]) == 5 and shards[0].num_batches(2) == 3 and shards[0].num_batches(2, True) == 2
    seen = []
    for shard in shards:
        batches = list(shard.batches(2, shuffle=True, generator=torch.Generator().manual_seed(3)))
        assert [y.shape[0] for _, y in batches] == [2, 2, 1]
        seen.append(torch.cat([y for _, y in batches]))
    # Disjoint, equal shares of one shuffled order; together the order less its odd sample out.
    order = torch.randperm(11, generator=torch.Generator().manual_seed(3))[:10]
    assert torch.equal(torch.cat([seen[0][:2], seen[1][:2], seen[0][2:4], seen[1][2:4], seen[0][4:], seen[1][4:]]),
                       order)
    with pytest.raises(ValueError, match="rank"):
        ShardedDataset(data, 2, 2)


def test_elastic_state_resumes_only_this_jobs_run(tmp_path, monkeypatch):
    from rnip_ext.app.train import elastic_state

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"elastic_run_id": "job-a"}))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert elastic_state(str(run)) is None  # a first attempt never resumes by itself
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert elastic_state(str(run)) == "restart"  # died before its first checkpoint
    (run / "last.pt").write_bytes(b"")
    assert elastic_state(str(run)) == "resume"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-b")  # someone else's run in the same folder
    assert elastic_state(str(run)) is None


def test_torchrun_two_ranks_train_to_a_flops_budget(tmp_path):
    """Both ranks remove the same channels between epochs (the pruner checks they agree), DDP is
    rebuilt after each narrowing, and the run's checkpoint (synchronised BatchNorms) prunes and reports as a
    single-process one does."""
    from rnip_ext.cli import main
    from rnip_ext.app.runs import build_model
    from rnip_ext.pruning import count_flops, restore

    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rnip_ext", "train", "--arch", "vgg_small", "--dataset", "digits", "--epochs", "4",
           "--batch-size", "64", "--lr", "0.05", "--target-flops", "0.25",
           "--device", "cpu", "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    config = json.loads((run / "config.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert config["world_size"] == 2 and summary["flops"] <= 0.25 * config["flops"]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4] and rows[-1]["flops"] == summary["flops"]
    last = load_checkpoint(str(run / "last.pt"))
    model = restore(build_model(config, config["num_classes"], config["in_channels"]), last["model"],
                    last["architecture"])
    size = config["image_size_used"]
    assert count_flops(model, torch.zeros(1, config["in_channels"], size, size)) == summary["flops"]
    assert main(["prune", str(run), "--ratio", "0.2", "--finetune-epochs", "0", "--out", str(tmp_path / "p"),
                 "--no-progress", "--device", "cpu"]) == 0


def _check_same_worker(rank, port, texts, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from rnip_ext.distributed import check_same

    try:
        check_same(texts[rank], torch.device("cpu"), "the architecture")
        results[rank] = "same"
    except RuntimeError as exc:
        results[rank] = str(exc)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("texts, agree", [(("a", "a"), True), (("a", "b"), False)])
def test_check_same_raises_on_every_rank_when_ranks_disagree(texts, agree):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_check_same_worker, args=(port, texts, results), nprocs=2, join=True)
    if agree:
        assert dict(results) == {0: "same", 1: "same"}
    else:
        assert all("ranks disagree on the architecture" in results[r] for r in (0, 1))


def test_torchrun_two_ranks_train_on_an_image_folder_streamed_by_workers(tmp_path):
    """`--dataset imagefolder`: each rank reads its DistributedSampler share of the folder through a
    worker process; the run prunes and reports like any other."""
    from data_helpers import write_image_folder

    write_image_folder(tmp_path / "images", per_class=(8, 2, 2))
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "rnip_ext", "train", "--arch", "vgg_small", "--dataset", "imagefolder", "--data-dir",
           str(tmp_path / "images"), "--image-size", "16", "--workers", "1", "--epochs", "2", "--batch-size", "4",
           "--device", "cpu", "--out", str(run), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    config = json.loads((run / "config.json").read_text())
    assert config["world_size"] == 2 and config["train_size"] == 24 and config["num_classes"] == 3
    assert config["in_channels"] == 3 and config["image_size_used"] == 16
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # 24 images, 2 ranks of 12, batches of 4: 3 steps per rank and epoch, every image once.
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["test_accuracy"] <= 1 for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kind"] == "train" and summary["dataset"] == "imagefolder"
