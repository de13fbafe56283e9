"""rnip_ext.integrations.lightning with a real lightning.Trainer on CPU: train to a budget, ModelCheckpoint +
load_from_checkpoint, and a run resumed from a mid-run checkpoint that continues the schedule."""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from budget_helpers import X0, BrightDark, OwnNet
from rnip_ext import pruning

# torchmetrics (imported by Lightning) imports torchvision, whose CUDA build cannot register its
# operators with the CPU torch here: the test-only stub tests/zoo_models.py uses.
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from rnip_ext.integrations.lightning import BudgetPruning, restore_architecture  # noqa: E402


class Net(L.LightningModule):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.net = OwnNet()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)}

    def on_load_checkpoint(self, checkpoint):
        restore_architecture(self, checkpoint)


def _trainer(tmp_path, epochs=6, **kw):
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1, save_last=True)
    budget = BudgetPruning(X0, target_flops=0.3)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[budget, ckpt], deterministic=True, **kw)
    return trainer, budget


def _data():
    return DataLoader(BrightDark(64), batch_size=16, shuffle=False)


def test_a_lightning_run_reaches_the_budget_and_its_checkpoints_load_narrowed(tmp_path):
    trainer, budget = _trainer(tmp_path)
    model = Net()
    params = {id(p) for p in model.parameters()}
    trainer.fit(model, _data())
    pruner = budget.pruner
    assert pruner.within_budget and pruner.done and pruner.model is model
    assert {id(p) for p in model.parameters()} == params  # narrowed in place: Lightning's optimiser stayed bound
    assert {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]} == params
    assert sum(s.removed - s.forced for s in pruner.history) > 0  # channels receded under AdamW
    loaded = Net.load_from_checkpoint(tmp_path / "last.ckpt")  # a fresh, unpruned Net narrowed on load
    assert pruning.architecture_json(loaded) == pruning.architecture_json(model)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x), rtol=0, atol=0)


def test_a_run_resumed_from_a_mid_run_checkpoint_continues_the_schedule(tmp_path):
    full, full_budget = _trainer(tmp_path / "full")
    reference = Net()
    full.fit(reference, _data())
    mid = tmp_path / "full" / "epoch=2.ckpt"  # after 3 of 6 epochs: already narrowed
    assert torch.load(mid, weights_only=False)["callbacks"]["rnip_ext.BudgetPruning"]["steps_done"] == 3
    resumed, budget = _trainer(tmp_path / "resumed")
    model = Net(seed=5)  # fresh and unpruned
    resumed.fit(model, _data(), ckpt_path=mid)
    assert budget.pruner.steps_done == 6 and budget.pruner.within_budget
    assert pruning.architecture_json(model) == pruning.architecture_json(reference)
    assert [s.removed for s in budget.pruner.history] == [s.removed for s in full_budget.pruner.history]
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)


def test_the_run_length_is_required(tmp_path):
    trainer = L.Trainer(max_epochs=-1, max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False,
                        callbacks=[BudgetPruning(X0, target_flops=0.3)])
    with pytest.raises(ValueError, match="needs the run's length"):
        trainer.fit(Net(), _data())
