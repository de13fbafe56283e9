"""``SyncBoundedBatchNorm2d``: bounded BatchNorm with statistics over the global batch of all ranks.

Transport is ``torch.distributed`` only (one ``all_gather`` forward, one ``all_reduce`` backward),
so it runs under DDP and ``torchrun`` with any backend (``gloo`` on CPU, ``nccl`` on CUDA).

Per channel, rank ``r`` holds ``n_r`` positions with local mean ``m_r`` and ``M2_r = sum (x - m_r)^2``.
The gathered ``[world, 3, C]`` triples are merged in rank order (deterministic, and never
``E[x^2] - E[x]^2``, which cancels catastrophically in fp32)::

    n = sum_r n_r,    mean = sum_r n_r m_r / n,    M2 = sum_r M2_r + sum_r n_r (m_r - mean)^2
    var = M2 / n      (biased; the running variance gets the unbiased M2 / (n - 1))

Forward ``y = sigmoid(w) * xhat + b`` with ``xhat = (x - mean) * invstd``, ``invstd = rsqrt(var + eps)``.
Backward, with the globally all-reduced ``S1 = sum dy`` and ``S2 = sum dy * xhat``::

    dx = sigmoid(w) * invstd * (dy - S1 / n - xhat * S2 / n)
    dw = sigmoid(w) (1 - sigmoid(w)) * sum_local(dy * xhat) [+ g * dR/dw]     (local contribution)
    db = sum_local(dy)                                                        (local contribution)

The parameter gradients are this rank's share, as in ``nn.SyncBatchNorm``: DDP's gradient
all-reduce turns them into the global gradient.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .. import functional as RF
from .._backend import resolve_backend
from .bounded_batchnorm import BoundedBatchNorm2d

__all__ = ["SyncBoundedBatchNorm2d"]

_DIMS = (0, 2, 3)  # reduction dims of an (N, C, H, W) input: everything but the channel


def _channel(v: Tensor) -> Tensor:
    """``[C]`` -> ``[1, C, 1, 1]`` for broadcasting against an ``(N, C, H, W)`` tensor."""
    return v.view(1, -1, 1, 1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _local_moments(x: Tensor, acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """Two-pass local ``(mean, M2)`` per channel in ``acc``; zeros for an empty local batch."""
    num_channels = x.shape[1]
    if x.numel() == 0:
        zeros = x.new_zeros(num_channels, dtype=acc)
        return zeros, zeros.clone()
    xa = x.to(acc)
    mean = xa.mean(dim=_DIMS)
    m2 = (xa - _channel(mean)).square().sum(dim=_DIMS)
    return mean, m2


def _merge_moments(stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merge gathered ``[world, 3, C]`` (count, mean, M2) rows: the global ``(n, mean, M2)`` ``[C]``.

    Pooled-moments form of Chan's merge; sums run over the rank axis in rank order, so every rank
    computes bit-identical results. A rank with count 0 contributes nothing; with ``n == 0``
    everywhere the result is ``(0, 0, 0)``, never NaN.
    """
    counts, means, m2s = stats[:, 0], stats[:, 1], stats[:, 2]
    n = counts.sum(dim=0)
    safe_n = n.clamp_min(1)
    mean = (counts * means).sum(dim=0) / safe_n
    m2 = m2s.sum(dim=0) + (counts * (means - mean).square()).sum(dim=0)
    return n, mean, m2


def _gather_moments(local: Tensor, group, world_size: int) -> Tensor:
    """``all_gather`` of this rank's ``[3, C]`` triple into ``[world, 3, C]`` (rank order)."""
    local = local.contiguous()
    out = local.new_empty((world_size,) + tuple(local.shape))
    if local.is_cuda:
        dist.all_gather_into_tensor(out, local, group=group)
    else:
        # gloo lacks all_gather_into_tensor in some releases; the list form works everywhere and
        # costs nothing at [3, C].
        dist.all_gather(list(out.unbind(0)), local, group=group)
    return out


