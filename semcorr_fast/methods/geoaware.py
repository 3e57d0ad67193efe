"""GeoAware-SC, supervised ("Telling Left from Right", Zhang et al., CVPR 2024), registered "geoaware".

A light **post-processor** on frozen fused SD + DINOv2 features (notes ``seed_geoaware.md`` §4), trained
with keypoint supervision:

* :class:`PostProcessor` (the code's ``AggregationNetwork``, after Diffusion Hyperfeatures): the raw
  3968-channel map is split by source into the groups s3 (640), s4 (1280), s5 (1280) and DINOv2 (768);
  each group goes through its own Detectron2-style ResNet bottleneck block (1×1 → 3×3 → 1×1 convs,
  192 bottleneck channels, GroupNorm(32), no biases, MSRA fill, a projection shortcut where the width
  changes, final ReLU) to 768 channels; the blocks' outputs are mixed with ``softmax(w)`` (w learnable,
  initialised to ones) and L2-normalised per location (ε = 1e-10). In training, element-wise dropout
  (p = 0.2) is applied to the input features. 5,150,212 parameters at the paper's sizes (+1 logit scale;
  the paper's "5M"; the DINOv2 group keeps Detectron2's identity shortcut because 768 = 768).
* **Sparse CLIP loss** (§4.2a): ``A_ij = <F̂s(q_i), F̂t(r_j)>`` over the K mutually visible keypoints
  (their integer cells), ``½[CE(τA, I) + CE(τAᵀ, I)]`` with ``τ = exp(logit_scale)`` learned (init
  ln(1/0.07)).
* **Dense soft-argmax EPE loss** (§4.2b): the keypoint rows' soft-argmax over the whole target map
  with β = 0.02 (:func:`semcorr_fast.ops.soft_argmax`, which streams the target and sends gradients to
  every target cell; no Ns×Nt matrix), flow ``x̂ − q_i`` against the GT flow ``(p_t − p_s)`` in
  continuous grid units plus Gaussian noise ``σ = gt_noise·T/2`` (T = the threshold's bbox side in grid
  units, ``gt_noise`` = 0.1); the loss is the mean over keypoints of the L2 norm [C] (the paper writes
  a sum). Note the code's mixed convention, kept here: the prediction is relative to the *integer*
  source cell ``q_i = ⌊p_s⌋`` (cell centres at integers) while the GT flow uses continuous coordinates,
  so the target is ``x̂* = q_i + p_t − p_s``.
* **Pose-variant pair augmentation** (§4.2d) with the flipped images' features (computed by the
  backbone again, not flipped maps): *single* (flipped source → target), *double* (flipped source →
  flipped target) and *self* (flipped source → source) flips, keypoints mirrored ``x → W − x`` and
  permuted left/right (``flip_perm``); each adds only a dense term (a CLIP term when ``dense_loss`` is
  off, as in the code) and the per-pair loss is
  ``(L_sparse + L_dense + w_s·L_single + w_d·L_double + w_self·L_self) / (1 + Σ w)`` over the terms
  that have keypoints, weights (1, 1, 0.25). ``flip_aug``:

  - ``"paper"`` (default, the paper's supplementary §A): single, double and self flips;
  - ``"code"``: the released code, where the single-flip branch tests the test-time flag
    ``ADAPT_FLIP`` (False) and is silently off: double and self only, normalised by 2.25;
  - ``"none"``: no augmentation (the Tab. 5 baseline rows).

  Which of "paper"/"code" produced the published 85.6 is not known; "paper" follows the issue.

Batches (:meth:`GeoAwareSC.training_step`) come in two layouts:

* **features** (:class:`semcorr_fast.methods.feature_pairs.FeaturePairs`, read from the evaluation
  layer's :class:`~semcorr_fast.backbones.FeatureCache`): ``src_feat``/``trg_feat``/``src_feat_flip``/
  ``trg_feat_flip`` ``(B, C, h, w)``, keypoints in grid units (see :data:`FEATURE_BATCH_KEYS`);
* **images** (the trainer's ``data.source = "pairs"``): the method runs the frozen backbone on the
  images and their mirrors (``no_grad``), through an optional feature cache (``feature_cache``, keyed
  like the evaluation layer: ``"<image name>@<H>x<W>"`` and ``":flip"``) so each image is encoded once.

Evaluation: :meth:`GeoAwareSC.descriptor` = the post-processed, normalised 768-d map (eval mode: no
dropout); GeoAware-SC evaluates it with the ``"geoaware"`` matcher (window soft-argmax, radius 7).
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import register_method
from .base import Method
from .. import ops

__all__ = ["PostProcessor", "BottleneckBlock", "GeoAwareSC", "infer_feature_dims", "gather_cells", "clip_loss",
           "epe_loss", "dense_rows", "naive_dense_rows", "flip_keypoints", "augmentation_terms", "FLIP_VARIANTS",
           "FEATURE_BATCH_KEYS", "LOGIT_SCALE_INIT"]

#: CLIP's initial logit scale, ln(1/0.07) (τ₀ ≈ 14.29).
LOGIT_SCALE_INIT = math.log(1 / 0.07)

#: flip augmentation variants → the augmented terms they use (the original pair is always used).
FLIP_VARIANTS = {"paper": ("single", "double", "self"), "code": ("double", "self"), "none": ()}

#: keys of the feature batch layout (see :meth:`GeoAwareSC.training_step`).
FEATURE_BATCH_KEYS = ("src_feat", "trg_feat", "src_feat_flip", "trg_feat_flip", "src_kps", "trg_kps", "valid",
                      "flip_perm", "src_flip_width", "trg_flip_width", "thr", "src_thr")


def _err_shape(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__


# ----------------------------------------------------------------------------------------------------------
# the post-processor
# ----------------------------------------------------------------------------------------------------------

class ConvNorm(nn.Conv2d):
    """A bias-free convolution followed by GroupNorm (Detectron2's ``Conv2d(..., norm=GN)``: the norm is
    the ``norm`` attribute, so state-dict keys are ``weight``, ``norm.weight``, ``norm.bias``)."""

    def __init__(self, cin: int, cout: int, kernel: int, groups: int):
        super().__init__(cin, cout, kernel, padding=kernel // 2, bias=False)
        self.norm = nn.GroupNorm(groups, cout)
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")  # c2_msra_fill

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


class BottleneckBlock(nn.Module):
    """Detectron2's ResNet bottleneck block (stride 1, GN): ``relu(conv3(relu(conv2(relu(conv1 x)))) + sc(x))``
    with ``sc`` a 1×1 ConvNorm projection when ``cin != cout``, else the identity.

    ``(B, cin, h, w) → (B, cout, h, w)``, non-negative (final ReLU).
    """

    def __init__(self, cin: int, cout: int, bottleneck: int, groups: int):
        super().__init__()
        self.shortcut = ConvNorm(cin, cout, 1, groups) if cin != cout else None
        self.conv1 = ConvNorm(cin, bottleneck, 1, groups)
        self.conv2 = ConvNorm(bottleneck, bottleneck, 3, groups)
        self.conv3 = ConvNorm(bottleneck, cout, 1, groups)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class PostProcessor(nn.Module):
    """GeoAware-SC's post-processor (the code's ``AggregationNetwork``): one bottleneck block per feature
    group, softmax mixing weights, L2 normalisation, input dropout.

    Args:
        feature_dims: channels of each input group, in the input's channel order (GeoAware-SC:
            s3, s4, s5, DINOv2 = (640, 1280, 1280, 768)).
        out_dim: output channels (768).
        bottleneck: bottleneck channels of every block (default ``out_dim // 4`` = 192).
        dropout: element-wise input dropout probability in training mode (0.2; ``F.dropout``, survivors
            scaled by 1/(1 − p)); never applied in eval mode.
        tiny: small test configuration: GroupNorm with 4 groups instead of 32 (so widths like 32/8 work).
        norm_groups: GroupNorm groups (overrides the default 32, or 4 when ``tiny``); must divide
            ``bottleneck`` and ``out_dim``.
        eps: the normalisation's ε: ``x / (‖x‖ + eps)`` (the code's 1e-10).

    ``forward(feats (B, Σ feature_dims, h, w) float) → (B, out_dim, h, w)`` in the input dtype,
    L2-normalised per location unless ``normalize=False``. Parameter names follow the released code
    (``bottleneck_layers.<l>.0.conv1.weight``, ``mixing_weights``), so its state dicts load.
    """

    def __init__(self, feature_dims: Sequence[int] = (640, 1280, 1280, 768), out_dim: int = 768,
                 bottleneck: Optional[int] = None, dropout: float = 0.2, tiny: bool = False,
                 norm_groups: Optional[int] = None, eps: float = 1e-10):
        super().__init__()
        try:
            dims = tuple(int(c) for c in feature_dims)
        except (TypeError, ValueError):
            raise TypeError(f"PostProcessor: feature_dims must be a sequence of positive ints, got {feature_dims!r}") from None
        if not dims or min(dims) < 1 or any(isinstance(c, bool) for c in feature_dims):
            raise ValueError(f"PostProcessor: feature_dims must be a non-empty sequence of positive ints, got {feature_dims!r}")
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or out_dim < 1:
            raise ValueError(f"PostProcessor: out_dim must be a positive int, got {out_dim!r}")
        bottleneck = out_dim // 4 if bottleneck is None else bottleneck
        if isinstance(bottleneck, bool) or not isinstance(bottleneck, int) or bottleneck < 1:
            raise ValueError(f"PostProcessor: bottleneck must be a positive int, got {bottleneck!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"PostProcessor: dropout must be a float in [0, 1), got {dropout!r}")
        if not isinstance(tiny, bool):
            raise TypeError(f"PostProcessor: tiny must be a bool, got {tiny!r}")
        groups = (4 if tiny else 32) if norm_groups is None else norm_groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"PostProcessor: norm_groups must be a positive int, got {norm_groups!r}")
        for name, ch in (("bottleneck", bottleneck), ("out_dim", out_dim)):
            if ch % groups:
                raise ValueError(f"PostProcessor: {name} ({ch}) must be divisible by the GroupNorm groups ({groups}); "
                                 f"pass norm_groups= (or tiny=True for 4 groups)")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"PostProcessor: eps must be a non-negative float, got {eps!r}")
        self.feature_dims, self.out_dim, self.bottleneck = dims, out_dim, bottleneck
        self.dropout, self.tiny, self.norm_groups, self.eps = float(dropout), tiny, groups, float(eps)
        self.in_dim = sum(dims)
        self.bottleneck_layers = nn.ModuleList(
            [nn.Sequential(BottleneckBlock(c, out_dim, bottleneck, groups)) for c in dims])
        self.mixing_weights = nn.Parameter(torch.ones(len(dims)))

    def extra_repr(self) -> str:
        return (f"feature_dims={self.feature_dims}, out_dim={self.out_dim}, bottleneck={self.bottleneck}, "
                f"dropout={self.dropout}, norm_groups={self.norm_groups}")

    def mixing(self) -> Tensor:
        """The group weights ``softmax(mixing_weights)`` ``(n_groups,)``."""
        return torch.softmax(self.mixing_weights, dim=0)

    def forward(self, feats: Tensor, normalize: bool = True) -> Tensor:
        if not isinstance(feats, Tensor) or feats.dim() != 4 or not feats.is_floating_point() \
                or feats.shape[1] != self.in_dim:
            raise ValueError(f"PostProcessor: feats must be a float (B, {self.in_dim}, h, w) tensor (groups "
                             f"{self.feature_dims}), got {_err_shape(feats)}")
        if self.training and self.dropout > 0:
            feats = F.dropout(feats, p=self.dropout, training=True)
        w = self.mixing()
        out = None
        for l, chunk in enumerate(feats.split(self.feature_dims, dim=1)):
            y = w[l] * self.bottleneck_layers[l](chunk)
            out = y if out is None else out + y
        if normalize:
            out = out / (torch.linalg.vector_norm(out, dim=1, keepdim=True) + self.eps)
        return out


def infer_feature_dims(backbone) -> tuple[int, ...]:
    """The feature groups of a backbone's output channels: SD + DINOv2 fused backbones (``sd_dino``:
    attributes ``sd`` with ``channels``/``order`` and ``dino`` with ``dim``) → the SD maps in the
    backbone's concatenation order (s3, s4, s5) then DINOv2; ``sd15_decoder`` → its three maps; any other
    backbone → one group of ``backbone.dim`` channels."""
    sd = getattr(backbone, "sd", None)
    dino = getattr(backbone, "dino", None)
    if sd is not None and dino is not None and hasattr(sd, "channels") and hasattr(sd, "order"):
        dims = tuple(int(sd.channels[k]) for k in sd.order) + (int(dino.dim),)
    elif hasattr(backbone, "channels") and hasattr(backbone, "order"):
        dims = tuple(int(backbone.channels[k]) for k in backbone.order)
    else:
        dims = (int(backbone.dim),)
    if sum(dims) != int(backbone.dim):
        raise ValueError(f"infer_feature_dims: groups {dims} do not add up to the backbone's {backbone.dim} channels")
    return dims


# ----------------------------------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------------------------------

def _cells(kps: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(…, K, 2) grid coordinates → (integer cells (…, K, 2) float, flat indices (…, K) int64);
    NaN → cell 0."""
    h, w = hw
    k = torch.nan_to_num(kps, nan=0.0)
    cx = k[..., 0].floor().clamp(0, w - 1)
    cy = k[..., 1].floor().clamp(0, h - 1)
    return torch.stack((cx, cy), -1), (cy * w + cx).long()


