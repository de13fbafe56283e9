"""Train a tiny CNN with bounded BatchNorm and the receding regulariser on generated data.

The README's "main job" until the full ``rnip demo`` lands: it needs nothing but torch (tqdm
shows progress when installed), runs in seconds on a CPU, and prints how the channel importances
``sigmoid(weight)`` move under the regulariser: the low ones recede towards 0 while the useful
ones stay up, the bimodal split that makes pruning lossless.

    python examples/tiny_train.py [--steps 1000] [--strength 0.02] [--shift 3] [--seed 0]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import rnip_ext

try:
    from tqdm.auto import trange
except ImportError:  # progress bars are a nicety, not a requirement
    trange = range


def make_data(n: int, classes: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy 12x12 images whose class is a fixed random pattern: learnable by a small CNN."""
    patterns = torch.randn(classes, 3, 12, 12, generator=gen)
    labels = torch.randint(classes, (n,), generator=gen)
    images = patterns[labels] + 1.5 * torch.randn(n, 3, 12, 12, generator=gen)
    return images, labels


def make_model(classes: int, width: int = 24) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False),
        rnip_ext.BoundedBatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, width, 3, padding=1, bias=False),
        rnip_ext.BoundedBatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, classes),
    )


def importances(model: nn.Module) -> torch.Tensor:
    return torch.cat([m.importance for m in model.modules() if isinstance(m, rnip_ext.BoundedBatchNorm2d)])


def histogram(values: torch.Tensor, bins: int = 10) -> str:
    """A text histogram of values in [0, 1]."""
    counts = torch.histc(values, bins=bins, min=0.0, max=1.0).long().tolist()
    top = max(counts) or 1
    lines = []
    for i, count in enumerate(counts):
        bar = "#" * round(40 * count / top)
        lines.append(f"  [{i / bins:.1f}, {(i + 1) / bins:.1f}) {count:4d} {bar}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--strength", type=float, default=0.02,
                        help="regulariser strength (large: a tiny run must show the effect quickly)")
    parser.add_argument("--shift", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    x, y = make_data(2048, classes=4, gen=gen)
    x_test, y_test = make_data(512, classes=4, gen=gen.manual_seed(args.seed))
    model = make_model(classes=4)
    reg = rnip_ext.RecedingRegularizer(model, strength=args.strength, shift=args.shift)
    opt = torch.optim.SGD(
        rnip_ext.param_groups(model, lr=0.05, weight_decay=1e-4), momentum=0.9, nesterov=True
    )
    print(f"rnip_ext {rnip_ext.__version__}: {reg}")
    print("importance sigmoid(weight) before training:")
    print(histogram(importances(model)))

    for step in trange(args.steps):
        idx = torch.randint(len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx]) + reg()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    imp = importances(model)
    print(f"after {args.steps} steps: test accuracy {accuracy:.3f}, penalty {reg.penalty().item():.2f}")
    print("importance sigmoid(weight) after training:")
    print(histogram(imp))
    print(f"channels below 0.05: {(imp < 0.05).sum().item()} of {imp.numel()} (prunable at no cost)")


if __name__ == "__main__":
    main()
