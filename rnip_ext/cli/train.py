"""``rnip train``: the paper's training protocol with model selection on a validation split."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn

from .. import distributed as D
from .. import models
from ..data import load_dataset
from ..nn import convert_sync_batchnorm
from ..pruning import count_flops, count_params
from ..training import METHODS, bn_kind, default_strength, evaluate, make_optimizer, make_regularizer, make_scheduler, train_epoch
from .runs import CheckpointError, append_jsonl, load_checkpoint, read_json, save_checkpoint, versions, write_json

ARCHS = ("vgg16", "resnet56", "vgg_small")
# Settings that must match to resume a run (the rest, e.g. --epochs or --device, may change).
# --epochs is one of them: the lr milestones sit at 50% and 75% of it.
RESUME_KEYS = ("arch", "dataset", "method", "strength", "shift", "seed", "batch_size", "lr", "val_fraction",
               "weight_decay", "bn_lr_scale", "image_size", "epochs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", choices=ARCHS, default="vgg16")
    p.add_argument("--dataset", choices=("cifar10", "cifar100", "digits"), default="digits")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py / cifar-100-python")
    p.add_argument("--download", action="store_true", help="fetch CIFAR with torchvision (if installed)")
    p.add_argument("--method", choices=METHODS, default="rni")
    p.add_argument("--strength", type=float, default=None, help="regulariser strength (default: the paper's)")
    p.add_argument("--shift", type=float, default=None, help="receding shift b (default: the paper's)")
    p.add_argument("--epochs", type=int, default=160)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--bn-lr-scale", type=float, default=10.0)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    return torch.device(name)


def build_model(config: dict, num_classes: int, in_channels: int) -> nn.Module:
    """The model a run config describes (same builder for training, pruning and reporting)."""
    bn = bn_kind(config["method"])
    if config["arch"] == "vgg16":
        return models.vgg16_cifar(num_classes, bn, in_channels)
    if config["arch"] == "resnet56":
        return models.resnet56_cifar(num_classes, bn, in_channels)
    return models.vgg_small(num_classes, bn, in_channels=in_channels)


def image_size_for(arch: str, dataset: str) -> int | None:
    """Digits are upsampled to 32x32 for the CIFAR networks, 16x16 for the small VGG."""
    if dataset != "digits":
        return None
    return 16 if arch == "vgg_small" else 32


def resolve_config(args: argparse.Namespace) -> dict:
    strength, shift = default_strength(args.method, args.arch)
    config = {
        "arch": args.arch, "dataset": args.dataset, "data_dir": args.data_dir, "method": args.method,
        "strength": strength if args.strength is None else args.strength,
        "shift": shift if args.shift is None else args.shift,
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "weight_decay": args.weight_decay,
        "bn_lr_scale": args.bn_lr_scale, "val_fraction": args.val_fraction, "seed": args.seed,
        "device": args.device, "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
        "image_size": image_size_for(args.arch, args.dataset), "bn": bn_kind(args.method),
        "optimizer": "SGD(momentum=0.9, nesterov=True)", "schedule": "lr/10 at 50% and 75% of epochs",
    }
    for key, low in (("epochs", 1), ("batch_size", 1)):
        if config[key] < low:
            raise SystemExit(f"error: --{key.replace('_', '-')} must be >= {low}")
    if config["strength"] < 0:
        raise SystemExit("error: --strength must be >= 0")
    if args.dataset != "digits" and not 0.0 < config["val_fraction"] < 1.0:
        # Model selection needs a validation split (never the test set).
        raise SystemExit("error: --val-fraction must be in (0, 1): epochs are selected on the validation split")
    return config


def fit(model: nn.Module, splits, config: dict, out: str, *, epochs: int, regularizer, device: torch.device,
        resume_from: dict | None, progress: bool, description: str,
        dist_ctx: D.DistributedContext | None = None) -> dict:
    """Train with per-epoch checkpoints (``last.pt``), best-on-validation (``best.pt``) and metrics.

    With ``dist_ctx`` (under torchrun) the model trains wrapped in ``DistributedDataParallel`` on
    this rank's shard of the training set; rank 0 alone evaluates (on the unwrapped model, which
    needs no collective) and writes metrics and checkpoints; every rank waits at each epoch's end.
    """
    is_main = dist_ctx is None or dist_ctx.is_main
    optimizer = make_optimizer(model, config["lr"], config["weight_decay"], config["bn_lr_scale"])
    scheduler = make_scheduler(optimizer, epochs)
    scaler = torch.amp.GradScaler(device.type) if config["amp"] == "fp16" else None
    generator = torch.Generator().manual_seed(config["seed"])
    start_epoch, best = 0, {"val_accuracy": -1.0, "epoch": -1, "test_accuracy": None}
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        if scaler is not None and resume_from.get("scaler"):
            scaler.load_state_dict(resume_from["scaler"])
        generator.set_state(resume_from["generator"])
        torch.set_rng_state(resume_from["torch_rng"])
        start_epoch = int(resume_from["epoch"]) + 1
        best = {"val_accuracy": float(resume_from["best_val"]), "epoch": int(resume_from["best_epoch"]),
                "test_accuracy": resume_from.get("best_test")}
    runner = torch.compile(model) if config["compile"] else model
    train_runner, train_data = runner, splits.train
    if dist_ctx is not None:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        train_runner = torch.compile(ddp) if config["compile"] else ddp
        train_data = D.ShardedDataset(splits.train, dist_ctx.rank, dist_ctx.world_size)
    metrics_path = os.path.join(out, "metrics.jsonl")
    if is_main and os.path.exists(metrics_path):  # drop rows of an epoch that died before its checkpoint
        with open(metrics_path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["epoch"] <= start_epoch]
        with open(metrics_path, "w") as f:
            f.writelines(rows)
    from tqdm.auto import tqdm

    for epoch in tqdm(range(start_epoch, epochs), desc=description, disable=not progress,
                      initial=start_epoch, total=epochs):
        stats = train_epoch(train_runner, train_data, optimizer, config["batch_size"], regularizer, amp=config["amp"],
                            scaler=scaler, channels_last=config["channels_last"], generator=generator,
                            progress=progress, description=f"epoch {epoch + 1}")
        lr = optimizer.param_groups[-1]["lr"]
        scheduler.step()
        if dist_ctx is not None:
            # Ranks see equal shares, so the plain mean over ranks is the epoch's mean.
            loss, accuracy, penalty, speed = D.average_stats(
                [stats.loss, stats.accuracy, stats.penalty, stats.images_per_second], device)
            stats = type(stats)(loss, accuracy, penalty, speed * dist_ctx.world_size)
            if not is_main:
                D.barrier()
                continue
        val = evaluate(runner, splits.val, amp=config["amp"], channels_last=config["channels_last"])
        test = evaluate(runner, splits.test, amp=config["amp"], channels_last=config["channels_last"])
        row = {"epoch": epoch + 1, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
               "penalty": stats.penalty, "val_accuracy": val, "test_accuracy": test, "lr": lr,
               "images_per_second": stats.images_per_second, "time": time.time()}
        append_jsonl(metrics_path, row)
        if val > best["val_accuracy"]:
            best = {"val_accuracy": val, "epoch": epoch + 1, "test_accuracy": test}
            save_checkpoint(os.path.join(out, "best.pt"), {"model": model.state_dict(), "epoch": epoch})
        save_checkpoint(os.path.join(out, "last.pt"), {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "epoch": epoch,
            "best_val": best["val_accuracy"], "best_epoch": best["epoch"], "best_test": best["test_accuracy"],
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
        })
        if dist_ctx is not None:
            D.barrier()
    return best


def run(args: argparse.Namespace) -> dict:
    """Train one run; under torchrun (``WORLD_SIZE`` > 1) as one rank of a DDP job."""
    dist_ctx = D.context_from_env()
    if dist_ctx is None:
        return _run(args, None)
    try:
        return _run(args, dist_ctx)
    finally:
        D.teardown()


def _run(args: argparse.Namespace, dist_ctx: D.DistributedContext | None) -> dict:
    is_main = dist_ctx is None or dist_ctx.is_main
    config = resolve_config(args)
    out = args.out
    config_path = os.path.join(out, "config.json")
    resume_from = None
    if args.resume:
        if not os.path.isfile(config_path):
            raise SystemExit(f"error: --resume but {out} holds no run (no config.json)")
        old = read_json(config_path)
        changed = [k for k in RESUME_KEYS if old.get(k) != config.get(k)]
        if changed:
            raise SystemExit(f"error: cannot resume {out}: settings differ from the run's ({', '.join(changed)})")
        try:
            resume_from = load_checkpoint(os.path.join(out, "last.pt"))
        except CheckpointError as exc:
            raise SystemExit(f"error: cannot resume: {exc}") from exc
    elif os.path.exists(os.path.join(out, "last.pt")):
        raise SystemExit(f"error: {out} already holds a run; pass --resume to continue it or choose another --out")
    if is_main:
        os.makedirs(out, exist_ok=True)

    # Every rank seeds alike, so models start identical (DDP also broadcasts rank 0's).
    torch.manual_seed(config["seed"])
    device = resolve_device(config["device"]) if dist_ctx is None else D.setup(dist_ctx, config["device"])
    splits = load_dataset(config["dataset"], config["data_dir"], config["val_fraction"], config["seed"], device,
                          download=args.download, image_size=config["image_size"])
    model = build_model(config, splits.num_classes, splits.in_channels).to(device)
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)
    config.update({"num_classes": splits.num_classes, "in_channels": splits.in_channels,
                   "image_size_used": splits.image_size, "resolved_device": str(device), "versions": versions(),
                   "params": count_params(model), "flops": count_flops(model, example),
                   "train_size": len(splits.train), "val_size": len(splits.val), "test_size": len(splits.test)})
    if dist_ctx is not None:
        # Per-process batch: the global batch is world_size * batch_size.
        config["world_size"] = dist_ctx.world_size
        model = convert_sync_batchnorm(model)
    if is_main:
        write_json(config_path, config)
    regularizer = make_regularizer(model, config["method"], config["strength"], config["shift"])
    try:
        best = fit(model, splits, config, out, epochs=config["epochs"], regularizer=regularizer, device=device,
                   resume_from=resume_from, progress=is_main and not args.no_progress,
                   description=f"train {config['method']}", dist_ctx=dist_ctx)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the last finished epoch is saved; continue with: rnip train ... --out {out} --resume")
        raise SystemExit(130)
    summary = {"kind": "train", "arch": config["arch"], "dataset": config["dataset"], "method": config["method"],
               "ratio": 0.0, "best_epoch": best["epoch"], "val_accuracy": best["val_accuracy"],
               "test_accuracy": best["test_accuracy"], "params": config["params"], "flops": config["flops"]}
    if not is_main:
        return summary
    write_json(os.path.join(out, "summary.json"), summary)
    print(f"{config['method']}: best epoch {best['epoch']} val {best['val_accuracy']:.4f} "
          f"test {best['test_accuracy']:.4f} -> {out}")
    return summary
