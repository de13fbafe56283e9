"""Budget pruning in a Lightning ``Trainer``: :class:`BudgetPruning` around :class:`rnip_ext.BudgetPruner`.

    from rnip_ext.integrations.lightning import BudgetPruning, restore_architecture

    class Net(L.LightningModule):
        ...
        def on_load_checkpoint(self, checkpoint):   # pruned checkpoints load into a fresh Net
            restore_architecture(self, checkpoint)

    trainer = L.Trainer(max_epochs=30, callbacks=[BudgetPruning(torch.zeros(1, 3, 32, 32), target_flops=0.1)])
    trainer.fit(Net(), loader)

After each training epoch the callback calls ``pruner.step()`` with the trainer's optimiser and
scheduler; the module is narrowed in place, so Lightning's optimiser, scheduler and precision
plugin keep working. With the default ``update="decoupled"`` nothing goes into
``training_step``; with ``update="loss"`` add the callback's ``pruner.penalty()`` to the loss there. Checkpoints (``ModelCheckpoint``) carry the module's
architecture (``checkpoint["rnip_architecture"]``) and the pruner's state, so
``Net.load_from_checkpoint(path)`` and ``trainer.fit(Net(), ckpt_path=path)`` rebuild the
narrowed network and continue the schedule -- given the module's ``on_load_checkpoint`` above.
Needs ``pip install rnip_ext[lightning]``.
"""

from __future__ import annotations

import warnings

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised where lightning is missing
    raise ImportError("rnip_ext.integrations.lightning needs Lightning: pip install 'rnip_ext[lightning]'") from exc

from ..pruner import BudgetPruner, narrow_to
from ..pruning import architecture_json

__all__ = ["ARCHITECTURE_KEY", "BudgetPruning", "restore_architecture"]

ARCHITECTURE_KEY = "rnip_architecture"


def restore_architecture(module, checkpoint: dict) -> None:
    """Narrow ``module`` in place to the architecture a pruned checkpoint records (nothing when it
    records none); call it from the LightningModule's ``on_load_checkpoint``."""
    architecture = checkpoint.get(ARCHITECTURE_KEY)
    if architecture is not None:
        narrow_to(module, architecture)


class BudgetPruning(pl.Callback):
    """A ``lightning.pytorch.Callback`` training the module to a budget: one
    :class:`rnip_ext.BudgetPruner` step after each training epoch.

    ``example_inputs``, ``target_flops``/``target_params`` and ``pruner_kwargs`` go to
    :class:`~rnip_ext.BudgetPruner`; its schedule has ``epochs`` steps, by default the trainer's
    ``max_epochs``. :attr:`pruner` exists from ``setup`` on.
    """

    def __init__(self, example_inputs, *, target_flops: float | None = None, target_params: float | None = None,
                 epochs: int | None = None, **pruner_kwargs) -> None:
        super().__init__()
        self.example_inputs = example_inputs
        self.kwargs = dict(target_flops=target_flops, target_params=target_params, **pruner_kwargs)
        self.epochs = epochs
        self.pruner: BudgetPruner | None = None

    @property
    def state_key(self) -> str:
        return "rnip_ext.BudgetPruning"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self.pruner is not None:
            return
        epochs = self.epochs if self.epochs is not None else trainer.max_epochs
        if epochs is None or epochs < 0:
            raise ValueError("BudgetPruning needs the run's length: set Trainer(max_epochs=...) or BudgetPruning(epochs=...)")
        if type(pl_module).on_load_checkpoint is pl.LightningModule.on_load_checkpoint:
            warnings.warn(f"{type(pl_module).__name__} does not narrow itself when a checkpoint loads: pruned checkpoints "
                          "will not load into a fresh module. Add `def on_load_checkpoint(self, checkpoint): "
                          "restore_architecture(self, checkpoint)` (rnip_ext.integrations.lightning)", stacklevel=2)
        self.pruner = BudgetPruner(pl_module, self.example_inputs, epochs=epochs, **self.kwargs)

    def on_fit_start(self, trainer, pl_module) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"BudgetPruning needs exactly one optimiser, the module configures {len(trainer.optimizers)}")
        if self.pruner.optimizer is None:
            self.pruner.bind(trainer.optimizers[0])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        configs = trainer.lr_scheduler_configs
        step = self.pruner.step(trainer.optimizers[0], scheduler=configs[0].scheduler if len(configs) == 1 else None)
        if trainer.logger is not None:
            pl_module.log_dict({"budget/flops_fraction": step.flops_fraction, "budget/strength": step.next_strength,
                                "budget/removed": float(step.removed)}, on_epoch=True, logger=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[ARCHITECTURE_KEY] = architecture_json(pl_module)

    def state_dict(self) -> dict:
        return self.pruner.state_dict() if self.pruner is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict:
            self.pruner.load_state_dict(state_dict)
