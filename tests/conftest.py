"""Seeds every test: fresh inputs per test, reproducible from the printed seed.

Each test's seed is derived from its node id and ``RNIP_TEST_SEED`` (default 0), so tests draw
different inputs from each other, and a failure can be replayed by re-running with the same value.
"""

import os
import random
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


@pytest.fixture(autouse=True)
def _seed_everything(request):
    seed = (zlib.crc32(request.node.nodeid.encode()) + BASE_SEED) % (2**31)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield seed


def pytest_report_header(config):
    return f"rnip_ext test seed base: RNIP_TEST_SEED={BASE_SEED}"
