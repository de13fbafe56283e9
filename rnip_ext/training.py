"""The paper's training recipe as reusable pieces: regulariser by method, optimiser, one epoch, evaluation.

Recipe (Suteu & Guo): SGD with Nesterov momentum 0.9, lr 0.1 divided by 10 at 50% and 75% of
the epochs, weight decay 1e-4 on convolutions and linear layers, BatchNorm parameters with 10x
the learning rate and no weight decay. The CLI (:mod:`rnip_ext.cli`) drives these.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import InMemoryDataset
from .nn import BoundedBatchNorm2d
from .regularizers import L1Regularizer, PolarizationRegularizer, RecedingRegularizer, param_groups

__all__ = [
    "METHODS",
    "DEFAULT_STRENGTH",
    "EpochStats",
    "bn_kind",
    "default_strength",
    "evaluate",
    "make_optimizer",
    "make_regularizer",
    "make_scheduler",
    "train_epoch",
]

METHODS = ("rni", "l1", "polarization", "none")

# The paper's strengths (and shifts) per method and architecture family.
DEFAULT_STRENGTH = {
    ("rni", "vgg"): (1e-3, 3.0),
    ("rni", "resnet"): (1e-4, 0.0),
    ("l1", "vgg"): (1e-4, 0.0),
    ("l1", "resnet"): (1e-5, 0.0),
    ("polarization", "vgg"): (1e-4, 0.0),
    ("polarization", "resnet"): (1e-5, 0.0),
}


def bn_kind(method: str) -> str:
    """The receding regulariser needs bounded BatchNorms; the baselines train plain ones."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return "bounded" if method == "rni" else "plain"


def default_strength(method: str, arch: str) -> tuple[float, float]:
    """``(strength, shift)`` the paper used for ``method`` on ``arch`` (0 for ``none``)."""
    if method == "none":
        return 0.0, 0.0
    family = "resnet" if "resnet" in arch else "vgg"
    return DEFAULT_STRENGTH[(method, family)]


def make_regularizer(model: nn.Module, method: str, strength: float, shift: float = 0.0):
    """The regulariser of ``method`` for ``model`` (``None`` for ``none`` or zero strength)."""
    bn_kind(method)
    if method == "none" or strength == 0:
        return None
    if method == "rni":
        return RecedingRegularizer(model, strength, shift)
    if method == "l1":
        return L1Regularizer(model, strength)
    return PolarizationRegularizer(model, strength)


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 1e-4, bn_lr_scale: float = 10.0):
    """SGD, Nesterov momentum 0.9, with the paper's groups: every BatchNorm (bounded or plain) gets
    ``bn_lr_scale * lr`` and no weight decay, so baselines train under the same recipe."""
    groups = param_groups(model, lr, weight_decay, bn_lr_scale,
                          bn_types=(BoundedBatchNorm2d, nn.modules.batchnorm._BatchNorm))
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True)


def make_scheduler(optimizer, epochs: int):
    """lr / 10 at 50% and 75% of the epochs."""
    milestones = sorted({max(1, math.floor(epochs * 0.5)), max(1, math.floor(epochs * 0.75))})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


@dataclass
class EpochStats:
    """What one training epoch measured."""

    loss: float
    accuracy: float
    penalty: float
    images_per_second: float


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def train_epoch(model: nn.Module, data: InMemoryDataset, optimizer, batch_size: int, regularizer=None, *,
                amp: str = "none", scaler=None, channels_last: bool = False, generator=None,
                progress: bool = True, description: str = "train") -> EpochStats:
    """One epoch of ``criterion + reg()`` with augmentation; returns mean loss, accuracy, penalty, speed."""
    from tqdm.auto import tqdm

    model.train()
    device = data.images.device
    total = correct = 0
    loss_sum = penalty_sum = 0.0
    start = time.perf_counter()
    batches = data.batches(batch_size, shuffle=True, augment=True, generator=generator, drop_last=len(data) > batch_size)
    bar = tqdm(batches, total=data.num_batches(batch_size, drop_last=len(data) > batch_size), desc=description,
               leave=False, disable=not progress)
    for x, y in bar:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            out = model(x)
            loss = F.cross_entropy(out, y)
        penalty = regularizer() if regularizer is not None else None
        total_loss = loss if penalty is None else loss + penalty
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(total_loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            total_loss.backward()
            optimizer.step()
        if isinstance(regularizer, PolarizationRegularizer):
            regularizer.clamp_()
        n = y.shape[0]
        total += n
        loss_sum += loss.item() * n
        correct += (out.argmax(1) == y).sum().item()
        if penalty is not None:
            penalty_sum += penalty.item() * n
        bar.set_postfix(loss=f"{loss_sum / total:.3f}", acc=f"{correct / total:.3f}")
    elapsed = time.perf_counter() - start
    return EpochStats(loss_sum / max(total, 1), correct / max(total, 1), penalty_sum / max(total, 1),
                      total / max(elapsed, 1e-9))


@torch.no_grad()
def evaluate(model: nn.Module, data: InMemoryDataset, batch_size: int = 256, *, amp: str = "none",
             channels_last: bool = False) -> float:
    """Top-1 accuracy of ``model`` on ``data`` in eval mode."""
    model.eval()
    device = data.images.device
    correct = 0
    for x, y in data.batches(batch_size):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / max(len(data), 1)
