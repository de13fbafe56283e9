"""Which compiled variant a kernel launch needs, computed without a GPU.

Shared by ``benchmarks/aot_sm90.py`` (compiles each variant ahead of time for sm_90) and
``tests/kernels/test_compiled_variants.py`` (counts the variants a layer's steps need): both
intercept ``kernel.run`` and ask :func:`specialisation` what Triton would compile for it.
"""

from __future__ import annotations

import contextlib
import inspect

__all__ = [
    "MIN_TRITON",
    "all_kernels",
    "internals_supported",
    "recorded_launches",
    "specialisation",
    "step_launches",
    "triton_release",
    "variant_key",
]

# The first Triton whose private pieces used here (``native_specialize_impl``, ``kernel.run``
# interception under the interpreter, dict ``attrs`` in ``ASTSource``) were checked: 3.6 and 3.9.
MIN_TRITON = (3, 6)


def triton_release() -> tuple[int, int] | None:
    """``(major, minor)`` of the installed Triton (``"3.10.0rc1"`` -> ``(3, 10)``), or None."""
    try:
        import triton
    except ImportError:
        return None
    major, minor = (int("".join(ch for ch in p if ch.isdigit()) or 0) for p in (triton.__version__.split(".") + ["0"])[:2])
    return major, minor


def internals_supported() -> bool:
    """Whether the installed Triton is one this module (and the ahead-of-time compile built on the
    same internals) was checked with: ``triton.__version__ >= MIN_TRITON``. The kernels
    themselves run on older releases; only variant counting and AOT compiles need this."""
    release = triton_release()
    return release is not None and release >= MIN_TRITON


def all_kernels() -> list:
    """Every ``@triton.jit`` kernel the launchers of :mod:`rnip_ext.kernels` can launch."""
    from . import bn_backward, bn_normalize, bn_single, bn_stats

    return [
        bn_stats._bn_partial_stats_kernel, bn_stats._bn_combine_stats_kernel,
        bn_normalize._bn_normalize_kernel, bn_backward._bn_bwd_partial_kernel,
        bn_backward._bn_bwd_combine_kernel, bn_backward._bn_bwd_dx_kernel,
        bn_single._bn_fwd_single_kernel, bn_single._bn_bwd_single_kernel,
    ]  # fmt: skip


def _do_not_specialize(kernel) -> set:
    dns = getattr(kernel, "do_not_specialize", None)
    if dns is None:  # the interpreter keeps the decorator's arguments in kwargs
        dns = getattr(kernel, "kwargs", {}).get("do_not_specialize", [])
    return set(dns or [])


def specialisation(kernel, args, kwargs) -> tuple[list[tuple[str, str, object]], int | None]:
    """What a launch ``kernel[grid](*args, **kwargs)`` compiles for: per parameter, in order,
    ``(name, "constexpr", value)`` for a compile-time constant (declared, or made one by
    Triton's specialisation, e.g. ``== 1``), else ``(name, type, key)`` from Triton's own
    ``specialize_impl`` (``key == "D"``: divisible by 16), honouring ``do_not_specialize``;
    and ``num_warps`` (``None`` when not given)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    params = list(inspect.signature(kernel.fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    bound.update(kwargs)
    dns = _do_not_specialize(kernel)
    out = []
    for p in params:
        value = bound.get(p.name, p.default)
        if "constexpr" in str(p.annotation):
            out.append((p.name, "constexpr", value))
            continue
        spec = p.name not in dns
        ty, key = native_specialize_impl(BaseBackend, value, False, spec, spec)
        out.append((p.name, "constexpr", key) if ty == "constexpr" else (p.name, ty, key))
    return out, kwargs.get("num_warps")


def variant_key(kernel, args, kwargs) -> tuple:
    """A hashable key of the compiled variant a launch needs (two launches with equal keys share
    one compile): the kernel, every parameter's specialisation and ``num_warps``."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    params, num_warps = specialisation(kernel, args, kwargs)
    return (kernel.fn.__name__,) + tuple((n, t, str(k)) for n, t, k in params) + (num_warps,)


def _skip_launch(*args, **kwargs) -> None:
    """A launch that does nothing (``recorded_launches(run=False, record=False)``)."""
    return None


@contextlib.contextmanager
def recorded_launches(run: bool = True, record: bool = True):
    """Record every launch of the kernels in :func:`all_kernels` while the block runs.

    Yields a list that fills with ``(kernel, args, kwargs)`` per launch (``kwargs`` without
    ``grid``/``warmup``). With ``run=False`` the launches are intercepted and nothing runs: the
    launchers can then plan on ``meta`` tensors (what would compile, without a GPU) or be timed on
    the host alone; with ``record=False`` as well each launch is a bare no-op that records nothing
    (host timing of the launchers' own Python: the recording's bookkeeping, ~0.4 us a launch, is
    not theirs). The kernels' ``run`` is restored on exit.
    """
    launches = []
    kernels = all_kernels()
    saved = [vars(k).get("run") for k in kernels]
    for kernel in kernels:
        original = kernel.run

        def launch(*args, _kernel=kernel, _original=original, **kwargs):
            launches.append((_kernel, args, {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}))
            return _original(*args, **kwargs) if run else None

        kernel.run = launch if run or record else _skip_launch
    try:
        yield launches
    finally:
        for kernel, before in zip(kernels, saved):
            if before is None:
                del kernel.run
            else:
                kernel.run = before


def step_launches(shape, dtype, channels_last: bool, modes=("fwdbwd",), *, penalty: bool = True,
                  bias: bool = False, momentum: float | None = 0.1) -> list:
    """The kernel launches of a ``BoundedBatchNorm2d`` call on an input of ``shape``/``dtype``,
    planned on ``meta`` tensors (nothing runs, no GPU needed; chunking as for
    ``_config.PLANNING_SM_COUNT`` SMs): ``(kernel, args, kwargs)`` per launch.

    ``modes``: ``fwd`` a training forward (running statistics updated, the fused penalty when
    ``penalty``), ``fwdbwd`` that and its backward (``dx``, ``dw``, ``db`` with ``bias``, the
    penalty gradient as the stride-0 vector ``penalty.sum()`` sends back), ``eval`` an eval
    forward. The layer's parameters are float32 (mixed precision for fp16/bf16 inputs).
    """
    import torch

    from . import bn_normalize, bn_train

    meta = torch.device("meta")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(shape, dtype=dtype, device=meta).contiguous(memory_format=fmt)
    c = shape[1]
    w = torch.empty(c, device=meta)
    b = torch.empty(c, device=meta) if bias else None
    running = (torch.empty(c, device=meta), torch.empty(c, device=meta))
    nbt = torch.empty((), dtype=torch.long, device=meta)
    with recorded_launches(run=False) as launches:
        for mode in modes:
            if mode == "eval":
                bn_normalize.normalize(x, running[0], running[1], w, b, 1e-5)
                continue
            y, mean, var, _ = bn_train.train_forward(x, w, b, 1e-5, 3.0, penalty, running=running,
                                                     momentum=momentum, num_batches_tracked=nbt)  # fmt: skip
            if mode == "fwdbwd":
                g = torch.empty((), device=meta).expand(c) if penalty else None
                bn_train.train_backward(y, x, mean, var, w, g, 1e-5, 3.0, True, (True, True, bias))
        return list(launches)
