"""benchmarks/bn_speed.py refuses bad arguments with one argparse error, before any work."""

import json
import os
import subprocess
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")


def run(*args):
    return subprocess.run([sys.executable, os.path.join(BENCH, "bn_speed.py"), *args], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: --device cuda is valid here")
def test_cuda_without_a_gpu_is_an_argument_error():
    done = run("--device", "cuda", "--sets", "vgg16_cifar")
    assert done.returncode == 2 and "torch.cuda.is_available() is False" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args,message", [(["--device", "gpu0"], "is not a torch device"),
                                          (["--sets", "vgg19"], "invalid choice: 'vgg19'")])
def test_unknown_device_or_shape_set(args, message):
    done = run(*args)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_rows_are_written_as_they_finish_with_host_timing(monkeypatch):
    """The JSON is rewritten after every row (a timeout keeps the finished rows), and training-step
    rows carry the host microseconds of our launchers and of the whole layer step."""
    monkeypatch.syspath_prepend(BENCH)
    import bn_speed

    written = []
    monkeypatch.setattr(bn_speed, "write_json", lambda name, payload: written.append(json.loads(json.dumps(payload))))
    bn_speed.main(["--device", "cpu", "--repeats", "3", "--modes", "fwdbwd", "eval", "--variants", "paper", "ours",
                   "--layouts", "nchw", "--threads", "1"])  # fmt: skip
    assert [len(p["rows"]) for p in written] == list(range(1, 7))
    assert [p["complete"] for p in written] == [False] * 5 + [True] and written[0]["planned_rows"] == 6
    rows = written[-1]["rows"]
    assert [r["mode"] for r in rows] == ["fwdbwd"] * 3 + ["eval"] * 3  # training steps first
    for r in rows:
        assert r["ours_ms"] > 0 and r["speedup_vs_paper"] > 0 and "ours_error" not in r, r
        assert ("host_us" in r) == (r["mode"] == "fwdbwd")
    assert all(0 < r["host_own_us"] < r["host_layer_us"] and 0 < r["host_us"] < r["host_layer_us"] for r in rows[:3])
    assert written[-1]["summary"]["median_host_us"] > 0
