"""Run specs: every setting of a train, prune, export or demo run, validated before anything is read or written.

The ``rnip`` commands parse their arguments into these (:meth:`TrainSpec.from_args` and friends);
library users build them directly. A setting the user must fix raises :class:`~rnip_ext.app.errors.UserError`
naming the option as the command spells it (``--epochs must be >= 1, got 0``).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, fields

import torch

from .._validation import describe_range
from ..budget import BUDGET_SHIFT, START_STRENGTH
from ..data import CIFAR_FILES
from ..pruning.latency_plan import LATENCY_RULES
from ..training import bn_kind, default_strength
from .demo import DEMO_EPOCHS, DEMO_FINETUNE_EPOCHS, DEMO_TARGETS
from .errors import UserError
from .plots import require_matplotlib
from .runs import image_size_for, resolve_threads

__all__ = ["BUDGET_MIN_CHANNELS", "DemoSpec", "ExportSpec", "PruneSpec", "TrainSpec", "check_option",
           "ReportSpec", "parse_threads", "resolve_device"]

# Every layer of a budget run keeps at least this many channels (the planner's default).
BUDGET_MIN_CHANNELS = 3


def check_option(name: str, value: float, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = True) -> None:
    """``value`` finite and within the bounds, else a :class:`UserError` naming ``--name``."""
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        span = describe_range(low, high, low_open=low_open, high_open=high_open) or "a finite number"
        raise UserError(f"--{name} must be {span}, got {value}")


def parse_threads(value: str | int) -> int:
    """``--threads``: a number >= 1, or ``auto`` (:func:`rnip_ext.app.runs.resolve_threads`)."""
    if value != "auto":
        try:
            value = int(value)
        except ValueError:
            raise UserError(f"--threads must be a number >= 1 or 'auto', got {value!r}") from None
        check_option("threads", value, low=1)
    return resolve_threads(value)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a device is a :class:`UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is available")
    return torch.device(name)


class _FromArgs:
    @classmethod
    def from_args(cls, args: argparse.Namespace):
        """The spec from parsed arguments (``--no-progress`` becomes ``progress``); absent ones keep their default."""
        names = {f.name for f in fields(cls)}
        values = {name: getattr(args, name) for name in names if hasattr(args, name)}
        for flag, name in (("no_progress", "progress"), ("no_plots", "plots")):
            if hasattr(args, flag) and name in names:
                values[name] = not getattr(args, flag)
        return cls(**values)


@dataclass
class TrainSpec(_FromArgs):
    """``rnip train``: the paper's recipe (or a budget run with ``target_flops``) into the run directory ``out``."""

    out: str
    arch: str = "vgg16"
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None
    mean: list | None = None
    std: list | None = None
    workers: int | None = None
    download: bool = False
    method: str = "rni"
    strength: float | None = None
    shift: float | None = None
    penalty: str = "layer"
    epochs: int = 160
    lr: float = 0.1
    batch_size: int = 64
    weight_decay: float = 1e-4
    bn_lr_scale: float = 10.0
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    target_flops: float | None = None
    receded_below: float | None = None
    receding: str | None = None
    threads: str | int = "auto"
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def config(self) -> dict:
        """Every setting of the run, resolved (the paper's defaults filled in) and validated: ``config.json``."""
        strength, shift = default_strength(self.method, self.arch)
        target, receding = self.target_flops, self.receding
        if target is not None and self.method == "rni":
            # A budget run starts BudgetPruner's controller at the focused penalty's strength.
            strength, shift = START_STRENGTH[receding or "decoupled"], BUDGET_SHIFT
        dataset, image_size, mean, std = self.dataset, self.image_size, self.mean, self.std
        config = {
            "arch": self.arch, "dataset": dataset, "data_dir": self.data_dir, "method": self.method,
            "strength": strength if self.strength is None else self.strength,
            "shift": shift if self.shift is None else self.shift,
            "penalty": self.penalty if self.method == "rni" else None,
            "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "weight_decay": self.weight_decay,
            "bn_lr_scale": self.bn_lr_scale, "val_fraction": self.val_fraction, "seed": self.seed,
            "device": self.device, "amp": self.amp, "channels_last": self.channels_last, "compile": self.compile,
            "image_size": image_size if image_size is not None else (
                32 if dataset == "imagefolder" else image_size_for(self.arch, dataset)),
            "mean": list(mean) if mean else None, "std": list(std) if std else None,
            "bn": bn_kind(self.method),
            "optimizer": "SGD(momentum=0.9, nesterov=True)", "schedule": "lr/10 at 50% and 75% of epochs",
        }
        self._check(config)
        below, receding = self.receded_below, self.receding
        if target is not None:
            below = 0.01 if below is None else below
            receding = receding or "decoupled"
            config.update(budget=f"BudgetPruner(receding={receding!r}, scope='local', geometric schedule after 2 "
                                 "epochs, budget at 1/3 of epochs)", min_channels=BUDGET_MIN_CHANNELS)
        config.update(target_flops=target, receded_below=below, receding=receding)
        return config

    def _check(self, config: dict) -> None:
        """Every setting in range, and the combinations that make sense (a :class:`UserError` otherwise)."""
        dataset, image_size, mean, std = self.dataset, self.image_size, self.mean, self.std
        target, receding = self.target_flops, self.receding
        check_option("epochs", config["epochs"], low=1)
        check_option("batch-size", config["batch_size"], low=1)
        check_option("lr", config["lr"], low=0, low_open=True)
        check_option("strength", config["strength"], low=0)
        check_option("shift", config["shift"])
        check_option("weight-decay", config["weight_decay"], low=0)
        check_option("bn-lr-scale", config["bn_lr_scale"], low=0, low_open=True)
        # Model selection needs a validation split (never the test set); digits use a fixed split,
        # but a value outside (0, 1) is a mistake there too.
        check_option("val-fraction", config["val_fraction"], low=0, high=1, low_open=True)
        if image_size is not None:
            if dataset.startswith("cifar"):
                raise UserError("--image-size applies to imagefolder and digits; CIFAR images are 32x32")
            check_option("image-size", image_size, low=1)
        if (mean or std) and dataset != "imagefolder":
            raise UserError("--mean and --std apply to --dataset imagefolder")
        for v in std or ():
            check_option("std", v, low=0, low_open=True)
        below = self.receded_below
        if target is None and (below is not None or receding is not None):
            raise UserError("--receded-below and --receding need --target-flops")
        if target is not None:
            check_option("target-flops", target, low=0, high=1, low_open=True, high_open=False)
            check_option("receded-below", 0.01 if below is None else below, low=0, high=1, low_open=True)
            if config["method"] != "rni":
                raise UserError(f"--target-flops trains with the receding regulariser: it needs --method rni, "
                                f"got {config['method']}")
        if config["dataset"] in CIFAR_FILES and config["data_dir"] is None:
            raise UserError(f"--dataset {config['dataset']} needs --data-dir (the folder holding "
                            f"{CIFAR_FILES[config['dataset']][0]})")
        if config["dataset"] == "imagefolder" and config["data_dir"] is None:
            raise UserError("--dataset imagefolder needs --data-dir (a folder holding train/<class>/<image> files)")
        _check_resume(self.resume, self.overwrite)


