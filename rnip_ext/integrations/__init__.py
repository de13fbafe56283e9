"""Bridges to other pruning libraries, each an optional dependency imported on its own.

``rnip_ext.integrations.torch_pruning`` prunes models that hold
:class:`~rnip_ext.BoundedBatchNorm2d` through Torch-Pruning's dependency graph, for architectures
that :func:`rnip_ext.pruning.plan` cannot trace (residual streams, concatenations, attention).
It needs ``pip install rnip_ext[torch-pruning]``; importing this package alone never does.

``rnip_ext.integrations.lightning`` trains a ``lightning.LightningModule`` to a FLOPs budget with a
``lightning.Trainer`` callback around :class:`rnip_ext.BudgetPruner` (``pip install rnip_ext[lightning]``).
"""
