"""The application beside the library: what the ``rnip`` command, the demo, the report and the benchmarks share.

``spec`` (validated run settings), ``train``/``prune``/``export`` (runs returning a summary), ``runs``
(model building, prune-and-measure, summaries), ``demo`` and ``report`` (with ``plots`` and
``demo_plots``), ``measure`` (throughput, kernel launches, versions), ``errors`` (mistakes the user
can fix). The library (``rnip_ext`` without ``app``/``cli``) never imports this package.
"""