class _SyncBoundedBN(torch.autograd.Function):
    """Training-mode bounded BN over the global batch; see the module docstring for the formulas.

    Outputs ``(y, mean, var, n, penalty)``: ``mean``/biased ``var``/count ``n`` (``[C]``, in the
    accumulation dtype, non-differentiable) for the caller's running-statistics update, and the
    per-channel receding penalty (empty unless ``shift`` is given), whose gradient is added to
    ``dw`` in this backward.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, world_size, use_triton, shift):
        acc = _acc_dtype(x.dtype)
        num_channels = x.shape[1]
        n_local = x.numel() // num_channels
        penalty = x.new_empty(0, dtype=acc)
        if use_triton and n_local > 0:
            # The same custom ops as the local layer (rnip_ext.ops), around the collectives.
            mean_l, var_l, pen = torch.ops.rnip_ext.bounded_bn_stats(x, weight, 0.0 if shift is None else shift,
                                                                     shift is not None)  # fmt: skip
            m2_l = var_l * n_local
            if shift is not None:
                penalty = pen
        else:
            mean_l, m2_l = _local_moments(x, acc)
        if shift is not None and penalty.numel() == 0 and weight is not None:
            penalty = RF.receding_penalty_per_channel(weight.detach().to(acc), shift)
        count = torch.full((num_channels,), float(n_local), dtype=acc, device=x.device)
        local = torch.stack([count, mean_l.to(acc), m2_l.to(acc)])
        n, mean, m2 = _merge_moments(_gather_moments(local, group, world_size))
        var = m2 / n.clamp_min(1)
        invstd = torch.rsqrt(var + eps)
        if use_triton and n_local > 0:
            y = torch.ops.rnip_ext.bounded_bn_eval(x, mean, var, weight, bias, eps)  # given statistics
        else:
            # Normalising with given statistics is the eager reference in eval form.
            y = RF.bounded_batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, weight, mean, invstd, n, var)
        ctx.group, ctx.world_size, ctx.shift = group, world_size, shift
        ctx.eps, ctx.use_triton = eps, use_triton
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.mark_non_differentiable(mean, var, n)
        if shift is None:
            ctx.mark_non_differentiable(penalty)
        return y, mean, var, n, penalty

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dn, dpenalty):
        x, weight, mean, invstd, n, var = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        acc = mean.dtype
        if ctx.use_triton and x.numel():
            return _triton_backward(ctx, dy, dpenalty, x, weight, mean, var, n) + (None,) * 5
        # Recompute xhat rather than save it: it is as large as x, and the recompute is one pass.
        xhat = (x.to(acc) - _channel(mean)) * _channel(invstd)
        dya = dy.to(acc)
        if x.numel():
            sum_dy = dya.sum(dim=_DIMS)
            sum_dy_xhat = (dya * xhat).sum(dim=_DIMS)
        else:
            sum_dy = mean.new_zeros(mean.shape)
            sum_dy_xhat = mean.new_zeros(mean.shape)
        scale = torch.sigmoid(weight.to(acc)) if weight is not None else None
        dx = dw = db = None
        if need_x:
            # One all-reduce of both sums; every rank whose input needs a gradient joins it.
            sums = torch.stack([sum_dy, sum_dy_xhat])
            dist.all_reduce(sums, group=ctx.group)
            safe_n = n.clamp_min(1)
            mean_dy, mean_dy_xhat = sums[0] / safe_n, sums[1] / safe_n
            coeff = invstd if scale is None else invstd * scale
            dx = _channel(coeff) * (dya - _channel(mean_dy) - xhat * _channel(mean_dy_xhat))
            dx = dx.to(x.dtype)
        if need_w:
            dw = scale * (1.0 - scale) * sum_dy_xhat
            if ctx.shift is not None and dpenalty is not None and dpenalty.numel():
                # The regulariser's gradient, fused into this layer's d(weight).
                dw = dw + dpenalty.to(acc) * RF.receding_penalty_grad(weight.detach().to(acc), ctx.shift)
            dw = dw.to(weight.dtype)
        if need_b:
            db = sum_dy.to(ctx.bias_dtype)
        return dx, dw, db, None, None, None, None, None


def _triton_backward(ctx, dy, dpenalty, x, weight, mean, var, n):
    """``(dx, dw, db)`` through the bounded-BN ops: local sums (partials + combine: local
    ``dw``/``db`` with the penalty gradient fused), one ``all_reduce`` of the ``[2, C]`` sums, then
    ``dx`` from the global means."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    penalized = ctx.shift is not None and dpenalty is not None and dpenalty.numel() > 0
    g = dpenalty if (need_w and penalized) else None
    sums, dw, db = torch.ops.rnip_ext.bounded_bn_backward_sums(
        dy, x, mean, var, weight, g, ctx.eps, 0.0 if ctx.shift is None else ctx.shift, [need_w, need_b])
    dx = None
    if need_x:
        dist.all_reduce(sums, group=ctx.group)  # global sum(dy), sum(dy * xhat)
        sums.div_(n.clamp_min(1))
        dx = torch.ops.rnip_ext.bounded_bn_backward_dx(dy, x, mean, var, weight, sums, ctx.eps)
    return (
        dx,
        dw.to(weight.dtype) if need_w else None,
        db.to(ctx.bias_dtype) if need_b else None,
    )


