"""Test configuration shared by every test file.

Without a GPU, the Triton backend runs under Triton's interpreter on CPU tensors; the interpreter is
chosen when ``triton.jit`` decorates a kernel, so the variable is set here, before any import of
``semcorr_fast.kernels``.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from semcorr_fast import _backend  # noqa: E402

# Backends under test (the reference is the oracle, so it is tested through properties only).
KERNEL_BACKENDS = ("cpu", "triton", "cuda")


def backend_device(backend: str) -> torch.device:
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def unavailable_backends() -> dict:
    return {b: w for b in KERNEL_BACKENDS if (w := _backend.why_unavailable(b, backend_device(b))) is not None}


# Only the backends this machine has are parametrised; tests/test_backends.py reports the others as
# skipped once each, with the reason.
AVAILABLE = [b for b in KERNEL_BACKENDS if b not in unavailable_backends()]


@pytest.fixture(params=AVAILABLE)
def backend(request):
    return request.param


@pytest.fixture
def device(backend):
    return backend_device(backend)


@pytest.fixture
def small_tiles(monkeypatch):
    """Force tiny CPU tiles so that small shapes still cross several row blocks and target tiles."""
    monkeypatch.setenv("SEMCORR_CPU_BM", "8")
    monkeypatch.setenv("SEMCORR_CPU_BN", "32")
