"""Keypoint-transfer metrics: PCK, PCK†, the miss/jitter/swap breakdown, KAP and the geometry-aware subset.

Every function takes plain torch tensors (any float dtype, CPU or GPU) and returns tensors on the same
device. Shapes, for P image pairs with K keypoint slots each:

* ``pred``, ``gt``  (P, K, 2)  predicted / ground-truth target keypoints, pixels (x, y), one frame;
* ``thr``           (P,)       the threshold base of each pair (max side of the target bbox, or of the
  image, in the same pixel frame): keypoint k of pair p is *correct* at ``alpha`` iff
  ``‖pred[p,k] − gt[p,k]‖₂ < alpha · thr[p]``;
* ``valid``         (P, K) bool, the keypoints that count (visible in both images); ``None`` = all.

Conventions shared by every function (where the papers' codes differ, the option is named):

* **Strict threshold** by default (GeoAware-SC and Jamais Vu: ``err < α·thr``). ``inclusive=True`` gives
  ``err ≤ α·thr``, the convention of Demystifying's paper text and code and of DIFT.
* **per="image"** (default): each pair's fraction of correct valid keypoints, averaged over the pairs
  that have at least one valid keypoint (pairs without one are skipped, not counted as 0).
  **per="point"**: all valid keypoints of all pairs pooled. When there is no valid keypoint at all the
  result is **NaN**.
* **NaN predictions** (a coordinate that is NaN) are wrong: they are treated as infinitely far from every
  keypoint (so in :func:`error_breakdown` they are misses). ±inf coordinates are simply far away.
* Distances are ``sqrt(dx² + dy²)`` in max(float32, input dtype); the same arithmetic is used for the
  own-GT distance and the prediction-to-every-GT matrix, so PCK† ≤ PCK holds bit for bit.
* ``alpha`` may be one number (the result is 0-dim) or a sequence (the result has shape (len(alpha),)).
* Shapes must match exactly; errors name the argument and the expected shape. ``gt`` must be finite at
  valid keypoints and ``thr`` finite and ≥ 0 for pairs with a valid keypoint; elsewhere they are ignored
  (padding may hold anything).

Sources: Demystifying (Aygün & Mac Aodha, ECCV'22) §4.1 Eq. 5 and its ``evaluation/model/evaluation.py``;
GeoAware-SC (Zhang et al., CVPR'24) §3.1, §5 and ``utils/utils_geoware.py``/``pck_train.py``; Jamais Vu
(Mariotti et al., NeurIPS'25) §4.3 and ``extract_kap_vals``/``compute_kap``. See the notes in
``/work/shared/notes`` (seed_demystifying.md §4, seed_geoaware.md §1.1/§6.1, seed_jamaisvu.md §4.3).
"""
from __future__ import annotations

import math
from numbers import Real
from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "pck", "pck_dagger", "error_breakdown", "kap", "average_precision", "geoaware_subset",
    "geoaware_groups", "summarize", "format_table", "SPAIR_GEO_GROUPS", "AP10K_GEO_GROUPS",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PAIR_CHUNK = 2048   # pairs per block when building the (P, K, K) prediction-to-GT distance matrices
_KAP_CHUNK = 64      # pairs per block of KAP's (P, K, N) similarity / distance tensors


# ---------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------

def _float_tensor(x, name: str, op: str, shape_doc: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a float16, bfloat16, float32 or float64 tensor of shape "
                        f"{shape_doc}, got dtype {x.dtype}")
    return x


