"""rnip_ext: Receding Neuron Importances structured pruning (Suteu & Guo, arXiv 2204.06404).

Train a CNN with :class:`BoundedBatchNorm2d` (scale ``sigmoid(weight)``) and the
:class:`RecedingRegularizer`; channels whose importance recedes to ~0 can then be removed.
Importing this package never requires Triton or the compiled extension.
"""

from . import functional
from ._version import __version__
from .nn import (
    BoundedBatchNorm2d,
    BoundedBatchNormAct2d,
    SyncBoundedBatchNorm2d,
    convert_batchnorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from . import models, pruning
from .pruning import prune
from .regularizers import L1Regularizer, PolarizationRegularizer, RecedingRegularizer, param_groups
from .pruner import BudgetPruner

__all__ = [
    "__version__",
    "functional",
    "BoundedBatchNorm2d",
    "BoundedBatchNormAct2d",
    "SyncBoundedBatchNorm2d",
    "convert_batchnorm",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
    "RecedingRegularizer",
    "L1Regularizer",
    "PolarizationRegularizer",
    "param_groups",
    "BudgetPruner",
    "models",
    "pruning",
    "prune",
]
