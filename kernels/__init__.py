"""Triton kernels for rnip_ext, installed as ``rnip_ext.kernels``.

Importing this package requires ``triton``; ``rnip_ext`` itself imports it only when a Triton
path is requested.

Bounded batch norm (``y = sigmoid(w) * (x - mean) / sqrt(var + eps) + b``), one kernel per job,
each module with its launcher:

* ``bn_stats``: ``bn_batch_stats`` -- per-channel batch mean and biased variance (chunked
  partials merged by Chan's formula) and the receding penalty ``s * (1 - log s)``;
* ``bn_normalize``: ``bn_normalize`` -- the elementwise forward, training or eval;
* ``bn_backward``: ``bn_backward`` -- partial sums, their deterministic combine (``dw`` with the
  penalty gradient fused, ``db``) and the elementwise ``dx``.

Shared pieces: ``_config`` (every block size, warp count and chunking choice, in one place),
``_layout`` (the ``[N, C, HW]`` stride view; no Triton import, so the ops' fake kernels use it
too), ``_launch`` (device checks, dtypes) and ``_math`` (stable sigmoid pieces, offsets).

Every launcher reads NCHW and channels_last tensors in place (strides are passed, never
``.contiguous()``), takes fp16/bf16/fp32 (and fp64, for gradcheck) inputs with fp32 (fp64)
accumulation, and accepts ``config=`` (a ``_config.BNConfig``) to override the tiles, which is
what the tests and benchmarks use. On CPU tensors the kernels need the Triton interpreter:
``TRITON_INTERPRET=1`` must be set before this package's kernel modules are imported.
"""
