"""Channel gather: copy the kept channels of a weight in one pass.

``channel_gather(src, out_index, in_index)`` computes ``src[out_index][:, in_index]`` as a new
contiguous tensor::

    out[o, i, *r] = src[out_index[o], in_index[i], *r]

``out_index`` selects along dim 0 (output channels of a conv/linear weight, or the entries of a
BatchNorm vector), ``in_index`` along dim 1 (input channels); ``None`` keeps every channel of that
dim. Any number of trailing dims, any dtype, any strides (channels_last conv weights read in place).
Indices are 1-D int64/int32 on the device of ``src``, each value in ``[0, size)``; duplicates are
allowed, negative values are not.

Backward (floating and complex dtypes) scatters the gradient back with ``index_add`` semantics, so
duplicated indices accumulate (``None`` indices skip their step)::

    g = zeros(len(out_index), src.shape[1], *r).index_add(1, in_index, grad)
    grad_src = zeros(src.shape).index_add(0, out_index, g)

``channel_gather_many`` does the same for a list of tensors in one call: one ``at::parallel_for``
over all of them on CPU, on CUDA one kernel launch per element size and 15 tensors (their
descriptors passed by value: nothing staged or copied, so a call can be captured in a CUDA graph).
It is meant for pruning a whole model at once.

The compiled op (``rnip_ext._C``, ``torch.ops.rnip_ext.channel_gather[_many]``) is used when it
loaded (:data:`HAS_C_EXT`) and has a kernel for the tensor's device; otherwise, or with
``RNIP_EXT_DISABLE_C=1`` in the environment, the same results come from ``index_select``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

__all__ = ["HAS_C_EXT", "channel_gather", "channel_gather_many"]

_INDEX_DTYPES = (torch.int64, torch.int32)


def _load_c_ext() -> ModuleType | None:
    if os.environ.get("RNIP_EXT_DISABLE_C", "").strip() not in ("", "0"):
        return None
    try:
        from .. import _C
    except ImportError:
        return None
    return _C


_C = _load_c_ext()

#: Whether the compiled ``rnip_ext._C`` loaded, i.e. ``torch.ops.rnip_ext.channel_gather`` exists.
HAS_C_EXT: bool = _C is not None

# A CPU-only build still loads on a CUDA machine: CUDA tensors then take the index_select path.
_C_HAS_CUDA: bool = bool(getattr(_C, "WITH_CUDA", 0))

# What the public functions do; tests flip it (or call the private functions) to run both paths.
_USE_C_EXT: bool = HAS_C_EXT


# ------------------------------------------------------------------------------------------------
# Argument checks (mirrors the TORCH_CHECKs of csrc/channel_gather.cpp, same wording)


def _names(job: int | None) -> tuple[str, str, str, str]:
    if job is None:
        return "channel_gather", "src", "out_index", "in_index"
    at = f"[{job}]"
    return "channel_gather_many", f"srcs{at}", f"out_indices{at}", f"in_indices{at}"


def _check_index(op: str, name: str, src: Tensor, src_name: str, index: object) -> None:
    if not isinstance(index, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type(index).__name__}")
    if index.dim() != 1:
        raise ValueError(f"{op}: {name} must be 1-D, got a {index.dim()}-D tensor")
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{op}: {name} must be int64 or int32, got {index.dtype}")
    if index.device != src.device:
        raise ValueError(f"{op}: {name} is on {index.device} but {src_name} is on {src.device}")


def _check_args(job: int | None, src: object, out_index: object, in_index: object) -> None:
    """Checks everything that does not need the index values (shapes, dtypes, devices)."""
    op, src_name, out_name, in_name = _names(job)
    if not isinstance(src, Tensor):
        raise TypeError(f"{op}: {src_name} must be a torch.Tensor, got {type(src).__name__}")
    if src.dim() < 1:
        raise ValueError(f"{op}: {src_name} must have at least 1 dimension, got a 0-D tensor")
    if src.layout != torch.strided:
        raise ValueError(f"{op}: {src_name} must be a strided (dense) tensor")
    if out_index is not None:
        _check_index(op, out_name, src, src_name, out_index)
    if in_index is not None:
        if src.dim() < 2:
            raise ValueError(
                f"{op}: {in_name} was given but {src_name} is 1-D (only out_index applies to it)"
            )
        _check_index(op, in_name, src, src_name, in_index)


def _has_values(t: Tensor) -> bool:
    # Under torch.compile or FakeTensorMode there are no values to read (reading one would break
    # the graph); the compiled op checks them again when it runs.
    if torch.compiler.is_compiling():
        return False
    return not isinstance(t, FakeTensor) and t.device.type != "meta"


def _check_values(jobs: Sequence[tuple[int | None, Tensor, Tensor | None, Tensor | None]]) -> None:
    """Checks that every index value lies in ``[0, size)``. All indices are tested together with a
    fixed handful of ops and one read of the verdict: one host synchronisation on CUDA, and no
    per-tensor work, however many tensors the many-form gets."""
    entries = []  # (job, dim, index, bound)
    for job, src, out_index, in_index in jobs:
        for dim, index in ((0, out_index), (1, in_index)):
            if index is not None and index.numel() > 0 and _has_values(index):
                entries.append((job, dim, index, src.shape[dim]))
    if not entries:
        return
    lengths = [e[2].numel() for e in entries]
    limit = np.repeat(np.array([e[3] for e in entries], dtype=np.int64), lengths)
    if entries[0][2].device.type == "cpu":
        # numpy, single-threaded: a torch op on a few thousand values may open an OpenMP region,
        # whose sleeping workers can take a scheduler tick to wake on a busy machine.
        flat = np.concatenate([e[2].numpy() for e in entries]).astype(np.int64, copy=False)
        bad_positions = np.flatnonzero((flat < 0) | (flat >= limit))
        if bad_positions.size == 0:
            return
        first = int(bad_positions[0])
    else:
        flat_t = torch.cat([e[2].to(torch.int64) for e in entries])
        bad = (flat_t < 0) | (flat_t >= torch.from_numpy(limit).to(flat_t.device))
        if not bool(bad.any()):
            return
        first = int(bad.nonzero()[0, 0])
    for (job, dim, index, bound), length in zip(entries, lengths):
        if first < length:
            break
        first -= length
    op, src_name, out_name, in_name = _names(job)
    name = out_name if dim == 0 else in_name
    raise ValueError(
        f"{op}: {name}[{first}] = {int(index[first])} is out of range [0, {bound}) of dim {dim} of "
        f"{src_name} (negative indices are not allowed)"
    )


def _check_many_lengths(srcs: object, out_indices: object, in_indices: object) -> None:
    for name, value in (("srcs", srcs), ("out_indices", out_indices), ("in_indices", in_indices)):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"channel_gather_many: {name} must be a list or tuple, got {type(value).__name__}")
    for name, value in (("out_indices", out_indices), ("in_indices", in_indices)):
        if len(value) != len(srcs):
            raise ValueError(
                f"channel_gather_many: {name} has {len(value)} entries but srcs has {len(srcs)}"
            )


def _gathered_shape(src: Tensor, out_index: Tensor | None, in_index: Tensor | None) -> list:
    shape = list(src.shape)
    if out_index is not None:
        shape[0] = out_index.shape[0]
    if in_index is not None:
        shape[1] = in_index.shape[0]
    return shape


# ------------------------------------------------------------------------------------------------
# The two implementations


def _op_has_kernel(device: torch.device) -> bool:
    if device.type in ("cpu", "meta"):
        return True
    return device.type == "cuda" and _C_HAS_CUDA


def _gather_reference(src: Tensor, out_index: Tensor | None, in_index: Tensor | None) -> Tensor:
    """The eager formulation with ``index_select`` (the fallback; also what the tests trust)."""
    out = src
    if out_index is not None:
        out = out.index_select(0, out_index)
    if in_index is not None:
        out = out.index_select(1, in_index)
    if out is src:
        # The op always returns a fresh tensor, never a view of src.
        return src.clone(memory_format=torch.contiguous_format)
    return out.contiguous()


def _channel_gather(
    src: Tensor,
    out_index: Tensor | None,
    in_index: Tensor | None,
    *,
    use_c_ext: bool,
    check_values: bool = True,
) -> Tensor:
    _check_args(None, src, out_index, in_index)
    if check_values:
        _check_values([(None, src, out_index, in_index)])
    if use_c_ext:
        if not HAS_C_EXT:
            raise RuntimeError("channel_gather: the compiled op (rnip_ext._C) is not loaded")
        if _op_has_kernel(src.device):
            return torch.ops.rnip_ext.channel_gather(src, out_index, in_index)
    return _gather_reference(src, out_index, in_index)


def check_many(
    srcs: Sequence[Tensor],
    out_indices: Sequence[Tensor | None],
    in_indices: Sequence[Tensor | None],
    *,
    check_values: bool = True,
) -> None:
    """Raises what :func:`channel_gather_many` raises for these arguments, copying nothing: a
    caller gathering in several calls checks all of them first, so that none fails half-way."""
    _check_many_lengths(srcs, out_indices, in_indices)
    for job, (src, out_index, in_index) in enumerate(zip(srcs, out_indices, in_indices)):
        _check_args(job, src, out_index, in_index)
        if src.device != srcs[0].device:
            raise ValueError(
                f"channel_gather_many: srcs[{job}] is on {src.device} but srcs[0] is on {srcs[0].device}"
            )
    if check_values:
        _check_values([(job, *args) for job, args in enumerate(zip(srcs, out_indices, in_indices))])


def _channel_gather_many(
    srcs: Sequence[Tensor],
    out_indices: Sequence[Tensor | None],
    in_indices: Sequence[Tensor | None],
    *,
    use_c_ext: bool,
    check_values: bool = True,
) -> list[Tensor]:
    check_many(srcs, out_indices, in_indices, check_values=check_values)
    if not srcs:
        return []
    if use_c_ext:
        if not HAS_C_EXT:
            raise RuntimeError("channel_gather_many: the compiled op (rnip_ext._C) is not loaded")
        if _op_has_kernel(srcs[0].device):
            return torch.ops.rnip_ext.channel_gather_many(list(srcs), list(out_indices), list(in_indices))
    return [_gather_reference(*args) for args in zip(srcs, out_indices, in_indices)]


# ------------------------------------------------------------------------------------------------
# Public API


def channel_gather(
    src: Tensor,
    out_index: Tensor | None = None,
    in_index: Tensor | None = None,
    *,
    check_values: bool = True,
) -> Tensor:
    """Returns ``src[out_index][:, in_index]`` as a new contiguous tensor.

    Args:
        src: tensor with at least one dim, any dtype and strides (conv weight ``[C_out, C_in, kh,
            kw]``, linear weight ``[C_out, C_in]``, BatchNorm vector ``[C]``).
        out_index: 1-D int64/int32 indices into dim 0, or ``None`` for all of them.
        in_index: 1-D int64/int32 indices into dim 1, or ``None`` for all; ``src`` must then have
            at least two dims.
        check_values: check that every index value lies in ``[0, size)`` before running, raising
            :class:`ValueError` otherwise. On CUDA this costs one host synchronisation. With
            ``False`` the values are still refused where the copy runs, less politely: by the C++
            CPU kernel (the same ValueError), by ``index_select`` in the fallback (IndexError),
            and by the CUDA kernel with a failed device assertion (as ``index_select``'s:
            ``cudaErrorAssert`` at the next synchronisation, which leaves the CUDA context
            unusable).

    Raises:
        TypeError: a non-tensor argument or an index that is not int64/int32.
        ValueError: a 0-D ``src``, an index that is not 1-D or is on another device, ``in_index``
            for a 1-D ``src``, or an index value out of range.

    Differentiable for floating ``src`` (duplicated indices accumulate their gradients); works under
    ``torch.compile(fullgraph=True)``.
    """
    return _channel_gather(src, out_index, in_index, use_c_ext=_USE_C_EXT, check_values=check_values)


def channel_gather_many(
    srcs: Sequence[Tensor],
    out_indices: Sequence[Tensor | None],
    in_indices: Sequence[Tensor | None],
    *,
    check_values: bool = True,
) -> list[Tensor]:
    """Returns ``[channel_gather(s, o, i) for s, o, i in zip(srcs, out_indices, in_indices)]``,
    computed in one call.

    All ``srcs`` must be on one device; dtypes and shapes may differ. ``out_indices`` and
    ``in_indices`` have one entry (a tensor or ``None``) per source. ``check_values`` as in
    :func:`channel_gather`, with a single host synchronisation for the whole list on CUDA.
    Raises what :func:`channel_gather` raises, naming the offending entry (``out_indices[3]``), and
    :class:`ValueError` when the three lists differ in length.
    """
    return _channel_gather_many(
        srcs, out_indices, in_indices, use_c_ext=_USE_C_EXT, check_values=check_values
    )


# ------------------------------------------------------------------------------------------------
# Fake kernels and autograd formulas of the compiled ops


def _is_differentiable(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point or dtype.is_complex


def _scatter_back(
    grad: Tensor, src_shape: Sequence, out_index: Tensor | None, in_index: Tensor | None
) -> Tensor:
    """The adjoint of the gather: ``grad`` added into zeros of ``src_shape`` at the gathered
    positions (duplicates accumulate). Built from differentiable ops, so it has a backward too."""
    if in_index is not None:
        shape = list(grad.shape)
        shape[1] = src_shape[1]
        grad = grad.new_zeros(shape).index_add(1, in_index, grad)
    if out_index is not None:
        shape = list(grad.shape)
        shape[0] = src_shape[0]
        grad = grad.new_zeros(shape).index_add(0, out_index, grad)
    return grad


def _save_indices(ctx, index_pairs: Sequence[tuple[Tensor | None, Tensor | None]]) -> None:
    # save_for_backward takes tensors only: remember where the Nones were.
    ctx.index_present = [(o is not None, i is not None) for o, i in index_pairs]
    ctx.save_for_backward(*[t for pair in index_pairs for t in pair if t is not None])


def _saved_indices(ctx) -> list[tuple[Tensor | None, Tensor | None]]:
    saved = iter(ctx.saved_tensors)
    return [
        (next(saved) if has_out else None, next(saved) if has_in else None)
        for has_out, has_in in ctx.index_present
    ]


def _setup_context_one(ctx, inputs, output) -> None:
    src, out_index, in_index = inputs
    ctx.src_shape = src.shape
    _save_indices(ctx, [(out_index, in_index)])


def _backward_one(ctx, grad: Tensor):
    ((out_index, in_index),) = _saved_indices(ctx)
    return _scatter_back(grad, ctx.src_shape, out_index, in_index), None, None


def _setup_context_many(ctx, inputs, output) -> None:
    srcs, out_indices, in_indices = inputs
    ctx.src_shapes = [s.shape for s in srcs]
    ctx.differentiable = [_is_differentiable(s.dtype) for s in srcs]
    _save_indices(ctx, list(zip(out_indices, in_indices)))


def _backward_many(ctx, grads: Sequence[Tensor | None]):
    grad_srcs = [
        _scatter_back(g, shape, o, i) if g is not None and ok else None
        for g, shape, ok, (o, i) in zip(grads, ctx.src_shapes, ctx.differentiable, _saved_indices(ctx))
    ]
    # torch.library matches the returned structure against the inputs' pytree, in which a list
    # holding a None is one leaf while a list of tensors is a node with one leaf per tensor.
    n = len(grad_srcs)
    out_full = all(has_out for has_out, _ in ctx.index_present)
    in_full = all(has_in for _, has_in in ctx.index_present)
    return grad_srcs, [None] * n if out_full else None, [None] * n if in_full else None


if HAS_C_EXT:

    @torch.library.register_fake("rnip_ext::channel_gather")
    def _channel_gather_fake(src: Tensor, out_index: Tensor | None, in_index: Tensor | None) -> Tensor:
        _check_args(None, src, out_index, in_index)
        return src.new_empty(_gathered_shape(src, out_index, in_index))

    @torch.library.register_fake("rnip_ext::channel_gather_many")
    def _channel_gather_many_fake(
        srcs: list[Tensor], out_indices: list[Tensor | None], in_indices: list[Tensor | None]
    ) -> list[Tensor]:
        _check_many_lengths(srcs, out_indices, in_indices)
        outs = []
        for job, (src, out_index, in_index) in enumerate(zip(srcs, out_indices, in_indices)):
            _check_args(job, src, out_index, in_index)
            outs.append(src.new_empty(_gathered_shape(src, out_index, in_index)))
        return outs

    torch.library.register_autograd(
        "rnip_ext::channel_gather", _backward_one, setup_context=_setup_context_one
    )
    torch.library.register_autograd(
        "rnip_ext::channel_gather_many", _backward_many, setup_context=_setup_context_many
    )
