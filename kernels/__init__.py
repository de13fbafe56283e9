"""Triton kernels for rnip_ext, installed as ``rnip_ext.kernels``.

Importing this package requires ``triton``; ``rnip_ext`` itself imports it only when a Triton
path is requested.

Bounded batch norm (``y = sigmoid(w) * (x - mean) / sqrt(var + eps) + b``), one kernel per job,
each module with its launcher:

* ``bn_stats``: ``bn_batch_stats`` -- per-channel batch mean and biased variance (chunked
  partials merged by Chan's formula) and the receding penalty ``s * (1 - log s)``;
* ``bn_normalize``: ``bn_normalize`` -- the elementwise forward, training or eval;
* ``bn_backward``: ``bn_backward`` -- partial sums, their deterministic combine (``dw`` with the
  penalty gradient fused, ``db``) and the elementwise ``dx``; ``bn_backward_sums`` /
  ``bn_backward_dx``, the pieces around ``SyncBoundedBatchNorm2d``'s all-reduce;
* ``bn_single``: the single-pass path -- one program holds a channel block's whole ``N*H*W``
  slice: training forward in one launch (2S), backward in one launch (3S);
* ``bn_chunked``: the chunked training forward in two launches (partials, normalise-with-combine);
* ``bn_train``: ``train_forward`` / ``train_backward``, which pick the path
  (``_config.single_pass_config``) and are what ``rnip_ext.ops`` calls.

Running statistics (and ``num_batches_tracked``) are updated inside the training-forward kernels.
Sizes that change with the batch or image size are runtime arguments that Triton does not
specialise (``_launch.RUNTIME_SIZES``): constexprs are tile shapes and flags only.

Shared pieces: ``_config`` (every block size, warp count and chunking choice, in one place),
``_layout`` (the ``[N, C, HW]`` stride view; no Triton import, so the ops' fake kernels use it
too), ``_launch`` (device checks, dtypes) and ``_math`` (stable sigmoid pieces, offsets).

Every launcher reads NCHW and channels_last tensors in place (strides are passed, never
``.contiguous()``), takes fp16/bf16/fp32 (and fp64, for gradcheck) inputs with fp32 (fp64)
accumulation, and accepts ``config=`` (a ``_config.BNConfig``) to override the tiles, which is
what the tests and benchmarks use. On CPU tensors the kernels need the Triton interpreter:
``TRITON_INTERPRET=1`` must be set before this package's kernel modules are imported.
"""
