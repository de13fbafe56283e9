"""Train your own network to 30% of its FLOPs in your own loop, with rnip_ext.BudgetPruner.

An own CNN with a residual block, an own Dataset and DataLoader, AdamW, OneCycleLR, a GradScaler
and label smoothing: the pruner adds one line to the loss and one call per epoch, and narrows the
model in place (the optimiser, scheduler and scaler keep working). Runs in seconds on a CPU.

    python examples/budget_own_loop.py [--epochs 8] [--target 0.3]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rnip_ext


class Net(nn.Module):
    def __init__(self, width: int = 16, classes: int = 4) -> None:
        super().__init__()
        bn = rnip_ext.BoundedBatchNorm2d  # or build with nn.BatchNorm2d and rnip_ext.convert_batchnorm(model)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), bn(width), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), bn(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), bn(width)
        self.wide = nn.Sequential(nn.Conv2d(width, 4 * width, 3, padding=1, bias=False), bn(4 * width), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes))

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))  # a residual block
        return self.head(self.wide(x))


def data(n: int = 512, classes: int = 4, seed: int = 0) -> TensorDataset:
    """Noisy 12x12 images whose class is a fixed random pattern (the same patterns for every ``seed``)."""
    patterns = torch.randn(classes, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(classes, (n,), generator=g)
    return TensorDataset(patterns[labels] + 1.5 * torch.randn(n, 3, 12, 12, generator=g), labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--target", type=float, default=0.3, help="fraction of the FLOPs to keep")
    args = p.parse_args()
    torch.manual_seed(0)
    model = Net()
    loader = DataLoader(data(), batch_size=32, shuffle=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=args.epochs * len(loader))
    scaler = torch.amp.GradScaler("cuda" if torch.cuda.is_available() else "cpu")
    pruner = rnip_ext.BudgetPruner(model, torch.zeros(1, 3, 12, 12), target_flops=args.target, epochs=args.epochs)
    for epoch in range(args.epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1) + pruner.penalty()
            optimizer.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
        step = pruner.step(optimizer, scheduler=scheduler, scaler=scaler)
        print(f"epoch {epoch + 1}: {step.fraction:.1%} of the FLOPs, {step.removed} channels removed "
              f"({step.forced} of them not yet receded), loss {loss.item():.3f}")
    x, y = data(256, seed=1).tensors  # held out: new noise, the same classes
    accuracy = (model.eval()(x).argmax(1) == y).float().mean().item()
    print(f"final: {rnip_ext.pruning.count_flops(model, x[:1]) / pruner.original_flops:.1%} of the FLOPs, "
          f"held-out accuracy {accuracy:.1%}")


if __name__ == "__main__":
    main()
