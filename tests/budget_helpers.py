"""What a new user brings to budget training: an own residual CNN, an own Dataset, an own loop (test helper)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rnip_ext import BoundedBatchNorm2d


class Block(nn.Module):
    """A residual block: its inner channels can be pruned, the residual stream cannot."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = BoundedBatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = BoundedBatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class OwnNet(nn.Module):
    """A plain stem, one residual block, a plain conv with a wide middle, a linear head."""

    def __init__(self, classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), BoundedBatchNorm2d(width), nn.ReLU())
        self.block = Block(width)
        self.mid = nn.Sequential(nn.Conv2d(width, 4 * width, 3, padding=1, bias=False), BoundedBatchNorm2d(4 * width),
                                 nn.ReLU(), nn.Conv2d(4 * width, 2 * width, 3, padding=1, bias=False),
                                 BoundedBatchNorm2d(2 * width), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, classes))

    def forward(self, x):
        return self.head(self.mid(self.block(self.stem(x))))


def own_net(seed: int = 0, **kw) -> OwnNet:
    torch.manual_seed(seed)
    return OwnNet(**kw)


class BrightDark(Dataset):
    """``n`` random 8x8 grey images labelled bright (1) or dark (0): learnable in a few steps."""

    def __init__(self, n: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, 8, 8, generator=g) + 0.5 * torch.randint(0, 2, (n, 1, 1, 1), generator=g)
        self.y = (self.x.mean((1, 2, 3)) > 0.75).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def loader(seed: int = 0, n: int = 64, batch_size: int = 16) -> DataLoader:
    return DataLoader(BrightDark(n, seed), batch_size=batch_size, shuffle=True, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


X0 = torch.zeros(1, 1, 8, 8)


def train_interval(model, data, optimizer, pruner=None, *, scaler=None, scheduler=None, label_smoothing=0.1):
    """One epoch of the own loop: ``loss = task + pruner.penalty()``, GradScaler, a per-step scheduler."""
    model.train()
    for x, y in data:
        loss = F.cross_entropy(model(x), y, label_smoothing=label_smoothing)
        if pruner is not None:
            loss = loss + pruner.penalty()
        optimizer.zero_grad()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return loss  # the last batch's graph stays alive across pruner.step(), as in most loops
