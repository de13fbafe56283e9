"""``BoundedBatchNorm2d``: a drop-in ``nn.BatchNorm2d`` whose scale is ``sigmoid(weight)``."""

from __future__ import annotations

import inspect
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import init
from torch.nn.modules.batchnorm import _NormBase

from .. import functional as RF
from .._backend import BACKENDS, resolve_backend
from .._validation import is_int
from ..ops import bounded_bn as ops_bn

# torch 2.13 gave _NormBase a keyword-only ``bias``; older releases (2.6-2.12) always add a shift.
_NORMBASE_TAKES_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters

__all__ = ["BoundedBatchNorm2d"]


def _stamp(t: Tensor | None):
    """What identifies a tensor's current values for a cache: storage and in-place version."""
    return None if t is None else (t.data_ptr(), t._version)


class _PenaltyRecord(NamedTuple):
    """A fused forward's per-channel penalty, valid for one ``shift`` and one weight version."""

    shift: float
    penalty: Tensor
    weight_version: int


class BoundedBatchNorm2d(_NormBase):
    r"""Batch normalisation over a 4-D input with a scale bounded in (0, 1).

    .. math::

        y = \sigma(w) \, \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} + \beta

    per channel, where ``w`` (:attr:`weight`) is an unbounded logit initialised ``N(0, 1)`` and the
    shift ``beta`` (:attr:`bias`) exists only with ``bias=True``. Without a shift (the default, as
    in Suteu & Guo, arXiv 2204.06404) a channel whose importance ``sigmoid(w)`` has receded to ~0
    outputs ~0, so removing it changes nothing downstream.

    Everything else is ``torch.nn.BatchNorm2d``: the same arguments, state_dict keys
    (``weight``, [``bias``], ``running_mean``, ``running_var``, ``num_batches_tracked``), unbiased
    running variance, ``momentum=None`` for a cumulative average, eval mode on running statistics,
    ``track_running_stats=False`` for batch statistics in both modes, ``affine=False`` for scale 1
    and no shift, mixed precision (fp16/bf16 input, fp32 parameters and statistics) and the input's
    memory format kept in the output.

    The class deliberately does not derive from ``torch.nn.modules.batchnorm._BatchNorm``: tools
    that test for that class (``nn.SyncBatchNorm.convert_sync_batchnorm``, Torch-Pruning's BN
    pruner) would otherwise treat the logit as a plain BatchNorm scale and silently change the
    network. ``convert_sync_batchnorm`` therefore leaves these layers untouched.

    Args:
        num_features: number of channels ``C`` of an ``(N, C, H, W)`` input.
        eps: added to the variance for stability; must be > 0.
        momentum: running-statistics factor; ``None`` for a cumulative moving average.
        affine: learn the scale logit (and, with ``bias=True``, a shift).
        track_running_stats: keep running statistics for eval mode.
        device, dtype: factory arguments for parameters and buffers.
        bias: keyword-only; add a learnable shift (default ``False``). Requires ``affine=True``.
        backend: keyword-only; ``"auto"`` (Triton kernels on CUDA tensors when Triton imports,
            eager PyTorch otherwise), ``"triton"`` or ``"eager"``; ``None`` (default) defers to
            the ``RNIP_BACKEND`` environment variable, itself ``auto`` by default.

    Penalty attachment: on the Triton path, when a penalty is attached (:meth:`attach_penalty`,
    which :class:`~rnip_ext.RecedingRegularizer` calls), each training forward also yields this
    layer's per-channel receding penalty ``s (1 - log s)``, ``s = sigmoid(weight + shift)``, kept
    for one :meth:`take_recorded_penalty`, and the backward pass adds its gradient into
    ``d(weight)`` inside the same kernel. The attachment is not copied (``deepcopy``, pickling)
    and carries over when :func:`~rnip_ext.convert_sync_batchnorm` swaps the class.
    """

    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = False,
        backend: str | None = None,
    ) -> None:
        if backend is not None and (not isinstance(backend, str) or backend.lower() not in BACKENDS):
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)} or None, got {backend!r}")
        if not is_int(num_features):
            raise TypeError(f"num_features must be an int, got {type(num_features).__name__}")
        if num_features < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        if not isinstance(eps, (int, float)) or not eps > 0 or math.isinf(eps):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        if bias and not affine:
            raise ValueError("bias=True needs affine=True (affine=False means scale 1 and no shift)")
        if _NORMBASE_TAKES_BIAS:
            super().__init__(
                num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
            )
        else:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
            if not bias:
                # torch < 2.13: _NormBase always makes a shift; drop it the way 2.13 registers
                # none (a None entry in _parameters, so state_dict has no "bias" key).
                self.bias = None
        self.backend = backend
        # The penalty attachment (attach_penalty): the shift the fused path computes the penalty
        # with, and the latest record, consumed by take_recorded_penalty.
        self._receding_shift: float | None = None
        self._recorded_penalty: _PenaltyRecord | None = None

    def __getstate__(self):
        # Copies (deepcopy, pickle, pruning) are not bound to the original's regulariser, and a
        # recorded penalty holds an autograd graph that cannot be copied.
        state = super().__getstate__()
        state["_receding_shift"] = None
        state["_recorded_penalty"] = None
        state.pop("_eval_cache", None)
        return state

    def __setstate__(self, state):
        state.setdefault("backend", None)
        state.setdefault("_receding_shift", None)
        state.setdefault("_recorded_penalty", None)
        super().__setstate__(state)

    # -- penalty attachment --------------------------------------------------------------------

    def attach_penalty(self, shift: float | None) -> None:
        """Compute the receding penalty with ``shift`` in each fused training forward (``None``:
        detach). Any recorded penalty is dropped. The owner (e.g. a regulariser) then reads each
        forward's record with :meth:`take_recorded_penalty`."""
        if shift is not None:
            shift = float(shift)
            if not math.isfinite(shift):
                raise ValueError(f"shift must be finite, got {shift}")
        self._receding_shift = shift
        self._recorded_penalty = None

    @property
    def penalty_shift(self) -> float | None:
        """The attached penalty's shift (:meth:`attach_penalty`), or ``None`` when detached."""
        return self._receding_shift

    @property
    def has_recorded_penalty(self) -> bool:
        """Whether the last forward left a penalty record not yet taken."""
        return self._recorded_penalty is not None

    def take_recorded_penalty(self, shift: float) -> Tensor | None:
        """The per-channel penalty the last fused forward computed for ``shift``, once (else None).

        A record made before the weight last changed in place (an optimiser step) is stale and
        dropped: the regulariser then computes the penalty from the current weight.
        """
        record = self._recorded_penalty
        if record is None:  # the eager path's every step: no nn.Module.__setattr__ call
            return None
        self._recorded_penalty = None
        if record.shift != shift or record.weight_version != self._fast_attr("weight")._version:
            return None
        return record.penalty

    def _wants_penalty(self) -> bool:
        """Whether this training forward should return the attached regulariser's penalty."""
        if not self.training or self._receding_shift is None:
            return False
        weight = self._fast_attr("weight")
        return weight is not None and weight.requires_grad and torch.is_grad_enabled()

    def _record_penalty(self, shift: float, penalty: Tensor) -> None:
        self._recorded_penalty = _PenaltyRecord(shift, penalty, self._fast_attr("weight")._version)

    def extra_repr(self) -> str:
        # Written here so the repr names the shift on every torch (2.13's _NormBase does, older
        # ones do not).
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}"
        )

    def reset_parameters(self) -> None:
        """Reset running statistics, draw ``weight ~ N(0, 1)`` (the paper's init), zero ``bias``."""
        self.reset_running_stats()
        if self.affine:
            init.normal_(self.weight, 0.0, 1.0)
            if self.bias is not None:
                init.zeros_(self.bias)

    @property
    def importance(self) -> Tensor:
        """Per-channel importance ``sigmoid(weight)``, detached (all ones when ``affine=False``)."""
        if self.weight is None:
            device = self.running_mean.device if self.running_mean is not None else None
            return torch.ones(self.num_features, device=device)
        return torch.sigmoid(self.weight.detach())

    def _fast_attr(self, name: str):
        """A parameter or buffer by dict lookup (nn.Module.__getattr__ costs ~1 us per read, a
        measurable share of a small layer's CPU step); anything else, e.g. a parametrised
        ``weight`` (``torch.nn.utils.parametrize``), through ordinary attribute access."""
        params = self._parameters
        if name in params:
            return params[name]
        buffers = self._buffers
        if name in buffers:
            return buffers[name]
        return getattr(self, name, None)

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"expected a Tensor input, got {type(input).__name__}")
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels (dim 1), got "
                f"{input.shape[1]} channels in input of shape {tuple(input.shape)}"
            )
        if not input.is_floating_point():
            raise TypeError(f"expected a floating-point input, got {input.dtype}")
        ref = self._fast_attr("weight")
        if ref is None:
            ref = self._fast_attr("running_mean")
        if ref is not None and ref.dtype != input.dtype and not (
            ref.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16)
        ):
            raise TypeError(
                f"input dtype {input.dtype} does not match the layer's parameters/buffers "
                f"({ref.dtype}); mixed precision supports only float16/bfloat16 input with float32 "
                "parameters: convert the layer with .to(dtype) or the input"
            )

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # A record is valid only for the forward that made it: drop the previous one (and the
        # graph it holds) whether or not this forward records. Written only when set: the
        # nn.Module.__setattr__ it costs is a measurable share of a small layer's CPU step.
        if self._recorded_penalty is not None:
            self._recorded_penalty = None
        if resolve_backend(input, self.backend) == "triton":
            return self._forward_triton(input)
        get = self._fast_attr
        running_mean, running_var = get("running_mean"), get("running_var")
        if not (self.training and self.track_running_stats):
            if (not self.training and running_mean is not None and input.dtype == running_mean.dtype
                    and self._no_graph(input)):  # fmt: skip
                return self._forward_folded(input, running_mean, running_var)
            # Batch statistics in training, and in eval when there are no running buffers; the
            # buffers are passed only where they are read (eval).
            use_batch_stats = self.training or (running_mean is None and running_var is None)
            if self.training:
                running_mean = running_var = None
            return RF.bounded_batch_norm(input, running_mean, running_var, get("weight"), get("bias"),
                                         use_batch_stats, 0.0, self.eps)  # fmt: skip
        tracked = get("num_batches_tracked")
        if tracked is not None:
            tracked.add_(1)
            if self.momentum is None:
                return self._forward_cumulative(input, running_mean, running_var, tracked)
        return RF.bounded_batch_norm(input, running_mean, running_var, get("weight"), get("bias"), True,
                                     0.0 if self.momentum is None else self.momentum, self.eps)  # fmt: skip

    def _no_graph(self, input: Tensor) -> bool:
        """Whether this forward builds no autograd graph (so eval may use the folded map; an
        input of the parameters' dtype is the caller's other condition: mixed precision keeps
        ``F.batch_norm``'s rounding)."""
        if not torch.is_grad_enabled():
            return True
        return not (input.requires_grad or any(p.requires_grad for p in self._parameters.values() if p is not None))

    def _forward_folded(self, input: Tensor, running_mean: Tensor, running_var: Tensor) -> Tensor:
        """Eval as one affine map ``y = x * A + B``, ``A = sigmoid(w) / sqrt(running_var + eps)``,
        ``B = b - running_mean * A``, folded once and reused until a parameter or buffer changes
        (its storage or its in-place version counter; a training step moves
        ``num_batches_tracked``) or ``eps`` does. The map runs as whichever CPU kernel is faster
        for the layout (measured, benchmarks/bn_speed.py): ``F.batch_norm``'s inference kernel
        with the folded scale and shift (mean 0, variance 1, eps 0: exactly ``x * A + B``) for
        NCHW, a broadcast ``addcmul`` for channels_last."""
        get = self._fast_attr
        weight, bias, tracked = get("weight"), get("bias"), get("num_batches_tracked")
        # The running buffers change in place inside batch-norm kernels, which do not bump their
        # version counters; every such training step increments num_batches_tracked, which does.
        # Storage pointers catch replaced data (.to(), .data = ...); one key, built flat (this
        # runs every eval call).
        key = (self.eps, _stamp(weight), _stamp(bias), _stamp(running_mean), _stamp(running_var), _stamp(tracked))
        cached = self.__dict__.get("_eval_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                scale = torch.rsqrt(running_var + self.eps)
                if weight is not None:
                    scale = scale * torch.sigmoid(weight)
                shift = -running_mean * scale
                if bias is not None:
                    shift = shift + bias
                cached = (key, scale, shift, torch.zeros_like(scale), torch.ones_like(scale))
            self.__dict__["_eval_cache"] = cached
        _, scale, shift, zero, one = cached
        if input.is_contiguous():
            return torch.batch_norm(input, scale, shift, zero, one, False, 0.0, 0.0, False)
        view = (1, -1) + (1,) * (input.dim() - 2)
        return torch.addcmul(shift.view(view), input, scale.view(view))

    def _forward_cumulative(self, input: Tensor, running_mean: Tensor, running_var: Tensor, tracked: Tensor):
        """Training with ``momentum=None`` (running = cumulative average, ``f = 1 / count``)
        without a host synchronisation: ``F.batch_norm`` with ``momentum=1`` writes the batch
        statistics (mean, unbiased variance) into zeroed scratch buffers in the same pass, and the
        running buffers move towards them by ``f``, a device tensor -- never ``float(count)``."""
        batch_mean = torch.zeros_like(running_mean)
        batch_var = torch.zeros_like(running_var)
        get = self._fast_attr
        y = RF.bounded_batch_norm(input, batch_mean, batch_var, get("weight"), get("bias"), True, 1.0, self.eps)
        with torch.no_grad():
            factor = tracked.to(running_mean.dtype).reciprocal()  # count >= 1: just incremented
            running_mean.lerp_(batch_mean, factor)
            running_var.lerp_(batch_var, factor)
        return y

    def _forward_triton(self, input: Tensor) -> Tensor:
        """The fused kernels (``rnip_ext.ops``); running statistics are updated inside them."""
        # Parameters and buffers by dict lookup (_fast_attr): this runs every training step.
        get = self._fast_attr
        running_mean, running_var = get("running_mean"), get("running_var")
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        if not use_batch_stats:
            return ops_bn.bounded_batch_norm_eval(input, running_mean, running_var, get("weight"), get("bias"), self.eps)
        if input.numel() == input.shape[1]:  # F.batch_norm's rule, which the kernels do not check
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size {input.size()}"
            )
        with_penalty = self._wants_penalty()
        shift = self._receding_shift if with_penalty else 0.0
        # Running statistics and num_batches_tracked are updated inside the op's kernels (no
        # host sync, no per-step host-to-device copy, no extra launches).
        track = self.training and self.track_running_stats
        y, _, _, penalty = ops_bn.bounded_batch_norm_train(
            input, get("weight"), get("bias"), self.eps, shift, with_penalty,
            running_mean if track else None,
            running_var if track else None,
            get("num_batches_tracked") if track else None,
            self.momentum,
        )  # fmt: skip
        if with_penalty:
            self._record_penalty(shift, penalty)
        return y

    @classmethod
    def _can_replace(cls, bn: nn.Module) -> bool:
        """Whether a layer of this class computes what ``bn`` computes, up to the scale's form."""
        return type(bn).forward is nn.BatchNorm2d.forward

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, *, bias: bool = False) -> "BoundedBatchNorm2d":
        """A ``BoundedBatchNorm2d`` replacing the plain ``bn``, on the same device and dtype.

        Carries over ``num_features``, ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
        the running statistics and ``num_batches_tracked``, the training mode and the parameters'
        ``requires_grad``; with ``bias=True`` (and ``bn`` having a shift) also the shift. The scale
        logit ``weight`` is drawn afresh from ``N(0, 1)``, the paper's initialisation: a plain
        BatchNorm's ``gamma`` is unbounded and its sign carries meaning, so there is no faithful
        logit for it.
        """
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or isinstance(bn, nn.SyncBatchNorm):
            raise TypeError(f"from_batchnorm expects an nn.BatchNorm2d, got {type(bn).__name__}")
        if not cls._can_replace(bn):
            raise TypeError(
                f"from_batchnorm: {type(bn).__qualname__} has its own forward (timm's BatchNormAct2d also "
                f"applies an activation), which a {cls.__name__} would drop; rnip_ext.convert_batchnorm(model) "
                "turns norm-activation layers into BoundedBatchNormAct2d and refuses other subclasses"
            )
        ref = bn.weight if bn.weight is not None else bn.running_mean
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        new = cls(
            bn.num_features,
            bn.eps,
            bn.momentum,
            bn.affine,
            bn.track_running_stats,
            **factory,
            bias=bias and bn.affine,
        )
        with torch.no_grad():
            if bn.track_running_stats and bn.running_mean is not None:
                new.running_mean.copy_(bn.running_mean)
                new.running_var.copy_(bn.running_var)
                new.num_batches_tracked.copy_(bn.num_batches_tracked)
            if new.bias is not None and bn.bias is not None:
                new.bias.copy_(bn.bias)
        if bn.affine:
            new.weight.requires_grad_(bn.weight.requires_grad)
            if new.bias is not None and bn.bias is not None:
                new.bias.requires_grad_(bn.bias.requires_grad)
        new.train(bn.training)
        return new
