"""Seeds every test: fresh inputs per test, reproducible from the printed seed.

Each test's seed is derived from its node id and ``RNIP_TEST_SEED`` (default 0), so tests draw
different inputs from each other, and a failure can be replayed by re-running with the same value.
"""

import os
import random
import zlib

import numpy as np
import pytest
import torch

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
