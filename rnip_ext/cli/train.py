"""``rnip train``: the paper's training protocol with model selection on a validation split.

Argument parsing only: the run is :func:`rnip_ext.app.train.train` on a :class:`~rnip_ext.app.spec.TrainSpec`.
"""

from __future__ import annotations

import argparse

from ..app.runs import ARCHS, DATASET_CHOICES
from ..app.spec import TrainSpec
from ..app.train import train
from ..pruner import UPDATES
from ..training import METHODS
from ._options import add_threads_argument


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=ARCHS, default="vgg16", help="network: the paper's VGG-16 or ResNet-56, or the demo's small VGG")
    p.add_argument("--dataset", choices=DATASET_CHOICES, default="digits",
                   help="digits ships with scikit-learn (no download); imagefolder streams DIR/train/<class>/*.jpg|png "
                        "(DIR/val, DIR/test optional) from --data-dir with worker processes")
    p.add_argument("--data-dir", default=None,
                   help="folder holding cifar-10-batches-py / cifar-100-python, or the image folder (required for "
                        "CIFAR and imagefolder)")
    p.add_argument("--image-size", type=int, default=None,
                   help="imagefolder/digits: images are resized to this square size (default 32; digits: 16 for "
                        "vgg_small, 32 otherwise)")
    p.add_argument("--mean", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="imagefolder: per-channel mean of the normalisation (default ImageNet's)")
    p.add_argument("--std", type=float, nargs=3, default=None, metavar=("R", "G", "B"),
                   help="imagefolder: per-channel std of the normalisation (default ImageNet's)")
    p.add_argument("--workers", type=int, default=None,
                   help="imagefolder: data-loading worker processes (default min(4, CPUs))")
    p.add_argument("--download", action="store_true", help="fetch CIFAR with torchvision (if installed)")
    p.add_argument("--method", choices=METHODS, default="rni",
                   help="rni: receding regulariser on bounded BatchNorm; l1: network slimming; polarization; none")
    p.add_argument("--strength", type=float, default=None, help="regulariser strength (default: the paper's for --method and --arch)")
    p.add_argument("--shift", type=float, default=None, help="receding shift b (default: the paper's for --arch)")
    p.add_argument("--penalty", choices=("layer", "paper"), default="layer",
                   help="rni only: the receding penalty on layer-relative scales (a layer cannot recede as a "
                        "whole behind the next BatchNorm) or the paper's formulation on sigmoid(w + shift)")
    p.add_argument("--epochs", type=int, default=160, help="training epochs (lr / 10 at 50%% and 75%%)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate, > 0")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (per process under torchrun)")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="weight decay of convs and linear layers")
    p.add_argument("--bn-lr-scale", type=float, default=10.0, help="BatchNorm learning-rate multiplier")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="fraction of the CIFAR training set held out for model selection, in (0, 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of initialisation, split, shuffling and augmentation")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast precision")
    p.add_argument("--channels-last", action="store_true", help="train in channels_last memory format")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--target-flops", type=float, default=None,
                   help="train to this fraction of the network's FLOPs (MACs) in one run, in (0, 1]: receded "
                        "channels leave after each epoch, the penalty focused on the channels the planner would "
                        "remove next (rnip_ext.BudgetPruner; needs --method rni)")
    p.add_argument("--receded-below", type=float, default=None,
                   help="with --target-flops: a channel is receded when its importance is below T, in (0, 1) "
                        "(default 0.01)")
    p.add_argument("--receding", choices=UPDATES, default=None,
                   help="with --target-flops: 'decoupled' (default) moves the focused logits after each optimiser "
                        "step, outside the optimiser; 'loss' adds the penalty to the loss (the paper's way)")
    add_threads_argument(p, "auto")
    p.add_argument("--out", required=True,
                   help="run directory: must be new, empty, or this run being resumed (required)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in --out, deleting only the files an earlier rnip run wrote there")
    p.add_argument("--no-progress", action="store_true", help="print nothing per epoch")


def run(args: argparse.Namespace) -> dict:
    return train(TrainSpec.from_args(args))
