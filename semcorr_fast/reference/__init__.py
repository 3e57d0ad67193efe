"""Naive, materialising reference implementations: the oracle every backend is tested against.

They are written from the definitions in ``../shared/docs/ops-contract.md`` with plain torch ops
(autograd gives their gradients), and they build the full Ns×Nt matrices the fused kernels avoid.
Never the default backend.
"""
from .kabsch import kabsch_reference  # noqa: F401
from .losses import expected_cost, rowsoftmax_distill, softmax_aggregate  # noqa: F401
from .correlation import (  # noqa: F401
    coordinate_grid,
    similarity,
    instance_matching_distance,
    match_topk,
    mutual_nn,
    ncc,
    soft_argmax,
    softmax_t,
    topk_retrieval,
    window_soft_argmax,
)
