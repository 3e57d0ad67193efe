"""Backend selection (``backend=``, ``SEMCORR_BACKEND``) and availability reporting."""
import pytest
import torch

from conftest import KERNEL_BACKENDS, unavailable_backends
from semcorr_fast import _backend, ops


@pytest.mark.parametrize("name", KERNEL_BACKENDS)
def test_backend_availability_is_reported(name):
    why = unavailable_backends().get(name)
    if why is not None:
        pytest.skip(f"backend {name!r} unavailable here: {why}")
    assert _backend.why_unavailable(name, torch.device("cpu") if name != "cuda" else torch.device("cuda")) is None


def test_unavailable_backend_raises_runtime_error_with_reason():
    src, tgt = torch.randn(1, 3, 4), torch.randn(1, 6, 4)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="cuda.*unavailable"):
        ops.match_topk(src, tgt, 1, backend="cuda")


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        ops.soft_argmax(torch.randn(1, 3, 4), torch.randn(1, 6, 4), 0.1, (2, 3), backend="tpu")
    with pytest.raises(TypeError, match="backend"):
        ops.soft_argmax(torch.randn(1, 3, 4), torch.randn(1, 6, 4), 0.1, (2, 3), backend=3)


def test_auto_is_cpu_for_cpu_tensors_and_env_overrides(monkeypatch):
    t = [torch.randn(1, 2, 3)]
    monkeypatch.delenv("SEMCORR_BACKEND", raising=False)
    assert _backend.resolve("auto", t, op="x") == "cpu"
    monkeypatch.setenv("SEMCORR_BACKEND", "reference")
    assert _backend.resolve("auto", t, op="x") == "reference"
    # an explicit backend wins over the environment
    assert _backend.resolve("cpu", t, op="x") == "cpu"
    monkeypatch.setenv("SEMCORR_BACKEND", "bogus")
    with pytest.raises(ValueError, match="bogus"):
        _backend.resolve("auto", t, op="x")


def test_reference_is_never_the_default(monkeypatch):
    monkeypatch.delenv("SEMCORR_BACKEND", raising=False)
    assert _backend.resolve("auto", [torch.randn(2)], op="x") != "reference"


def test_mixed_devices_rejected():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    with pytest.raises(ValueError, match="same device"):
        ops.soft_argmax(torch.randn(1, 3, 4), torch.randn(1, 6, 4).cuda(), 0.1, (2, 3))
