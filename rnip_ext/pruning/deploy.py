"""Shipping a (pruned) network as a file anyone can load: a ``torch.export`` program, or ONNX.

:func:`save`/:func:`load` keep a checkpoint that needs ``rnip_ext`` (and, for your own models,
their Python class) to read back. :func:`export` writes a self-contained program instead: the
network in eval mode, traced by ``torch.export`` into standard ATen operations, with every
BatchNorm that follows a convolution folded into it. The file loads with
``torch.export.load(path).module()`` (or ``onnxruntime`` for ``format="onnx"``) on a machine
with PyTorch alone.
"""

from __future__ import annotations

import contextlib
import copy
import operator
import os
import tempfile

import torch
import torch.fx as fx
from torch import Tensor, nn

from ..nn import BoundedBatchNorm2d, is_norm_act
from .graph import PruningTraceError, eval_mode, trace

__all__ = ["export", "standard_modules"]

FORMATS = ("pt2", "onnx")


def _as_plain_batchnorm(bn: BoundedBatchNorm2d) -> nn.BatchNorm2d:
    """``nn.BatchNorm2d`` computing what ``bn`` computes in eval mode: scale ``sigmoid(w)``,
    shift ``b`` (0 without one), the same running statistics and ``eps``."""
    ref = bn.weight if bn.weight is not None else bn.running_mean
    plain = nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, affine=bn.affine,
                           track_running_stats=bn.track_running_stats,
                           device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype)
    with torch.no_grad():
        if bn.affine:
            plain.weight.copy_(torch.sigmoid(bn.weight))
            if bn.bias is not None:
                plain.bias.copy_(bn.bias)
            else:
                plain.bias.zero_()
        if bn.track_running_stats and bn.running_mean is not None:
            plain.running_mean.copy_(bn.running_mean)
            plain.running_var.copy_(bn.running_var)
            plain.num_batches_tracked.copy_(bn.num_batches_tracked)
    return plain.eval()


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` names where the conv's output feeds only that BatchNorm, each called once,
    and the BatchNorm normalises with running statistics in eval: there ``bn(conv(x))`` is one
    convolution. An untraceable model has no such pairs (its BatchNorms stay as they are)."""
    try:
        gm = trace(model)
    except PruningTraceError:
        return []
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        bn = modules[node.target]
        if type(bn) is not nn.BatchNorm2d or bn.running_mean is None or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or calls[src.target] != 1 or len(src.users) != 1:
            continue
        conv = modules[src.target]
        if isinstance(conv, nn.Conv2d) and conv.out_channels == bn.num_features:
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``conv`` becomes ``bn(conv(x))`` in eval mode, computed in float64:

        s = gamma / sqrt(running_var + eps),   W' = s[o] * W[o],   b' = s * (b - running_mean) + beta
    """
    w = conv.weight.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(bn.running_var, dtype=torch.float64)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(gamma)
    b = conv.bias.double() if conv.bias is not None else torch.zeros_like(gamma)
    scale = gamma / torch.sqrt(bn.running_var.double() + bn.eps)
    conv.weight = nn.Parameter((w * scale.reshape(-1, *([1] * (w.dim() - 1)))).to(conv.weight.dtype),
                               requires_grad=False)
    conv.bias = nn.Parameter((scale * (b - bn.running_mean.double()) + beta).to(conv.weight.dtype),
                             requires_grad=False)


def standard_modules(model: nn.Module) -> nn.Module:
    """An eval-mode deep copy of ``model`` built from standard PyTorch layers only.

    Every ``BoundedBatchNorm2d`` becomes the ``nn.BatchNorm2d`` with weight ``sigmoid(w)`` (and
    its shift, or 0), followed by its ``drop`` and ``act`` for a norm-activation layer; then every BatchNorm whose input is the output of a convolution read by
    nothing else is folded into that convolution (see :func:`_fold`) and replaced by
    ``nn.Identity``. A BatchNorm after anything else (an addition, a pooling), or one without
    running statistics (it normalises with the batch's even in eval), stays a BatchNorm.
    ``model`` itself is not modified.
    """
    copied = copy.deepcopy(model).eval()
    for name, m in list(copied.named_modules()):
        if isinstance(m, BoundedBatchNorm2d):
            plain = _as_plain_batchnorm(m)
            _set_module(copied, name, nn.Sequential(plain, m.drop, m.act) if is_norm_act(m) else plain)
    modules = dict(copied.named_modules())
    for conv_name, bn_name in _foldable_pairs(copied):
        _fold(modules[conv_name], modules[bn_name])
        _set_module(copied, bn_name, nn.Identity())
    for p in copied.parameters():
        p.requires_grad_(False)
    return copied


def _inputs(example_inputs) -> tuple[Tensor, ...]:
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise ValueError("example_inputs must be a tensor or a tuple of tensors, e.g. torch.randn(1, 3, 32, 32), "
                         f"got {type(example_inputs).__name__}")
    return inputs


def _non_aten_ops(program) -> list[str]:
    bad = set()
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if not (isinstance(node.target, torch._ops.OpOverload) and node.target.namespace == "aten"):
            bad.add(str(node.target))
    return sorted(bad)


def _trace_program(model: nn.Module, inputs: tuple[Tensor, ...]):
    """``torch.export`` with a dynamic batch dimension when every input has the same first size
    (an example batch of one is doubled for tracing, since export specialises sizes 0 and 1)."""
    from torch.export import Dim

    sizes = {t.shape[0] if t.dim() else None for t in inputs}
    if len(sizes) == 1 and None not in sizes:
        traced = tuple(torch.cat([t, t]) if t.shape[0] == 1 else t for t in inputs)
        # A finite max: torch 2.6 guards some slicing with `size != INT64_MAX`, which an unbounded
        # range fails (and the batch would silently become static).
        batch = Dim("batch", min=1, max=2**31 - 1)
        try:
            return torch.export.export(model, traced, dynamic_shapes=tuple({0: batch} for _ in inputs)), True
        except Exception:  # the model ties the batch size down (e.g. a reshape to a fixed size)
            pass
    return torch.export.export(model, inputs), False


def _check_target(path: str, overwrite: bool) -> None:
    """The file ``path`` can be written: its folder exists, it is not a folder, and it is new unless
    ``overwrite`` (checked before the export's work; the publish checks again)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory; export writes one file: give a file name such as "
                                f"{os.path.join(path, 'model.pt2')}")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"the folder of {path} does not exist ({folder}); create it first")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; nothing was written (overwrite=True replaces it)")


def _atomic_write(path: str, write, suffix: str, overwrite: bool) -> None:
    """``write(tmp)`` to a temporary file in the target's folder, then publish it at ``path``: no
    half-written file, and errors name ``path``, not the temporary file.

    ``overwrite=True`` renames over an existing file; ``overwrite=False`` publishes with a hard link,
    which fails (``FileExistsError``) if ``path`` appeared meanwhile: a file created by someone else
    is never replaced."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        with _naming(path):
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}")
            os.close(fd)
        write(tmp)
        umask = os.umask(0)  # mkstemp makes the file private; give it the permissions a new file gets
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with _naming(path):
            if overwrite:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
                os.unlink(tmp)
    except BaseException:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _naming(path: str):
    """File-system errors name ``path`` (the user's file), not the temporary file beside it."""
    try:
        yield
    except FileExistsError as exc:
        raise FileExistsError(f"{path} was created by something else during the export; it was left as it "
                              "is and nothing was written") from exc
    except OSError as exc:
        if exc.errno is None:
            raise
        raise type(exc)(exc.errno, f"{exc.strerror} (writing {path})", path) from exc


@torch.no_grad()
def export(model: nn.Module, path: str | os.PathLike, example_inputs, *, format: str = "pt2",
           overwrite: bool = False):
    """Write ``model`` in eval mode as a self-contained program of standard ATen operations.

    ``format="pt2"`` (default) writes a ``torch.export`` program: load it with
    ``torch.export.load(path).module()`` anywhere PyTorch is installed, without ``rnip_ext`` or
    the model's Python class. ``format="onnx"`` writes the same graph as ONNX (needs the
    ``onnx`` extra: ``pip install "rnip_ext[onnx]"``).

    The exported network is :func:`standard_modules` of ``model``: bounded BatchNorms become
    ``nn.BatchNorm2d`` with scale ``sigmoid(w)``; each BatchNorm right after a convolution
    whose output nothing else reads is folded into it, ``W' = s W``,
    ``b' = s (b - mean) + beta`` with ``s = gamma / sqrt(var + eps)`` (exact in eval); other
    BatchNorms stay as ATen ``batch_norm``. Its outputs equal ``model``'s in eval mode to fp32
    rounding (checked on ``example_inputs`` before writing). The batch dimension is exported as
    dynamic (any batch size) when every input shares it and the model allows; otherwise sizes
    are those of ``example_inputs``.

    ``example_inputs``: a tensor or tuple of tensors the model accepts, on its device. ``path``:
    a file in an existing folder (``FileNotFoundError`` otherwise, ``IsADirectoryError`` for a
    folder). An existing file raises ``FileExistsError`` unless ``overwrite=True`` (default
    ``False``), checked before the work and again when publishing, so a file created while the
    export ran is never replaced. The file is written to a temporary name and published in one
    step (an existing file is replaced only by a complete one). ``model`` is left as it was (mode
    and parameters). Returns the ``torch.export.ExportedProgram``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"export expects an nn.Module, got {type(model).__name__}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    path = os.fspath(path)
    _check_target(path, overwrite)
    inputs = _inputs(example_inputs)
    with eval_mode(model):
        try:
            expected = model(*inputs)
        except Exception as exc:  # the model's own error type varies; the cause is the input
            raise ValueError(f"example_inputs do not fit the model ({type(exc).__name__}: {exc})") from exc
    if format == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
        except ImportError as exc:
            raise ImportError('format="onnx" needs onnx and onnxscript: pip install "rnip_ext[onnx]"') from exc
    standard = standard_modules(model)
    program, _ = _trace_program(standard, inputs)
    bad = _non_aten_ops(program)
    if bad:
        raise ValueError(f"the exported graph holds operations outside ATen ({', '.join(bad)}), which would "
                         "not load without their library; replace those layers before exporting")
    got = program.module()(*inputs)
    _check_same(expected, got)
    if format == "pt2":
        _atomic_write(path, lambda tmp: torch.export.save(program, tmp), ".pt2", overwrite)
    else:
        def write_onnx(tmp):
            onnx_program = torch.onnx.export(program, args=inputs, dynamo=True, verbose=False)
            onnx_program.save(tmp)

        _atomic_write(path, write_onnx, ".onnx", overwrite)
    return program


def _check_same(expected, got) -> None:
    """The exported program computes the model (to fp32 rounding relative to the output's size)."""
    flat_e, _ = torch.utils._pytree.tree_flatten(expected)
    flat_g, _ = torch.utils._pytree.tree_flatten(got)
    for e, g in zip(flat_e, flat_g, strict=True):
        if isinstance(e, Tensor):
            scale = e.abs().max().item() if e.numel() else 0.0
            tol = 1e-4 if e.dtype == torch.float32 else 1e-2
            if e.shape != g.shape or not torch.allclose(g.to(e.dtype), e, rtol=tol, atol=tol * max(scale, 1e-30)):
                raise RuntimeError("the exported program does not reproduce the model's output; please report "
                                   "this as a bug of rnip_ext.pruning.export")
