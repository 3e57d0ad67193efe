"""Evaluation runner: a dataset of pairs, a backbone, a matcher → per-pair predictions and PCK tables.

``evaluate(dataset, backbone, matcher)`` runs the protocol pair by pair:

1. features of the source and the target image (from the on-disk cache when given one), computed on the
   backbone's canvas from the dataset's canvas image (see :func:`backbone_input`), so a feature map
   covers a known rectangle (``frame``) of the dataset canvas;
2. the K keypoint rows matched by :func:`semcorr_fast.matching.match_keypoints` (or
   :func:`~semcorr_fast.matching.pose_align` with test-time pose alignment);
3. PCK / PCK† / error breakdown per category and overall (:mod:`semcorr_fast.metrics`).

Under ``torchrun`` (torch.distributed initialised), pairs are sharded by rank (``i ≡ rank mod world``),
each rank extracts only its own pairs' features, and the records are gathered on every rank, so the
result equals the single-process one.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from . import matching
from .data.base import Pair, PairDataset

#: PCK thresholds reported by each protocol (PF-PASCAL uses 0.05/0.1/0.15; everyone else 0.01/0.05/0.1).
DEFAULT_ALPHAS = {"pf-pascal": (0.05, 0.1, 0.15)}


def alphas_for(dataset_name: str) -> tuple[float, ...]:
    return DEFAULT_ALPHAS.get(dataset_name, (0.01, 0.05, 0.1))


def backbone_input(image: Tensor, canvas) -> tuple[Tensor, tuple[float, float, float, float]]:
    """A dataset-canvas image (3, H, W) → (the backbone's input image, the frame its feature map covers).

    The backbone's :class:`~semcorr_fast.data.canvas.Canvas` decides: ``resize`` squashes to its size;
    ``pad_square(S)`` pads a non-square image centred to a square (the frame then extends past the
    image by the padding) and resizes to S; ``max_side``/``identity`` keep the image. The frame is in
    dataset-canvas pixels.
    """
    _, H, W = image.shape
    frame = (0.0, 0.0, float(W), float(H))
    kind = getattr(canvas, "kind", "identity")
    if kind == "resize":
        h, w = canvas.size
        if (h, w) != (H, W):
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0]
        return image, frame
    if kind == "pad_square":
        S = canvas.size
        if H != W:
            L = max(H, W)
            ox, oy = (L - W) // 2, (L - H) // 2
            padded = image.new_zeros(3, L, L)
            padded[:, oy:oy + H, ox:ox + W] = image
            image, frame = padded, (-float(ox), -float(oy), float(L - ox), float(L - oy))
        if image.shape[-1] != S:
            image = F.interpolate(image[None], size=(S, S), mode="bilinear", align_corners=False, antialias=True)[0]
        return image, frame
    if kind == "max_side":
        S = canvas.size
        if max(H, W) != S:
            r = S / max(H, W)
            image = F.interpolate(image[None], size=(max(1, round(H * r)), max(1, round(W * r))), mode="bilinear",
                                  align_corners=False, antialias=True)[0]
        return image, frame
    return image, frame


class FeatureSource:
    """Features of dataset-canvas images by key, through an optional on-disk cache.

    ``get(image, key) -> (feat (C, h, w) float32, frame)``; the key should name the image and its canvas
    (the runner uses ``f"{name}@{H}x{W}"``, with ``":flip"``/``":rot90"`` for re-encoded poses).
    """

    def __init__(self, backbone, cache=None, device: str | torch.device = "cpu"):
        self.backbone = backbone
        self.cache = cache
        self.device = torch.device(device)
        self.computed = 0

    @torch.no_grad()
    def get(self, image: Tensor, key: str) -> tuple[Tensor, tuple[float, float, float, float]]:
        inp, frame = backbone_input(image, self.backbone.canvas)
        if self.cache is not None and self.cache.has(key):
            return self.cache.get(key).float(), frame
        feat = self.backbone(inp[None].to(self.device))[0].float().cpu()
        self.computed += 1
        if self.cache is not None:
            self.cache.put(key, feat)
        return feat, frame


@dataclass
class PairRecord:
    """One evaluated pair: everything the metrics need, and what the plots show."""

    index: int
    pair_id: str
    category: str
    pred: Tensor          # (K, 2) canvas pixels
    gt: Tensor            # (K, 2)
    src_kps: Tensor       # (K, 2)
    valid: Tensor         # (K,) bool
    thr: float
    pose: str = "identity"
    flip_perm: Tensor | None = None
    src_vis: Tensor | None = None  # (K,) bool: annotated in the source (finite keypoint)
    trg_vis: Tensor | None = None  # (K,) bool: annotated in the target


@dataclass
class EvalResult:
    records: list[PairRecord]
    summary: dict
    seconds: float
    info: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"summary": self.summary, "info": self.info, "seconds": self.seconds,
                "pairs": [{"index": r.index, "pair_id": r.pair_id, "category": r.category, "pose": r.pose,
                           "thr": r.thr, "pred": _nan_list(r.pred), "gt": r.gt.tolist(),
                           "valid": r.valid.tolist()} for r in self.records]}


def _nan_list(t: Tensor) -> list:
    return [[None if math.isnan(v) else v for v in row] for row in t.tolist()]


def _cell_centres(frame, hw) -> Tensor:
    """(h·w, 2) canvas points (x, y) of the cell centres of an (h, w) map covering ``frame``, row-major."""
    x0, y0, x1, y1 = frame
    h, w = hw
    xs = x0 + (torch.arange(w) + 0.5) * (x1 - x0) / w
    ys = y0 + (torch.arange(h) + 0.5) * (y1 - y0) / h
    return torch.stack((xs.repeat(h), ys.repeat_interleave(w)), -1)


def _to_identity_pose(pts: Tensor, cand: str, canvas_hw) -> Tensor:
    """Canvas points of a candidate pose's image → the same points on the original (identity) image."""
    if cand == "identity":
        return pts
    H, W = canvas_hw
    if cand == "flip":
        return torch.stack((W - pts[:, 0], pts[:, 1]), -1)
    k = int(cand[3:]) // 90 % 4
    rot_hw = (W, H) if k % 2 else (H, W)
    return matching.rotate_query(pts, (4 - k) % 4, rot_hw)


def _object_region(pair: Pair, side: str, mask_dir: str | None):
    """``inside(points (N, 2) canvas) -> (N,) bool``: the object of one image of a pair.

    With ``mask_dir``, an instance mask ``<mask_dir>/<image stem>.png`` (nonzero = object, the original
    image's size; GeoAware-SC's code uses SAM masks prompted by the GT box) is looked up through the
    inverse canvas transform; without one (or when the file is absent), the bbox, else the image content.
    """
    name = pair.src_name if side == "src" else pair.trg_name
    tf = pair.src_tf if side == "src" else pair.trg_tf
    if mask_dir is not None and tf is not None:
        path = os.path.join(mask_dir, os.path.splitext(os.path.basename(name))[0] + ".png")
        if os.path.isfile(path):
            import numpy as np
            from PIL import Image
            with Image.open(path) as im:
                m = torch.from_numpy(np.asarray(im.convert("L")) > 0)
            if tuple(m.shape) != tuple(tf.in_size):
                raise ValueError(f"{path}: mask is {tuple(m.shape)} (H, W) but its image is {tuple(tf.in_size)}")

            def inside_mask(pts):
                o = tf.inverse_points(pts).floor().long()
                ok = (o[:, 0] >= 0) & (o[:, 0] < m.shape[1]) & (o[:, 1] >= 0) & (o[:, 1] < m.shape[0])
                out = torch.zeros(pts.shape[0], dtype=torch.bool)
                out[ok] = m[o[ok, 1], o[ok, 0]]
                return out
            return inside_mask
    bbox = pair.src_bbox if side == "src" else pair.trg_bbox
    if bbox is not None:
        box = [float(v) for v in bbox]
    elif tf is not None:
        box = list(tf.content_box)
    else:
        img = pair.src_image if side == "src" else pair.trg_image
        box = [0.0, 0.0, float(img.shape[-1]), float(img.shape[-2])]

    def inside_box(pts):
        return (pts[:, 0] >= box[0]) & (pts[:, 0] <= box[2]) & (pts[:, 1] >= box[1]) & (pts[:, 1] <= box[3])
    return inside_box


def _grid_mask(inside, frame, hw, cand="identity", canvas_hw=None) -> Tensor:
    """(h, w) bool: cells of a candidate pose's map whose centre lies on the object."""
    pts = _to_identity_pose(_cell_centres(frame, hw), cand, canvas_hw)
    return inside(pts).reshape(hw)


def _pair_aware_predict(model, pair: Pair, device) -> Tensor:
    """Predictions of a model whose query depends on the target (``model.match_points``, e.g. Universal's
    cross-attention adapter): both images to the model's canvas, keypoints mapped there and back."""
    s_in, sf = backbone_input(pair.src_image, model.canvas)
    t_in, tf = backbone_input(pair.trg_image, model.canvas)

    def to_input(xy, frame, img):
        x0, y0, x1, y1 = frame
        return torch.stack(((xy[:, 0] - x0) * img.shape[-1] / (x1 - x0), (xy[:, 1] - y0) * img.shape[-2] / (y1 - y0)), -1)

    q = to_input(pair.src_kps.float(), sf, s_in)
    with torch.no_grad():
        p = model.match_points(s_in[None].to(device), t_in[None].to(device), q[None].to(device))[0].float().cpu()
    x0, y0, x1, y1 = tf
    return torch.stack((x0 + p[:, 0] * (x1 - x0) / t_in.shape[-1], y0 + p[:, 1] * (y1 - y0) / t_in.shape[-2]), -1)


def evaluate_pair(pair: Pair, feats: FeatureSource, matcher, *, pose: str = "none", pose_score: str = "imd",
                  index: int = 0, mask_dir: str | None = None) -> PairRecord:
    """Match one pair's keypoints (see :func:`evaluate` for ``pose``).

    A model with a ``match_points(src_images, trg_images, src_xy)`` method (a pair-aware matcher such as
    Universal's adapter) predicts by itself; ``matcher`` and ``pose`` do not apply to it.
    """
    H, W = pair.src_image.shape[-2:]
    if hasattr(feats.backbone, "match_points"):
        if pose != "none":
            raise ValueError(f"evaluate: pose alignment is not defined for the pair-aware model {feats.backbone.name}")
        pred = _pair_aware_predict(feats.backbone, pair, feats.device)
        return PairRecord(index, pair.pair_id, pair.category, pred, pair.trg_kps.float(), pair.src_kps.float(),
                          pair.valid.clone(), float(pair.thr), "identity", pair.flip_perm,
                          torch.isfinite(pair.src_kps).all(-1), torch.isfinite(pair.trg_kps).all(-1))
    trg_feat, trg_frame = feats.get(pair.trg_image, f"{pair.trg_name}@{pair.trg_image.shape[-2]}x{pair.trg_image.shape[-1]}")
    src_key = f"{pair.src_name}@{H}x{W}"
    src_feat, src_frame = feats.get(pair.src_image, src_key)
    if pose == "none":
        pred = matching.match_keypoints(src_feat, trg_feat, pair.src_kps, matcher, src_frame=src_frame,
                                        trg_frame=trg_frame)
        chosen = "identity"
    else:
        cands = matching.pose_candidates(pair.category, "paper" if pose == "paper" else "code")
        if pair.flip_perm is None:
            cands = [c for c in cands if c != "flip"]
        sfeats, sframes, smasks = {"identity": src_feat}, {"identity": src_frame}, {}
        for c in cands:
            if c == "identity":
                continue
            img = matching.candidate_image(pair.src_image, c)
            sfeats[c], sframes[c] = feats.get(img, f"{src_key}:{c}")
        tmask = None
        if pose_score == "imd":
            s_in = _object_region(pair, "src", mask_dir)
            for c, f in sfeats.items():
                smasks[c] = _grid_mask(s_in, sframes[c], tuple(f.shape[1:]), c, (H, W))
            tmask = _grid_mask(_object_region(pair, "trg", mask_dir), trg_frame, tuple(trg_feat.shape[1:]))
        pred, chosen, _ = matching.pose_align(sfeats, trg_feat, pair.src_kps, pair.valid, matcher, canvas_hw=(H, W),
                                              src_frames=sframes, trg_frame=trg_frame, flip_perm=pair.flip_perm,
                                              src_masks=smasks or None, trg_mask=tmask, score=pose_score)
    return PairRecord(index, pair.pair_id, pair.category, pred.float(), pair.trg_kps.float(), pair.src_kps.float(),
                      pair.valid.clone(), float(pair.thr), chosen, pair.flip_perm,
                      torch.isfinite(pair.src_kps).all(-1), torch.isfinite(pair.trg_kps).all(-1))


def _stack(records: list[PairRecord]):
    """Pad every pair to the largest K (padding is invalid) → pred, gt (P, K, 2), thr (P,), valid (P, K)."""
    K = max((r.pred.shape[0] for r in records), default=0)
    P = len(records)
    pred = torch.full((P, K, 2), float("nan"))
    gt = torch.zeros(P, K, 2)
    valid = torch.zeros(P, K, dtype=torch.bool)
    for i, r in enumerate(records):
        k = r.pred.shape[0]
        pred[i, :k], gt[i, :k], valid[i, :k] = r.pred, r.gt, r.valid
    thr = torch.tensor([r.thr for r in records], dtype=torch.float32)
    return pred, gt, thr, valid


def summarize_records(records: list[PairRecord], alphas, *, dagger: bool = True, geo_dataset: str | None = None) -> dict:
    """Per-category and overall PCK (per image and per point) of evaluated pairs; PCK† when ``dagger``;
    the geometry-aware subset's numbers when ``geo_dataset`` names a dataset with part groups."""
    from . import metrics

    pred, gt, thr, valid = _stack(records)
    cats = [r.category for r in records]
    geo = None
    if geo_dataset is not None:
        rows = []
        for r in records:
            # the rule needs each image's own visibility (e.g. >= 2 group members visible in the target)
            vs = r.src_vis if r.src_vis is not None else r.valid
            vt = r.trg_vis if r.trg_vis is not None else r.valid
            m = metrics.geoaware_subset(r.category, vs, vt, dataset=geo_dataset) & r.valid
            rows.append(F.pad(m, (0, valid.shape[1] - m.shape[0])))
        geo = torch.stack(rows) if rows else None
    return metrics.summarize(pred, gt, thr, valid, cats, alphas=tuple(alphas), dagger=dagger, geo_mask=geo)


def _dist():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def evaluate(dataset: PairDataset, backbone, matcher="geoaware", *, pose: str = "none", pose_score: str = "imd",
             cache=None, device="cpu", limit: int | None = None, alphas=None, dagger: bool = True,
             geo_dataset: str | None = None, progress: bool = True, mask_dir: str | None = None) -> EvalResult:
    """Evaluate a backbone + matcher on a dataset.

    Args:
        dataset: a :class:`~semcorr_fast.data.base.PairDataset` (its canvas is the evaluation frame).
        backbone: a :mod:`semcorr_fast.backbones` model (``canvas``, ``forward(images) -> (B, C, h, w)``).
        matcher: a :class:`~semcorr_fast.matching.Matcher` or a preset name.
        pose: "none"; "code" (identity vs flip, GeoAware-SC's released code); "paper" (also ±90°/180°
            rotations for bottles).
        pose_score: "imd" (instance matching distance inside the instance masks) or "mutual_nn".
        mask_dir: instance masks for the IMD, one ``<image stem>.png`` per image (nonzero = object;
            GeoAware-SC's code uses SAM prompted by the GT box); where absent, the bbox stands in.
        cache: a feature cache with ``has/get/put`` (``semcorr_fast.backbones.cache.FeatureCache``).
        limit: evaluate only the first ``limit`` pairs.
    Returns:
        :class:`EvalResult` (records sorted by pair index, the summary dict of :func:`summarize_records`).
    """
    from tqdm.auto import tqdm

    if pose not in ("none", "code", "paper"):
        raise ValueError(f"evaluate: pose must be 'none', 'code' or 'paper', got {pose!r}")
    dist, rank, world = _dist()
    n = len(dataset) if limit is None else min(limit, len(dataset))
    mine = range(rank, n, world)
    feats = FeatureSource(backbone, cache, device)
    t0 = time.perf_counter()
    records = []
    for i in tqdm(mine, disable=not progress or rank != 0, desc=f"eval {getattr(dataset, 'name', '')}"):
        records.append(evaluate_pair(dataset[i], feats, matcher, pose=pose, pose_score=pose_score, index=i,
                                     mask_dir=mask_dir))
    if dist is not None:
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = [r for part in gathered for r in part]
    records.sort(key=lambda r: r.index)
    seconds = time.perf_counter() - t0
    alphas = alphas if alphas is not None else alphas_for(getattr(dataset, "name", ""))
    summary = summarize_records(records, alphas, dagger=dagger, geo_dataset=geo_dataset) if records else {}
    info = {"dataset": getattr(dataset, "name", type(dataset).__name__), "n_pairs": len(records),
            "backbone": getattr(backbone, "name", type(backbone).__name__),
            "matcher": repr(matching.build_matcher(matcher)), "pose": pose, "pose_score": pose_score,
            "world_size": world, "features_computed_rank0": feats.computed}
    return EvalResult(records, summary, seconds, info)


def write_json(result: EvalResult, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result.to_json(), f, indent=1, allow_nan=True)
    os.replace(tmp, path)