def _bool_tensor(x, name: str, op: str, shape: tuple, shape_doc: str, device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: {name} must be a bool torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if x.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be a bool tensor of shape {shape_doc}, got dtype {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {shape_doc} = {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{op}: {name} must be on the same device as pred ({device}), got {x.device}")
    return x


def _check_keypoints(op: str, pred, gt, thr, valid) -> Tensor:
    """Validate pred/gt (P, K, 2), thr (P,), valid (P, K) bool or None; return valid as a tensor."""
    _float_tensor(pred, "pred", op, "(P, K, 2)")
    if pred.dim() != 3 or pred.shape[-1] != 2:
        raise ValueError(f"{op}: pred must have shape (P, K, 2), got {tuple(pred.shape)}")
    P, K = int(pred.shape[0]), int(pred.shape[1])
    _float_tensor(gt, "gt", op, "(P, K, 2)")
    if tuple(gt.shape) != (P, K, 2):
        raise ValueError(f"{op}: gt must have shape (P, K, 2) = {(P, K, 2)} (the shape of pred), got "
                         f"{tuple(gt.shape)}")
    _float_tensor(thr, "thr", op, "(P,)")
    if tuple(thr.shape) != (P,):
        raise ValueError(f"{op}: thr must have shape (P,) = ({P},), got {tuple(thr.shape)}")
    for name, t in (("gt", gt), ("thr", thr)):
        if t.device != pred.device:
            raise ValueError(f"{op}: {name} must be on the same device as pred ({pred.device}), got {t.device}")
    if valid is None:
        valid = torch.ones(P, K, dtype=torch.bool, device=pred.device)
    else:
        _bool_tensor(valid, "valid", op, (P, K), "(P, K)", pred.device)
    if valid.any():
        if not bool(torch.isfinite(gt[valid]).all()):
            raise ValueError(f"{op}: gt must be finite at every valid keypoint (valid[p, k] = True); found "
                             f"NaN/inf at a valid keypoint")
        has = valid.any(-1)
        t = thr[has]
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{op}: thr must be finite and >= 0 for every pair with a valid keypoint, got "
                             f"{t[~(torch.isfinite(t) & (t >= 0))][:3].tolist()}")
    return valid


def _alphas(alpha, op: str, name: str = "alpha") -> tuple[list[float], bool]:
    """(values, scalar?) from a number, a 0-dim/1-dim tensor or a sequence of numbers."""
    def one(v) -> float:
        if isinstance(v, Tensor):
            if v.dim() != 0:
                raise ValueError(f"{op}: each {name} must be a number, got a tensor of shape {tuple(v.shape)}")
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"{op}: {name} must be a number or a sequence of numbers, got {type(v).__name__}")
        v = float(v)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{op}: {name} must be finite and >= 0, got {v}")
        return v

    if isinstance(alpha, Tensor):
        if alpha.dim() == 0:
            return [one(alpha)], True
        if alpha.dim() != 1:
            raise ValueError(f"{op}: {name} must be a number or a 1-dim sequence, got a tensor of shape "
                             f"{tuple(alpha.shape)}")
        vals = [one(v) for v in alpha.detach().cpu().tolist()]
    elif isinstance(alpha, (str, bytes)):
        raise TypeError(f"{op}: {name} must be a number or a sequence of numbers, got {type(alpha).__name__}")
    elif isinstance(alpha, Real) and not isinstance(alpha, bool):
        return [one(alpha)], True
    else:
        try:
            seq = list(alpha)
        except TypeError:
            raise TypeError(f"{op}: {name} must be a number or a sequence of numbers, got "
                            f"{type(alpha).__name__}") from None
        vals = [one(v) for v in seq]
    if not vals:
        raise ValueError(f"{op}: {name} must not be an empty sequence")
    return vals, False


def _choice(value, name: str, options: tuple, op: str):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{op}: {name} must be one of {options}, got {value!r}")
    return value


def _flag(value, name: str, op: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


def _compute_dtype(*ts: Tensor) -> torch.dtype:
    dt = torch.float32
    for t in ts:
        dt = torch.promote_types(dt, t.dtype)
    return dt


# ---------------------------------------------------------------------------------------------------------
# distances and aggregation
# ---------------------------------------------------------------------------------------------------------

def _norm(dx: Tensor, dy: Tensor) -> Tensor:
    """sqrt(dx² + dy²) as separate, correctly rounded ops (identical bits however the tensors are laid out);
    NaN (a NaN prediction) becomes +inf."""
    d = torch.sqrt(dx * dx + dy * dy)
    return torch.where(torch.isnan(d), torch.full_like(d, math.inf), d)


def _own_dist(pred: Tensor, gt: Tensor, dt) -> Tensor:
    """(P, K): distance of each prediction to its own ground truth."""
    diff = pred.to(dt) - gt.to(dt)
    return _norm(diff[..., 0], diff[..., 1])


def _dist_stats(pred: Tensor, gt: Tensor, valid: Tensor, dt):
    """e (P, K) own-GT distance; delta (P, K) distance to the nearest *valid* GT of the pair; first (P, K) the
    index of that nearest GT (first index among ties). Rows of a pair with no valid GT get delta = inf."""
    P, K = valid.shape
    e = torch.empty(P, K, dtype=dt, device=pred.device)
    delta = torch.empty_like(e)
    first = torch.empty(P, K, dtype=torch.long, device=pred.device)
    for s in range(0, P, _PAIR_CHUNK):
        sl = slice(s, min(P, s + _PAIR_CHUNK))
        p, g, v = pred[sl].to(dt), gt[sl].to(dt), valid[sl]
        dx = p[:, :, None, 0] - g[:, None, :, 0]
        dy = p[:, :, None, 1] - g[:, None, :, 1]
        D = _norm(dx, dy)                                         # (p, i: prediction, j: GT)
        e[sl] = torch.diagonal(D, dim1=1, dim2=2)
        D = torch.where(v[:, None, :], D, torch.full_like(D, math.inf))
        if K:   # amin + argmin: Tensor.min(dim) is pathologically slow on small CPU tensors under load
            delta[sl], first[sl] = D.amin(dim=2), D.argmin(dim=2)
    return e, delta, first


def _thresholds(thr: Tensor, alphas: list[float], dt) -> Tensor:
    """(A, P, 1): alpha · thr, in the compute dtype."""
    a = torch.tensor(alphas, dtype=dt, device=thr.device)
    return (a[:, None] * thr.to(dt)[None, :])[..., None]


def _below(x: Tensor, d: Tensor, inclusive: bool) -> Tensor:
    return x <= d if inclusive else x < d


def _aggregate(hit: Tensor, mask: Tensor, per: str, dt) -> Tensor:
    """hit (A, P, K) bool, mask (P, K) bool → (A,) in dt: mean over pairs with ≥ 1 masked keypoint of each
    pair's hit fraction (per="image"), or pooled fraction (per="point"); NaN when nothing is masked."""
    A = hit.shape[0]
    hit = hit & mask
    if per == "image":
        n = mask.sum(-1)                                          # (P,)
        has = n > 0
        if not bool(has.any()):
            return torch.full((A,), math.nan, dtype=dt, device=hit.device)
        frac = hit[:, has].sum(-1).to(torch.float64) / n[has].to(torch.float64)
        return frac.mean(-1).to(dt)
    total = int(mask.sum())
    if total == 0:
        return torch.full((A,), math.nan, dtype=dt, device=hit.device)
    return (hit.sum((-1, -2)).to(torch.float64) / total).to(dt)


def _keypoint_hits(pred, gt, thr, valid, alphas, *, inclusive: bool, dagger: bool, ties: str):
    """(A, P, K) bool correctness of every keypoint (PCK, or PCK† when dagger), and the compute dtype."""
    dt = _compute_dtype(pred, gt, thr)
    d = _thresholds(thr, alphas, dt)
    if not dagger:
        return _below(_own_dist(pred, gt, dt)[None], d, inclusive), dt
    e, delta, first = _dist_stats(pred, gt, valid, dt)
    if ties == "paper":
        own_nearest = e == delta
    else:
        own_nearest = first == torch.arange(e.shape[1], device=e.device)
    return _below(e[None], d, inclusive) & own_nearest[None], dt


def _shape_out(v: Tensor, scalar: bool) -> Tensor:
    return v[0] if scalar else v


# ---------------------------------------------------------------------------------------------------------
# PCK, PCK†, error breakdown
# ---------------------------------------------------------------------------------------------------------

def pck(pred: Tensor, gt: Tensor, thr: Tensor, alpha, *, valid: Tensor | None = None, per: str = "image",
        inclusive: bool = False) -> Tensor:
    """Percentage of correct keypoints (as a fraction in [0, 1]).

    Args:
        pred, gt: (P, K, 2) float, predicted / ground-truth target keypoints (x, y) in pixels.
        thr: (P,) float, threshold base per pair (e.g. max side of the target bbox).
        alpha: a number or a sequence of numbers (≥ 0).
        valid: (P, K) bool, keypoints that count (visible in both images); None = all.
        per: "image" (mean over pairs of each pair's fraction; pairs without a valid keypoint are
            skipped) or "point" (all valid keypoints pooled).
        inclusive: False (default): correct iff ``‖pred − gt‖ < alpha·thr`` (GeoAware-SC / Jamais Vu code);
            True: ``≤`` (Demystifying's paper and code, DIFT).
    Returns:
        0-dim tensor (a sequence ``alpha`` gives shape (len(alpha),)), dtype max(float32, inputs), on the
        inputs' device. **NaN** when there is no valid keypoint at all. NaN predictions count as wrong.
    """
    op = "pck"
    valid = _check_keypoints(op, pred, gt, thr, valid)
    alphas, scalar = _alphas(alpha, op)
    _choice(per, "per", ("image", "point"), op)
    _flag(inclusive, "inclusive", op)
    hit, dt = _keypoint_hits(pred, gt, thr, valid, alphas, inclusive=inclusive, dagger=False, ties="paper")
    return _shape_out(_aggregate(hit, valid, per, dt), scalar)


def pck_dagger(pred: Tensor, gt: Tensor, thr: Tensor, alpha, *, valid: Tensor | None = None,
               per: str = "image", inclusive: bool = False, ties: str = "paper") -> Tensor:
    """PCK† (Demystifying, Eq. 5): correct only if within the threshold of its own GT **and** that GT is the
    nearest of the pair's valid GT keypoints.

    With e = ‖pred_m − gt_m‖ and δ = min over valid j of ‖pred_m − gt_j‖ (δ ≤ e always):
    PCK† counts ``e < alpha·thr ∧ δ = e`` (``≤`` with ``inclusive=True``). The threshold applies to the
    distance to the *own* GT only: a prediction within the threshold whose nearest GT is another keypoint
    is not counted (it is a swap), and one whose own GT is nearest but that lies outside the threshold is
    not counted either. Only valid keypoints of the pair are candidates for "nearest" (the paper's P is
    the keypoints visible in both images; Jamais Vu's code pushes invisible ones to the maximum distance).

    Args:
        pred, gt, thr, alpha, valid, per, inclusive: as :func:`pck`.
        ties: "paper" (default): δ = e, so the prediction counts when its own GT is *among* the nearest (a tie
            with another GT at exactly the same distance still counts) — Eq. 5 as printed.
            "argmin": the own index must be the first argmin over the valid GTs in keypoint order, as the
            released codes do (``torch.argmin``; Demystifying ``correct_kps_analyze``, Jamais Vu ``--PCKD``).
    Returns:
        as :func:`pck`; always ≤ PCK at the same arguments.
    """
    op = "pck_dagger"
    valid = _check_keypoints(op, pred, gt, thr, valid)
    alphas, scalar = _alphas(alpha, op)
    _choice(per, "per", ("image", "point"), op)
    _flag(inclusive, "inclusive", op)
    _choice(ties, "ties", ("paper", "argmin"), op)
    hit, dt = _keypoint_hits(pred, gt, thr, valid, alphas, inclusive=inclusive, dagger=True, ties=ties)
    return _shape_out(_aggregate(hit, valid, per, dt), scalar)


def error_breakdown(pred: Tensor, gt: Tensor, thr: Tensor, alpha, *, valid: Tensor | None = None,
                    per: str = "image", inclusive: bool = False, convention: str = "paper") -> dict[str, Tensor]:
    """Demystifying's error types (§4.1, Table 3): rates of correct, miss, jitter and swap predictions.

    With d = alpha·thr, e = ‖pred_m − gt_m‖ and δ = min over the pair's valid GTs of ‖pred_m − gt_j‖:

    ===========  ===================================  ===========================================
    key          convention="paper" (paper text)      convention="code" (``correct_kps_analyze``)
    ===========  ===================================  ===========================================
    correct      e < d  (≤ with inclusive=True) — plain PCK, in both conventions
    miss         d < δ   (far from *every* GT)        δ ≥ d
    jitter       d < e < 2d                           d ≤ e ≤ 2d
    swap         δ ≠ e ∧ δ < d  (another GT nearer)   first-argmin ≠ own ∧ δ ≤ d
    ===========  ===================================  ===========================================

    The types are not exclusive and need not sum to 1: miss and jitter can co-occur, and a swap can be
    PCK-correct (PCK − PCK† is exactly the rate of correct ∧ swap under the paper convention). To reproduce
    the released code fully, pass ``inclusive=True, convention="code"``; with the defaults a prediction
    exactly at e = d is neither correct nor jitter. Demystifying reports these per image (each pair's
    count / M, averaged over pairs), the default here; ``per="point"`` pools keypoints. (The code also
    averages over pairs without keypoints, as zeros; here such pairs are skipped, as in :func:`pck`.)
    A NaN prediction is a miss (infinitely far from every keypoint), never jitter or swap.

    Args:
        pred, gt, thr, alpha, valid, per, inclusive: as :func:`pck`.
        convention: "paper" (default) or "code", see the table.
    Returns:
        {"correct", "miss", "jitter", "swap"} → each a tensor shaped like :func:`pck`'s result.
    """
    op = "error_breakdown"
    valid = _check_keypoints(op, pred, gt, thr, valid)
    alphas, scalar = _alphas(alpha, op)
    _choice(per, "per", ("image", "point"), op)
    _flag(inclusive, "inclusive", op)
    _choice(convention, "convention", ("paper", "code"), op)
    dt = _compute_dtype(pred, gt, thr)
    d = _thresholds(thr, alphas, dt)
    e, delta, first = _dist_stats(pred, gt, valid, dt)
    e, delta = e[None], delta[None]
    correct = _below(e, d, inclusive)
    if convention == "paper":
        miss = d < delta
        jitter = (d < e) & (e < 2 * d)
        swap = (delta != e) & (delta < d)
    else:
        own = torch.arange(e.shape[-1], device=e.device)
        miss = delta >= d
        jitter = (e >= d) & (e <= 2 * d)
        swap = (first != own)[None] & (delta <= d)
    out = {"correct": correct, "miss": miss, "jitter": jitter, "swap": swap}
    return {k: _shape_out(_aggregate(v, valid, per, dt), scalar) for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------------
# KAP
# ---------------------------------------------------------------------------------------------------------

def _ap_rows(scores: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Average precision of every row: scores (R, L), labels and mask (R, L) bool → (R,) float64.

    Entries outside ``mask`` do not exist. Every positive is credited the precision at the end of its run of
    tied scores, which is Σ_n (R_n − R_{n−1}) · P_n over distinct thresholds. NaN for a row without positives.
    """
    R, L = scores.shape
    if L == 0:
        return torch.full((R,), math.nan, dtype=torch.float64, device=scores.device)
    s, order = torch.sort(scores.to(torch.float64), dim=1, descending=True, stable=True)
    pos = (labels & mask).gather(1, order).to(torch.float64)
    neg = (~labels & mask).gather(1, order).to(torch.float64)
    tp, fp = torch.cumsum(pos, 1), torch.cumsum(neg, 1)
    last = torch.ones_like(s, dtype=torch.bool)
    last[:, :-1] = s[:, :-1] != s[:, 1:]                          # last index of each run of tied scores
    idx = torch.arange(L, device=s.device).expand(R, L)
    end = torch.where(last, idx, torch.full_like(idx, L))
    end = torch.flip(torch.cummin(torch.flip(end, [1]), 1).values, [1])   # end of each entry's tie run
    n = tp + fp
    prec = torch.where(n > 0, tp / n.clamp(min=1), torch.zeros_like(n)).gather(1, end)
    npos = pos.sum(1)
    ap = (pos * prec).sum(1) / npos.clamp(min=1)
    return torch.where(npos > 0, ap, torch.full_like(ap, math.nan))


def average_precision(scores: Tensor, labels: Tensor) -> Tensor:
    """Average precision of a ranking, as scikit-learn's ``average_precision_score`` computes it.

    AP = Σ_n (R_n − R_{n−1}) · P_n over the distinct score thresholds in decreasing order (tied scores form one
    threshold; no interpolation), R_0 = 0.

    Args:
        scores: (N,) float; higher = more confident. −inf is allowed (ranks last); NaN is an error.
        labels: (N,) bool, True for positives.
    Returns:
        0-dim float64 tensor; NaN when there is no positive.
    """
    op = "average_precision"
    _float_tensor(scores, "scores", op, "(N,)")
    if scores.dim() != 1:
        raise ValueError(f"{op}: scores must have shape (N,), got {tuple(scores.shape)}")
    _bool_tensor(labels, "labels", op, tuple(scores.shape), "(N,) like scores", scores.device)
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{op}: scores must not contain NaN")
    return _ap_rows(scores[None], labels[None], torch.ones_like(labels)[None])[0]


def _kap_scores(sim, gt, thr, alphas, valid_src, valid_trg, cell_xy, convention, normalize, inclusive, dt):
    """Positive / negative scores (A, P, K) and their masks (P, K) for KAP.

    One pass per alpha over the (pairs, keypoints, cells) block; nothing of size (A, P, K, N) is built.
    """
    P, K, N = sim.shape
    A = len(alphas)
    dev = sim.device
    pos = torch.full((A, P, K), -math.inf, dtype=dt, device=dev)
    neg = torch.full((A, P, K), -math.inf, dtype=dt, device=dev)
    cxy = cell_xy.to(dt)
    gt_used = gt.to(dt)
    if convention == "code":
        # the released code zeroes the coordinates of keypoints invisible in the target
        gt_used = torch.where(valid_trg[..., None], gt_used, torch.zeros_like(gt_used))
    r = _thresholds(thr, alphas, dt)[..., 0]                      # (A, P)
    r2 = (r * r).T.contiguous()                                   # (P, A)
    ninf = torch.tensor(-math.inf, dtype=dt, device=dev)
    for s in range(0, P, _KAP_CHUNK):
        sl = slice(s, min(P, s + _KAP_CHUNK))
        S = sim[sl].to(dt)
        S = torch.where(torch.isnan(S), ninf, S)
        vs = valid_src[sl]
        if normalize:
            # min-max over the pair's block of source-visible rows (Jamais Vu extract_kap_vals)
            fin = vs[..., None] & torch.isfinite(S)
            lo = torch.where(fin, S, -ninf).amin((1, 2), keepdim=True)
            hi = torch.where(fin, S, ninf).amax((1, 2), keepdim=True)
            span = hi - lo
            span = torch.where(torch.isfinite(span) & (span > 0), span, torch.ones_like(span))
            lo = torch.where(torch.isfinite(lo), lo, torch.zeros_like(lo))
            S = (S - lo) / span
        g = gt_used[sl]
        dx = cxy[None, None, :, 0] - g[..., 0:1]
        dy = cxy[None, None, :, 1] - g[..., 1:2]
        d2 = dx * dx + dy * dy                                    # (p, K, N) squared cell-to-GT distances
        if convention == "paper":
            overall = S.amax(-1)
            vt = valid_trg[sl]
        for i in range(A):
            rr = r2[sl, i][:, None, None]
            within = d2 <= rr if inclusive else d2 < rr               # NaN distances: never within
            # code: outside-radius cells are multiplied by 0 (they still compete for the max); paper: excluded
            fill = torch.zeros((), dtype=dt, device=dev) if convention == "code" else ninf
            p_ = torch.where(within, S, fill).amax(-1)
            n_ = torch.where(within, fill, S).amax(-1)
            if convention == "paper":
                n_ = torch.where(vt, n_, overall)
            pos[i, sl], neg[i, sl] = p_, n_
    pos_mask = valid_src.clone() if convention == "code" else valid_src & valid_trg
    return pos, neg, pos_mask, valid_src.clone()


def kap(sim: Tensor, gt: Tensor, thr: Tensor, alpha, *, valid_src: Tensor, valid_trg: Tensor,
        per: str = "image", cell_xy: Tensor | None = None, convention: str = "paper", normalize: bool = True,
        inclusive: bool = True) -> Tensor:
    """Keypoint Average Precision (KAP; SphericalMaps, used by Jamais Vu §4.3): matching recast as detection.

    For every source keypoint visible in the source, its similarity map over the target grid yields
    scores: a **positive** = the highest similarity within radius r = alpha·thr of the keypoint's GT target
    location, and a **negative** = the highest similarity beyond r — or over the whole map when the
    keypoint is not visible in the target (then there is no positive). AP over the pooled scores rewards
    peaked maps at the right place and penalises confident matches for keypoints absent from the target.

    Args:
        sim: (P, K, H, W) similarity map of each source keypoint over the target grid, or (P, K, N) with
            ``cell_xy`` given. Any float dtype; NaN similarities are never the maximum.
        gt: (P, K, 2) GT target keypoints (x, y) in the frame of ``cell_xy``; ignored where not in
            ``valid_trg``.
        thr: (P,) threshold base in the same frame (r = alpha·thr).
        alpha: a number or a sequence.
        valid_src: (P, K) bool, keypoint visible in the source (the rows that are scored).
        valid_trg: (P, K) bool, keypoint visible in the target.
        per: "image" (default; per-pair AP averaged over pairs that have at least one positive — Jamais Vu's
            default) or "point" (one AP over all pairs' pooled scores — ``--KPT_RESULT``).
        cell_xy: (H, W, 2) or (N, 2) position (x, y) of each target cell. Default for a (P, K, H, W) map:
            cell (i, j) is at (x = j, y = i), i.e. gt and thr are in cell units. Jamais Vu scales pixels of
            the 840 canvas by 60/840 and uses this default (cell *corners*, not centres).
        convention: "paper" (default): the definition above. "code": Jamais Vu's ``extract_kap_vals`` as
            released — every source-visible keypoint gets a positive (max within r of its GT; keypoints
            invisible in the target have GT (0, 0) there) and a negative (max beyond r); outside-radius cells
            are multiplied by 0 rather than excluded. This is what produced the published numbers.
        normalize: min–max normalise each pair's block of source-visible rows to [0, 1] first (both codes
            do; it changes pooled AP only, not per-pair AP). A constant block maps to 0.
        inclusive: cells with distance ≤ r are "within" (default, as the code); False: < r.
    Returns:
        0-dim tensor (sequence alpha: (len(alpha),)), dtype max(float32, inputs). An empty radius gives a
        −inf positive (paper; 0 in the code convention). NaN when no pair has a positive.
    """
    op = "kap"
    _float_tensor(sim, "sim", op, "(P, K, H, W) or (P, K, N)")
    if sim.dim() not in (3, 4):
        raise ValueError(f"{op}: sim must have shape (P, K, H, W) or (P, K, N), got {tuple(sim.shape)}")
    P, K = int(sim.shape[0]), int(sim.shape[1])
    dev = sim.device
    if cell_xy is None:
        if sim.dim() != 4:
            raise ValueError(f"{op}: cell_xy (N, 2) is required when sim has shape (P, K, N)")
        H, W = int(sim.shape[2]), int(sim.shape[3])
        ys, xs = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
        cell_xy = torch.stack((xs, ys), -1).reshape(H * W, 2).to(torch.float32)
    else:
        _float_tensor(cell_xy, "cell_xy", op, "(H, W, 2) or (N, 2)")
        want = tuple(sim.shape[2:]) + (2,)
        if tuple(cell_xy.shape) != want:
            raise ValueError(f"{op}: cell_xy must have shape {'(H, W, 2)' if sim.dim() == 4 else '(N, 2)'} = "
                             f"{want} to match sim {tuple(sim.shape)}, got {tuple(cell_xy.shape)}")
        if cell_xy.device != dev:
            raise ValueError(f"{op}: cell_xy must be on the same device as sim ({dev}), got {cell_xy.device}")
        cell_xy = cell_xy.reshape(-1, 2)
    sim = sim.reshape(P, K, -1)
    _float_tensor(gt, "gt", op, "(P, K, 2)")
    if tuple(gt.shape) != (P, K, 2):
        raise ValueError(f"{op}: gt must have shape (P, K, 2) = {(P, K, 2)} (P, K of sim), got {tuple(gt.shape)}")
    _float_tensor(thr, "thr", op, "(P,)")
    if tuple(thr.shape) != (P,):
        raise ValueError(f"{op}: thr must have shape (P,) = ({P},), got {tuple(thr.shape)}")
    for name, t in (("gt", gt), ("thr", thr)):
        if t.device != dev:
            raise ValueError(f"{op}: {name} must be on the same device as sim ({dev}), got {t.device}")
    _bool_tensor(valid_src, "valid_src", op, (P, K), "(P, K)", dev)
    _bool_tensor(valid_trg, "valid_trg", op, (P, K), "(P, K)", dev)
    alphas, scalar = _alphas(alpha, op)
    _choice(per, "per", ("image", "point"), op)
    _choice(convention, "convention", ("paper", "code"), op)
    _flag(normalize, "normalize", op)
    _flag(inclusive, "inclusive", op)
    both = valid_src & valid_trg
    if both.any() and not bool(torch.isfinite(gt[both]).all()):
        raise ValueError(f"{op}: gt must be finite where valid_src and valid_trg are both True")
    has = valid_src.any(-1)
    if has.any():
        t = thr[has]
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise ValueError(f"{op}: thr must be finite and >= 0 for every pair with a source-visible keypoint")

    dt = _compute_dtype(sim, gt, thr, cell_xy)
    pos, neg, pos_mask, neg_mask = _kap_scores(sim, gt, thr, alphas, valid_src, valid_trg, cell_xy,
                                               convention, normalize, inclusive, dt)
    A = len(alphas)
    scores = torch.cat((pos, neg), -1)                            # (A, P, 2K)
    labels = torch.cat((torch.ones(P, K, dtype=torch.bool, device=dev),
                        torch.zeros(P, K, dtype=torch.bool, device=dev)), -1)
    mask = torch.cat((pos_mask, neg_mask), -1)
    if per == "point":
        out = _ap_rows(scores.reshape(A, -1), labels.reshape(1, -1).expand(A, -1),
                       mask.reshape(1, -1).expand(A, -1))
    else:
        keep = pos_mask.any(-1)                                   # pairs with at least one positive
        if bool(keep.any()):
            n = int(keep.sum())
            ap = _ap_rows(scores[:, keep].reshape(A * n, -1), labels[keep].repeat(A, 1), mask[keep].repeat(A, 1))
            out = ap.reshape(A, n).mean(-1)
        else:
            out = torch.full((A,), math.nan, dtype=torch.float64, device=dev)
    return _shape_out(out.to(dt), scalar)


# ---------------------------------------------------------------------------------------------------------
# geometry-aware subset (GeoAware-SC)
# ---------------------------------------------------------------------------------------------------------

# Part groups by keypoint index = the dataset's keypoint id (SPair-71k: the key of the per-image "kps"
# dict, 0..29; AP-10K: the 17 standard keypoints). Entries are, in the released code's order, either a
# singleton id or (group name, ids). Transcribed from GeoAware-SC's ``SPAIR_GEO_AWARE`` /
# ``AP10K_GEO_AWARE`` [C] (the notes carry only the names and sizes, paper Table 6, which they match);
# the code's "+2" offsets are resolved (SPair bus ids 8, 9 and bicycle ids 11, 12 are unused slots).
# Table 6 lists the bus/car "light" group with 2 members; the code (used here) has 4.
SPAIR_GEO_GROUPS: dict[str, list] = {
    "aeroplane": [0, 1, 2, 3, ("landing_gear", (4, 5)), ("engine_front", (6, 7)), ("wing_end", (8, 9)),
                  ("engine_back", (10, 11)), ("wing_foot_front", (12, 13)), ("wing_foot_back", (14, 15)),
                  ("tailplane_end", (16, 17)), ("tailplane_foot_front", (18, 19)),
                  ("tailplane_foot_back", (20, 21)), 22, 23, 24],
    "bicycle": [0, 1, ("handle", (2, 3)), 4, 5, ("seat_back_end", (6, 7)), 8, ("pedal", (9, 10)), 13],
    "bird": [0, ("wing_end", (1, 2)), 3, 4, 5, 6, 7, 8, 9, ("foot", (10, 11)), ("knee", (12, 13)),
             ("hip", (14, 15)), 16],
    "boat": [0, ("upper_front", (1, 2)), ("upper_side", (3, 4)), ("upper_back", (5, 6)),
             ("lower_front", (7, 8)), ("lower_side", (9, 10)), ("lower_back", (11, 12)), 13],
    "bottle": [("cap", (0, 1)), ("neck", (2, 3)), ("shoulder", (4, 5)), ("body", (6, 7)), ("base", (8, 9))],
    "bus": [("rearview_mirror", (0, 1)), ("light", (2, 3, 5, 6)), ("licence_plate", (4, 7)),
            ("front_fender", (10, 13, 20, 23)), ("wheel", (11, 14, 21, 24)), ("rear_fender", (12, 15, 22, 25)),
            ("window_top_corner", (16, 17, 26, 27)), ("window_bottom_corner", (18, 19, 28, 29))],
    "car": [("rearview_mirror", (0, 1)), ("light", (2, 3, 6, 7)), ("licence_plate", (4, 8)),
            ("brand_logo", (5, 9)), ("rear_fender", (10, 13, 20, 23)), ("wheel", (11, 14, 21, 24)),
            ("front_fender", (12, 15, 22, 25)), ("window_bottom_corner", (16, 17, 26, 27)),
            ("window_top_corner", (18, 19, 28, 29))],
    "cat": [0, 1, ("ear", (2, 3)), 4, 5, 6, 7, 8, ("paw", (9, 10, 11, 12)), 13, 14],
    "chair": [("cushion_front", (0, 1)), ("cushion_back", (2, 3)), ("leg", (4, 5, 6, 7)),
              ("backrest_top", (8, 9)), ("armrest_front", (10, 11)), ("armrest_back", (12, 13))],
    "cow": [0, 1, ("ear", (2, 3)), 4, 5, 6, 7, 8, ("hoof", (9, 10, 11, 12)), 13, 14, ("knee", (15, 16, 17, 18)),
            ("horn", (19, 20))],
    "dog": [0, 1, ("ear", (2, 3)), 4, 5, 6, 7, 8, ("paw", (9, 10, 11, 12)), 13, 14, 15],
    "horse": [0, 1, ("ear", (2, 3)), 4, 5, 6, 7, 8, 9, ("hoof", (10, 11, 12, 13)), 14, 15,
              ("knee", (16, 17, 18, 19))],
    "motorbike": [("rearview_mirror", (0, 1)), ("handle", (2, 3)), 4, 5, 6, 7, 8, 9, 10, 11, 12],
    "person": [0, 1, 2, 3, 4, 5, 6, 7, ("shoulder", (8, 9)), ("elbow", (10, 11)), ("wrist", (12, 13)),
               ("knee", (14, 15)), ("ankle", (16, 17)), ("foot", (18, 19))],
    "pottedplant": [("top", (0, 1, 2, 3)), ("side_wall", (4, 5)), ("bottom", (6, 8)), 7],
    "sheep": [0, 1, ("ear", (2, 3)), 4, 5, 6, 7, 8, ("hoof", (9, 10, 11, 12)), 13, 14,
              ("knee", (15, 16, 17, 18)), ("horn", (19, 20))],
    "train": [("front_top", (0, 1)), ("front_bottom", (2, 3)), ("back_top", (4, 5)), ("back_bottom", (6, 7)),
              ("window_top_outer_corner", (8, 9)), ("window_bottom_outer_corner", (10, 11)),
              ("window_top_inner_corner", (12, 13)), ("window_bottom_inner_corner", (14, 15)),
              ("front_light", (16, 17))],
    "tvmonitor": [("outer_corner", (0, 2, 4, 6)), ("outer_side", (1, 3, 5, 7)), ("inner_corner", (8, 10, 12, 14)),
                  ("inner_side", (9, 11, 13, 15))],
}

# AP-10K, every species: 0 L-eye, 1 R-eye, 2 nose, 3 neck, 4 tail root, 5 L-shoulder, 6 L-elbow,
# 7 L-front-paw, 8 R-shoulder, 9 R-elbow, 10 R-front-paw, 11 L-hip, 12 L-knee, 13 L-back-paw, 14 R-hip,
# 15 R-knee, 16 R-back-paw. Eyes are excluded on purpose (too close to tell apart by PCK) [S §C].
AP10K_GEO_GROUPS: list = [0, 1, 2, 3, 4, ("shoulder", (5, 8)), ("knee", (6, 9, 12, 15)),
                          ("foot", (7, 10, 13, 16)), ("hip", (11, 14))]

_DATASET_ALIASES = {"spair": "spair", "spair-71k": "spair", "spair71k": "spair",
                    "ap10k": "ap10k", "ap-10k": "ap10k"}


def _table(category: str, dataset: str, op: str) -> list:
    ds = _DATASET_ALIASES.get(dataset.lower()) if isinstance(dataset, str) else None
    if ds is None:
        raise NotImplementedError(f"{op}: no geometry-aware part groups for dataset {dataset!r} (GeoAware-SC "
                                  f"defines them for SPair-71k ('spair') and AP-10K ('ap10k') only)")
    if ds == "ap10k":
        return AP10K_GEO_GROUPS
    if not isinstance(category, str) or category.lower() not in SPAIR_GEO_GROUPS:
        raise ValueError(f"{op}: unknown SPair-71k category {category!r}; expected one of "
                         f"{', '.join(SPAIR_GEO_GROUPS)}")
    return SPAIR_GEO_GROUPS[category.lower()]


def _ids(item) -> tuple:
    return item[1] if isinstance(item, tuple) else (item,)


def geoaware_groups(category: str, *, dataset: str = "spair", groups: str = "code",
                    used_points: Sequence[int] | None = None) -> list[list[int]]:
    """The part groups (lists of keypoint ids, ≥ 2 members) that define the geometry-aware subset.

    groups="semantic": the groups as tabulated (:data:`SPAIR_GEO_GROUPS`, :data:`AP10K_GEO_GROUPS`), applied
    by keypoint id — what GeoAware-SC's definition (paper §3.1, Table 6) means.

    groups="code" (default, reproduces the published Geo numbers): GeoAware-SC's ``compute_pck`` (also Jamais
    Vu's) filters the table to the ``used_points`` of the evaluated split, then renumbers the ids in the
    order they appear in the table (``renumber_indices``) and uses those numbers as positions in the
    compacted keypoint array (the used ids, sorted). Where the table lists ids out of order — SPair bus,
    car, pottedplant, tvmonitor and AP-10K — the groups actually evaluated differ from the semantic ones
    (e.g. AP-10K {L-shoulder, L-elbow}, {L-front-paw, R-shoulder, R-elbow, R-front-paw}, ...). This mode maps
    those positions back to ids. ``used_points`` defaults to every id the table lists (all keypoints used).
    """
    op = "geoaware_groups"
    table = _table(category, dataset, op)
    _choice(groups, "groups", ("code", "semantic"), op)
    if groups == "semantic":
        return [list(_ids(it)) for it in table if len(_ids(it)) >= 2]
    if used_points is None:
        used = sorted({i for it in table for i in _ids(it)})
    else:
        try:
            used = sorted({int(i) for i in used_points})
        except (TypeError, ValueError):
            raise TypeError(f"{op}: used_points must be a sequence of ints, got {used_points!r}") from None
    used_set = set(used)
    out, pos = [], 0
    for it in table:
        keep = [i for i in _ids(it) if i in used_set]
        if not keep:
            continue
        out.append([used[p] for p in range(pos, pos + len(keep))])
        pos += len(keep)
    return [g for g in out if len(g) >= 2]


def geoaware_subset(category, valid_src: Tensor, valid_trg: Tensor, *, dataset: str = "spair",
                    groups: str = "code", used_points: Sequence[int] | None = None) -> Tensor:
    """GeoAware-SC's geometry-aware keypoints (§3.1): mutually visible keypoints whose part group has at
    least two members visible in the **target** image (so another, differently oriented instance of the
    same part could be confused with it). Singletons (nose, tail, eyes, ...) are never geometry-aware.

    Keypoint index k = the dataset's keypoint id (SPair-71k: the per-image ``kps`` key, categories of up to
    30 slots; AP-10K: the 17 standard keypoints). K may exceed the vocabulary (padding is never Geo) but
    must cover every id of the category's groups.

    Args:
        category: an SPair-71k category name (one for all rows, or a sequence of P names for batched masks);
            ignored for AP-10K (every species shares the groups).
        valid_src: (K,) or (P, K) bool, keypoint visible in the source.
        valid_trg: same shape, keypoint visible in the target.
        dataset: "spair" or "ap10k"; any other dataset raises NotImplementedError (no group table).
        groups: "code" (default; the released evaluation, reproducing the published numbers) or "semantic"
            (the groups by id); see :func:`geoaware_groups`.
        used_points: for groups="code", the keypoint ids present in the evaluated split (default: all).
    Returns:
        bool tensor shaped like ``valid_src``. Use it as ``valid & geo`` for per-image Geo PCK (GeoAware-SC's
        SPair protocol) or per-point (its AP-10K evaluator), e.g. via :func:`summarize`'s ``geo_mask``.
    """
    op = "geoaware_subset"
    if not isinstance(valid_src, Tensor) or valid_src.dim() not in (1, 2):
        raise ValueError(f"{op}: valid_src must be a bool tensor of shape (K,) or (P, K), got "
                         f"{tuple(valid_src.shape) if isinstance(valid_src, Tensor) else type(valid_src).__name__}")
    shape_doc = "(K,)" if valid_src.dim() == 1 else "(P, K)"
    _bool_tensor(valid_src, "valid_src", op, tuple(valid_src.shape), shape_doc, valid_src.device)
    _bool_tensor(valid_trg, "valid_trg", op, tuple(valid_src.shape), shape_doc + " like valid_src",
                 valid_src.device)
    batched = valid_src.dim() == 2
    vs = valid_src if batched else valid_src[None]
    vt = valid_trg if batched else valid_trg[None]
    P, K = vs.shape
    if isinstance(category, str):
        cats = [category] * P
    else:
        if not batched:
            raise TypeError(f"{op}: category must be a str for (K,) masks, got {type(category).__name__}")
        try:
            cats = list(category)
        except TypeError:
            raise TypeError(f"{op}: category must be a str or a sequence of P str, got "
                            f"{type(category).__name__}") from None
        if len(cats) != P:
            raise ValueError(f"{op}: category must hold P = {P} names (one per row of valid_src), got {len(cats)}")
    out = torch.zeros_like(vs)
    for cat in dict.fromkeys(cats):
        grp = geoaware_groups(cat, dataset=dataset, groups=groups, used_points=used_points)
        need = 1 + max((i for it in _table(cat, dataset, op) for i in _ids(it)), default=-1)
        if K < need:
            raise ValueError(f"{op}: category {cat!r} uses keypoint ids up to {need - 1}, so valid_src/valid_trg "
                             f"need K >= {need} (index = the dataset's keypoint id), got K = {K}")
        rows = torch.tensor([c == cat for c in cats], device=vs.device)
        mark = torch.zeros(int(rows.sum()), K, dtype=torch.bool, device=vs.device)
        vt_r = vt[rows]
        for g in grp:
            idx = torch.tensor(g, device=vs.device)
            enough = vt_r[:, idx].sum(-1) >= 2
            mark[:, idx] |= enough[:, None]
        out[rows] = mark & vs[rows] & vt_r
    return out if batched else out[0]


# ---------------------------------------------------------------------------------------------------------
# summaries
# ---------------------------------------------------------------------------------------------------------

def _akey(a: float) -> str:
    return f"{a:g}"


def summarize(pred: Tensor, gt: Tensor, thr: Tensor, valid: Tensor | None, categories: Sequence[str], *,
              alphas=(0.01, 0.05, 0.1), dagger: bool = False, geo_mask: Tensor | None = None,
              inclusive: bool = False, ties: str = "paper") -> dict:
    """Overall and per-category PCK, per image and per point, for a set of evaluated pairs.

    Args:
        pred, gt: (P, K, 2); thr: (P,); valid: (P, K) bool or None — as :func:`pck`.
        categories: P category names (one per pair).
        alphas: the thresholds reported.
        dagger: also PCK† (:func:`pck_dagger`, ``ties``).
        geo_mask: (P, K) bool, geometry-aware keypoints (:func:`geoaware_subset`); adds the same numbers on
            ``valid & geo_mask``. PCK†'s nearest-GT check still uses every valid keypoint.
        inclusive: as :func:`pck`.
    Returns:
        ``{"overall": block, "per_category": {category: block}, "n_pairs": P, "n_points": valid count,
        "alphas": [...], "dagger": bool, "geo": bool}``, categories sorted by name. A block maps
        ``"pck@{a}/image"``, ``"pck@{a}/point"`` (a formatted with ``:g``, e.g. ``pck@0.1/image``), with dagger
        ``"pck_dagger@{a}/..."``, with geo_mask ``"geo/pck@{a}/..."`` (and ``"geo/pck_dagger@{a}/..."``) to
        Python floats in [0, 1] (NaN when nothing counts), plus ``"n_pairs"``, ``"n_pairs_empty"`` (pairs
        with no valid keypoint, left out of the per-image means), ``"n_points"`` and, with geo_mask,
        ``"geo/n_pairs"`` (pairs with ≥ 1 Geo keypoint) and ``"geo/n_points"``. The overall per-image number
        is the mean over all pairs (= the pair-weighted mean of the category means, as GeoAware-SC and
        Jamais Vu report it); per point pools all keypoints.
    """
    op = "summarize"
    valid = _check_keypoints(op, pred, gt, thr, valid)
    P, K = valid.shape
    if isinstance(categories, str):
        raise TypeError(f"{op}: categories must be a sequence of P = {P} str, got a single str")
    try:
        cats = list(categories)
    except TypeError:
        raise TypeError(f"{op}: categories must be a sequence of P str, got {type(categories).__name__}") from None
    if len(cats) != P:
        raise ValueError(f"{op}: categories must hold P = {P} names (one per pair), got {len(cats)}")
    if not all(isinstance(c, str) for c in cats):
        raise TypeError(f"{op}: categories must all be str")
    alist, _ = _alphas(alphas, op, "alphas")
    _flag(dagger, "dagger", op)
    _flag(inclusive, "inclusive", op)
    _choice(ties, "ties", ("paper", "argmin"), op)
    if geo_mask is not None:
        _bool_tensor(geo_mask, "geo_mask", op, (P, K), "(P, K)", pred.device)

    families = {"pck": _keypoint_hits(pred, gt, thr, valid, alist, inclusive=inclusive, dagger=False,
                                      ties=ties)[0]}
    if dagger:
        families["pck_dagger"] = _keypoint_hits(pred, gt, thr, valid, alist, inclusive=inclusive, dagger=True,
                                                ties=ties)[0]
    dt = torch.float64

    def block(rows: Tensor) -> dict:
        m = valid[rows]
        b: dict = {}
        masks = [("", m)]
        if geo_mask is not None:
            masks.append(("geo/", m & geo_mask[rows]))
        for prefix, mk in masks:
            for fam, hits in families.items():
                h = hits[:, rows]
                for per in ("image", "point"):
                    vals = _aggregate(h, mk, per, dt).tolist()
                    for a, v in zip(alist, vals):
                        b[f"{prefix}{fam}@{_akey(a)}/{per}"] = float(v)
        b["n_pairs"] = int(rows.sum()) if rows.dtype == torch.bool else int(rows.numel())
        b["n_pairs_empty"] = int((~m.any(-1)).sum())
        b["n_points"] = int(m.sum())
        if geo_mask is not None:
            g = m & geo_mask[rows]
            b["geo/n_pairs"] = int(g.any(-1).sum())
            b["geo/n_points"] = int(g.sum())
        return b

    all_rows = torch.ones(P, dtype=torch.bool, device=pred.device)
    per_cat = {}
    for cat in sorted(set(cats)):
        rows = torch.tensor([c == cat for c in cats], dtype=torch.bool, device=pred.device)
        per_cat[cat] = block(rows)
    return {"overall": block(all_rows), "per_category": per_cat, "n_pairs": P, "n_points": int(valid.sum()),
            "alphas": alist, "dagger": dagger, "geo": geo_mask is not None}


def format_table(summary: dict) -> str:
    """The per-category table of a :func:`summarize` result, as aligned text (values in %, 2 decimals).

    One row per category and a final "all" row; columns: pairs, points, then for every reported family
    (PCK, PCK† with dagger, Geo PCK / Geo PCK† with a geo mask) and every alpha, the per-image ("img") and
    per-point ("pt") numbers under a two-line header. NaN prints as "-".
    """
    op = "format_table"
    if not isinstance(summary, dict) or "overall" not in summary or "per_category" not in summary:
        raise TypeError(f"{op}: summary must be the dict returned by summarize(), got {type(summary).__name__}")
    alphas = summary.get("alphas")
    if alphas is None:   # recover them from the keys
        alphas = sorted({float(k.split("@")[1].split("/")[0]) for k in summary["overall"] if k.startswith("pck@")})
    fams = [("pck", "PCK")]
    if summary.get("dagger"):
        fams.append(("pck_dagger", "PCK†"))
    if summary.get("geo"):
        fams += [("geo/pck", "Geo PCK")] + ([("geo/pck_dagger", "Geo PCK†")] if summary.get("dagger") else [])
    counts = [("n_pairs", "pairs"), ("n_points", "points")]
    if summary.get("geo"):
        counts.append(("geo/n_points", "geo pts"))

    def pct(v) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"

    rows = [(cat, blk) for cat, blk in summary["per_category"].items()] + [("all", summary["overall"])]
    top = ["category"] + [lab for _, lab in counts]
    sub = [""] * len(top)
    cells = [[cat] + [str(blk.get(k, "")) for k, _ in counts] for cat, blk in rows]
    group_start = []
    for fam, lab in fams:
        for a in alphas:
            group_start.append(len(top))
            for per, short in (("image", "img"), ("point", "pt")):
                top.append(f"{lab}@{_akey(a)}" if per == "image" else "")
                sub.append(short)
                for r, (_, blk) in enumerate(rows):
                    cells[r].append(pct(blk.get(f"{fam}@{_akey(a)}/{per}")))
    ncol = len(top)
    width = [max(len(sub[c]), max((len(r[c]) for r in cells), default=0)) for c in range(ncol)]
    # a family@alpha label spans its img and pt columns
    for c in group_start:
        need = len(top[c]) - (width[c] + 2 + width[c + 1])
        if need > 0:
            width[c] += need - need // 2
            width[c + 1] += need // 2
    width[0] = max(width[0], len(top[0]))
    for c in range(1, len(counts) + 1):
        width[c] = max(width[c], len(top[c]))

    def line(vals, header=False) -> str:
        parts, c = [], 0
        while c < ncol:
            if header and c in group_start:
                w = width[c] + 2 + width[c + 1]
                parts.append(vals[c].rjust(w))
                c += 2
                continue
            parts.append(vals[c].ljust(width[c]) if c == 0 else vals[c].rjust(width[c]))
            c += 1
        return "  ".join(parts)

    out = [line(top, header=True), line(sub), "-" * len(line(sub))]
    out += [line(r) for r in cells[:-1]]
    out.append("-" * len(line(sub)))
    out.append(line(cells[-1]))
    return "\n".join(out)
