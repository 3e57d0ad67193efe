"""Batched, weighted Kabsch-Umeyama: the similarity transform that best aligns two point sets.

Public functions: :func:`kabsch`, :func:`apply_similarity`, :func:`similarity_to_row_matrix`,
:func:`row_matrix_to_similarity`. Method and conventions: ``docs/kabsch.md``; native code:
``csrc/kabsch/`` (``kabsch_core.h`` holds the per-problem math shared by the CPU and CUDA kernels).

Conventions
-----------
Column vectors: a point ``x (d,)`` maps to ``s * R @ x + t``. For points stored as rows
``X (P, d)`` that is ``s * X @ R.T + t``. Jamais Vu and pytorch3d keep points as rows and a 4x4 matrix
``M`` applied as ``[x, 1] @ M``; :func:`similarity_to_row_matrix` builds that matrix,
``M = [[s R^T, 0], [t^T, 1]]``, and :func:`row_matrix_to_similarity` inverts it.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .._backend import resolve
from ..reference.kabsch import DEGENERATE, EMPTY, NONFINITE, OK, kabsch_reference

__all__ = [
    "kabsch",
    "apply_similarity",
    "similarity_to_row_matrix",
    "row_matrix_to_similarity",
    "KABSCH_OK",
    "KABSCH_DEGENERATE",
    "KABSCH_EMPTY",
    "KABSCH_NONFINITE",
]

#: ``info`` codes returned by ``kabsch(..., return_info=True)``.
KABSCH_OK, KABSCH_DEGENERATE, KABSCH_EMPTY, KABSCH_NONFINITE = OK, DEGENERATE, EMPTY, NONFINITE

_STATUS_COL = 3  # column of the status code in the native op's stats (StatsLayout in kabsch_core.h)
_FLOAT_TYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _stats_width(d: int) -> int:
    return 5 + 2 * d + d * d


# --------------------------------------------------------------------------------------------------
# The custom op (native backends): forward and backward both go through torch.library, so that
# torch.compile and tracing see two opaque ops with fake implementations.
# --------------------------------------------------------------------------------------------------

@torch.library.custom_op("semcorr_fast::kabsch", mutates_args=())
def _kabsch_op(src: Tensor, tgt: Tensor, weights: Optional[Tensor], estimate_scale: bool,
               min_scale: float, max_scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    R, t, s, stats = _ext.ops().kabsch_fwd(src, tgt, weights, estimate_scale, min_scale, max_scale)
    return R, t, s, stats


@_kabsch_op.register_fake
def _kabsch_op_fake(src, tgt, weights, estimate_scale, min_scale, max_scale):
    B, _, d = src.shape
    return (src.new_empty(B, d, d), src.new_empty(B, d), src.new_empty(B), src.new_empty(B, _stats_width(d)))


@torch.library.custom_op("semcorr_fast::kabsch_backward", mutates_args=())
def _kabsch_backward_op(grad_R: Tensor, grad_t: Tensor, grad_s: Tensor, src: Tensor, tgt: Tensor,
                        weights: Optional[Tensor], R: Tensor, s: Tensor, stats: Tensor,
                        estimate_scale: bool, min_scale: float, max_scale: float
                        ) -> tuple[Tensor, Tensor, Tensor]:
    gsrc, gtgt, gw = _ext.ops().kabsch_bwd(grad_R, grad_t, grad_s, src, tgt, weights, R, s, stats,
                                           estimate_scale, min_scale, max_scale)
    return gsrc, gtgt, gw


@_kabsch_backward_op.register_fake
def _kabsch_backward_op_fake(grad_R, grad_t, grad_s, src, tgt, weights, R, s, stats, estimate_scale,
                             min_scale, max_scale):
    gw = torch.empty_like(weights) if weights is not None else src.new_empty(0)
    return torch.empty_like(src), torch.empty_like(tgt), gw


def _kabsch_setup_context(ctx, inputs, output):
    src, tgt, weights, estimate_scale, min_scale, max_scale = inputs
    R, _, s, stats = output
    ctx.save_for_backward(src, tgt, weights, R, s, stats)
    ctx.params = (estimate_scale, min_scale, max_scale)
    ctx.mark_non_differentiable(stats)


def _kabsch_backward(ctx, grad_R, grad_t, grad_s, _grad_stats):
    src, tgt, weights, R, s, _stats = ctx.saved_tensors
    need_src, need_tgt, need_w = ctx.needs_input_grad[:3]
    if not (need_src or need_tgt or need_w):
        return None, None, None, None, None, None
    grad_R = torch.zeros_like(R) if grad_R is None else grad_R.contiguous()
    grad_t = R.new_zeros(R.shape[:2]) if grad_t is None else grad_t.contiguous()
    grad_s = torch.zeros_like(s) if grad_s is None else grad_s.contiguous()
    gsrc, gtgt, gw = _kabsch_backward_op(grad_R, grad_t, grad_s, src, tgt, weights, R, s, _stats, *ctx.params)
    return (gsrc if need_src else None, gtgt if need_tgt else None,
            gw if (need_w and weights is not None) else None, None, None, None)


_kabsch_op.register_autograd(_kabsch_backward, setup_context=_kabsch_setup_context)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

def _check_points(name: str, x, fn: str = "kabsch") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape (B, P, d), got {type(x).__name__}")
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"{fn}: {name} must be a floating-point tensor (float16, bfloat16, float32 or "
                        f"float64), got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{fn}: {name} must have shape (B, P, d) with d in {{2, 3}}, got {tuple(x.shape)}")
    if x.shape[-1] not in (2, 3):
        raise ValueError(f"{fn}: {name} must have shape (B, P, d) with d in {{2, 3}}, got d = {x.shape[-1]} "
                         f"(shape {tuple(x.shape)})")


def _check_scale_bound(name: str, v) -> float | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"kabsch: {name} must be a float or None, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v):
        raise ValueError(f"kabsch: {name} must not be NaN")
    return v


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def kabsch(src: Tensor, tgt: Tensor, weights: Tensor | None = None, *, estimate_scale: bool = False,
           min_scale: float | None = None, max_scale: float | None = None, backend: str = "auto",
           return_info: bool = False):
    r"""Weighted Kabsch-Umeyama: the rotation, translation and scale aligning ``src`` onto ``tgt``.

    Solves, independently for each of the B problems,

    .. math:: \min_{R \in SO(d),\, t,\, s} \sum_i w_i \, \| s R\, \mathrm{src}_i + t - \mathrm{tgt}_i \|^2

    Column-vector convention: ``tgt_i ≈ s * R @ src_i + t``, i.e. for row-stored points
    ``tgt ≈ s * src @ R.mT + t[:, None]`` (see :func:`apply_similarity`). The row-vector 4x4 form used
    by Jamais Vu and pytorch3d (``[x, 1] @ M``) is :func:`similarity_to_row_matrix`.

    Method (native backends ``"cpu"``/``"cuda"``): weighted centroids and the d×d cross-covariance
    ``M = Σ ŵ (tgt_i − μ_t)(src_i − μ_s)ᵀ`` in two passes over the points, then a closed-form
    rotation: Horn's unit-quaternion method for d = 3 (largest eigenvector of a symmetric 4×4 matrix,
    Jacobi sweeps), ``atan2`` for d = 2. Umeyama's scale ``s = tr(Rᵀ M) / σ²_src`` is clamped to
    ``[min_scale, max_scale]`` before ``t = μ_t − s R μ_s`` is computed. The backward is analytic
    (Procrustes derivative, only ``1/(σ_i + σ_j)`` terms), so gradients stay finite for symmetric or
    identical clouds where ``torch.linalg.svd``'s backward returns NaN (first-order gradients only).
    ``"reference"`` is the naive SVD implementation
    (:func:`semcorr_fast.reference.kabsch.kabsch_reference`) with plain autograd, whose gradients are
    NaN at such clouds.

    Args:
        src: ``(B, P, d)`` source points, d ∈ {2, 3}.
        tgt: ``(B, P, d)`` target points, same dtype as ``src``.
        weights: ``(B, P)`` non-negative weights (a bool or 0/1 mask is a weight), or None for all 1.
            Checked for negative entries (one device synchronisation on CUDA).
        estimate_scale: estimate Umeyama's scale; otherwise ``s = 1``.
        min_scale, max_scale: clamp of the scale (only with ``estimate_scale=True``; Jamais Vu uses
            ``min_scale=1``). No gradient flows through the scale while the clamp is active.
        backend: ``"auto"``, ``"reference"``, ``"cpu"`` or ``"cuda"``.
        return_info: also return ``info (B,) int8`` with the status codes below.

    Returns:
        ``(R (B, d, d), t (B, d), s (B,))``, or ``(R, t, s, info)`` with ``return_info=True``.
        float32 for float16/bfloat16/float32 inputs (half inputs are computed in float32 and
        returned in float32), float64 for float64 inputs.

    Degenerate input (never an error, ``info`` tells which case applied):

    * ``KABSCH_OK`` (0): unique solution.
    * ``KABSCH_DEGENERATE`` (1): the optimal rotation is not unique — collinear points (d = 3),
      fewer than d points with non-zero weight, coincident points — or one cloud is a single point.
      The native backends return the optimal rotation closest to the identity (the reference returns
      whichever optimum LAPACK finds); gradients along the undetermined directions are zero. When all
      weighted source points coincide (zero spread): ``R = I``, unclamped scale 1, ``t`` maps the
      centroid onto the target centroid. When all weighted target points coincide: ``R = I``,
      unclamped scale 0 (then clamped).
    * ``KABSCH_EMPTY`` (2): all weights zero (or ``P = 0``): ``R = I``, ``t = 0``,
      ``s = clamp(1, min_scale, max_scale)``; gradients zero.
    * ``KABSCH_NONFINITE`` (3): a NaN/Inf weight, or a NaN/Inf coordinate of a point with positive
      weight (native backends: also weighted sums that overflow the dtype):
      ``R``, ``t`` and ``s`` of that problem are NaN (so are its gradients); the other
      problems of the batch are unaffected. Points with weight 0 never influence the result, even
      when their coordinates are NaN/Inf (they read as 0).

    Raises:
        TypeError: a non-tensor or non-floating ``src``/``tgt``, ``src``/``tgt`` dtypes differ,
            integer ``weights``, a non-numeric scale bound.
        ValueError: wrong ranks, d ∉ {2, 3}, ``tgt``/``weights`` shapes not matching ``src``,
            negative weights, tensors on several devices, negative ``min_scale``, non-positive
            ``max_scale``, ``min_scale > max_scale``, scale bounds without ``estimate_scale``.
        RuntimeError: the requested backend is unavailable.

    Example:
        >>> src = torch.tensor([[[0., 0, 0], [1, 0, 0], [0, 2, 0], [0, 0, 3]]])
        >>> Rz = torch.tensor([[[0., -1, 0], [1, 0, 0], [0, 0, 1]]])     # 90° about z
        >>> tgt = 2 * src @ Rz.mT + torch.tensor([1., 2, 3])
        >>> R, t, s = kabsch(src, tgt, estimate_scale=True)
        >>> torch.allclose(R, Rz, atol=1e-5), t.round(decimals=4).tolist(), round(s.item(), 4)
        (True, [[1.0, 2.0, 3.0]], 2.0)
    """
    _check_points("src", src)
    _check_points("tgt", tgt)
    if tgt.shape != src.shape:
        raise ValueError(f"kabsch: tgt must have the shape of src (B, P, d) = {tuple(src.shape)}, "
                         f"got {tuple(tgt.shape)}")
    if tgt.dtype != src.dtype:
        raise TypeError(f"kabsch: src and tgt must have the same dtype, got {src.dtype} and {tgt.dtype}")
    B, P, d = src.shape
    if weights is not None:
        if not isinstance(weights, Tensor):
            raise TypeError(f"kabsch: weights must be a torch.Tensor of shape (B, P) or None, "
                            f"got {type(weights).__name__}")
        if weights.dtype not in _FLOAT_TYPES and weights.dtype != torch.bool:
            raise TypeError(f"kabsch: weights must be a floating-point or bool tensor of shape (B, P), "
                            f"got {weights.dtype}")
        if tuple(weights.shape) != (B, P):
            raise ValueError(f"kabsch: weights must have shape (B, P) = {(B, P)}, got {tuple(weights.shape)}")
    if not isinstance(estimate_scale, bool):
        raise TypeError(f"kabsch: estimate_scale must be a bool, got {type(estimate_scale).__name__}")
    lo = _check_scale_bound("min_scale", min_scale)
    hi = _check_scale_bound("max_scale", max_scale)
    if not estimate_scale and (lo is not None or hi is not None):
        raise ValueError("kabsch: min_scale/max_scale clamp the estimated scale; pass estimate_scale=True "
                         "(with estimate_scale=False the scale is always 1)")
    if lo is not None and lo < 0:
        raise ValueError(f"kabsch: min_scale must be >= 0, got {lo}")
    if hi is not None and hi <= 0:
        raise ValueError(f"kabsch: max_scale must be > 0, got {hi}")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"kabsch: min_scale ({lo}) must be <= max_scale ({hi})")

    backend = resolve(backend, [src, tgt, weights], op="kabsch", supported=("reference", "cpu", "cuda"),
                      cuda_ops=("kabsch",))

    dtype = _compute_dtype(src.dtype)
    src_c, tgt_c = src.to(dtype), tgt.to(dtype)
    w_c = None
    if weights is not None:
        w_c = weights.to(dtype)
        if bool((w_c < 0).any()):
            raise ValueError("kabsch: weights must be >= 0 (a 0/1 mask is a weight); found negative entries")

    if backend == "reference":
        R, t, s, info = kabsch_reference(src_c, tgt_c, w_c, estimate_scale=estimate_scale, min_scale=lo,
                                         max_scale=hi, return_info=True)
    else:
        R, t, s, stats = _kabsch_op(src_c.contiguous(), tgt_c.contiguous(),
                                    None if w_c is None else w_c.contiguous(), estimate_scale,
                                    -math.inf if lo is None else lo, math.inf if hi is None else hi)
        info = stats[:, _STATUS_COL].to(torch.int8)
    return (R, t, s, info) if return_info else (R, t, s)


# --------------------------------------------------------------------------------------------------
# Applying and converting similarity transforms
# --------------------------------------------------------------------------------------------------

def _check_similarity(fn: str, R, t, s, d: int | None = None) -> tuple[int, int]:
    if not isinstance(R, Tensor) or not R.is_floating_point():
        raise TypeError(f"{fn}: R must be a floating-point tensor of shape (B, d, d)")
    if R.dim() != 3 or R.shape[-1] != R.shape[-2] or R.shape[-1] not in (2, 3):
        raise ValueError(f"{fn}: R must have shape (B, d, d) with d in {{2, 3}}, got {tuple(R.shape)}")
    B, dd = R.shape[0], R.shape[-1]
    if d is not None and dd != d:
        raise ValueError(f"{fn}: R must be ({B}, {d}, {d}) to match the points, got {tuple(R.shape)}")
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{fn}: t must be a floating-point tensor of shape (B, d)")
    if tuple(t.shape) != (B, dd):
        raise ValueError(f"{fn}: t must have shape (B, d) = {(B, dd)}, got {tuple(t.shape)}")
    if s is not None:
        if not isinstance(s, Tensor) or not s.is_floating_point():
            raise TypeError(f"{fn}: s must be a floating-point tensor of shape (B,) or None")
        if tuple(s.shape) != (B,):
            raise ValueError(f"{fn}: s must have shape (B,) = ({B},), got {tuple(s.shape)}")
    return B, dd


def apply_similarity(points: Tensor, R: Tensor, t: Tensor, s: Tensor | None = None) -> Tensor:
    """Apply ``x ↦ s R x + t`` (column-vector convention) to row-stored points.

    Args:
        points: ``(B, P, d)``.
        R: ``(B, d, d)``; t: ``(B, d)``; s: ``(B,)`` or None (scale 1), as returned by :func:`kabsch`.

    Returns:
        ``(B, P, d)``: ``s[:, None, None] * points @ R.mT + t[:, None]``. Differentiable.

    Example:
        >>> R = torch.tensor([[[0., -1], [1, 0]]])                  # 90° in the plane
        >>> apply_similarity(torch.tensor([[[1., 0]]]), R, torch.tensor([[0., 1]]), torch.tensor([2.]))
        tensor([[[0., 3.]]])
    """
    _check_points("points", points, fn="apply_similarity")
    B, d = _check_similarity("apply_similarity", R, t, s, d=points.shape[-1])
    if points.shape[0] != B:
        raise ValueError(f"apply_similarity: points must have B = {B} problems like R, got {tuple(points.shape)}")
    out = points @ R.mT
    if s is not None:
        out = s[:, None, None] * out
    return out + t[:, None, :]


def similarity_to_row_matrix(R: Tensor, t: Tensor, s: Tensor | None = None) -> Tensor:
    """The ``(B, d+1, d+1)`` row-vector matrix of a similarity (Jamais Vu / pytorch3d convention).

    With homogeneous row points ``[x, 1]``, ``[x, 1] @ M = [s R x + t, 1]``, where
    ``M = [[s Rᵀ, 0], [tᵀ, 1]]``. For d = 3 this is the 4×4 ``[[sR', 0], [T, 1]]`` of Jamais Vu with
    their row-convention rotation ``R' = Rᵀ``.

    Args:
        R: ``(B, d, d)``; t: ``(B, d)``; s: ``(B,)`` or None (scale 1).

    Returns:
        ``(B, d+1, d+1)``. Differentiable.

    Example:
        >>> R = torch.eye(2)[None]; t = torch.tensor([[5., 6]])
        >>> similarity_to_row_matrix(R, t, torch.tensor([2.]))
        tensor([[[2., 0., 0.],
                 [0., 2., 0.],
                 [5., 6., 1.]]])
    """
    B, d = _check_similarity("similarity_to_row_matrix", R, t, s)
    A = R.mT if s is None else s[:, None, None] * R.mT
    top = torch.cat([A, A.new_zeros(B, d, 1)], dim=2)
    bottom = torch.cat([t, t.new_ones(B, 1)], dim=1)[:, None, :]
    return torch.cat([top, bottom.to(top.dtype)], dim=1)


def row_matrix_to_similarity(M: Tensor, *, check: bool = True, atol: float | None = None):
    """Inverse of :func:`similarity_to_row_matrix`: ``(R, t, s)`` from a ``(B, d+1, d+1)`` matrix.

    ``s = det(A)^(1/d)`` and ``R = Aᵀ / s`` with ``A = M[:, :d, :d]``; ``t = M[:, d, :d]``.

    Args:
        M: ``(B, d+1, d+1)``, d ∈ {2, 3}, floating point.
        check: verify that ``M`` is a row-vector similarity: last column ``(0, …, 0, 1)``,
            ``det(A) > 0`` and ``Aᵀ A = s² I`` within ``atol`` (relative to ``s²``); ValueError
            otherwise. This synchronises with the device.
        atol: tolerance of the checks (default ``1e-4`` for float32 and lower, ``1e-8`` for float64).

    Returns:
        ``R (B, d, d)``, ``t (B, d)``, ``s (B,)``.

    Example:
        >>> M = torch.tensor([[[0., 2, 0], [-2, 0, 0], [1, 1, 1]]])
        >>> R, t, s = row_matrix_to_similarity(M)
        >>> R, t, s
        (tensor([[[ 0., -1.],
                 [ 1.,  0.]]]), tensor([[1., 1.]]), tensor([2.]))
    """
    if not isinstance(M, Tensor) or not M.is_floating_point():
        raise TypeError("row_matrix_to_similarity: M must be a floating-point tensor of shape (B, d+1, d+1)")
    if M.dim() != 3 or M.shape[-1] != M.shape[-2] or M.shape[-1] not in (3, 4):
        raise ValueError(f"row_matrix_to_similarity: M must have shape (B, d+1, d+1) with d in {{2, 3}}, "
                         f"got {tuple(M.shape)}")
    d = M.shape[-1] - 1
    A = M[:, :d, :d]
    t = M[:, d, :d]
    det = torch.linalg.det(A)
    s = det.clamp_min(0).pow(1.0 / d)
    if check and M.shape[0] > 0:
        tol = atol if atol is not None else (1e-8 if M.dtype == torch.float64 else 1e-4)
        col = M[:, :, d]
        want = torch.zeros_like(col)
        want[:, d] = 1
        if not torch.allclose(col, want, rtol=0, atol=tol):
            raise ValueError("row_matrix_to_similarity: M's last column must be (0, ..., 0, 1) "
                             "(row-vector convention [x, 1] @ M)")
        if bool((det <= 0).any()):
            raise ValueError("row_matrix_to_similarity: det(M[:, :d, :d]) must be > 0 (a rotation times a "
                             "positive scale); got a reflection or a singular block")
        gram = A.mT @ A / (s * s)[:, None, None]
        eye = torch.eye(d, dtype=M.dtype, device=M.device).expand_as(gram)
        if not torch.allclose(gram, eye, rtol=0, atol=tol):
            raise ValueError("row_matrix_to_similarity: M[:, :d, :d] is not a scaled rotation (A^T A != s^2 I)")
    R = (A / s[:, None, None]).mT
    return R, t, s
