import os
import sys

import torch

# Kernels are exercised under the Triton interpreter on CPU. The variable is read when triton and the
# kernels are imported, so it must be set before anything imports triton (torch._dynamo does).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

# Shared test helpers (diffusers_tiny.py) live beside the tests.
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _fresh_state():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
