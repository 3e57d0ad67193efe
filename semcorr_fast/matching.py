"""Keypoint matchers: from two feature maps and K source keypoints to K predicted target points.

Only the K keypoint rows are queried (never all Ns rows): their descriptors are sampled from the
source map and streamed against the target map by :mod:`semcorr_fast.ops`, so no Ns×Nt matrix exists.

Frames. Keypoints and predictions are pixels (x, y) of the evaluation canvas (x right, y down). A
feature map ``(C, h, w)`` covers a rectangle of that canvas, ``frame = (x0, y0, x1, y1)`` (the whole
canvas unless the backbone saw a padded copy), split into h×w cells. A point maps to the continuous
grid coordinate ``g = (p − x0)·w/(x1 − x0)`` and to the cell ``⌊g⌋``.

=====================  ==================================================================================
matcher preset         what it does (and whose protocol it is)
=====================  ==================================================================================
``geoaware``           window soft-argmax, radius 7, τ = 0.02 (β), outside = "zero", cell centres:
                       ``x = (x̂ + 0.5)·stride`` — GeoAware-SC's supervised evaluation and Jamais Vu
``geoaware-zeroshot``  hard argmax on the 60×60 grid, cell centres — GeoAware-SC's zero-shot numbers
``demystifying``       features bilinearly resampled to a 128×128 grid (align_corners=False), hard
                       argmax, cell corners: ``x = ⌊j·W/128⌋`` — Demystifying's ``pred_kps``
``soft``               plain soft-argmax over the whole map (τ = 0.02)
``window-exclude``     window soft-argmax with the softmax over the window only (the exact window)
=====================  ==================================================================================

Pose alignment (GeoAware-SC's test-time adaptive pose, :func:`pose_align`): the source is re-encoded
flipped (and, for bottles in the paper, rotated); the candidate with the smallest instance matching
distance (or the mask-free mutual-NN score) is kept, and a flipped candidate queries each keypoint at the
mirrored location of its left/right partner.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

Frame = tuple[float, float, float, float]


@dataclass(frozen=True)
class Matcher:
    """How K source keypoints become K target predictions (see the module docstring for presets).

    kind: "argmax" | "soft" | "window"; grid: resample both maps to this (h, w) grid first (None = the
    native grid); radius, tau, outside: window soft-argmax parameters; to_pixels: "center" (cell centre,
    GeoAware-SC) or "corner" (cell corner, Demystifying); query: "cell" (the descriptor of the cell
    containing the keypoint, every anchor's choice) or "bilinear" (bilinearly sampled at the keypoint).
    """

    kind: str = "window"
    grid: tuple[int, int] | None = None
    radius: int = 7
    tau: float = 0.02
    outside: str = "zero"
    to_pixels: str = "center"
    query: str = "cell"
    backend: str = "auto"

    def __post_init__(self):
        for name, val, choices in (("kind", self.kind, ("argmax", "soft", "window")),
                                   ("outside", self.outside, ("zero", "exclude")),
                                   ("to_pixels", self.to_pixels, ("center", "corner")),
                                   ("query", self.query, ("cell", "bilinear"))):
            if val not in choices:
                raise ValueError(f"Matcher: {name} must be one of {choices}, got {val!r}")
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            raise ValueError(f"Matcher: grid must be (h, w) with h, w >= 1 or None, got {self.grid!r}")


PRESETS = {
    "geoaware": Matcher("window", radius=7, tau=0.02, outside="zero", to_pixels="center"),
    "geoaware-zeroshot": Matcher("argmax", to_pixels="center"),
    "demystifying": Matcher("argmax", grid=(128, 128), to_pixels="corner"),
    "soft": Matcher("soft", tau=0.02, to_pixels="center"),
    "window-exclude": Matcher("window", radius=7, tau=0.02, outside="exclude", to_pixels="center"),
    "argmax": Matcher("argmax", to_pixels="center"),
}


def build_matcher(name: str | Matcher, **overrides) -> Matcher:
    """A preset by name (``PRESETS``), with field overrides, e.g. ``build_matcher("geoaware", radius=5)``."""
    if isinstance(name, Matcher):
        return replace(name, **overrides) if overrides else name
    if name not in PRESETS:
        raise ValueError(f"matcher: unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def _check_map(feat: Tensor, name: str) -> None:
    if not isinstance(feat, Tensor) or feat.dim() != 3 or not feat.is_floating_point():
        got = f"{tuple(feat.shape)} {feat.dtype}" if isinstance(feat, Tensor) else type(feat).__name__
        raise ValueError(f"match_keypoints: {name} must be a float (C, h, w) feature map, got {got}")


def _check_frame(frame, name: str) -> Frame:
    if frame is None or len(frame) != 4 or not (frame[2] > frame[0] and frame[3] > frame[1]):
        raise ValueError(f"match_keypoints: {name} must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0, got {frame!r}")
    return tuple(float(v) for v in frame)


def to_grid(xy: Tensor, frame: Frame, hw: tuple[int, int]) -> Tensor:
    """(K, 2) canvas pixels → continuous grid coordinates of an (h, w) map covering ``frame``."""
    x0, y0, x1, y1 = frame
    h, w = hw
    return torch.stack(((xy[:, 0] - x0) * (w / (x1 - x0)), (xy[:, 1] - y0) * (h / (y1 - y0))), -1)


def from_grid(g: Tensor, frame: Frame, hw: tuple[int, int], to_pixels: str) -> Tensor:
    """(K, 2) grid coordinates (x̂, ŷ) in cell units → canvas pixels, by ``to_pixels``."""
    x0, y0, x1, y1 = frame
    h, w = hw
    sx, sy = (x1 - x0) / w, (y1 - y0) / h
    if to_pixels == "center":
        return torch.stack((x0 + (g[:, 0] + 0.5) * sx, y0 + (g[:, 1] + 0.5) * sy), -1)
    return torch.stack((x0 + torch.floor(g[:, 0] * sx), y0 + torch.floor(g[:, 1] * sy)), -1)


def sample_rows(feat: Tensor, g: Tensor, query: str = "cell", grid: tuple[int, int] | None = None) -> Tensor:
    """Descriptors of K points of a (C, h, w) map: (K, 2) grid coordinates of the ``grid`` (or native) map → (K, C).

    With ``grid`` set, the value equals ``F.interpolate(feat, grid, mode="bilinear", align_corners=False)``
    at the cell (or the point), computed for the K rows only.
    """
    C, h, w = feat.shape
    gh, gw = grid if grid is not None else (h, w)
    if query == "cell":
        cx = g[:, 0].floor().clamp(0, gw - 1)
        cy = g[:, 1].floor().clamp(0, gh - 1)
        if grid is None:
            idx = (cy * w + cx).long()
            return feat.reshape(C, h * w)[:, idx].t()
        px, py = cx + 0.5, cy + 0.5  # cell centre of the resampled grid
    else:
        px, py = g[:, 0].clamp(0, gw), g[:, 1].clamp(0, gh)
    nx = 2 * px / gw - 1
    ny = 2 * py / gh - 1
    pts = torch.stack((nx, ny), -1).to(feat.dtype)[None, None]            # (1, 1, K, 2)
    out = F.grid_sample(feat[None], pts, mode="bilinear", align_corners=False, padding_mode="border")
    return out[0, :, 0].t()


def _target_rows(feat: Tensor, grid: tuple[int, int] | None) -> tuple[Tensor, tuple[int, int]]:
    if grid is not None and tuple(grid) != tuple(feat.shape[1:]):
        feat = F.interpolate(feat[None], size=tuple(grid), mode="bilinear", align_corners=False)[0]
    C, h, w = feat.shape
    return feat.reshape(C, h * w).t().contiguous(), (h, w)


def match_keypoints(src_feat: Tensor, trg_feat: Tensor, src_kps: Tensor, matcher: Matcher | str = "geoaware", *,
                    src_frame: Frame, trg_frame: Frame, trg_mask: Tensor | None = None) -> Tensor:
    """Predict the target location of K source keypoints.

    Args:
        src_feat ``(C, hs, ws)``, trg_feat ``(C, ht, wt)``: feature maps (any float dtype; cosine
            similarity: the rows are L2-normalised inside the op).
        src_kps ``(K, 2)``: source keypoints (x, y) in canvas pixels.
        matcher: a :class:`Matcher` or a preset name.
        src_frame, trg_frame: the canvas rectangle (x0, y0, x1, y1) each map covers.
        trg_mask: optional ``(ht, wt)`` (or matcher grid) bool; only True cells can be chosen (argmax
            matcher only: Demystifying's optional bbox restriction).
    Returns:
        ``(K, 2)`` float32 target predictions (x, y) in canvas pixels. Rows of NaN keypoints are NaN.
    """
    m = build_matcher(matcher)
    _check_map(src_feat, "src_feat")
    _check_map(trg_feat, "trg_feat")
    if src_feat.shape[0] != trg_feat.shape[0]:
        raise ValueError(f"match_keypoints: src_feat and trg_feat must have the same C, got {src_feat.shape[0]} "
                         f"and {trg_feat.shape[0]}")
    if not isinstance(src_kps, Tensor) or src_kps.dim() != 2 or src_kps.shape[1] != 2:
        raise ValueError(f"match_keypoints: src_kps must be (K, 2), got "
                         f"{tuple(src_kps.shape) if isinstance(src_kps, Tensor) else type(src_kps).__name__}")
    sf, tf = _check_frame(src_frame, "src_frame"), _check_frame(trg_frame, "trg_frame")
    K = src_kps.shape[0]
    src_grid = m.grid if m.grid is not None else tuple(src_feat.shape[1:])
    tgt_rows, thw = _target_rows(trg_feat, m.grid)
    nan_rows = ~torch.isfinite(src_kps).all(-1)
    kps = torch.where(nan_rows[:, None], torch.zeros_like(src_kps), src_kps).float()
    q = sample_rows(src_feat, to_grid(kps, sf, src_grid), m.query, m.grid).contiguous()
    if K == 0:
        return src_kps.new_zeros(0, 2, dtype=torch.float32)
    if trg_mask is not None:
        if m.kind != "argmax":
            raise ValueError("match_keypoints: trg_mask is only supported with the argmax matcher")
        if trg_mask.shape != thw or trg_mask.dtype != torch.bool:
            raise ValueError(f"match_keypoints: trg_mask must be a bool {thw} map, got {tuple(trg_mask.shape)} "
                             f"{trg_mask.dtype}")
    if m.kind == "argmax":
        mask = None if trg_mask is None else trg_mask.reshape(1, -1)
        _, idx = ops.match_topk(q[None], tgt_rows[None], 1, tgt_mask=mask, backend=m.backend)
        idx = idx[0, :, 0]
        g = torch.stack(((idx % thw[1]), (idx // thw[1])), -1).float()
        g[idx < 0] = float("nan")
    elif m.kind == "soft":
        g = ops.soft_argmax(q[None], tgt_rows[None], m.tau, thw, backend=m.backend)[0].float()
    else:
        g = ops.window_soft_argmax(q[None], tgt_rows[None], m.tau, thw, m.radius, outside=m.outside,
                                   backend=m.backend)[0].float()
    pred = from_grid(g, tf, thw, m.to_pixels)
    pred[nan_rows] = float("nan")
    return pred


# ----------------------------------------------------------------------------------------------------------
# GeoAware-SC's test-time adaptive pose alignment
# ----------------------------------------------------------------------------------------------------------

def _resize_map(feat: Tensor, size: int) -> Tensor:
    return F.interpolate(feat[None].float(), size=(size, size), mode="bilinear", align_corners=False)[0]


def _resize_mask(mask: Tensor, size: int) -> Tensor:
    return F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0] > 0.5


def pose_score(src_feat: Tensor, trg_feat: Tensor, src_mask: Tensor | None = None, trg_mask: Tensor | None = None,
               *, method: str = "imd", resolution: int = 64, backend: str = "auto") -> float:
    """How well a source candidate matches the target; lower is better.

    ``method="imd"`` (GeoAware-SC ``get_distance``): both maps L2-normalised per cell, bilinearly resized to
    ``resolution``² (no re-normalisation), masks nearest-resized; the mean over source-mask cells of the
    L2 distance to the nearest target-mask cell (``ops.instance_matching_distance``). ``None`` masks mean
    every cell. ``method="mutual_nn"`` (the mask-free ``MUTUAL_NN`` option): mutual nearest neighbours
    of the normalised native maps; the mean distance over the mutual pairs.
    """
    if method not in ("imd", "mutual_nn"):
        raise ValueError(f"pose_score: method must be 'imd' or 'mutual_nn', got {method!r}")
    a = F.normalize(src_feat.float(), dim=0, eps=1e-10)
    b = F.normalize(trg_feat.float(), dim=0, eps=1e-10)
    if method == "imd":
        a, b = _resize_map(a, resolution), _resize_map(b, resolution)
        C = a.shape[0]
        sm = None if src_mask is None else _resize_mask(src_mask, resolution).reshape(1, -1)
        tm = None if trg_mask is None else _resize_mask(trg_mask, resolution).reshape(1, -1)
        d = ops.instance_matching_distance(a.reshape(C, -1).t()[None].contiguous(), b.reshape(C, -1).t()[None].contiguous(),
                                           src_mask=sm, tgt_mask=tm, normalize=False, backend=backend)
        return float(d[0])
    C = a.shape[0]
    ar, br = a.reshape(C, -1).t().contiguous(), b.reshape(C, -1).t().contiguous()
    s2t, _, mutual = ops.mutual_nn(ar[None], br[None], normalize=False, backend=backend)
    rows = mutual[0].nonzero()[:, 0]
    if rows.numel() == 0:
        return float("inf")
    return float((ar[rows] - br[s2t[0, rows]]).norm(dim=-1).mean())


def _partner_ok(valid: Tensor, perm: Tensor) -> Tensor:
    """Keypoints whose flipped prediction may be used: i and its partner π(i) both mutually visible."""
    return valid & valid[perm]


def flip_query(src_kps: Tensor, perm: Tensor, canvas_w: float) -> Tensor:
    """Where keypoint i is queried on the horizontally flipped source: the mirror of its partner π(i).

    ``x' = W − x_{π(i)}`` (GeoAware-SC's ``840 − x``), ``y' = y_{π(i)}``.
    """
    p = src_kps[perm]
    return torch.stack((canvas_w - p[:, 0], p[:, 1]), -1)


def rotate_query(src_kps: Tensor, quarter_turns: int, canvas_hw: tuple[int, int]) -> Tensor:
    """Keypoints on the source rotated by ``quarter_turns``×90° counter-clockwise (``torch.rot90`` on (H, W))."""
    H, W = canvas_hw
    x, y = src_kps[:, 0], src_kps[:, 1]
    k = quarter_turns % 4
    if k == 0:
        return src_kps.clone()
    if k == 1:
        return torch.stack((y, W - x), -1)
    if k == 2:
        return torch.stack((W - x, H - y), -1)
    return torch.stack((H - y, x), -1)


def pose_candidates(category: str, variant: str = "paper") -> list[str]:
    """GeoAware-SC's candidate source poses: identity and flip; the paper adds ±90°/180° rotations for
    bottles (``variant="paper"``), the released code does not (``variant="code"``)."""
    if variant not in ("paper", "code"):
        raise ValueError(f"pose_candidates: variant must be 'paper' or 'code', got {variant!r}")
    cands = ["identity", "flip"]
    if variant == "paper" and category == "bottle":
        cands += ["rot90", "rot180", "rot270"]
    return cands


def candidate_image(image: Tensor, cand: str) -> Tensor:
    """(3, H, W) source image → the candidate pose's image."""
    if cand == "identity":
        return image
    if cand == "flip":
        return image.flip(-1)
    if cand.startswith("rot"):
        return torch.rot90(image, int(cand[3:]) // 90, dims=(-2, -1))
    raise ValueError(f"candidate_image: unknown candidate {cand!r}")


def pose_align(src_feats: dict, trg_feat: Tensor, src_kps: Tensor, valid: Tensor, matcher: Matcher | str, *,
               canvas_hw: tuple[int, int], src_frames: dict, trg_frame: Frame, flip_perm: Tensor | None,
               src_masks: dict | None = None, trg_mask: Tensor | None = None, score: str = "imd",
               backend: str = "auto") -> tuple[Tensor, str, dict]:
    """GeoAware-SC's test-time adaptive pose alignment.

    Args:
        src_feats: candidate name ("identity", "flip", "rot90", ...) → ``(C, h, w)`` features of the
            source re-encoded in that pose (``candidate_image``).
        src_masks: candidate name → instance mask on that candidate's feature grid (or None: IMD over
            every cell; ``score="mutual_nn"`` needs none).
        flip_perm ``(K,)``: the left/right permutation (required when "flip" is a candidate).
        valid ``(K,)``: keypoints visible in both images.
    Returns:
        ``(pred (K, 2), chosen candidate, {candidate: score})``. With "flip" chosen, keypoint i is
        predicted from the mirror of its partner π(i) where i and π(i) are both mutually visible, and from
        the identity pose elsewhere; a rotation replaces every prediction.
    """
    if "identity" not in src_feats:
        raise ValueError("pose_align: src_feats must contain the 'identity' candidate")
    H, W = canvas_hw
    scores = {c: pose_score(f, trg_feat, None if src_masks is None else src_masks.get(c), trg_mask,
                            method=score, backend=backend) for c, f in src_feats.items()}
    best = min(scores, key=lambda c: (scores[c], c != "identity"))
    pred = match_keypoints(src_feats["identity"], trg_feat, src_kps, matcher, src_frame=src_frames["identity"],
                           trg_frame=trg_frame)
    if best == "identity":
        return pred, best, scores
    if best == "flip":
        if flip_perm is None:
            raise ValueError("pose_align: the 'flip' candidate needs flip_perm (the dataset's left/right permutation)")
        q = flip_query(src_kps, flip_perm, W)
        pf = match_keypoints(src_feats["flip"], trg_feat, q, matcher, src_frame=src_frames["flip"], trg_frame=trg_frame)
        use = _partner_ok(valid, flip_perm)
        pred = torch.where(use[:, None], pf, pred)
        return pred, best, scores
    turns = int(best[3:]) // 90
    q = rotate_query(src_kps, turns, canvas_hw)
    pred = match_keypoints(src_feats[best], trg_feat, q, matcher, src_frame=src_frames[best], trg_frame=trg_frame)
    return pred, best, scores