def gather_cells(desc: Tensor, kps: Tensor) -> Tensor:
    """Descriptors of the cells holding K keypoints: ``desc (B, D, h, w)``, ``kps (B, K, 2)`` continuous grid
    coordinates (x, y) (cell ``⌊x⌋, ⌊y⌋``, clamped; NaN → cell 0) → ``(B, K, D)``."""
    if not isinstance(desc, Tensor) or desc.dim() != 4:
        raise ValueError(f"gather_cells: desc must be a (B, D, h, w) tensor, got {_err_shape(desc)}")
    if not isinstance(kps, Tensor) or kps.dim() != 3 or kps.shape[-1] != 2 or kps.shape[0] != desc.shape[0]:
        raise ValueError(f"gather_cells: kps must be ({desc.shape[0]}, K, 2), got {_err_shape(kps)}")
    B, D, h, w = desc.shape
    _, idx = _cells(kps, (h, w))
    return desc.flatten(2).gather(2, idx[:, None, :].expand(B, D, idx.shape[1])).transpose(1, 2)


def clip_loss(src_desc: Tensor, trg_desc: Tensor, mask: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
    """The sparse symmetric CLIP loss of each pair over its masked keypoints.

    Args:
        src_desc, trg_desc: ``(B, K, D)`` descriptors of the K keypoints (row k of both = keypoint k).
        mask: ``(B, K)`` bool, the keypoints taking part (mutually visible).
        logit_scale: 0-dim; the logits are ``exp(logit_scale)·<src_i, trg_j>``.
    Returns:
        ``(loss (B,), present (B,) bool)``: ``½(mean_i CE(row i) + mean_j CE(column j))`` over the masked
        K'×K' block; 0 where a pair has no keypoint (``present`` False).
    """
    if not (isinstance(src_desc, Tensor) and isinstance(trg_desc, Tensor) and src_desc.dim() == 3
            and src_desc.shape == trg_desc.shape):
        raise ValueError(f"clip_loss: src_desc and trg_desc must be (B, K, D) of the same shape, got "
                         f"{_err_shape(src_desc)} and {_err_shape(trg_desc)}")
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != src_desc.shape[:2]:
        raise ValueError(f"clip_loss: mask must be a bool {tuple(src_desc.shape[:2])} tensor, got {_err_shape(mask)}")
    logits = logit_scale.exp() * (src_desc @ trg_desc.transpose(1, 2)).float()       # (B, K, K)
    pair_mask = mask[:, :, None] & mask[:, None, :]
    neg = torch.finfo(logits.dtype).min
    masked = logits.masked_fill(~pair_mask, neg)
    diag = torch.diagonal(logits, dim1=1, dim2=2)
    row = torch.logsumexp(masked, dim=2) - diag                                       # CE of each row
    col = torch.logsumexp(masked, dim=1) - diag                                       # CE of each column
    n = mask.sum(1)
    denom = n.clamp(min=1).to(logits.dtype)
    loss = 0.5 * ((row * mask).sum(1) + (col * mask).sum(1)) / denom
    return torch.where(n > 0, loss, torch.zeros_like(loss)), n > 0


def dense_rows(queries: Tensor, tgt: Tensor, hw: tuple[int, int], beta: float = 0.02, *,
               backend: str = "auto") -> Tensor:
    """Soft-argmax of K query rows over a whole target map (the fused path): ``queries (P, K, D)``,
    ``tgt (P, N, D)`` (unit-norm rows; cosine = dot), N = h·w → ``(P, K, 2)`` expected (x, y) target
    cells under ``softmax(<q, t>/β)``. Streams the target (:func:`semcorr_fast.ops.soft_argmax`)."""
    return ops.soft_argmax(queries, tgt, beta, hw, normalize=False, backend=backend)


def naive_dense_rows(src_map: Tensor, tgt: Tensor, hw: tuple[int, int], idx: Tensor, beta: float = 0.02) -> Tensor:
    """The released code's way (``Correlation2Displacement``): the full ``(P, N, N)`` similarity of the whole
    source map ``src_map (P, N, D)`` against ``tgt (P, N, D)``, a max-subtracted row softmax with β, the
    expected coordinates of every source row, then the K rows ``idx (P, K)`` → ``(P, K, 2)``. Materialises
    N×N; kept as the oracle and the benchmark's naive formulation."""
    h, w = hw
    s = src_map @ tgt.transpose(1, 2)
    s = s - s.amax(-1, keepdim=True).detach()
    p = torch.softmax(s / beta, dim=-1)
    ys, xs = torch.meshgrid(torch.arange(h, device=tgt.device), torch.arange(w, device=tgt.device), indexing="ij")
    grid = torch.stack((xs.reshape(-1), ys.reshape(-1)), -1).to(p.dtype)
    coords = p @ grid                                                                 # (P, N, 2)
    return coords.gather(1, idx[..., None].expand(*idx.shape, 2))


def epe_loss(pred: Tensor, src_kps: Tensor, trg_kps: Tensor, mask: Tensor, hw: tuple[int, int],
             noise: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """GeoAware-SC's dense EPE of each problem: mean over masked keypoints of
    ``‖(pred − ⌊src⌋) − (trg − src + noise)‖₂`` (flows in grid cells; the prediction relative to the
    integer source cell, the GT flow from continuous coordinates, as the released code).

    Args:
        pred: ``(P, K, 2)`` predicted target cells (x, y) (e.g. :func:`dense_rows`).
        src_kps, trg_kps: ``(P, K, 2)`` continuous grid coordinates (NaN allowed where masked out).
        mask: ``(P, K)`` bool.
        hw: the source grid (for the cell clamp).
        noise: optional ``(P, K, 2)`` Gaussian perturbation of the GT flow.
    Returns:
        ``(loss (P,), present (P,) bool)``; 0 where a problem has no keypoint.
    """
    for name, t in (("pred", pred), ("src_kps", src_kps), ("trg_kps", trg_kps)):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.shape[-1] != 2 or t.shape[:2] != mask.shape:
            raise ValueError(f"epe_loss: {name} must be {tuple(mask.shape) + (2,)}, got {_err_shape(t)}")
    cell, _ = _cells(src_kps, hw)
    s = torch.nan_to_num(src_kps.float(), nan=0.0)
    t = torch.nan_to_num(trg_kps.float(), nan=0.0)
    gt = t - s
    if noise is not None:
        gt = gt + noise
    diff = (pred.float() - cell) - gt
    diff = torch.where(mask[..., None], diff, torch.zeros_like(diff))
    err = torch.linalg.vector_norm(diff, dim=-1)
    n = mask.sum(1)
    loss = (err * mask).sum(1) / n.clamp(min=1).to(err.dtype)
    return loss, n > 0


# ----------------------------------------------------------------------------------------------------------
# flip augmentation
# ----------------------------------------------------------------------------------------------------------

def flip_keypoints(kps: Tensor, vis: Tensor, perm: Tensor, width) -> tuple[Tensor, Tensor]:
    """Keypoints of the horizontally mirrored image: part i sits at the mirror of part ``perm[i]``.

    Args:
        kps: ``(B, K, 2)`` (x, y), any units; vis: ``(B, K)`` bool (visible in that image).
        perm: ``(B, K)`` int64 left/right permutation (GeoAware-SC's flip list; an involution).
        width: ``(B,)`` tensor or float: the mirror is ``x' = width − x`` (GeoAware-SC's ``img_size − x``;
            in grid units of a map covering the whole canvas, ``width`` = the grid width).
    Returns:
        ``(kps_f (B, K, 2), vis_f (B, K))`` with ``kps_f[b, i] = (width − x[b, π(i)], y[b, π(i)])`` and
        ``vis_f[b, i] = vis[b, π(i)]``.
    """
    if not isinstance(kps, Tensor) or kps.dim() != 3 or kps.shape[-1] != 2:
        raise ValueError(f"flip_keypoints: kps must be (B, K, 2), got {_err_shape(kps)}")
    if not isinstance(vis, Tensor) or vis.dtype != torch.bool or vis.shape != kps.shape[:2]:
        raise ValueError(f"flip_keypoints: vis must be a bool {tuple(kps.shape[:2])} tensor, got {_err_shape(vis)}")
    if not isinstance(perm, Tensor) or perm.dtype != torch.int64 or perm.shape != kps.shape[:2]:
        raise ValueError(f"flip_keypoints: perm must be an int64 {tuple(kps.shape[:2])} tensor, got {_err_shape(perm)}")
    K = kps.shape[1]
    if ((perm < 0) | (perm >= K)).any():
        raise ValueError(f"flip_keypoints: perm entries must lie in [0, {K}), got min {int(perm.min())}, "
                         f"max {int(perm.max())}")
    width = torch.as_tensor(width, dtype=kps.dtype, device=kps.device)
    width = width.reshape(-1, 1) if width.dim() else width
    p = kps.gather(1, perm[..., None].expand(*perm.shape, 2))
    return torch.stack((width - p[..., 0], p[..., 1]), -1), vis.gather(1, perm)


def augmentation_terms(variant: str, weights: Sequence[float] = (1.0, 1.0, 0.25)) -> dict[str, float]:
    """The augmented terms of a flip variant and their weights: ``"paper"`` → single, double, self;
    ``"code"`` → double, self (single flip silently off in the released code); ``"none"`` → none.
    ``weights`` = (single, double, self)."""
    if variant not in FLIP_VARIANTS:
        raise ValueError(f"augmentation_terms: flip_aug must be one of {sorted(FLIP_VARIANTS)}, got {variant!r}")
    w = dict(zip(("single", "double", "self"), (float(x) for x in weights)))
    return {t: w[t] for t in FLIP_VARIANTS[variant] if w[t] > 0}


# ----------------------------------------------------------------------------------------------------------
# the method
# ----------------------------------------------------------------------------------------------------------

def _image_key(name: str, hw) -> str:
    return f"{name}@{int(hw[0])}x{int(hw[1])}"


@register_method("geoaware")
class GeoAwareSC(Method):
    """GeoAware-SC's supervised post-processor on frozen fused features (see the module docstring).

    Args:
        backbone: a :mod:`semcorr_fast.backbones` model; GeoAware-SC uses ``sd_dino`` with
            ``mode="raw"`` (the zero-shot per-half normalisation is refused: the post-processor takes the
            raw concatenation).
        feature_dims: the post-processor's input groups (default :func:`infer_feature_dims`).
        out_dim, bottleneck, dropout, tiny, norm_groups: :class:`PostProcessor` options (768, 192, 0.2).
        sparse_loss: use the CLIP term on the original pair (True; the "SD+DINO (S)" baseline uses it alone).
        dense_loss: use the soft-argmax EPE terms (True).
        beta: soft-argmax temperature β (0.02; logits = cos/β).
        gt_noise: GT perturbation factor (0.1): σ = gt_noise·T/2, T the threshold base in grid units
            (the target's bbox side; the source's for the self flip). 0 disables it.
        flip_aug: ``"paper"`` | ``"code"`` | ``"none"`` (see the module docstring).
        flip_weights: weights of the (single, double, self) flip terms ((1, 1, 0.25)).
        logit_scale_init: initial CLIP logit scale (ln(1/0.07)).
        dense_impl: ``"fused"`` (keypoint rows through :func:`semcorr_fast.ops.soft_argmax`) or ``"naive"``
            (the released code's full N×N soft-argmax per augmented pair; for checks and benchmarks).
        backend: the ops backend (``"auto"``).
        feature_cache: a folder: image batches read/write the backbone's features there (a
            :class:`~semcorr_fast.backbones.FeatureCache` keyed like the evaluation layer), so each
            training image and its mirror are encoded once.
        init_checkpoint: start from a checkpoint: a ``semcorr_fast.train`` ``last.pt``/``best.pt`` of this
            method (e.g. the AP-10K pre-training) or a released GeoAware-SC ``.PTH`` state dict.
    """

    def __init__(self, backbone: nn.Module, *, feature_dims: Optional[Sequence[int]] = None, out_dim: int = 768,
                 bottleneck: Optional[int] = None, dropout: float = 0.2, tiny: bool = False,
                 norm_groups: Optional[int] = None, sparse_loss: bool = True, dense_loss: bool = True,
                 beta: float = 0.02, gt_noise: float = 0.1, flip_aug: str = "paper",
                 flip_weights: Sequence[float] = (1.0, 1.0, 0.25), logit_scale_init: float = LOGIT_SCALE_INIT,
                 dense_impl: str = "fused", backend: str = "auto", feature_cache: Optional[str] = None,
                 init_checkpoint: Optional[str] = None):
        super().__init__(backbone)
        if getattr(backbone, "mode", None) == "zero_shot":
            raise ValueError("geoaware: the sd_dino backbone must run with mode='raw' (backbone_args.mode = \"raw\"): "
                             "the post-processor takes the unnormalised 3968-channel concatenation")
        for name, v in (("sparse_loss", sparse_loss), ("dense_loss", dense_loss)):
            if not isinstance(v, bool):
                raise TypeError(f"geoaware: {name} must be a bool, got {v!r}")
        if not (sparse_loss or dense_loss):
            raise ValueError("geoaware: at least one of sparse_loss and dense_loss must be True")
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta > 0):
            raise ValueError(f"geoaware: beta must be a positive float, got {beta!r}")
        if not (isinstance(gt_noise, (int, float)) and not isinstance(gt_noise, bool) and gt_noise >= 0):
            raise ValueError(f"geoaware: gt_noise must be a float >= 0, got {gt_noise!r}")
        if dense_impl not in ("fused", "naive"):
            raise ValueError(f"geoaware: dense_impl must be 'fused' or 'naive', got {dense_impl!r}")
        if (not isinstance(flip_weights, (list, tuple)) or len(flip_weights) != 3
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in flip_weights)):
            raise ValueError(f"geoaware: flip_weights must be [single, double, self] non-negative numbers, got "
                             f"{flip_weights!r}")
        self.terms = augmentation_terms(flip_aug, flip_weights)
        dims = infer_feature_dims(backbone) if feature_dims is None else tuple(int(c) for c in feature_dims)
        if sum(dims) != int(backbone.dim):
            raise ValueError(f"geoaware: feature_dims {dims} must add up to the backbone's {backbone.dim} channels")
        self.post = PostProcessor(dims, out_dim, bottleneck, dropout, tiny, norm_groups)
        # the CLIP logit scale; it is only trained when a CLIP term exists (DDP needs every parameter used)
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)),
                                        requires_grad=bool(sparse_loss or not dense_loss))
        self.dim = int(out_dim)
        self.sparse_loss, self.dense_loss = sparse_loss, dense_loss
        self.beta, self.gt_noise, self.flip_aug = float(beta), float(gt_noise), flip_aug
        self.dense_impl, self.backend = dense_impl, backend
        self.feature_cache = None
        if feature_cache is not None:
            from ..backbones.cache import FeatureCache
            self.feature_cache = FeatureCache(os.fspath(feature_cache), backbone.name, backbone.canvas)
        if init_checkpoint is not None:
            self.load_init(init_checkpoint)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", flip_aug={self.flip_aug!r}, terms={self.terms}, sparse={self.sparse_loss}, "
                f"dense={self.dense_loss}, beta={self.beta}, gt_noise={self.gt_noise}, dense_impl={self.dense_impl!r}")

    # ------------------------------------------------------------------ weights
    def load_init(self, path: str) -> None:
        """Load post-processor (+ logit scale) weights from a training checkpoint of this method or from a
        released GeoAware-SC state dict (``bottleneck_layers.*``, ``mixing_weights``, ``logit_scale``;
        ``self_logit_scale`` is ignored). Errors name the file and the mismatching keys."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found (expected a geoaware training checkpoint or a GeoAware-SC "
                                    f"post-processor state dict, geoaware init_checkpoint)")
        try:
            ck = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable checkpoint ({exc})") from exc
        if not isinstance(ck, dict):
            raise ValueError(f"{path}: expected a dict checkpoint, got {type(ck).__name__}")
        if "format" in ck and "model" in ck:
            state = {k: v for k, v in ck["model"].items() if k.startswith("post.") or k == "logit_scale"}
        else:
            state = {("post." + k if not k.startswith(("post.", "logit_scale")) else k): v for k, v in ck.items()
                     if k != "self_logit_scale"}
        own = {k for k in self.state_dict() if k.startswith("post.") or k == "logit_scale"}
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            raise KeyError(f"{path}: checkpoint does not match the post-processor (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
        self.load_state_dict(state, strict=False)

    # ------------------------------------------------------------------ descriptors
    def descriptor_from_features(self, feats: Tensor) -> Tensor:
        """Backbone features ``(B, C, h, w)`` → normalised descriptors ``(B, out_dim, h, w)`` (dropout in
        training mode only)."""
        p = self.post.mixing_weights
        return self.post(feats.to(device=p.device, dtype=p.dtype))

    def descriptor(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] on the backbone canvas → ``(B, out_dim, h, w)`` unit descriptors."""
        with torch.no_grad():
            feats = self.backbone(images)
        return self.descriptor_from_features(feats)

    # ------------------------------------------------------------------ batches
    def _backbone_features(self, images: Tensor, names) -> Tensor:
        """Frozen backbone features of dataset-canvas images (through the feature cache when named)."""
        from ..evaluate import backbone_input

        cache = self.feature_cache if names is not None else None
        out: list = [None] * images.shape[0]
        todo = []
        for i in range(images.shape[0]):
            if cache is not None and cache.has(names[i]):
                out[i] = cache.get(names[i])
            else:
                todo.append(i)
        if todo:
            inp = torch.stack([backbone_input(images[i], self.backbone.canvas)[0] for i in todo])
            with torch.no_grad():
                f = self.backbone(inp).float()
            for j, i in enumerate(todo):
                out[i] = f[j]
                if cache is not None:  # use what later epochs will read back (the cache's dtype)
                    cache.put(names[i], f[j])
                    out[i] = f[j].to(cache.dtype).float()
        dev = self.logit_scale.device
        return torch.stack([o.to(device=dev, dtype=torch.float32) for o in out])

    def features_from_images(self, batch: dict) -> dict:
        """An image batch (the trainer's ``pairs`` source: ``src``/``trg`` images on the dataset canvas,
        keypoints and thresholds in canvas pixels, ``flip_perm``, optional ``src_name``/``trg_name``) →
        the feature layout (:data:`FEATURE_BATCH_KEYS`): backbone features of the images and of their
        mirrors, keypoints and thresholds in grid units."""
        from ..backbones.cache import flip_key
        from ..evaluate import backbone_input

        for k in ("src", "trg", "src_kps", "trg_kps", "valid", "thr"):
            if k not in batch:
                raise KeyError(f"geoaware: an image batch needs {k!r} (got keys {sorted(batch)})")
        src, trg = batch["src"], batch["trg"]
        if not (isinstance(src, Tensor) and src.dim() == 4 and src.shape == trg.shape):
            raise ValueError(f"geoaware: batch['src'] and batch['trg'] must be (B, 3, H, W) of one shape, got "
                             f"{_err_shape(src)} and {_err_shape(trg)}")
        B, _, H, W = src.shape
        hw = (H, W)
        names = {}
        for side in ("src", "trg"):
            n = batch.get(f"{side}_name")
            names[side] = None if n is None else [_image_key(x, hw) for x in n]
        need_flip = bool(self.terms)
        out = {}
        for side, imgs in (("src", src), ("trg", trg)):
            out[f"{side}_feat"] = self._backbone_features(imgs, names[side])
            if need_flip:
                fn = None if names[side] is None else [flip_key(k) for k in names[side]]
                out[f"{side}_feat_flip"] = self._backbone_features(imgs.flip(-1), fn)
        h, w = out["src_feat"].shape[-2:]
        x0, y0, x1, y1 = backbone_input(src[0], self.backbone.canvas)[1]
        sx, sy = w / (x1 - x0), h / (y1 - y0)
        dev = out["src_feat"].device

        def grid(p):
            p = p.to(dev).float()
            return torch.stack(((p[..., 0] - x0) * sx, (p[..., 1] - y0) * sy), -1)

        thr = batch["thr"].to(dev).float()
        src_thr = batch.get("src_thr")
        src_thr = thr if src_thr is None else torch.where(torch.isfinite(src_thr.to(dev)), src_thr.to(dev).float(), thr)
        perm = batch.get("flip_perm")
        K = batch["src_kps"].shape[1]
        perm = torch.full((B, K), -1, dtype=torch.int64, device=dev) if perm is None else perm.to(dev)
        fw = torch.full((B,), (W - 2 * x0) * sx, device=dev)
        out.update(src_kps=grid(batch["src_kps"]), trg_kps=grid(batch["trg_kps"]), valid=batch["valid"].to(dev),
                   flip_perm=perm, src_flip_width=fw, trg_flip_width=fw.clone(), thr=thr * sx, src_thr=src_thr * sx)
        return out

    def _check_feature_batch(self, batch: dict) -> None:
        need = ["src_feat", "trg_feat", "src_kps", "trg_kps", "valid", "thr"]
        if self.terms:
            need += ["src_feat_flip", "trg_feat_flip", "flip_perm", "src_flip_width", "trg_flip_width"]
        if "self" in self.terms:
            need += ["src_thr"]
        missing = [k for k in need if k not in batch]
        if missing:
            raise KeyError(f"geoaware: the feature batch lacks {missing} (flip_aug={self.flip_aug!r}; keys present: "
                           f"{sorted(k for k in batch if isinstance(k, str))})")
        f = batch["src_feat"]
        if not (isinstance(f, Tensor) and f.dim() == 4):
            raise ValueError(f"geoaware: batch['src_feat'] must be (B, C, h, w), got {_err_shape(f)}")
        B, _, h, w = f.shape
        for k in ("trg_feat", "src_feat_flip", "trg_feat_flip"):
            if k in need and (not isinstance(batch[k], Tensor) or batch[k].shape != f.shape):
                raise ValueError(f"geoaware: batch[{k!r}] must have the shape of src_feat {tuple(f.shape)}, got "
                                 f"{_err_shape(batch[k])}")
        K = batch["src_kps"].shape[1] if isinstance(batch["src_kps"], Tensor) and batch["src_kps"].dim() == 3 else -1
        for k, shape in (("src_kps", (B, K, 2)), ("trg_kps", (B, K, 2)), ("valid", (B, K)), ("thr", (B,))):
            t = batch[k]
            if not isinstance(t, Tensor) or tuple(t.shape) != shape:
                raise ValueError(f"geoaware: batch[{k!r}] must have shape {shape}, got {_err_shape(t)}")
        if batch["valid"].dtype != torch.bool:
            raise ValueError(f"geoaware: batch['valid'] must be bool, got {batch['valid'].dtype}")

    # ------------------------------------------------------------------ losses
    def _noise(self, shape, sigma: Tensor, generator) -> Optional[Tensor]:
        if self.gt_noise <= 0:
            return None
        z = torch.randn(shape, generator=generator, dtype=torch.float32)
        return z.to(sigma.device) * sigma.float().reshape(-1, 1, 1)

    def loss_terms(self, batch: dict, generator: Optional[torch.Generator] = None) -> dict:
        """Every loss term of a feature batch, per pair.

        Args:
            batch: the feature layout (:data:`FEATURE_BATCH_KEYS`; :meth:`features_from_images` converts
                image batches).
            generator: CPU generator for the GT noise (None: the global RNG).
        Returns:
            ``{term: (loss (B,), present (B,) bool)}`` for ``"sparse"`` (CLIP, original pair), ``"dense"``
            (EPE, original pair) and each enabled flip term (``"single"``, ``"double"``, ``"self"``).
        """
        self._check_feature_batch(batch)
        flips = dict(self.terms)
        A, Bm = batch["src_feat"], batch["trg_feat"]
        B, _, h, w = A.shape
        hw = (h, w)
        dev = self.logit_scale.device
        gA, gB = batch["src_kps"].to(dev).float(), batch["trg_kps"].to(dev).float()
        valid = batch["valid"].to(dev)
        visA, visB = torch.isfinite(gA).all(-1), torch.isfinite(gB).all(-1)
        valid = valid & visA & visB
        thrB = batch["thr"].to(dev).float()
        maps = [A, Bm]
        if flips:
            perm = batch["flip_perm"].to(dev)
            has_flip = (perm >= 0).all(1)
            perm = torch.where(has_flip[:, None], perm, torch.arange(perm.shape[1], device=dev).expand_as(perm))
            gAf, visAf = flip_keypoints(gA, visA, perm, batch["src_flip_width"].to(dev).float())
            gBf, visBf = flip_keypoints(gB, visB, perm, batch["trg_flip_width"].to(dev).float())
            visAf, visBf = visAf & has_flip[:, None], visBf & has_flip[:, None]
            maps += [batch["src_feat_flip"], batch["trg_feat_flip"]]
        desc = self.descriptor_from_features(torch.cat(maps, 0))
        d = dict(zip(("A", "B", "Af", "Bf"), desc.split(B, 0)))

        out = {}
        # (name, query map, query kps, target map, target kps, mask, threshold)
        problems = [("dense", "A", gA, "B", gB, valid, thrB)]
        if "single" in flips:
            problems.append(("single", "Af", gAf, "B", gB, visAf & visB, thrB))
        if "double" in flips:
            problems.append(("double", "Af", gAf, "Bf", gBf, visAf & visBf, thrB))
        if "self" in flips:
            thrA = batch["src_thr"].to(dev).float()
            problems.append(("self", "Af", gAf, "A", gA, visAf & visA, torch.where(torch.isfinite(thrA), thrA, thrB)))
        if self.sparse_loss or not self.dense_loss:
            qs, qt = gather_cells(d["A"], gA), gather_cells(d["B"], gB)
            out["sparse"] = clip_loss(qs, qt, valid, self.logit_scale)
        if not self.dense_loss:  # the code's flip terms are CLIP terms without the dense objective
            for name, qm, qk, tm, tk, mask, _ in problems[1:]:
                out[name] = clip_loss(gather_cells(d[qm], qk), gather_cells(d[tm], tk), mask, self.logit_scale)
            return out
        noises = [self._noise((B, gA.shape[1], 2), self.gt_noise * thr / 2, generator) for *_, thr in problems]
        preds = self._predict(d, [(qm, qk, tm) for _, qm, qk, tm, *_ in problems], hw)
        for (name, qm, qk, tm, tk, mask, _), pred, nz in zip(problems, preds, noises):
            out[name] = epe_loss(pred, qk, tk, mask, hw, nz)
        return out

    def _predict(self, d: dict, problems: list, hw) -> list:
        """Soft-argmax predictions of every problem's keypoint rows. Fused: the problems sharing a target
        map are concatenated along K and all groups go through ONE :func:`ops.soft_argmax` call."""
        B = d["A"].shape[0]
        if self.dense_impl == "naive":
            outs = []
            for qm, qk, tm in problems:
                _, idx = _cells(qk, hw)
                outs.append(naive_dense_rows(d[qm].flatten(2).transpose(1, 2), d[tm].flatten(2).transpose(1, 2),
                                             hw, idx, self.beta))
            return outs
        groups: dict[str, list] = {}
        for i, (qm, qk, tm) in enumerate(problems):
            groups.setdefault(tm, []).append(i)
        rows, tgts, spans = [], [], {}
        Kmax = max(sum(problems[i][1].shape[1] for i in g) for g in groups.values())
        for gi, (tm, members) in enumerate(groups.items()):
            q = torch.cat([gather_cells(d[problems[i][0]], problems[i][1]) for i in members], 1)
            off = 0
            for i in members:
                k = problems[i][1].shape[1]
                spans[i] = (gi, off, k)
                off += k
            rows.append(F.pad(q, (0, 0, 0, Kmax - q.shape[1])))
            tgts.append(d[tm].flatten(2).transpose(1, 2))
        pred = dense_rows(torch.cat(rows, 0), torch.cat(tgts, 0).contiguous(), hw, self.beta, backend=self.backend)
        return [pred[g * B:(g + 1) * B, off:off + k] for g, off, k in (spans[i] for i in range(len(problems)))]

    def combine(self, terms: dict) -> tuple[Tensor, dict]:
        """Per-pair weighted mean of the terms → (batch loss, logged means). The original pair's term is
        ``sparse + dense`` with weight 1; flip terms have their weights; terms without keypoints are
        left out of the numerator and the denominator; pairs with no term at all are left out."""
        ref = next(iter(terms.values()))[0]
        num = torch.zeros_like(ref)
        den = torch.zeros_like(ref)
        orig_present = torch.zeros_like(ref, dtype=torch.bool)
        orig = torch.zeros_like(ref)
        for name in ("sparse", "dense"):
            if name in terms:
                loss, present = terms[name]
                orig = orig + torch.where(present, loss, torch.zeros_like(loss))
                orig_present = orig_present | present
        num = num + torch.where(orig_present, orig, torch.zeros_like(orig))
        den = den + orig_present.to(den.dtype)
        for name, wt in self.terms.items():
            loss, present = terms[name]
            num = num + wt * torch.where(present, loss, torch.zeros_like(loss))
            den = den + wt * present.to(den.dtype)
        any_term = den > 0
        per_pair = num / den.clamp(min=1e-12)
        if any_term.any():
            loss = per_pair[any_term].mean()
        else:  # no keypoint anywhere: a differentiable zero
            loss = sum(p.sum() for p in self.post.parameters()) * 0.0 + self.logit_scale * 0.0
        logs = {}
        for name, (l, present) in terms.items():
            logs[name] = l[present].mean().detach() if present.any() else l.new_zeros(())
        return loss, logs

    def training_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        """One step's losses on a feature batch or an image batch (see the module docstring).

        Feature layout (``(B, …)``, grid units = cells of the ``h×w`` feature map, x right, y down, the
        cell ``(i, j)`` spanning ``[i, i+1)``): ``src_feat``/``trg_feat``/``src_feat_flip``/``trg_feat_flip``
        ``(B, C, h, w)`` float (the flipped images' backbone features); ``src_kps``/``trg_kps`` ``(B, K, 2)``
        (NaN where not visible in that image); ``valid`` ``(B, K)`` bool (mutually visible);
        ``flip_perm`` ``(B, K)`` int64 (rows of -1: no flip for that pair); ``src_flip_width``/
        ``trg_flip_width`` ``(B,)`` (the mirror of x is ``width − x``); ``thr``/``src_thr`` ``(B,)`` the
        target/source threshold bases in grid units; ``generator`` optional.

        Returns ``{"loss", "sparse", "dense", <flip terms>, "logit_scale"}`` (term means over the pairs
        that have them; 0 otherwise).
        """
        if "src_feat" not in batch:
            feats = self.features_from_images(batch)
        else:
            feats = batch
        terms = self.loss_terms(feats, batch.get("generator"))
        loss, logs = self.combine(terms)
        return {"loss": loss, **logs, "logit_scale": self.logit_scale.detach().exp()}
