"""Loads the native extension ``semcorr_fast._C`` and reports what it was built with.

The C++ kernels register themselves with the torch dispatcher under the namespace ``semcorr_ext``
(``TORCH_LIBRARY_FRAGMENT`` in each ``csrc/<op>/`` folder; CPU and CUDA implementations are
dispatched by device). Python reaches them as ``torch.ops.semcorr_ext.<name>``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

_C = None
_ERROR: str | None = None
_INFO: dict = {}
try:  # pragma: no cover - exercised by every test run
    from . import _C  # type: ignore[attr-defined,no-redef]

    _INFO = dict(_C.build_info())  # read once: plain data that torch.compile can trace through
except Exception as exc:  # ImportError, or a broken build
    _ERROR = f"{type(exc).__name__}: {exc}"


def loaded() -> bool:
    return _C is not None


def error() -> str | None:
    """Why the extension could not be imported (None when it loaded)."""
    return _ERROR


def build_info() -> dict:
    if _C is None:
        return {"loaded": False, "error": _ERROR}
    info = dict(_INFO)
    info["loaded"] = True
    return info


def has_cuda_kernels() -> bool:
    return bool(_INFO.get("cuda", False))


def ops():
    """The ``torch.ops.semcorr_ext`` namespace (raises RuntimeError if the extension is missing)."""
    if _C is None:
        raise RuntimeError(
            "semcorr_fast's native extension (semcorr_fast._C) is not available: "
            f"{_ERROR}. Reinstall with a C++ compiler present (pip install --no-build-isolation .)."
        )
    return torch.ops.semcorr_ext


def cpu_bf16_gemm() -> str:
    """The CPU backend's bf16 tile GEMM: ``brgemm`` (oneDNN, AMX CPUs), ``avx512bf16`` (our
    micro-kernel, AVX512-BF16 CPUs without AMX) or ``off`` (bf16 converted to fp32, then sgemm)."""
    return _C.cpu_bf16_gemm() if _C is not None else "off"


@contextlib.contextmanager
def use_cpu_bf16_gemm(name: str) -> Iterator[str]:
    """Run a block with the bf16 tile GEMM ``name`` (auto | brgemm | avx512bf16 | off); yields the one
    in use, which is ``off`` when ``name`` is not available on this CPU. Not thread-safe with ops
    running concurrently; for tests and benchmarks (``SEMCORR_CPU_BF16_GEMM`` sets the default)."""
    if _C is None:
        raise RuntimeError(f"semcorr_fast._C is not available: {_ERROR}")
    prev = _C.cpu_bf16_gemm()
    try:
        yield _C.set_cpu_bf16_gemm(name)
    finally:
        _C.set_cpu_bf16_gemm(prev)
