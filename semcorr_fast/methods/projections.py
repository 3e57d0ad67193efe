"""Fitting the fixed projections of Demystifying §5.1: PCA and NMF of dense backbone features.

What the paper did (notes ``seed_demystifying.md`` §2.3-2.4, §9.9):

* **PCA** [paper]: ρ's weights are "the first 256 PCA components" of the backbone features. [code] An
  sklearn ``PCA`` object's ``components_`` (256×D) is loaded as the 1×1-conv weight; the conv **bias
  stays at its random initialisation and no mean is subtracted** (a quirk: ρ(x) = Vx + b, not
  V(x − μ)). Which features PCA was fitted on is not stated; this project fits on dense features of a
  random sample of training images at the training grid (see ``demystifying.PCAProjection``).
* **NMF** [paper]: the same with NMF components (it performs poorly, Table 2). sklearn's ``NMF``
  (coordinate descent by default) needs non-negative input: ResNet ``layer3`` features are post-ReLU,
  but ViT keys are not, and the paper does not say what was done for them. Here NMF is fitted with the
  Lee & Seung multiplicative updates for the Frobenius loss (as the task asks), and negative inputs are
  handled by :func:`make_nonnegative` (default: shift by the global minimum, a no-op for ReLU features).

Everything here is plain ``torch.linalg`` / matmul code on ``(n, D)`` row matrices; no similarity
matrix is involved.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor

__all__ = ["PCAResult", "NMFResult", "fit_pca", "fit_nmf", "make_nonnegative", "NEGATIVE_MODES"]

NEGATIVE_MODES = ("error", "clamp", "shift")


def _rows_arg(x, fn: str) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor of shape (n, D), got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must have shape (n, D) (one feature vector per row), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{fn}: x must be a floating tensor of shape (n, D), got dtype {x.dtype}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{fn}: x needs at least 2 rows and 1 column, got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}: x contains NaN or inf")
    return x


def _k_arg(k, D: int, fn: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{fn}: k must be an int >= 1, got {k!r}")
    if k > D:
        raise ValueError(f"{fn}: k = {k} components requested but the features have only D = {D} dimensions")
    return k


@dataclass
class PCAResult:
    """``components`` (k, D) orthonormal rows, by decreasing variance; ``mean`` (D,);
    ``explained_variance`` (k,) (unbiased, as sklearn's); ``explained_variance_ratio`` (k,).
    All in the input's dtype."""

    components: Tensor
    mean: Tensor
    explained_variance: Tensor
    explained_variance_ratio: Tensor


@dataclass
class NMFResult:
    """``components`` H (k, D) ≥ 0 and ``weights`` W (n, k) ≥ 0 with X ≈ W H; ``errors``: the Frobenius
    error ‖X − WH‖_F after the initialisation and after every iteration; ``shift``: the constant that
    :func:`make_nonnegative` added to X (0 for non-negative input)."""

    components: Tensor
    weights: Tensor
    errors: list = field(default_factory=list)
    shift: float = 0.0


def fit_pca(x: Tensor, k: int) -> PCAResult:
    """Principal components of the rows of ``x``: the top-``k`` eigenvectors of the sample covariance.

    Args:
        x: ``(n, D)`` floating features (n ≥ 2), one per row.
        k: number of components, 1 ≤ k ≤ D.
    Returns:
        :class:`PCAResult`. Computed in float64 with ``torch.linalg.eigh``; each component's sign is
        fixed so that its entry of largest magnitude is positive (deterministic output).

    >>> r = fit_pca(torch.tensor([[0., 0.], [2., 0.], [4., 0.]]), 1)
    >>> r.components.tolist()
    [[1.0, 0.0]]
    """
    fn = "fit_pca"
    x = _rows_arg(x, fn)
    n, D = x.shape
    k = _k_arg(k, D, fn)
    xd = x.double()
    mean = xd.mean(0)
    xc = xd - mean
    cov = xc.T @ xc / (n - 1)
    evals, evecs = torch.linalg.eigh(cov)             # ascending
    order = torch.argsort(evals, descending=True)[:k]
    comps = evecs[:, order].T.contiguous()            # (k, D)
    idx = comps.abs().argmax(1)
    sign = torch.sign(comps.gather(1, idx[:, None])).clamp_min(0) * 2 - 1  # +1 where the peak entry is >= 0
    comps = comps * sign
    var = evals[order].clamp_min(0)
    total = evals.clamp_min(0).sum()
    ratio = var / total if float(total) > 0 else torch.zeros_like(var)
    dt = x.dtype
    return PCAResult(comps.to(dt), mean.to(dt), var.to(dt), ratio.to(dt))


def make_nonnegative(x: Tensor, mode: str = "shift") -> tuple[Tensor, float]:
    """Make NMF input non-negative. ``(n, D)`` → ``(x', shift)``.

    ``mode``: ``"error"`` (raise on a negative entry), ``"clamp"`` (``max(x, 0)``, shift 0) or
    ``"shift"`` (add ``-min(x)`` to every entry when ``min(x) < 0``; a no-op for post-ReLU features).
    """
    fn = "make_nonnegative"
    if mode not in NEGATIVE_MODES:
        raise ValueError(f"{fn}: mode must be one of {NEGATIVE_MODES}, got {mode!r}")
    lo = float(x.min())
    if lo >= 0:
        return x, 0.0
    if mode == "error":
        raise ValueError(f"{fn}: NMF needs non-negative features, the minimum is {lo:.4g}; use mode='clamp' or 'shift'")
    if mode == "clamp":
        return x.clamp_min(0), 0.0
    return x - lo, -lo


def fit_nmf(x: Tensor, k: int, *, iters: int = 200, tol: float = 1e-4, negative: str = "error",
            generator: torch.Generator | None = None, eps: float = 1e-10) -> NMFResult:
    """Non-negative matrix factorisation X ≈ W H by Lee & Seung's multiplicative updates (Frobenius loss).

    Updates per iteration: ``H ← H ∘ (WᵀX) / (WᵀW H + eps)``, then ``W ← W ∘ (X Hᵀ) / (W H Hᵀ + eps)``;
    neither ever increases ‖X − WH‖_F. Initialisation as sklearn's ``init="random"``:
    ``sqrt(mean(X)/k)·|N(0, 1)|`` from ``generator``. Stops after ``iters`` iterations or once the
    error's decrease over the last 10 iterations, relative to the initial error, falls below ``tol``
    (sklearn's MU criterion). The error is tracked without forming WH:
    ‖X − WH‖² = ‖X‖² − 2⟨WᵀX, H⟩ + ⟨WᵀW, HHᵀ⟩.

    Args:
        x: ``(n, D)`` floating features; negatives are handled by :func:`make_nonnegative` with
            ``negative`` (default ``"error"``).
        k: number of components, 1 ≤ k ≤ D.
    Returns:
        :class:`NMFResult` (components (k, D) in the input's dtype; computed in float32, or float64
        for float64 input).
    """
    fn = "fit_nmf"
    x = _rows_arg(x, fn)
    n, D = x.shape
    k = _k_arg(k, D, fn)
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"{fn}: iters must be an int >= 1, got {iters!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"{fn}: tol must be a number >= 0, got {tol!r}")
    x, shift = make_nonnegative(x, negative)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    X = x.to(dt)
    gdev = generator.device if generator is not None else torch.device("cpu")
    avg = float(torch.sqrt(X.mean() / k).clamp_min(1e-12))
    H = (torch.randn(k, D, generator=generator, device=gdev, dtype=dt).abs() * avg).to(X.device)
    W = (torch.randn(n, k, generator=generator, device=gdev, dtype=dt).abs() * avg).to(X.device)
    xx = float((X * X).sum())

    def err(WtX, WtW, HHt) -> float:
        return max(xx - 2.0 * float((WtX * H).sum()) + float((WtW * HHt).sum()), 0.0) ** 0.5

    errors = [err(W.T @ X, W.T @ W, H @ H.T)]
    for it in range(iters):
        WtX, WtW = W.T @ X, W.T @ W
        H = H * WtX / (WtW @ H + eps)
        HHt = H @ H.T
        W = W * (X @ H.T) / (W @ HHt + eps)
        errors.append(err(W.T @ X, W.T @ W, HHt))
        if tol > 0 and it >= 10 and (errors[-11] - errors[-1]) / max(errors[0], 1e-30) < tol:
            break
    return NMFResult(H.to(x.dtype), W.to(x.dtype), errors, shift)
