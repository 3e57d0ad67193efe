"""semcorr_fast: fused, memory-lean kernels for dense semantic correspondence.

The public op surface is :mod:`semcorr_fast.ops` (contract: ``docs/ARCHITECTURE.md``).
"""
from . import ops  # noqa: F401
from ._backend import available as available_backends  # noqa: F401

__version__ = "0.1.0"
