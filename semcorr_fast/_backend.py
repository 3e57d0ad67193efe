"""Backend selection: the ``backend=`` keyword of every op and ``SEMCORR_BACKEND``.

Backends (contract, ``../shared/docs/ops-contract.md``):

* ``"reference"`` - naive, materialising torch code; the oracle of the tests, never the default.
* ``"cpu"``       - fused C++ kernels of ``semcorr_fast._C`` (CPU tensors).
* ``"triton"``    - Triton kernels in ``semcorr_fast.kernels`` (CUDA tensors; CPU tensors only under
  ``TRITON_INTERPRET=1``, which is how the tests run them without a GPU).
* ``"cuda"``      - CUDA C++ kernels of ``semcorr_fast._C`` (only the ops that have one).
* ``"auto"``      - ``SEMCORR_BACKEND`` if set, else ``"triton"`` for CUDA tensors (``"cuda"`` if
  Triton is missing) and ``"cpu"`` for CPU tensors.

An unavailable backend raises ``RuntimeError`` that says what is missing.
"""
from __future__ import annotations

import os
from typing import Iterable

import torch

from . import _ext

BACKENDS = ("reference", "cpu", "triton", "cuda")


_TRITON: list = []  # memo of _triton_error()'s answer


def _triton_error() -> str | None:
    if _TRITON:
        return _TRITON[0]
    err = None
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover
        err = f"triton is not importable ({exc})"
    if err is None:
        try:
            from . import kernels  # noqa: F401
        except Exception as exc:  # pragma: no cover
            err = f"semcorr_fast.kernels failed to import ({type(exc).__name__}: {exc})"
    _TRITON.append(err)
    return err


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unavailable(backend: str, device: torch.device | None = None, op: str | None = None,
                    cuda_ops: Iterable[str] = ()) -> str | None:
    """None if ``backend`` can run on ``device``; otherwise the reason, in words."""
    dev = device.type if device is not None else None
    if backend == "reference":
        return None
    if backend == "cpu":
        if not _ext.loaded():
            return f"the C++ extension is not built ({_ext.error()})"
        if dev not in (None, "cpu"):
            return f"backend 'cpu' needs CPU tensors, got {dev}"
        return None
    if backend == "triton":
        err = _triton_error()
        if err:
            return err
        if dev == "cpu" and not triton_interpreter():
            return "backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)"
        if dev == "cuda" and not torch.cuda.is_available():  # pragma: no cover
            return "no GPU is available"
        return None
    if backend == "cuda":
        if not _ext.has_cuda_kernels():
            return "the extension was built without CUDA kernels (SEMCORR_BUILD_CUDA=1 and nvcc needed)"
        if not torch.cuda.is_available():
            return "no GPU is available"
        if dev not in (None, "cuda"):
            return f"backend 'cuda' needs CUDA tensors, got {dev}"
        if op is not None and op not in set(cuda_ops):
            return f"op {op!r} has no CUDA C++ kernel (use backend='triton')"
        return None
    return f"unknown backend {backend!r}"


def resolve(backend: str, tensors: Iterable[torch.Tensor], *, op: str,
            supported: Iterable[str] = BACKENDS, cuda_ops: Iterable[str] = ()) -> str:
    """Pick the backend for one call and check it can run; raises a clear error otherwise."""
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str, one of 'auto', {', '.join(map(repr, BACKENDS))}; got {type(backend).__name__}")
    devices = {t.device.type for t in tensors if isinstance(t, torch.Tensor)}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(devices)}")
    dev = torch.device(devices.pop()) if devices else None
    supported = tuple(supported)
    if backend == "auto":
        env = os.environ.get("SEMCORR_BACKEND", "").strip()
        if env and env != "auto":
            backend = env
        elif dev is not None and dev.type == "cuda":
            backend = "triton" if "triton" in supported and why_unavailable("triton", dev) is None else "cuda"
        else:
            backend = "cpu" if "cpu" in supported else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend not in supported:
        raise RuntimeError(f"{op}: backend {backend!r} is not implemented for this op (it has {supported})")
    why = why_unavailable(backend, dev, op, cuda_ops)
    if why is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {why}")
    return backend


def available(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """Map backend -> None (available on ``device``) or the reason it is not."""
    device = torch.device(device)
    return {b: why_unavailable(b, device) for b in BACKENDS}
