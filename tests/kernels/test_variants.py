"""rnip_ext.kernels._variants: which Triton releases its internals were checked with."""

import pytest

from rnip_ext._backend import triton_available
from rnip_ext.kernels import _variants

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.mark.parametrize("version,supported", [("3.2.0", False), ("3.5.1", False), ("3.6.0", True),
                                               ("3.9.0", True), ("3.10.0rc1", True), ("4.0.0+git1a2b", True)])
def test_internals_supported_compares_release_numbers(monkeypatch, version, supported):
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    assert _variants.internals_supported() is supported
