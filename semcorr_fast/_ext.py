"""Loads the native extension ``semcorr_fast._C`` and reports what it was built with.

The C++ kernels register themselves with the torch dispatcher under the namespace ``semcorr_ext``
(``TORCH_LIBRARY_FRAGMENT`` in each ``csrc/<op>/`` folder; CPU and CUDA implementations are
dispatched by device). Python reaches them as ``torch.ops.semcorr_ext.<name>``.
"""
from __future__ import annotations

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
