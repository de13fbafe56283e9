"""``rnip prune`` as a library call: :func:`prune` runs a :class:`~rnip_ext.app.spec.PruneSpec`.

One-shot pruning of a trained run (:func:`rnip_ext.app.runs.prune_and_measure`), fine-tuning
without the regulariser (:func:`rnip_ext.training.fit`), ``pruned.pt`` and ``summary.json``.
"""

from __future__ import annotations

import os

import torch

from .. import pruning, rundir
from ..pruning.latency_plan import LATENCY_RULES
from ..callbacks import run_callbacks
from ..rundir import CheckpointError, OutputDirError, load_checkpoint, read_json
from ..training import NonFiniteLossError, fit
from .errors import Interrupted, UserError, user_errors
from .runs import build_model, load_splits, prune_and_measure, prune_summary
from .spec import PruneSpec, check_option, parse_threads, resolve_device
from .train import fit_settings, read_resume, write_run_json

__all__ = ["RESUME_KEYS", "prune"]

# Settings that must match to resume an interrupted fine-tuning (the plan is recomputed from them).
RESUME_KEYS = ("source_run", "ratio", "target_flops", "target_params", "target_latency", "latency_rule", "round_to",
               "scope", "residual_streams", "min_channels", "finetune_epochs", "lr")


def _describe(spec: PruneSpec, plan) -> str:
    if spec.target_flops is not None:
        return f"to {plan.achieved_flops:.1%} of the FLOPs (target {spec.target_flops:g})"
    if spec.target_params is not None:
        return f"to {plan.achieved_params:.1%} of the parameters (target {spec.target_params:g})"
    if spec.target_latency is not None:
        before, predicted, measured = plan.latency
        return (f"to {(measured or predicted) / before:.1%} of the {'measured' if measured else 'predicted'} latency "
                f"(target {spec.target_latency:g})")
    return f"{spec.ratio:.0%} of channels"


def prune(spec: PruneSpec) -> dict:
    """Prune the run in ``spec.run_dir`` once, fine-tune into ``spec.out``; returns the summary (also ``summary.json``)."""
    config, state = _read_source(spec.run_dir)
    with user_errors(OutputDirError):
        rundir.refuse_overlap(spec.out, [spec.run_dir])
        mode = rundir.check(spec.out, "prune", resume=spec.resume, overwrite=spec.overwrite,
                            hint="pass --resume to continue its fine-tuning, --overwrite to start over, "
                                 "or choose another --out")
    device = resolve_device(spec.device or config["device"])
    torch.set_num_threads(parse_threads(spec.threads))
    workers = spec.workers
    if workers is not None:
        check_option("workers", workers, low=0)
    else:
        workers = min(4, os.cpu_count() or 1) if config["dataset"] == "imagefolder" else 0
    torch.manual_seed(config["seed"])
    with user_errors(FileNotFoundError, ValueError, RuntimeError, ImportError):
        splits = load_splits(config, device)
    model = build_model(config, splits.num_classes, splits.in_channels).to(device)
    with user_errors(RuntimeError, ValueError, prefix=f"{spec.run_dir}/best.pt does not fit the run's model: "):
        # A run that pruned while training stores its architecture: the fresh model is narrowed first.
        pruning.restore(model, state["model"], state.get("architecture"))
    example = torch.zeros(1, splits.in_channels, splits.image_size, splits.image_size, device=device)
    # A rough speed figure next to the FLOPs, on the run's device: FLOPs alone overstate speed-ups.
    with user_errors(ValueError):
        table = _latency_table(spec, model, example)
        outcome = prune_and_measure(model, splits, example, ratio=spec.ratio, target_flops=spec.target_flops,
                                    target_params=spec.target_params, target_latency=spec.target_latency,
                                    latency_table=table, latency_rule=spec.latency_rule or LATENCY_RULES[0],
                                    round_to=spec.round_to, scope=spec.scope,
                                    residual_streams=spec.residual_streams,
                                    min_channels=spec.min_channels, speed_batch_size=min(config["batch_size"], 256))
    _print_plan(outcome, device)
    ft_config = dict(config, lr=spec.lr or config["lr"], device=spec.device or config["device"], compile=False)
    ft_config.update(source_run=os.path.abspath(spec.run_dir), ratio=spec.ratio, target_flops=spec.target_flops,
                     target_params=spec.target_params, target_latency=spec.target_latency,
                     latency_table=None if spec.latency_table is None else os.path.abspath(spec.latency_table),
                     latency_rule=spec.latency_rule,
                     round_to=spec.round_to, scope=spec.scope, residual_streams=spec.residual_streams,
                     min_channels=spec.min_channels, finetune_epochs=spec.finetune_epochs)
    resume_from = read_resume(spec.out, ft_config, RESUME_KEYS, "prune") if spec.resume else None
    with user_errors(OutputDirError):
        created = rundir.claim(spec.out, "prune", mode)
    write_run_json(spec.out, "config.json", ft_config)
    small = outcome.small
    best = {"test_accuracy": outcome.acc_pruned, "val_accuracy": outcome.val_pruned, "epoch": 0}
    if spec.finetune_epochs > 0:
        best = _finetune(spec, small, splits, ft_config, resume_from, created, workers)
    rundir.record(spec.out, "pruned.pt")
    pruning.save(small, os.path.join(spec.out, "pruned.pt"))
    summary = prune_summary(outcome, best, config=config, ratio=spec.ratio, scope=spec.scope,
                            target_flops=spec.target_flops, target_params=spec.target_params,
                            target_latency=spec.target_latency, round_to=spec.round_to)
    write_run_json(spec.out, "summary.json", summary)
    plan = outcome.plan
    print(f"{config['method']} pruned {_describe(spec, plan)} ({spec.scope}): test accuracy {outcome.acc_before:.4f} "
          f"-> {outcome.acc_pruned:.4f} pruned -> {best['test_accuracy']:.4f} fine-tuned; params {plan.params[0]:,} "
          f"-> {plan.params[1]:,}; FLOPs {plan.flops[0]:,} -> {plan.flops[1]:,}")
    return summary