class SyncBoundedBatchNorm2d(BoundedBatchNorm2d):
    r""":class:`BoundedBatchNorm2d` whose training statistics span the whole distributed batch.

    .. math::

        y = \sigma(w) \, \frac{x - \mathrm{E}_{\text{global}}[x]}
            {\sqrt{\mathrm{Var}_{\text{global}}[x] + \epsilon}} + \beta

    where the expectation and (biased) variance run over the positions of every rank of
    ``process_group``. Each rank computes its per-channel count, mean and ``M2`` (fp32, or fp64
    for fp64 input), one ``all_gather`` brings the ``[3, C]`` triples together and every rank merges
    them in rank order (deterministic); the backward all-reduces ``sum(dy)`` and
    ``sum(dy * xhat)`` once for the input gradient. Parameter gradients are each rank's local
    contribution (the ``nn.SyncBatchNorm`` convention): DDP's gradient averaging turns them into
    the gradient of the mean of the ranks' losses, which for equal local batches and a mean loss
    is the single-process gradient on the concatenated batch. Running statistics are updated on
    every rank alike from the global mean and the unbiased global variance ``M2 / (n - 1)``.

    Uneven local batch sizes work, and so does a rank with an empty local batch (count 0: it
    still joins the collectives and its output is empty). When no rank has any position the
    batch is counted in ``num_batches_tracked`` but moves no statistics, as in the local layer.

    Fallback rule: the synchronised path runs only when the layer is in training mode,
    ``torch.distributed`` is available and initialised, and ``process_group`` has more than one
    rank. Otherwise (eval mode, no process group, a single rank) the layer behaves exactly like
    :class:`BoundedBatchNorm2d`: running statistics in eval mode, or local batch statistics in
    eval mode with ``track_running_stats=False`` (as ``nn.SyncBatchNorm`` does).

    Backends: on the Triton path every computation is a ``rnip_ext.ops`` custom op (the local
    layer's): the local statistics and the penalty come from ``bounded_bn_stats`` and the output
    from ``bounded_bn_eval`` with the global statistics; the backward runs
    ``bounded_bn_backward_sums`` (local ``dw``/``db``, the receding regulariser's gradient fused
    into ``d(weight)``), one ``all_reduce`` of the ``[2, C]`` sums, and ``bounded_bn_backward_dx``
    with the global means (a rank with an empty local batch still joins the all-reduce, in PyTorch). The eager path
    computes everything with PyTorch and leaves the penalty to the regulariser's eager fallback.

    Under DDP every rank adds the full ``reg()`` to its loss: DDP averages gradients over ranks, so
    the penalty is counted once per step (the mean of identical terms).

    Args: those of :class:`BoundedBatchNorm2d`, plus keyword-only ``process_group`` (``None``:
    the default group). A copy (``copy.deepcopy``, pickling) drops a custom ``process_group``
    (process groups cannot be copied) and uses the default group.
    """

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
        process_group=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias, backend=backend
        )
        self.process_group = process_group

    def __getstate__(self):
        state = super().__getstate__()
        state["process_group"] = None
        return state

    def __setstate__(self, state):
        state.setdefault("process_group", None)
        super().__setstate__(state)

    def _sync_world_size(self) -> int:
        """Ranks to synchronise with: 1 (no synchronisation) unless a process group is up."""
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        world_size = self._sync_world_size() if self.training else 1
        if world_size <= 1:
            return super().forward(input)
        self._recorded_penalty = None  # valid only for the forward that made it
        return self._forward_sync(input, world_size)

    def _forward_sync(self, input: Tensor, world_size: int) -> Tensor:
        """The synchronised training forward (also usable with a one-rank group, for tests)."""
        use_triton = resolve_backend(input, self.backend) == "triton"
        with_penalty = use_triton and self._wants_penalty()
        shift = self._receding_shift if with_penalty else None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        y, mean, var, n, penalty = _SyncBoundedBN.apply(
            input, self.weight, self.bias, float(self.eps), group, world_size, use_triton, shift
        )
        if self.track_running_stats:
            self._update_global_running_stats(mean, var, n)
        if with_penalty:
            self._record_penalty(shift, penalty)
        return y

    @torch.no_grad()
    def _update_global_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        """``running = (1 - f) running + f global``, unbiased with the global count ``n``.

        Tensor arithmetic only (no host synchronisation): ``f`` is zeroed where ``n == 0``, which
        leaves the statistics of an empty global batch unchanged.
        """
        self.num_batches_tracked.add_(1)
        dtype = self.running_mean.dtype
        # A tensor factor without a host-to-device copy: the momentum multiplies the mask.
        if self.momentum is None:
            factor = (n > 0).to(dtype) / self.num_batches_tracked.to(dtype)
        else:
            factor = (n > 0).to(dtype) * self.momentum
        unbiased = var * (n / (n - 1).clamp_min(1))
        self.running_mean.lerp_(mean.to(dtype), factor)
        self.running_var.lerp_(unbiased.to(dtype), factor)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.process_group is None else f"{text}, process_group={self.process_group}"
