"""Reference (oracle) weighted Kabsch-Umeyama: moments in plain torch, rotation by ``torch.linalg.svd``.

Written straight from ``docs/math.md`` (section *kabsch*):

* ŵᵢ = wᵢ / Σw;  μ_s = Σ ŵᵢ xᵢ,  μ_t = Σ ŵᵢ yᵢ;  M = Σ ŵᵢ (yᵢ − μ_t)(xᵢ − μ_s)ᵀ;  σ²_s = Σ ŵᵢ ‖xᵢ − μ_s‖².
* M = U Σ Vᵀ, D = diag(1, …, 1, sign det(U Vᵀ)):  R = U D Vᵀ,  s = tr(Σ D) / σ²_s (clamped),  t = μ_t − s R μ_s.

The degenerate cases follow the same documented rules as :func:`semcorr_fast.ops.kabsch` (see its
docstring): zero-weight points are ignored (non-finite coordinates there read as 0), all-zero
weights give the identity, a cloud that is a single point gives R = I, non-finite input gives NaN.
Where the optimal rotation is not unique (collinear points, ...) this oracle returns whichever
maximiser LAPACK produces, while the native backends return the one closest to the identity.

Gradients are plain autograd through ``torch.linalg.svd``: they are NaN/Inf where singular values
repeat (symmetric or identical clouds). That is the point of the native backends' analytic backward.
"""
from __future__ import annotations

import torch

# Status codes, shared with semcorr_fast.ops.kabsch.
OK, DEGENERATE, EMPTY, NONFINITE = 0, 1, 2, 3


def _tol(dtype: torch.dtype) -> float:
    return 256.0 * torch.finfo(dtype).eps


def _clamp(x: torch.Tensor, lo: float | None, hi: float | None) -> torch.Tensor:
    return x if lo is None and hi is None else x.clamp(lo, hi)


def kabsch_reference(src: torch.Tensor, tgt: torch.Tensor, weights: torch.Tensor | None = None, *,
                     estimate_scale: bool = False, min_scale: float | None = None,
                     max_scale: float | None = None, return_info: bool = False):
    """Naive weighted Umeyama. ``src, tgt (B, P, d)`` float, ``weights (B, P)`` ≥ 0 or None.

    Returns ``(R (B, d, d), t (B, d), s (B,))`` (plus ``info (B,) int8`` if ``return_info``) with
    the column-vector convention ``tgt ≈ s R src + t``. No input validation beyond what torch does:
    the public op validates.
    """
    B, P, d = src.shape
    dtype = src.dtype
    if weights is None:
        weights = torch.ones(B, P, dtype=dtype, device=src.device)
    w = weights.to(dtype)
    # Zero-weight points take no part: their non-finite coordinates read as 0.
    zero = (w == 0)[..., None]
    src = torch.where(zero & ~torch.isfinite(src), torch.zeros((), dtype=dtype, device=src.device), src)
    tgt = torch.where(zero & ~torch.isfinite(tgt), torch.zeros((), dtype=dtype, device=src.device), tgt)
    pos = (w > 0)[..., None]
    nonfinite = (~torch.isfinite(w)).any(1) | (pos & ~(torch.isfinite(src) & torch.isfinite(tgt))).any((1, 2))
    W = w.sum(1)
    empty = ~(W > 0) & ~nonfinite
    good = ~nonfinite & ~empty

    # Safe stand-ins for the bad problems so that the linear algebra below never sees NaN.
    w_safe = torch.where(good[:, None], w, torch.ones_like(w))
    src_safe = torch.where(good[:, None, None], src, torch.zeros_like(src))
    tgt_safe = torch.where(good[:, None, None], tgt, torch.zeros_like(tgt))
    wn = w_safe / w_safe.sum(1, keepdim=True)                            # ŵ (B, P)
    mu_s = (wn[..., None] * src_safe).sum(1)                              # (B, d)
    mu_t = (wn[..., None] * tgt_safe).sum(1)
    a = src_safe - mu_s[:, None]
    b = tgt_safe - mu_t[:, None]
    M = torch.einsum("bp,bpi,bpj->bij", wn, b, a)                         # Σ ŵ b aᵀ (B, d, d)
    var_s = (wn * (a * a).sum(-1)).sum(1)
    var_t = (wn * (b * b).sum(-1)).sum(1)

    tol = _tol(dtype)
    src_point = ~(var_s > 0) | (var_s.sqrt() <= tol * mu_s.abs().amax(-1))
    tgt_point = ~(var_t > 0) | (var_t.sqrt() <= tol * mu_t.abs().amax(-1))
    point = src_point | tgt_point

    U, S, Vh = torch.linalg.svd(M)
    sign = torch.sign(torch.linalg.det(U @ Vh))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    Dg = torch.ones(B, d, dtype=dtype, device=src.device)
    Dg = torch.cat([Dg[:, :-1], sign[:, None]], dim=1)
    R = U @ torch.diag_embed(Dg) @ Vh
    eye = torch.eye(d, dtype=dtype, device=src.device).expand(B, d, d)
    R = torch.where(point[:, None, None], eye, R)

    if estimate_scale:
        trSD = (S * Dg).sum(-1)
        var_safe = torch.where(point, torch.ones_like(var_s), var_s)
        s_raw = trSD / var_safe
        one = torch.ones_like(s_raw)
        s_raw = torch.where(src_point, one, torch.where(tgt_point, torch.zeros_like(s_raw), s_raw))
        s = _clamp(s_raw, min_scale, max_scale)
    else:
        s = torch.ones(B, dtype=dtype, device=src.device)
    t = mu_t - s[:, None] * (R @ mu_s[..., None])[..., 0]

    # Empty problems: identity; non-finite: NaN.
    s_empty = torch.ones_like(s)
    if estimate_scale:
        s_empty = _clamp(s_empty, min_scale, max_scale)
    R = torch.where(empty[:, None, None], eye, R)
    t = torch.where(empty[:, None], torch.zeros_like(t), t)
    s = torch.where(empty, s_empty, s)
    nan = torch.full((), float("nan"), dtype=dtype, device=src.device)
    R = torch.where(nonfinite[:, None, None], nan, R)
    t = torch.where(nonfinite[:, None], nan, t)
    s = torch.where(nonfinite, nan, s)
    if not return_info:
        return R, t, s
    info = torch.full((B,), OK, dtype=torch.int8, device=src.device)
    info = torch.where(point, torch.full_like(info, DEGENERATE), info)
    # Rotation not unique: the gap s_{d-1} + sign * s_d vanishes (d = 3), or tr(R^T M) = 0 (d = 2).
    if d == 3:
        # Top two eigenvalues of Horn's 4x4 matrix differ by 2 (s2 + sign s3); its largest is tr(SD).
        gap = 2 * (S[:, 1] + sign * S[:, 2])
        rot_degenerate = gap <= tol * (S * Dg).sum(-1)
    else:
        # Norms of M / max|M_ij| (squares of huge float32 entries would overflow).
        m = M.abs().amax((-2, -1)).clamp_min(torch.finfo(dtype).tiny)
        rot_degenerate = (S * Dg).sum(-1) / m <= tol * torch.linalg.matrix_norm(M / m[:, None, None])
    info = torch.where(rot_degenerate, torch.full_like(info, DEGENERATE), info)
    info = torch.where(empty, torch.full_like(info, EMPTY), info)
    info = torch.where(nonfinite, torch.full_like(info, NONFINITE), info)
    return R, t, s, info
