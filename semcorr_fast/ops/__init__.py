"""``semcorr_fast.ops``: the public op surface (contract: ``../shared/docs/ops-contract.md``).

Every op takes ``backend="auto" | "reference" | "cpu" | "triton" | "cuda"`` (``SEMCORR_BACKEND``
overrides ``"auto"``). See ``docs/ARCHITECTURE.md`` for where each op's math, kernels and tests live.
"""
from .correlation import (  # noqa: F401
    flatten_map,
    instance_matching_distance,
    match_topk,
    mutual_nn,
    ncc,
    soft_argmax,
    softmax_t,
    topk_retrieval,
    window_soft_argmax,
)
from .losses import expected_cost, rowsoftmax_distill, softmax_aggregate, tau_from_logit_scale  # noqa: F401

try:  # geometry (Kabsch/Umeyama); see semcorr_fast/ops/kabsch.py
    from .kabsch import apply_similarity, kabsch, row_matrix_to_similarity, similarity_to_row_matrix  # noqa: F401
except ImportError as _exc:  # pragma: no cover - only while the module is being written
    if "kabsch" not in str(_exc):
        raise
