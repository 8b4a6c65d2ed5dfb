"""Test setup: Triton kernels run under the interpreter on machines without CUDA; generated
kernels are cached in a fresh folder per test session (not the user's ~/.cache/effc)."""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("EFFC_CACHE_DIR", tempfile.mkdtemp(prefix="effc-test-kernels-"))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cached graphs or recompile limits carried over, and
    effc.report() holds only this test's graphs."""
    import effc

    torch._dynamo.reset()
    effc.reset()
    yield
    torch._dynamo.reset()
