"""benchmarks/bn_speed.py refuses bad arguments with one argparse error, before any work."""

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