def _latency_table(spec: PruneSpec, model, example):
    """``--latency-table PATH``: the saved table at ``PATH`` (the planner validates it against the
    model, device and torch version), or, when ``PATH`` does not exist, a table measured now and
    saved there (atomically; an existing file is never replaced)."""
    path = spec.latency_table
    if path is None or os.path.exists(path):
        return path
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UserError(f"--latency-table {path}: its directory does not exist")
    table = pruning.LatencyTable.build(model, example, round_to=spec.round_to, min_channels=spec.min_channels,
                                       progress=spec.progress, residual_streams=spec.residual_streams)
    with user_errors(OSError):
        table.save(path)
    print(f"latency table measured and saved to {path}", flush=True)
    return table


def _read_source(run_dir: str) -> tuple[dict, dict]:
    """The ``config.json`` and ``best.pt`` of a finished training run, or a :class:`UserError`."""
    try:
        config = read_json(os.path.join(run_dir, "config.json"))
        state = load_checkpoint(os.path.join(run_dir, "best.pt"))
    except (FileNotFoundError, CheckpointError) as exc:
        raise UserError(f"{run_dir} is not a finished `rnip train` run ({exc})") from exc
    if not isinstance(config, dict) or not {"arch", "method", "dataset", "seed"} <= set(config):
        raise UserError(f"{run_dir}/config.json is not an `rnip train` run's config")
    return config, state


def _print_plan(outcome, device) -> None:
    plan, speed = outcome.plan, (outcome.speed_before, outcome.speed_after)
    print(plan)
    print(f"measured speed (rough: median of {speed[0].timed_batches} batches of {speed[0].batch_size} after "
          f"{speed[0].warmup} warm-up, eval, {device}, {speed[0].threads} threads): {speed[0]} -> {speed[1]} "
          f"({speed[1].images_per_s / speed[0].images_per_s:.2f}x); FLOPs {plan.flops[0]:,} -> {plan.flops[1]:,} "
          f"({plan.flops[0] / max(plan.flops[1], 1):.2f}x fewer)")


def _finetune(spec: PruneSpec, small, splits, ft_config: dict, resume_from, created: bool, workers: int) -> dict:
    """The paper's schedule again from the run's lr, without the regulariser; ``small`` ends at its best epoch."""
    try:
        with user_errors(RuntimeError, prefix=f"cannot resume {spec.out}: "):
            if resume_from is not None:  # widths differ if the source run changed since
                small.load_state_dict(resume_from["model"])
        best = fit(small, splits, epochs=spec.finetune_epochs, resume_from=resume_from,
                   callbacks=run_callbacks(spec.out, splits, num_workers=workers), num_workers=workers,
                   progress=spec.progress, description="fine-tune", **fit_settings(ft_config))
    except KeyboardInterrupt:
        saved = os.path.isfile(os.path.join(spec.out, "last.pt"))
        raise Interrupted(spec.out, saved, rundir.release(spec.out, created)) from None
    except NonFiniteLossError as exc:
        rundir.release(spec.out, created)
        raise UserError(str(exc)) from exc
    small.load_state_dict(load_checkpoint(os.path.join(spec.out, "best.pt"))["model"])
    return best
