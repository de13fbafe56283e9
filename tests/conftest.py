"""Seeds every test: fresh inputs per test, reproducible from the printed seed.

Each test's seed is derived from its node id and ``RNIP_TEST_SEED`` (default 0), so tests draw
different inputs from each other, and a failure can be replayed by re-running with the same value.
"""

import os
import random
import warnings
import zlib

# The Triton kernels run on CPU tensors under the interpreter. Triton reads the variable when a
# kernel is defined, so it is set here, before any test module imports rnip_ext.kernels; on a
# GPU machine (RNIP_TEST_DEVICE=cuda) the kernels compile for real instead.
if os.environ.get("RNIP_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

BASE_SEED = int(os.environ.get("RNIP_TEST_SEED", "0"))


def interpreter_numpy_clash() -> str | None:
    """Why this Triton's interpreter cannot run here, or None. Triton <= 3.6 turns loop bounds into
    ints with ``int(array)`` on one-element arrays, which newer numpy refuses (fixed in 3.7)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        from rnip_ext.kernels._variants import triton_release
    except ImportError:  # rnip_ext.kernels needs triton: nothing to interpret
        return None
    release = triton_release()
    if release is None or release >= (3, 7):
        return None
    import triton

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 1.25-2.2 only warn
            int(np.ones(1, dtype=np.int32))
    except TypeError:
        return (f"triton {triton.__version__}'s interpreter cannot run with numpy {np.__version__}: "
                "pip install 'numpy<2.3' (or triton >= 3.7)")
    return None


def pytest_terminal_summary(terminalreporter):
    # The tests still run (most need no interpreter); the advice stands next to the failures.
    clash = interpreter_numpy_clash()
    if clash:
        terminalreporter.write_line(f"kernel tests fail here: {clash}", red=True, bold=True)


@pytest.fixture(autouse=True)
def _seed_everything(request):
    seed = (zlib.crc32(request.node.nodeid.encode()) + BASE_SEED) % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield seed


def pytest_report_header(config):
    clash = interpreter_numpy_clash()
    return [f"rnip_ext test seed base: RNIP_TEST_SEED={BASE_SEED}"] + ([f"WARNING: {clash}"] if clash else [])
