"""The training-step entry points: the single-pass path where it fits, else the chunked one.

``train_forward`` and ``train_backward`` are what ``rnip_ext.ops`` calls. Each asks
:func:`._config.single_pass_config` (through ``bn_single.single_config_for``) whether one program
can hold a channel block's whole ``N*H*W`` slice; if so, one launch each way (2S forward, 3S
backward), otherwise the chunked kernels (statistics partials + normalise-with-combine, 3S;
backward partials + combine + dx, 5S). A ``config=`` argument forces a path: ``single_m > 0`` the single-pass
one, ``single_m == 0`` the chunked one.
"""

from __future__ import annotations

from torch import Tensor

from ._config import BNConfig
from .bn_backward import bn_backward
from .bn_chunked import bn_forward_chunked
from .bn_single import bn_backward_single, bn_forward_single, single_config_for

__all__ = ["train_forward", "train_backward", "uses_single_pass"]


def uses_single_pass(x: Tensor, config: BNConfig | None = None) -> bool:
    """Whether a training step on ``x`` (with ``config``, if given) takes the single-pass path."""
    return single_config_for(x, config) is not None


def train_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    shift: float = 0.0,
    with_penalty: bool = False,
    *,
    running: tuple[Tensor, Tensor] | None = None,
    momentum: float | None = 0.1,
    num_batches_tracked: Tensor | None = None,
    config: BNConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, penalty)`` of a training forward, running statistics updated in-kernel.

    See ``bn_single.bn_forward_single`` for the contract (both paths share it): one launch on
    the single-pass path, two on the chunked one (``bn_chunked``).
    """
    single = single_config_for(x, config)
    if single is not None:
        return bn_forward_single(
            x, weight, bias, eps, shift, with_penalty, running=running, momentum=momentum,
            num_batches_tracked=num_batches_tracked, config=single,
        )  # fmt: skip
    return bn_forward_chunked(
        x, weight, bias, eps, shift, with_penalty, running=running, momentum=momentum,
        num_batches_tracked=num_batches_tracked, config=config,
    )  # fmt: skip


def train_backward(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    penalty_grad: Tensor | None,
    eps: float,
    shift: float,
    training: bool,
    output_mask: tuple[bool, bool, bool] = (True, True, True),
    *,
    config: BNConfig | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dw, db)``: one launch on the single-pass path, at most three on the chunked one."""
    single = single_config_for(x, config)
    if single is not None:
        return bn_backward_single(
            dy, x, mean, var, weight, penalty_grad, eps, shift, training, output_mask,
            config=single,
        )  # fmt: skip
    return bn_backward(
        dy, x, mean, var, weight, penalty_grad, eps, shift, training, output_mask, config=config
    )