@dataclass
class PruneSpec(_FromArgs):
    """``rnip prune``: prune the trained run ``run_dir`` once (default budget: ratio 0.5), fine-tune into ``out``."""

    run_dir: str
    out: str
    ratio: float | None = None
    target_flops: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    latency_table: str | None = None
    latency_rule: str | None = None
    round_to: int | None = None
    residual_streams: bool = False
    scope: str = "global"
    min_channels: int = 3
    finetune_epochs: int = 160
    lr: float | None = None
    device: str | None = None
    resume: bool = False
    overwrite: bool = False
    workers: int | None = None
    threads: str | int = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.ratio is None and self.target_flops is None and self.target_params is None \
                and self.target_latency is None:
            self.ratio = 0.5
        if self.ratio is not None:
            check_option("ratio", self.ratio, low=0, high=1)
        if self.round_to is not None:
            check_option("round-to", self.round_to, low=1)
        if self.latency_table is not None and self.target_latency is None:
            raise UserError("--latency-table is used only with --target-latency")
        if self.latency_rule is not None:
            if self.target_latency is None:
                raise UserError("--latency-rule is used only with --target-latency")
            if self.latency_rule not in LATENCY_RULES:
                raise UserError(f"--latency-rule must be one of {', '.join(LATENCY_RULES)}, got {self.latency_rule!r}")
            if self.latency_rule == LATENCY_RULES[0]:  # the default, recorded as None like a run without the flag
                self.latency_rule = None
        if self.target_latency is not None and self.scope != "global":
            raise UserError("--target-latency plans over all layers at once: --scope must be global")
        for name in ("target-flops", "target-params", "target-latency"):
            value = getattr(self, name.replace("-", "_"))
            if value is not None:
                check_option(name, value, low=0, low_open=True, high=1, high_open=False)
        check_option("min-channels", self.min_channels, low=1)
        check_option("finetune-epochs", self.finetune_epochs, low=0)
        if self.lr is not None:
            check_option("lr", self.lr, low=0, low_open=True)
        _check_resume(self.resume, self.overwrite)


@dataclass
class ExportSpec(_FromArgs):
    """``rnip export``: the network of ``run_dir`` as one file ``out`` (``format`` pt2 or onnx; default from the suffix)."""

    run_dir: str
    out: str
    format: str | None = None

    def __post_init__(self) -> None:
        self.format = self.format or ("onnx" if self.out.lower().endswith(".onnx") else "pt2")


@dataclass
class DemoSpec(_FromArgs):
    """``rnip demo``: :func:`rnip_ext.app.demo.run_demo`'s settings as the command takes them (``threads``
    resolved to a count)."""

    out: str = "rnip-demo"
    seeds: int = 3
    epochs: int = DEMO_EPOCHS
    finetune_epochs: int = DEMO_FINETUNE_EPOCHS
    target_flops: list = field(default_factory=lambda: list(DEMO_TARGETS))
    device: str = "auto"
    threads: str | int = "1"
    plots: bool = True
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_option("seeds", self.seeds, low=1)
        check_option("epochs", self.epochs, low=1)
        check_option("finetune-epochs", self.finetune_epochs, low=0)
        self.threads = parse_threads(self.threads)
        for t in self.target_flops:
            check_option("target-flops", t, low=0, low_open=True, high=1, high_open=False)
        if len({round(t * 100) for t in self.target_flops}) != len(self.target_flops):
            raise UserError(f"--target-flops must differ by at least 0.01, got {self.target_flops}")
        _check_plots(self.plots)


@dataclass
class ReportSpec(_FromArgs):
    """``rnip report``: the table across the run directories ``runs`` (and their plots) into ``out``."""

    runs: list
    out: str = "report"
    plots: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check_plots(self.plots)


def _check_resume(resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise UserError("--resume continues the run in --out and --overwrite deletes it: pass one of them")


def _check_plots(plots: bool) -> None:
    if plots:
        try:
            require_matplotlib()
        except ImportError as exc:
            raise UserError(f"{exc}, or pass --no-plots") from exc
