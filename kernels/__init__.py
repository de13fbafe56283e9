"""Triton kernels for rnip_ext, installed as ``rnip_ext.kernels``.

``rnip_ext.ops`` reaches them through this package's attributes (``from .. import kernels``,
then ``kernels.train_forward(...)``): the kernel modules, and Triton with them, are imported on
first use (PEP 562 ``__getattr__``), so ``rnip_ext`` itself imports without Triton.

Bounded batch norm (``y = sigmoid(w) * (x - mean) / sqrt(var + eps) + b``), one kernel per job,
each module with its launcher:

* ``bn_stats``: per-channel batch mean and biased variance (chunked partials merged by Chan's
  formula in a combine kernel) and the receding penalty ``s * (1 - log s)``;
* ``bn_normalize``: the elementwise forward (eval, the chunked training forward's last step);
* ``bn_backward``: partial sums, their deterministic combine (``dw`` with the penalty gradient
  fused, ``db``) and the elementwise ``dx``; the sums and dx pieces around
  ``SyncBoundedBatchNorm2d``'s all-reduce;
* ``bn_single``: the single-pass path -- one program holds a channel block's whole ``N*H*W``
  slice: training forward in one launch (2S), backward in one launch (3S);
* ``bn_train``: ``train_forward`` / ``train_backward``, which pick the path.

The entry points, as ``rnip_ext.kernels.<name>``: ``train_forward``, ``train_backward``
(``bn_train``), ``normalize`` (``bn_normalize``), ``batch_stats`` (``bn_stats``),
``backward_sums``, ``backward_dx`` (``bn_backward``). They assume arguments ``rnip_ext.ops``
validated. Running statistics (and ``num_batches_tracked``) are updated inside the training
kernels. Sizes that change with the batch or image size are runtime arguments that Triton does
not specialise (``_launch.RUNTIME_SIZES``): constexprs are tile shapes and flags only.

Shared pieces: ``_config`` (every block size, warp count, path and chunking rule, pure Python),
``_plan`` (the cached launch plan per input layout: grids, sizes, constexprs), ``_layout`` (the
``[N, C, HW]`` view; no Triton import, so the ops' fake kernels use it too), ``_launch``
(devices, dtypes, the running-statistics mode), ``_scratch`` (the chunked path's per-call
scratch, cached per thread and stream; ``release_scratch()`` drops it), ``_math`` (stable sigmoid
pieces, offsets) and ``_variants`` (compiled variants and launch recording, for the AOT compile
and the tests).

Every launcher reads dense NCHW and channels_last tensors in place (strides are passed, never
``.contiguous()``; all ``[N, C, *]`` tensors of a launch share ``x``'s layout), takes
fp16/bf16/fp32 (and fp64, for gradcheck) inputs with fp32 (fp64) accumulation, and accepts
``config=`` (a ``_config.BNConfig``) to override the tiles, which is what the tests use. On CPU
tensors the kernels need the Triton interpreter: ``TRITON_INTERPRET=1`` must be set before this
package's kernel modules are imported.
"""

import importlib

_ENTRY_POINTS = {
    "train_forward": "bn_train",
    "train_backward": "bn_train",
    "uses_single_pass": "bn_train",
    "check_device": "bn_train",
    "normalize": "bn_normalize",
    "batch_stats": "bn_stats",
    "backward_sums": "bn_backward",
    "backward_dx": "bn_backward",
    "release_scratch": "_scratch",
}

__all__ = list(_ENTRY_POINTS)


def __getattr__(name: str):
    module = _ENTRY_POINTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rnip_ext.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value
