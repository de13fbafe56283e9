"""Triton kernels for rnip_ext, installed as ``rnip_ext.kernels``.

Importing this package requires ``triton``; ``rnip_ext`` itself imports it only when a Triton
path is requested.
"""
