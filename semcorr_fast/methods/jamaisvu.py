"""Jamais Vu (Mariotti et al., NeurIPS 2025), registered "jamaisvu": GeoAware-SC + 3-D category prototypes.

Supervised correspondence models learn the annotated keypoints and little else; Jamais Vu adds, on top of
GeoAware-SC's post-processor Φ and losses (:mod:`semcorr_fast.methods.geoaware`, reused unchanged), a
per-category sparse 3-D prototype learned from 2-D keypoints and monocular geometry (notes
``seed_jamaisvu.md`` §2; [P] paper, [C] the released code ``VICO-UoE/JamaisVu@d236e73``):

* **Lifting** (Eq. 2): the first image's visible keypoints are lifted to camera-frame 3-D points from
  MoGe's point map (:func:`semcorr_fast.geometry.lift_keypoints`; ``lift="points"``, the code) or from
  depth and intrinsics (``lift="depth"``, Eq. 2 literally).
* **Prototype keypoints 𝒫** (Eq. 3, ``proto_align``): per category, one 3-D point per keypoint slot
  (``P (n_cats, n_slots, 3)`` ~ 𝒩(0, 1e-10)). Each step the similarity ``M̂`` aligning the lifted
  keypoints onto 𝒫 is fitted by weighted Kabsch–Umeyama with the scale clamped to ``s ≥ 1`` (objects
  never shrink, so 𝒫 takes the size of the largest object) — :func:`semcorr_fast.ops.kabsch`, no
  gradient — and ``L_𝒫 = mean_i SmoothL1_β(‖M̂ k̄_i/σ − p_i/σ‖₂)`` (β = 1e-3, σ = the larger of the two
  clouds' max norms from the origin + 1e-5, detached) [C ``kps_alignment_loss``]; the printed ‖·‖₁ of
  Eq. 3 is the code's Huber of Euclidean distances. Gradients reach 𝒫 only.
* **Prototype descriptors 𝒵** (Eq. 4, ``proto_feat``, weight 0.3): ``Z (n_cats, n_slots, D)`` ~
  𝒩(0, 1/D); cross-entropy of ``cos(Φ(k_i), z_j)·exp(geom_temp)`` over the category's slots with label i,
  for the keypoints visible in the first image (their integer cells). One learned temperature
  ``τ = exp(−geom_temp)`` (init 1) is shared with φ.
* **Canonical coordinates φ** (Eq. 5): softmax attention of Φ over 𝒵 with 𝒫 (detached) as the values.
* **Local rigidity** (Eq. 6, ``geom_f`` + ``geom_b``): the object pixels (OWLv2+SAM mask ≥ 0.99, refined
  by depth MAD, :func:`semcorr_fast.geometry.object_mask`) are thinned to ``n_points`` = 1024 by
  farthest-point sampling in 3-D; Φ is sampled bilinearly **at those points only**
  (:func:`semcorr_fast.geometry.sample_at_points`; the code upsamples the whole 60×60×768 map to the
  point-map resolution first); posed points 𝒳ᵇ come from the point map, canonical points 𝒳ᶜ = φ. Every
  point seeds two neighbourhoods of ``n_neighbours`` = 64: a pseudo-geodesic one grown in posed space
  (Algorithm 1) and a kNN one in canonical space (``posed_rule``/``canonical_rule`` choose kNN or
  geodesic for each, the ablation of Tab. A1b). Offsets from the seed are aligned by Kabsch (s ≥ 1, no
  gradient; all 2·B·M problems in **one** :func:`semcorr_fast.ops.kabsch` call): ``geom_f`` aligns
  posed onto canonical offsets within the posed neighbourhoods and compares them with the canonical
  offsets (gradient through those); ``geom_b`` aligns canonical onto posed offsets within the canonical
  neighbourhoods (gradient through the fixed transform applied to the canonical offsets). Per
  neighbourhood σ = the larger max offset norm (detached); SmoothL1_β as above, mean over all
  (seed, neighbour) pairs [C ``geodesic_geom_loss``, ``nn_geom_loss``].
* **Total** [P §5.1, C]: ``L = L_GeoAware + 1·L_𝒫 + 0.3·L_𝒵 + 1·L_geom,f + 1·L_geom,b`` with the 3-D terms
  on the first image of each pair only [C]; ``geoaware_losses=False`` keeps only the prototype losses
  (Tab. A1a row 3).

Paper/code choices (named options; defaults marked):

* ``geodesic_variant``: ``"paper"`` (default, Algorithm 1 as printed) or ``"code"`` (the released
  ``closest_geodesic_neighbors``, whose distance update is transposed; the published numbers were run
  with it). See :func:`semcorr_fast.geometry.geodesic_neighbourhoods`.
* ``lift``: ``"points"`` (default; the code reads MoGe's point map) or ``"depth"`` (Eq. 2 with MoGe's
  depth and intrinsics). ``lift_mode``: ``"nearest"`` (default; the pixel containing the keypoint) or
  ``"bilinear"``.
* ``min_align_points`` (3): images with fewer lifted keypoints skip ``L_𝒫`` (the code fits any non-empty
  set; < 3 points leave the rotation undetermined). ``align_subsample``: align on a random subset of that
  many keypoints (Tab. A1d; off).
* Not reproduced code quirks: the weighted mean's +1e-6, keypoint features read with grid_sample at
  ``2k/(H−1)−1`` (a sub-cell shift with zero padding; here the keypoint's cell as GeoAware-SC), the
  point map read at ``⌊k·P/840⌋`` of a zero-padded square (here the point-map pixel holding the keypoint
  through the exact canvas transform), and the logging-only buffers ``proto_points``/``proto_adapted_feats``.
* Keypoint slots at or beyond a category's slot count (``num_kps``, the code's per-category counts) take
  no part in the prototype losses.

Batches: GeoAware-SC's two layouts (:meth:`GeoAwareSC.training_step`) — **images** (the trainer's
``pairs`` source; ``src_name``) or **features** (:class:`semcorr_fast.methods.feature_pairs.FeaturePairs`;
``src_key``) — plus ``category`` and the first images' geometry: ``src_geometry`` (a list of
:class:`semcorr_fast.geometry.ImageGeometry` or None) or, with ``geometry_root`` set, read from Jamais Vu's
layout ``<geometry_root>/<category>/<stem>/points.exr …`` and ``<masks_root>/<category>/<stem>.npy``
(:class:`semcorr_fast.geometry.GeometryStore`). The point map covers the original image; it is mapped to
the dataset canvas (``pad_square`` or ``resize``) by the canvas's transform at the point map's resolution.

``impl="naive"`` switches every step to the reference formulation for benchmarks: the full N×N
soft-argmax of GeoAware-SC, farthest-point sampling over every pixel of the zero-padded point map, Φ
upsampled to the whole padded point-map square before gathering, and a Python loop of
``torch.linalg.svd`` Kabsch fits.

Evaluation is GeoAware-SC's (Φ only; window soft-argmax): 𝒫, 𝒵 and φ are training-only.
:func:`evaluate_cross_benchmark` runs the paper's cross-benchmark protocol (Tab. 3: one model on
SPair-71k, SPair-U, AP-10K IS/CS/CF and PF-PASCAL, window soft-argmax for all, per-image PCK).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import geometry as geo
from .. import ops
from ..data.canvas import Canvas
from . import register_method
from .feature_pairs import feature_frame
from .geoaware import LOGIT_SCALE_INIT, GeoAwareSC, gather_cells

__all__ = ["JamaisVu", "JAMAISVU_NUM_KPS", "smooth_l1_distance", "keypoint_alignment_loss",
           "prototype_ce_loss", "canonical_coordinates", "local_rigidity_losses", "naive_kabsch_loop",
           "naive_sample_upsample", "umeyama_aligned_error", "CROSS_BENCHMARK", "evaluate_cross_benchmark"]

_SPAIR_CATEGORIES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dog",
                     "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor")
#: valid prototype slots per SPair category [C ``CategoryPrototype.num_keypoints_per_cat``]
JAMAISVU_NUM_KPS = dict(zip(_SPAIR_CATEGORIES, (25, 12, 17, 14, 10, 30, 30, 15, 14, 21, 16, 20, 13, 20, 9, 21, 18, 16)))
IMPLS = ("fused", "naive")


def _err(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


# ==========================================================================================================
# loss pieces (functional; shapes documented; used by the method and the tests)
# ==========================================================================================================

def smooth_l1_distance(a: Tensor, b: Tensor, beta: float = 1e-3) -> Tensor:
    """Huber of Euclidean distances [C ``smooth_dist``]: ``d = ‖a − b‖₂`` over the last dim, then
    ``0.5 d²/β`` for ``d < β`` else ``d − 0.5 β``. ``(..., 3)`` → ``(...)``."""
    d = torch.linalg.vector_norm(a - b, dim=-1)
    return F.smooth_l1_loss(d, torch.zeros_like(d), beta=beta, reduction="none")


def _kabsch_fused(src: Tensor, tgt: Tensor, weights: Optional[Tensor] = None, backend: str = "auto"):
    with torch.no_grad():
        return ops.kabsch(src.detach().float(), tgt.detach().float(), weights, estimate_scale=True, min_scale=1.0,
                          backend=backend)


def naive_kabsch_loop(src: Tensor, tgt: Tensor, weights: Optional[Tensor] = None, min_scale: float = 1.0):
    """The naive reference: one ``torch.linalg.svd`` Umeyama fit per problem in a Python loop (what a
    straightforward port does; the benchmark's baseline). Same convention and outputs as
    :func:`semcorr_fast.ops.kabsch` with ``estimate_scale=True, min_scale``: ``tgt ≈ s R src + t``.
    ``src, tgt (B, P, 3)``, ``weights (B, P)`` or None → ``R (B, 3, 3), t (B, 3), s (B,)``."""
    B, P, d = src.shape
    Rs, ts, ss = [], [], []
    with torch.no_grad():
        for b in range(B):
            x, y = src[b].float(), tgt[b].float()
            w = torch.ones(P, device=x.device) if weights is None else weights[b].float()
            wn = w / w.sum().clamp_min(1e-12)
            mx, my = (wn[:, None] * x).sum(0), (wn[:, None] * y).sum(0)
            xc, yc = x - mx, y - my
            M = (wn[:, None] * yc).T @ xc
            U, S, Vh = torch.linalg.svd(M)
            dsign = torch.sign(torch.linalg.det(U @ Vh))
            D = torch.ones(d, device=x.device)
            D[-1] = torch.where(dsign == 0, torch.ones_like(dsign), dsign)
            R = U @ torch.diag(D) @ Vh
            var = (wn * (xc * xc).sum(-1)).sum().clamp_min(1e-12)
            s = ((S * D).sum() / var).clamp_min(min_scale)
            Rs.append(R)
            ss.append(s)
            ts.append(my - s * R @ mx)
    return torch.stack(Rs), torch.stack(ts), torch.stack(ss)


def naive_sample_upsample(feat: Tensor, xy: Tensor, size: tuple[int, int]) -> Tensor:
    """The code's way of reading features at points: upsample the whole map to ``size`` = (H, W)
    (bilinear, ``align_corners=False``) and gather integer pixels ``xy (B, N, 2)`` (x, y) of it →
    ``(B, N, C)``. Builds the ``(B, C, H, W)`` map (and its gradient); kept for benchmarks and tests."""
    up = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)
    B, C, H, W = up.shape
    idx = (xy[..., 1].long().clamp(0, H - 1) * W + xy[..., 0].long().clamp(0, W - 1))
    return up.flatten(2).gather(2, idx[:, None, :].expand(B, C, idx.shape[1])).transpose(1, 2)


def keypoint_alignment_loss(posed: Tensor, proto: Tensor, weights: Tensor, beta: float = 1e-3,
                            min_scale: float = 1.0, kabsch=None, eps: float = 1e-5):
    """Eq. 3 as the code computes it [C ``kps_alignment_loss``]: fit ``M̂`` (s ≥ ``min_scale``) aligning the
    lifted keypoints onto the prototype (no gradient), then the Huber distance of the aligned keypoints
    to the prototype, normalised by the detached max norm of either cloud.

    Args:
        posed: ``(B, K, 3)`` lifted keypoints (camera frame).
        proto: ``(B, K, 3)`` prototype points of the same slots (gradients flow here only).
        weights: ``(B, K)`` bool, the keypoints taking part.
        kabsch: ``fn(src, tgt, weights) -> (R, t, s)`` (default: :func:`semcorr_fast.ops.kabsch`, s ≥ 1).
    Returns:
        ``(loss (B,), present (B,) bool, scale (B,))``: per-image mean over its keypoints (0 where none).
    """
    if not (isinstance(posed, Tensor) and posed.dim() == 3 and posed.shape[-1] == 3 and proto.shape == posed.shape):
        raise ValueError(f"keypoint_alignment_loss: posed and proto must be (B, K, 3) of one shape, got "
                         f"{_err(posed)} and {_err(proto)}")
    if not isinstance(weights, Tensor) or weights.dtype != torch.bool or weights.shape != posed.shape[:2]:
        raise ValueError(f"keypoint_alignment_loss: weights must be a bool {tuple(posed.shape[:2])} tensor, got "
                         f"{_err(weights)}")
    fit = kabsch or (lambda s, t, w: _kabsch_fused(s, t, w))
    w = weights.float()
    R, t, s = fit(posed.detach().float(), proto.detach().float(), w)
    with torch.no_grad():
        aligned = ops.apply_similarity(posed.detach().float(), R, t, s)
    m = weights[..., None]
    zero = torch.zeros((), dtype=proto.dtype, device=proto.device)
    pn = torch.where(m, proto.detach(), zero).norm(dim=-1).amax(1)
    an = torch.where(m, aligned, zero).norm(dim=-1).amax(1)
    sigma = (torch.maximum(pn, an) + eps)[:, None, None]
    per = smooth_l1_distance(aligned / sigma, proto / sigma, beta)
    n = weights.sum(1)
    loss = (per * w).sum(1) / n.clamp(min=1)
    return torch.where(n > 0, loss, torch.zeros_like(loss)), n > 0, s


def prototype_ce_loss(feats: Tensor, Z: Tensor, slot_mask: Tensor, labels: Tensor, kmask: Tensor,
                      log_temp: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 4: per image, mean over its masked keypoints of ``CE(cos(f_i, z_·)·exp(log_temp), label_i)``
    over the category's valid slots.

    Args:
        feats: ``(B, K, D)`` keypoint descriptors; Z: ``(B, S, D)`` the images' category descriptors;
        slot_mask: ``(B, S)`` bool valid slots; labels: ``(B, K)`` int64 slot of each keypoint;
        kmask: ``(B, K)`` bool keypoints taking part; log_temp: 0-dim (``geom_temp``; τ = exp(−log_temp)).
    Returns:
        ``(loss (B,), present (B,) bool)``.
    """
    logits = (F.normalize(feats.float(), dim=-1) @ F.normalize(Z.float(), dim=-1).transpose(1, 2)) * log_temp.exp()
    logits = logits.masked_fill(~slot_mask[:, None, :], torch.finfo(logits.dtype).min)
    lse = torch.logsumexp(logits, dim=-1)
    pick = logits.gather(2, labels.clamp(0, Z.shape[1] - 1)[..., None])[..., 0]
    ce = lse - pick
    n = kmask.sum(1)
    loss = (ce * kmask).sum(1) / n.clamp(min=1)
    return torch.where(n > 0, loss, torch.zeros_like(loss)), n > 0


def canonical_coordinates(feats: Tensor, Z: Tensor, P: Tensor, slot_mask: Tensor, log_temp: Tensor) -> Tensor:
    """Eq. 5, φ: ``softmax_j(cos(f, z_j)·exp(log_temp)) @ P`` over the valid slots (P detached by the caller
    as in the code). ``feats (B, M, D)``, ``Z (B, S, D)``, ``P (B, S, 3)``, ``slot_mask (B, S)`` → ``(B, M, 3)``."""
    logits = (F.normalize(feats.float(), dim=-1) @ F.normalize(Z.float(), dim=-1).transpose(1, 2)) * log_temp.exp()
    logits = logits.masked_fill(~slot_mask[:, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1) @ P.float()


def local_rigidity_losses(canon: Tensor, posed: Tensor, k: int, *, posed_rule: str = "geodesic",
                          canonical_rule: str = "knn", variant: str = "paper", beta: float = 1e-3, kabsch=None,
                          eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Eq. 6 with every point as a seed, both directions, one batched Kabsch call.

    Args:
        canon: ``(B, M, 3)`` canonical points 𝒳ᶜ = φ (differentiable).
        posed: ``(B, M, 3)`` posed points 𝒳ᵇ (constants).
        k: neighbourhood size k′ (64).
        posed_rule / canonical_rule: ``"geodesic"`` / ``"knn"`` (the paper's full model) or either rule in both.
        variant: the pseudo-geodesic variant (``"paper"`` | ``"code"``).
        kabsch: ``fn(src, tgt, weights) -> (R, t, s)`` for the ``(2·B·M, k, 3)`` problems (default one
            :func:`semcorr_fast.ops.kabsch` call, s ≥ 1, no gradient).
    Returns:
        ``(geom_f (B,), geom_b (B,))``: object→prototype (posed neighbourhoods, posed offsets aligned onto
        canonical ones, gradient through the canonical offsets) and prototype→object (canonical
        neighbourhoods, canonical offsets aligned onto posed ones, gradient through the transform applied
        to them); each the mean over seeds and neighbours of the Huber distance after per-neighbourhood
        normalisation.
    """
    if not (isinstance(canon, Tensor) and canon.dim() == 3 and canon.shape[-1] == 3 and posed.shape == canon.shape):
        raise ValueError(f"local_rigidity_losses: canon and posed must be (B, M, 3) of one shape, got {_err(canon)} "
                         f"and {_err(posed)}")
    B, M, _ = canon.shape
    posed = posed.detach().float()
    idx_b = geo.neighbourhoods(posed, k, posed_rule, variant)                  # grown in posed space
    idx_c = geo.neighbourhoods(canon.detach(), k, canonical_rule, variant)    # in canonical space
    Cq = geo.gather_neighbourhoods(canon, idx_b)                               # (B, M, k, 3), grad
    Bq = geo.gather_neighbourhoods(posed, idx_b)
    Cn = geo.gather_neighbourhoods(canon, idx_c)                               # grad
    Bn = geo.gather_neighbourhoods(posed, idx_c)
    src = torch.cat([Bq.reshape(B * M, k, 3), Cn.detach().reshape(B * M, k, 3)])
    tgt = torch.cat([Cq.detach().reshape(B * M, k, 3), Bn.reshape(B * M, k, 3)])
    fit = kabsch or (lambda s, t, w: _kabsch_fused(s, t, w))
    R, t, s = fit(src, tgt, None)                                              # ONE call, 2·B·M problems
    R_f, R_b = R[:B * M], R[B * M:]
    t_f, t_b = t[:B * M], t[B * M:]
    s_f, s_b = s[:B * M], s[B * M:]
    with torch.no_grad():
        aligned_b = ops.apply_similarity(Bq.reshape(B * M, k, 3), R_f, t_f, s_f)          # posed → canonical
    aligned_c = ops.apply_similarity(Cn.reshape(B * M, k, 3).float(), R_b, t_b, s_b)      # canonical → posed
    cq = Cq.reshape(B * M, k, 3).float()
    bn = Bn.reshape(B * M, k, 3)
    sig_f = (torch.maximum(cq.detach().norm(dim=-1).amax(-1), aligned_b.norm(dim=-1).amax(-1)) + eps)[:, None, None]
    sig_b = (torch.maximum(bn.norm(dim=-1).amax(-1), aligned_c.detach().norm(dim=-1).amax(-1)) + eps)[:, None, None]
    lf = smooth_l1_distance(cq / sig_f, aligned_b / sig_f, beta).reshape(B, M * k).mean(1)
    lb = smooth_l1_distance(bn / sig_b, aligned_c / sig_b, beta).reshape(B, M * k).mean(1)
    return lf, lb


def umeyama_aligned_error(X: Tensor, Y: Tensor) -> tuple[float, float]:
    """How well ``X (K, 3)`` matches ``Y (K, 3)`` up to a similarity: fit ``Y ≈ s R X + t`` (no scale clamp)
    and return ``(rms error, rms error / rms radius of Y)``."""
    R, t, s = ops.kabsch(X[None].double(), Y[None].double(), estimate_scale=True, backend="reference")
    Xa = ops.apply_similarity(X[None].double(), R, t, s)[0]
    rms = float(((Xa - Y.double()) ** 2).sum(-1).mean().sqrt())
    rad = float(((Y.double() - Y.double().mean(0)) ** 2).sum(-1).mean().sqrt())
    return rms, rms / max(rad, 1e-12)


# ==========================================================================================================
# the method
# ==========================================================================================================

def _image_stem(name: str) -> str:
    return os.path.splitext(os.path.basename(str(name).split("@", 1)[0]))[0]


@register_method("jamaisvu")
class JamaisVu(GeoAwareSC):
    """Jamais Vu: GeoAware-SC's post-processor and losses plus the 3-D prototype losses (module docstring).

    Args (beyond :class:`semcorr_fast.methods.geoaware.GeoAwareSC`'s, which keep their meaning):
        categories: the category names, in prototype order (SPair-71k's 18).
        num_kps: valid slots per category: a dict, a list in ``categories`` order, or one int
            (default :data:`JAMAISVU_NUM_KPS`, falling back to ``n_slots``).
        n_slots: prototype slots per category (30, SPair's keypoint ids).
        proto_weight, feat_weight, geom_weights: weights of ``L_𝒫`` (1), ``L_𝒵`` (0.3) and
            (``geom_f``, ``geom_b``) ((1, 1)).
        n_points: farthest-point samples per image (1024); n_neighbours: k′ (64).
        posed_rule, canonical_rule: neighbourhood rules in posed / canonical space (``"geodesic"`` / ``"knn"``).
        geodesic_variant: ``"paper"`` (Algorithm 1) or ``"code"`` (the released code's transposed update).
        huber_beta: the SmoothL1 corner (1e-3).
        mask_threshold, n_mad: object mask threshold (0.99) and the depth-MAD factor (5; None: off).
        lift, lift_mode: ``"points"``/``"depth"`` and ``"nearest"``/``"bilinear"`` (see the module docstring).
        min_align_points: lifted keypoints an image needs for ``L_𝒫`` (3); align_subsample: None or n.
        geoaware_losses: add GeoAware-SC's losses (True).
        geometry_root, masks_root: MoGe maps and object masks folders (see the module docstring); without
            them batches must carry ``src_geometry``.
        impl: ``"fused"`` or ``"naive"`` (benchmark reference; also sets GeoAware-SC's ``dense_impl``).
    """

    def __init__(self, backbone: nn.Module, *, feature_dims: Optional[Sequence[int]] = None, out_dim: int = 768,
                 bottleneck: Optional[int] = None, dropout: float = 0.2, tiny: bool = False,
                 norm_groups: Optional[int] = None, sparse_loss: bool = True, dense_loss: bool = True,
                 beta: float = 0.02, gt_noise: float = 0.1, flip_aug: str = "paper",
                 flip_weights: Sequence[float] = (1.0, 1.0, 0.25), logit_scale_init: float = LOGIT_SCALE_INIT,
                 dense_impl: str = "fused", backend: str = "auto", feature_cache: Optional[str] = None,
                 init_checkpoint: Optional[str] = None,
                 categories: Sequence[str] = _SPAIR_CATEGORIES, num_kps=None, n_slots: int = 30,
                 proto_weight: float = 1.0, feat_weight: float = 0.3, geom_weights: Sequence[float] = (1.0, 1.0),
                 n_points: int = 1024, n_neighbours: int = 64, posed_rule: str = "geodesic",
                 canonical_rule: str = "knn", geodesic_variant: str = "paper", huber_beta: float = 1e-3,
                 mask_threshold: float = 0.99, n_mad: Optional[float] = 5.0, lift: str = "points",
                 lift_mode: str = "nearest", min_align_points: int = 3, align_subsample: Optional[int] = None,
                 geoaware_losses: bool = True, geometry_root: Optional[str] = None,
                 masks_root: Optional[str] = None, impl: str = "fused"):
        if impl not in IMPLS:
            raise ValueError(f"jamaisvu: impl must be one of {IMPLS}, got {impl!r}")
        super().__init__(backbone, feature_dims=feature_dims, out_dim=out_dim, bottleneck=bottleneck,
                         dropout=dropout, tiny=tiny, norm_groups=norm_groups, sparse_loss=sparse_loss,
                         dense_loss=dense_loss, beta=beta, gt_noise=gt_noise, flip_aug=flip_aug,
                         flip_weights=flip_weights, logit_scale_init=logit_scale_init,
                         dense_impl="naive" if impl == "naive" else dense_impl, backend=backend,
                         feature_cache=feature_cache, init_checkpoint=None)
        cats = [str(c) for c in categories]
        if not cats or len(set(cats)) != len(cats):
            raise ValueError(f"jamaisvu: categories must be distinct names, got {categories!r}")
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"jamaisvu: n_slots must be a positive int, got {n_slots!r}")
        if num_kps is None:
            counts = [JAMAISVU_NUM_KPS.get(c, n_slots) for c in cats]
        elif isinstance(num_kps, int) and not isinstance(num_kps, bool):
            counts = [num_kps] * len(cats)
        elif isinstance(num_kps, dict):
            missing = [c for c in cats if c not in num_kps]
            if missing:
                raise ValueError(f"jamaisvu: num_kps has no count for categories {missing}")
            counts = [num_kps[c] for c in cats]
        else:
            counts = list(num_kps)
            if len(counts) != len(cats):
                raise ValueError(f"jamaisvu: num_kps must have one count per category ({len(cats)}), got {len(counts)}")
        if not all(isinstance(c, int) and 1 <= c <= n_slots for c in counts):
            raise ValueError(f"jamaisvu: every num_kps count must be an int in [1, n_slots = {n_slots}], got {counts}")
        for name, v in (("proto_weight", proto_weight), ("feat_weight", feat_weight), ("huber_beta", huber_beta),
                        ("mask_threshold", mask_threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"jamaisvu: {name} must be a number >= 0, got {v!r}")
        if (not isinstance(geom_weights, (list, tuple)) or len(geom_weights) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in geom_weights)):
            raise ValueError(f"jamaisvu: geom_weights must be [forward, backward] numbers >= 0, got {geom_weights!r}")
        for name, v, lo in (("n_points", n_points, 1), ("n_neighbours", n_neighbours, 1),
                            ("min_align_points", min_align_points, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"jamaisvu: {name} must be an int >= {lo}, got {v!r}")
        if n_neighbours > n_points:
            raise ValueError(f"jamaisvu: n_neighbours ({n_neighbours}) must be <= n_points ({n_points})")
        for name, v, allowed in (("posed_rule", posed_rule, geo.NEIGHBOURHOOD_RULES),
                                 ("canonical_rule", canonical_rule, geo.NEIGHBOURHOOD_RULES),
                                 ("geodesic_variant", geodesic_variant, geo.GEODESIC_VARIANTS),
                                 ("lift", lift, ("points", "depth")), ("lift_mode", lift_mode, ("nearest", "bilinear"))):
            if v not in allowed:
                raise ValueError(f"jamaisvu: {name} must be one of {allowed}, got {v!r}")
        if n_mad is not None and (isinstance(n_mad, bool) or not isinstance(n_mad, (int, float)) or n_mad <= 0):
            raise ValueError(f"jamaisvu: n_mad must be a positive number or None, got {n_mad!r}")
        if align_subsample is not None and (isinstance(align_subsample, bool) or not isinstance(align_subsample, int)
                                            or align_subsample < 1):
            raise ValueError(f"jamaisvu: align_subsample must be None or an int >= 1, got {align_subsample!r}")
        if not isinstance(geoaware_losses, bool):
            raise TypeError(f"jamaisvu: geoaware_losses must be a bool, got {geoaware_losses!r}")
        if self.canvas.kind not in ("pad_square", "resize"):
            raise ValueError(f"jamaisvu: the backbone canvas must be pad_square or resize (the point maps are mapped "
                             f"onto the dataset canvas by its transform), got {self.canvas}")

        self.categories = cats
        self.cat_index = {c: i for i, c in enumerate(cats)}
        self.n_slots = n_slots
        self.register_buffer("num_kps", torch.tensor(counts, dtype=torch.int64), persistent=False)
        D = self.post.out_dim
        self.proto_kps = nn.Parameter(torch.randn(len(cats), n_slots, 3) * 1e-5)        # 𝒫
        self.proto_feats = nn.Parameter(torch.randn(len(cats), n_slots, D) / math.sqrt(D))  # 𝒵
        self.geom_temp = nn.Parameter(torch.zeros(()))                                     # τ = exp(−geom_temp)
        self.proto_weight, self.feat_weight = float(proto_weight), float(feat_weight)
        self.geom_weights = (float(geom_weights[0]), float(geom_weights[1]))
        self.n_points, self.n_neighbours = n_points, n_neighbours
        self.posed_rule, self.canonical_rule, self.geodesic_variant = posed_rule, canonical_rule, geodesic_variant
        self.huber_beta, self.mask_threshold = float(huber_beta), float(mask_threshold)
        self.n_mad = None if n_mad is None else float(n_mad)
        self.lift, self.lift_mode = lift, lift_mode
        self.min_align_points, self.align_subsample = min_align_points, align_subsample
        self.geoaware_losses, self.impl = geoaware_losses, impl
        if not geoaware_losses:
            self.logit_scale.requires_grad_(False)
        self.geometry = None
        if geometry_root is not None:
            self.geometry = geo.GeometryStore(geometry_root, masks_root)
        elif masks_root is not None:
            raise ValueError("jamaisvu: masks_root needs geometry_root (the MoGe maps folder)")
        self._capture: Optional[list] = None
        if init_checkpoint is not None:
            self.load_init(init_checkpoint)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", categories={len(self.categories)}, n_slots={self.n_slots}, "
                f"n_points={self.n_points}, k={self.n_neighbours}, rules=({self.posed_rule!r}, "
                f"{self.canonical_rule!r}), geodesic={self.geodesic_variant!r}, impl={self.impl!r}")

    # ------------------------------------------------------------------ descriptors (capture for reuse)
    def descriptor_from_features(self, feats: Tensor) -> Tensor:
        out = super().descriptor_from_features(feats)
        if self._capture is not None:
            self._capture.append(out)
        return out

    def _kabsch(self):
        if self.impl == "naive":
            return lambda s, t, w: naive_kabsch_loop(s, t, w)
        return lambda s, t, w: _kabsch_fused(s, t, w, self.backend)

    # ------------------------------------------------------------------ geometry of a batch
    def _dataset_canvas(self, hw: tuple[int, int]) -> Canvas:
        H, W = hw
        if self.canvas.kind == "pad_square":
            if H != W:
                raise ValueError(f"jamaisvu: dataset-canvas images must be square on a pad_square backbone, got {hw}")
            return Canvas.pad_square(H)
        return Canvas.resized(H, W)

    def _geometries(self, batch: dict, B: int) -> list:
        given = batch.get("src_geometry")
        if given is not None:
            if len(given) != B or not all(g is None or isinstance(g, geo.ImageGeometry) for g in given):
                raise ValueError(f"jamaisvu: batch['src_geometry'] must be a list of {B} ImageGeometry or None")
            return list(given)
        if self.geometry is None:
            raise KeyError("jamaisvu: no geometry for the 3-D losses: set method_args.geometry_root (MoGe maps, and "
                           "masks_root for object masks) or put 'src_geometry' in the batch")
        names = batch.get("src_name", batch.get("src_key"))
        cats = batch.get("category")
        if names is None or cats is None:
            raise KeyError(f"jamaisvu: reading geometry needs batch['src_name'] (or 'src_key') and "
                           f"batch['category']; got keys {sorted(k for k in batch if isinstance(k, str))}")
        return [self.geometry.load(c, _image_stem(n)) for n, c in zip(names, cats)]

    def _canvas_hw(self, batch: dict) -> tuple[int, int]:
        if "src" in batch and isinstance(batch["src"], Tensor):
            return tuple(int(s) for s in batch["src"].shape[-2:])
        keys = batch.get("src_key")
        if keys:
            try:
                h, w = str(keys[0]).rsplit("@", 1)[1].split("x")
                return int(h), int(w)
            except (IndexError, ValueError):
                pass
        if self.canvas.kind == "pad_square":
            return (self.canvas.size, self.canvas.size)
        return tuple(self.canvas.size)

    @staticmethod
    def pixel_grid_coords(pix: Tensor, tf, frame, hw) -> Tensor:
        """Point-map pixels → the feature grid's sampling coordinates.

        Args:
            pix: ``(N, 2)`` int64 pixel indices (x, y) of the point map.
            tf: the dataset canvas's :class:`~semcorr_fast.data.canvas.CanvasTransform` at the point map's size.
            frame: ``(x0, y0, x1, y1)``, the dataset-canvas rectangle the ``hw`` = (h, w) grid covers.
        Returns:
            ``(N, 2)`` float32 coordinates with cell centres at integers (:func:`semcorr_fast.geometry.sample_at_points`)
            of the pixel centres.
        """
        x0, y0, x1, y1 = frame
        h, w = hw
        c = tf.points(pix.double() + 0.5)                                       # pixel centres on the canvas
        return torch.stack(((c[:, 0] - x0) * w / (x1 - x0) - 0.5, (c[:, 1] - y0) * h / (y1 - y0) - 0.5), -1).float()

    # ------------------------------------------------------------------ the 3-D losses
    def prototype_losses(self, desc: Tensor, kps: Tensor, categories: Sequence[str], geometries: Sequence,
                         canvas_hw: tuple[int, int], generator: Optional[torch.Generator] = None) -> dict:
        """The prototype losses of the first images of a batch.

        Args:
            desc: ``(B, D, h, w)`` unit descriptors Φ of the first images (differentiable).
            kps: ``(B, K, 2)`` their keypoints in grid units of ``desc`` (NaN where not visible; slot = index).
            categories: B category names (of :attr:`categories`).
            geometries: B :class:`semcorr_fast.geometry.ImageGeometry` or None (no 3-D losses for that image).
            canvas_hw: the dataset canvas size (the grid covers :func:`feature_frame` of it).
            generator: CPU generator (FPS starts, ``align_subsample``).
        Returns:
            ``{"proto_align", "proto_feat", "geom_f", "geom_b"}``: 0-dim means over the images that have
            each term (a differentiable 0 otherwise), plus ``"proto_scale"`` (mean fitted scale, detached)
            and ``"n_geom"`` (images with the dense terms).
        """
        B, D, h, w = desc.shape
        dev = desc.device
        if kps.shape[0] != B or len(categories) != B or len(geometries) != B:
            raise ValueError(f"jamaisvu: prototype_losses needs B = {B} keypoint rows, categories and geometries")
        unknown = sorted({c for c in categories if c not in self.cat_index})
        if unknown:
            raise KeyError(f"jamaisvu: categories {unknown} have no prototype; method categories: {self.categories}")
        K = kps.shape[1]
        cid = torch.tensor([self.cat_index[c] for c in categories], device=dev)
        ncat = self.num_kps.to(dev)[cid]                                        # (B,)
        S = self.n_slots
        slot_mask = torch.arange(S, device=dev)[None] < ncat[:, None]           # (B, S)
        Kp = min(K, S)
        kk = kps[:, :Kp].to(dev).float()
        vis = torch.isfinite(kk).all(-1) & (torch.arange(Kp, device=dev)[None] < ncat[:, None])
        P = self.proto_kps[cid]                                                 # (B, S, 3)
        Z = self.proto_feats[cid]                                               # (B, S, D)
        x0, y0, x1, y1 = feature_frame(*canvas_hw, self.canvas)
        sx, sy = (x1 - x0) / w, (y1 - y0) / h                                   # canvas px per cell
        dcanvas = self._dataset_canvas(canvas_hw)

        # ---- L_Z on the keypoints visible in the image (their cells)
        kf = gather_cells(desc, torch.where(vis[..., None], kk, torch.zeros_like(kk)))
        labels = torch.arange(Kp, device=dev).expand(B, Kp)
        l_feat, p_feat = prototype_ce_loss(kf, Z, slot_mask, labels, vis, self.geom_temp)

        # ---- per image: lift keypoints, object points, FPS
        posed_k = torch.zeros(B, Kp, 3, device=dev)
        lifted = torch.zeros(B, Kp, dtype=torch.bool, device=dev)
        sel_pts, sel_grid, has_geom = [], [], []
        cloud_pts, cloud_mask, cloud_pix = [], [], []
        for b, g in enumerate(geometries):
            if g is None:
                continue
            Hp, Wp = g.size
            tf = dcanvas.transform_for(Hp, Wp)
            canvas_xy = torch.stack((x0 + kk[b, :, 0] * sx, y0 + kk[b, :, 1] * sy), -1).cpu().double()
            pm_xy = tf.inverse_points(canvas_xy).float()
            vb = vis[b].cpu()
            if self.lift == "points":
                xyz, ok = geo.lift_keypoints(pm_xy, vb, points=g.points, ok=g.valid, mode=self.lift_mode)
            else:
                if g.intrinsics is None:
                    raise ValueError("jamaisvu: lift='depth' needs intrinsics (MoGe's fov.json) in the geometry")
                xyz, ok = geo.lift_keypoints(pm_xy, vb, depth=g.depth, intrinsics=g.intrinsics, ok=g.valid,
                                             mode=self.lift_mode)
            posed_k[b], lifted[b] = xyz.to(dev), ok.to(dev)
            m = geo.object_mask(g, self.mask_threshold, self.n_mad)
            if self.impl == "naive":   # the code: every pixel of the zero-padded square, masked
                L = max(Hp, Wp)
                oy, ox = (L - Hp) // 2, (L - Wp) // 2
                pts = torch.zeros(L, L, 3)
                pts[oy:oy + Hp, ox:ox + Wp] = g.points
                mm = torch.zeros(L, L, dtype=torch.bool)
                mm[oy:oy + Hp, ox:ox + Wp] = m
                ys, xs = torch.meshgrid(torch.arange(L) - oy, torch.arange(L) - ox, indexing="ij")
                pix = torch.stack((xs.reshape(-1), ys.reshape(-1)), -1)
                pts, mm = pts.reshape(-1, 3), mm.reshape(-1)
            else:                      # only the object pixels
                flat = m.reshape(-1).nonzero().squeeze(1)
                pts = g.points.reshape(-1, 3)[flat]
                mm = torch.ones(flat.shape[0], dtype=torch.bool)
                pix = torch.stack((flat % Wp, flat // Wp), -1)
            if int(mm.sum()) < self.n_neighbours:
                continue
            has_geom.append(b)
            cloud_pts.append(pts)
            cloud_mask.append(mm)
            cloud_pix.append((pix, tf))
        if has_geom:
            n_max = max(p.shape[0] for p in cloud_pts)
            pts_b = torch.zeros(len(has_geom), n_max, 3, device=dev)        # FPS runs on the training device
            msk_b = torch.zeros(len(has_geom), n_max, dtype=torch.bool, device=dev)
            for i, (p, mm) in enumerate(zip(cloud_pts, cloud_mask)):
                pts_b[i, :p.shape[0]], msk_b[i, :p.shape[0]] = p.to(dev), mm.to(dev)
            idx = geo.farthest_point_sampling(pts_b, self.n_points, msk_b, generator=generator)   # (G, M)
            for i, (pix, tf) in enumerate(cloud_pix):
                sel = idx[i]
                sel_pts.append(pts_b[i, sel])
                sel = sel.cpu()
                sel_grid.append(self.pixel_grid_coords(pix[sel], tf, (x0, y0, x1, y1), (h, w)))

        # ---- L_P
        wts = lifted
        if self.align_subsample is not None:
            r = torch.rand(B, Kp, generator=generator).to(dev)
            r = torch.where(wts, r, torch.full_like(r, 2.0))
            rank = r.argsort(1).argsort(1)
            wts = wts & (rank < self.align_subsample)
        enough = wts.sum(1) >= self.min_align_points
        wts = wts & enough[:, None]
        l_align, p_align, scale = keypoint_alignment_loss(posed_k, P[:, :Kp], wts, self.huber_beta,
                                                          kabsch=self._kabsch())

        # ---- φ and L_geom
        G = len(has_geom)
        if G:
            gi = torch.tensor(has_geom, device=dev)
            xb = torch.stack(sel_pts).to(dev)                                   # (G, M, 3) posed
            gxy = torch.stack(sel_grid).to(dev)                                 # (G, M, 2) grid coordinates
            dg = desc[gi]
            if self.impl == "naive":
                # the code: Φ upsampled to the padded point-map square, then gathered at the pixels
                L = max(max(g.size) for g in (geometries[b] for b in has_geom))
                q = (gxy + 0.5) * torch.tensor([L / w, L / h], device=dev)
                f = naive_sample_upsample(dg, q.floor(), (L, L))
            else:
                f = geo.sample_at_points(dg, gxy)                               # (G, M, D)
            xc = canonical_coordinates(f, Z[gi], P[gi].detach(), slot_mask[gi], self.geom_temp)
            lf, lb = local_rigidity_losses(xc, xb, self.n_neighbours, posed_rule=self.posed_rule,
                                           canonical_rule=self.canonical_rule, variant=self.geodesic_variant,
                                           beta=self.huber_beta, kabsch=self._kabsch())
            geom_f, geom_b = lf.mean(), lb.mean()
        else:
            geom_f = geom_b = None

        def mean_or_zero(loss, present, *anchors):
            if present.any():
                return loss[present].mean()
            return sum(a.sum() for a in anchors) * 0.0

        zero_anchor = (self.proto_feats, self.geom_temp, desc)
        out = {
            "proto_align": mean_or_zero(l_align, p_align & enough, self.proto_kps),
            "proto_feat": mean_or_zero(l_feat, p_feat, *zero_anchor),
            "geom_f": geom_f if geom_f is not None else sum(a.sum() for a in zero_anchor) * 0.0,
            "geom_b": geom_b if geom_b is not None else sum(a.sum() for a in zero_anchor) * 0.0,
            "proto_scale": scale[p_align & enough].mean().detach() if (p_align & enough).any() else desc.new_zeros(()),
            "n_geom": torch.tensor(float(G)),
        }
        return out

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        """GeoAware-SC's step (:meth:`GeoAwareSC.training_step`, either batch layout) plus the 3-D prototype
        losses of every pair's first image. Returns ``{"loss", <GeoAware-SC terms>, "proto_align",
        "proto_feat", "geom_f", "geom_b", "proto_loss", "tau", "proto_scale", ...}``."""
        gen = batch.get("generator")
        feats = batch if "src_feat" in batch else self.features_from_images(batch)
        B = feats["src_feat"].shape[0]
        logs: dict = {}
        d_src = None
        if self.geoaware_losses:
            self._capture = []
            try:
                terms = self.loss_terms(feats, gen)
            finally:
                captured, self._capture = self._capture, None
            loss, logs = self.combine(terms)
            # reuse the step's Φ of the first images (same dropout draw as the GeoAware-SC terms): loss_terms
            # encodes [src, trg(, src_flip, trg_flip)] in one call
            if len(captured) == 1 and captured[0].shape[0] in (2 * B, 4 * B):
                d_src = captured[0][:B]
        else:
            loss = None
        if d_src is None:
            d_src = self.descriptor_from_features(feats["src_feat"])
        geoms = self._geometries(batch, B)
        cats = batch.get("category")
        if cats is None:
            raise KeyError("jamaisvu: the batch needs 'category' (a list of B category names)")
        proto = self.prototype_losses(d_src, feats["src_kps"], list(cats), geoms, self._canvas_hw(batch), gen)
        proto_loss = (self.proto_weight * proto["proto_align"] + self.feat_weight * proto["proto_feat"]
                      + self.geom_weights[0] * proto["geom_f"] + self.geom_weights[1] * proto["geom_b"])
        total = proto_loss if loss is None else loss + proto_loss
        out = {"loss": total, **logs}
        out.update({k: v.detach() for k, v in proto.items()})
        out["proto_loss"] = proto_loss.detach()
        out["tau"] = (-self.geom_temp.detach()).exp()
        if self.geoaware_losses:
            out["logit_scale"] = self.logit_scale.detach().exp()
        return out


# ==========================================================================================================
# the cross-benchmark protocol (Tab. 3)
# ==========================================================================================================

#: Tab. 3's test sets: (label, dataset name, root key, build options). Thresholds come from
#: :func:`semcorr_fast.evaluate.alphas_for` (0.01/0.05/0.1 of the target bbox; PF-PASCAL 0.05/0.1/0.15 of the image).
CROSS_BENCHMARK = (
    ("SPair-71k", "spair", "spair", {"split": "test"}),
    ("SPair-U", "spair-u", "spair-u", {"split": "test"}),
    ("AP-10K IS", "ap10k", "ap10k", {"split": "test", "split_kind": "intra-species"}),
    ("AP-10K CS", "ap10k", "ap10k", {"split": "test", "split_kind": "cross-species"}),
    ("AP-10K CF", "ap10k", "ap10k", {"split": "test", "split_kind": "cross-family"}),
    ("PF-PASCAL", "pf-pascal", "pf-pascal", {"split": "test"}),
)


def evaluate_cross_benchmark(model, roots: dict, matcher="geoaware", *, only: Optional[Sequence[str]] = None,
                             limit: Optional[int] = None, cache=None, device="cpu", progress: bool = False) -> dict:
    """Evaluate one model on Jamais Vu's cross-benchmark protocol (Tab. 3).

    Args:
        model: a trained method or backbone (``semcorr_fast.train.load_trained(path)``).
        roots: dataset folders by key: ``"spair"`` (SPair-71k), ``"spair-u"`` (default: the SPair-71k root,
            where SPair-U's Extra* annotation folders are extracted), ``"ap10k"``, ``"pf-pascal"``.
        matcher: the matcher preset (``"geoaware"``: window soft-argmax 15×15, β = 0.02, for every model).
        only: evaluate only these labels of :data:`CROSS_BENCHMARK`.
        limit, cache, device, progress: passed to :func:`semcorr_fast.evaluate.evaluate`.
    Returns:
        ``{label: semcorr_fast.evaluate.EvalResult}`` (``.summary["overall"]`` holds ``pck@α/image``).
    Raises:
        KeyError: a needed root is missing (naming the key).
    """
    from ..data import build_dataset
    from ..evaluate import evaluate

    roots = dict(roots)
    if "spair" in roots:
        roots.setdefault("spair-u", roots["spair"])
    labels = [c[0] for c in CROSS_BENCHMARK]
    chosen = labels if only is None else list(only)
    bad = [x for x in chosen if x not in labels]
    if bad:
        raise ValueError(f"evaluate_cross_benchmark: unknown labels {bad}; choose from {labels}")
    out = {}
    for label, name, key, kw in CROSS_BENCHMARK:
        if label not in chosen:
            continue
        if key not in roots:
            raise KeyError(f"evaluate_cross_benchmark: roots[{key!r}] is needed for {label} (the {name} folder)")
        ds = build_dataset(name, root=roots[key], **kw)
        out[label] = evaluate(ds, model, matcher, cache=cache, device=device, limit=limit, progress=progress)
    return out
