"""Without Torch-Pruning installed, the integration fails on import with a message saying what to install."""

import importlib
import subprocess
import sys

import pytest


def test_import_without_torch_pruning_says_what_to_install(monkeypatch):
    # A None entry in sys.modules makes `import torch_pruning` raise ImportError, as if absent.
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    monkeypatch.delitem(sys.modules, "rnip_ext.integrations.torch_pruning", raising=False)
    with pytest.raises(ImportError, match=r"pip install rnip_ext\[torch-pruning\]") as info:
        importlib.import_module("rnip_ext.integrations.torch_pruning")
    assert "pip install torch-pruning" in str(info.value)
    assert "rnip_ext.integrations.torch_pruning" not in sys.modules


def test_importing_rnip_ext_does_not_import_torch_pruning():
    code = "import sys, rnip_ext, rnip_ext.integrations; assert 'torch_pruning' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
