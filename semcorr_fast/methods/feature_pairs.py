"""Training pairs read from the evaluation layer's feature cache (GeoAware-SC trains on pre-extracted features).

GeoAware-SC extracts the SD + DINOv2 features of every training image and of its horizontal mirror once,
offline, and then trains only the post-processor (notes ``seed_geoaware.md`` §2, §4.3). Here:

1. :func:`fill_cache` runs over a dataset's pairs once: it computes every missing feature map into a
   :class:`~semcorr_fast.backbones.FeatureCache` under the evaluation layer's keys
   (``"<image name>@<H>x<W>"`` of the dataset-canvas image, ``":flip"`` for the mirrored image, re-encoded
   by the backbone exactly as :func:`semcorr_fast.evaluate.evaluate` does for test-time pose alignment),
   and returns the pairs' :class:`FeatureIndex` (keypoints, visibility, thresholds, left/right
   permutation, cache keys and the canvas rectangle each map covers; no images), which
   :meth:`FeatureIndex.save` keeps next to the cache.
2. :class:`FeaturePairs` (a :class:`semcorr_fast.train.data.DatasetPairs`) turns the index and the cache
   into batches (:meth:`FeaturePairs.make_batch`), so :class:`semcorr_fast.train.data.BatchStream` serves
   them with its seeded per-epoch order and rank sharding; no image is decoded while training.

Batch layout (what :meth:`semcorr_fast.methods.geoaware.GeoAwareSC.training_step` reads): ``src_feat``,
``trg_feat``, ``src_feat_flip``, ``trg_feat_flip`` ``(b, C, h, w)`` float32 (flips only with
``flip=True``); ``src_kps``/``trg_kps`` ``(b, K, 2)`` float32 in **grid units** of the feature map
(``g = (p − x0)·w/(x1 − x0)``, :func:`semcorr_fast.matching.to_grid`; NaN where not visible in that
image); ``valid`` ``(b, K)`` bool; ``flip_perm`` ``(b, K)`` int64 (rows of -1 where the dataset has none);
``src_flip_width``/``trg_flip_width`` ``(b,)`` (the grid x of the mirrored image is ``width − x``, exact
for any padding); ``thr``/``src_thr`` ``(b,)`` target/source PCK threshold bases in grid units;
``category``, ``pair_id``, ``src_key``, ``trg_key`` (lists of str) and ``index`` ``(b,)``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

from ..backbones.cache import FeatureCache, flip_key
from ..train.data import DatasetPairs, source_thr

__all__ = ["PairMeta", "FeatureIndex", "FeaturePairs", "fill_cache", "build_feature_source", "image_key",
           "feature_frame", "INDEX_FORMAT"]

INDEX_FORMAT = "semcorr_fast.feature_index/1"


def image_key(name: str, hw) -> str:
    """The evaluation layer's cache key of a dataset-canvas image: ``"<name>@<H>x<W>"``."""
    return f"{name}@{int(hw[0])}x{int(hw[1])}"


def feature_frame(H: int, W: int, canvas) -> tuple[float, float, float, float]:
    """The rectangle ``(x0, y0, x1, y1)`` of an ``H×W`` dataset-canvas image that a backbone on ``canvas``
    sees (equals ``semcorr_fast.evaluate.backbone_input(image, canvas)[1]``, without touching pixels):
    a ``pad_square`` backbone pads a non-square image centred; every other canvas sees the image."""
    if getattr(canvas, "kind", None) == "pad_square" and H != W:
        L = max(H, W)
        ox, oy = (L - W) // 2, (L - H) // 2
        return (-float(ox), -float(oy), float(L - ox), float(L - oy))
    return (0.0, 0.0, float(W), float(H))


@dataclass
class PairMeta:
    """Everything a training batch needs of one pair except its features.

    ``src_kps``/``trg_kps`` ``(K, 2)`` float32 dataset-canvas pixels (NaN where not visible in that
    image), ``valid`` ``(K,)`` bool, ``thr``/``src_thr`` target/source threshold bases (pixels; ``src_thr``
    NaN when unknown), ``flip_perm`` ``(K,)`` int64 or None, ``*_key`` the cache keys, ``*_frame`` the
    rectangles the feature maps cover, ``*_hw`` the dataset-canvas image sizes.
    """

    pair_id: str
    category: str
    src_key: str
    trg_key: str
    src_kps: Tensor
    trg_kps: Tensor
    valid: Tensor
    thr: float
    src_thr: float
    flip_perm: Optional[Tensor]
    src_frame: tuple
    trg_frame: tuple
    src_hw: tuple
    trg_hw: tuple

    @classmethod
    def from_pair(cls, pair, canvas, thr_kind: str = "bbox") -> "PairMeta":
        """From a :class:`semcorr_fast.data.Pair` and the backbone's canvas."""
        shw = tuple(int(s) for s in pair.src_image.shape[-2:])
        thw = tuple(int(s) for s in pair.trg_image.shape[-2:])
        perm = None if pair.flip_perm is None else pair.flip_perm.to(torch.int64).clone()
        return cls(str(pair.pair_id), str(pair.category), image_key(pair.src_name, shw), image_key(pair.trg_name, thw),
                   pair.src_kps.float().clone(), pair.trg_kps.float().clone(), pair.valid.clone(), float(pair.thr),
                   source_thr(pair, thr_kind), perm, feature_frame(*shw, canvas), feature_frame(*thw, canvas), shw, thw)

    def to_dict(self) -> dict:
        return {"pair_id": self.pair_id, "category": self.category, "src_key": self.src_key, "trg_key": self.trg_key,
                "src_kps": self.src_kps, "trg_kps": self.trg_kps, "valid": self.valid, "thr": self.thr,
                "src_thr": self.src_thr, "flip_perm": self.flip_perm, "src_frame": list(self.src_frame),
                "trg_frame": list(self.trg_frame), "src_hw": list(self.src_hw), "trg_hw": list(self.trg_hw)}

    @classmethod
    def from_dict(cls, d: dict) -> "PairMeta":
        return cls(d["pair_id"], d["category"], d["src_key"], d["trg_key"], d["src_kps"], d["trg_kps"], d["valid"],
                   float(d["thr"]), float(d["src_thr"]), d["flip_perm"], tuple(d["src_frame"]), tuple(d["trg_frame"]),
                   tuple(d["src_hw"]), tuple(d["trg_hw"]))


class FeatureIndex:
    """The pairs of a dataset as :class:`PairMeta` records (``len``, ``index[i]``, ``name``).

    Build it with :func:`fill_cache` (which also fills the cache) or :meth:`from_dataset`; keep it with
    :meth:`save` / :meth:`load` (a ``torch.save`` file of plain tensors and strings, ``weights_only``).
    """

    def __init__(self, pairs: list, name: str = "?"):
        if not isinstance(pairs, list) or not all(isinstance(p, PairMeta) for p in pairs):
            raise TypeError("FeatureIndex: pairs must be a list of PairMeta")
        self.pairs, self.name = pairs, str(name)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> PairMeta:
        return self.pairs[i]

    def __repr__(self) -> str:
        return f"FeatureIndex({self.name!r}, n={len(self)})"

    def keys(self, flip: bool = False) -> list[str]:
        """The distinct image keys of the pairs (and their ``":flip"`` keys with ``flip=True``), sorted."""
        ks = sorted({p.src_key for p in self.pairs} | {p.trg_key for p in self.pairs})
        return ks + [flip_key(k) for k in ks] if flip else ks

    @classmethod
    def from_dataset(cls, dataset, canvas, *, num_workers: int = 0, progress: bool = False) -> "FeatureIndex":
        """Read every pair of ``dataset`` (images are decoded: the dataset gives no keypoints without them)."""
        thr_kind = getattr(dataset, "thr_kind", "bbox")
        metas = [PairMeta.from_pair(p, canvas, thr_kind) for _, p in _iter_pairs(dataset, num_workers, progress)]
        return cls(metas, getattr(dataset, "name", type(dataset).__name__))

    def save(self, path: str | os.PathLike) -> None:
        """Write the index atomically to ``path``."""
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp"
        torch.save({"format": INDEX_FORMAT, "name": self.name, "pairs": [p.to_dict() for p in self.pairs]}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureIndex":
        """Read an index written by :meth:`save`; errors name the path."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: not found (expected a feature-pair index written by "
                                    f"FeatureIndex.save / fill_cache)")
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable feature-pair index ({exc})") from exc
        if not isinstance(d, dict) or d.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: not a feature-pair index (format {INDEX_FORMAT!r} expected)")
        return cls([PairMeta.from_dict(p) for p in d["pairs"]], d.get("name", "?"))


def _identity(x):
    return x


def _iter_pairs(dataset, num_workers: int, progress: bool) -> Iterator:
    """``(i, Pair)`` over the dataset, decoded in ``num_workers`` DataLoader workers when > 0."""
    from tqdm.auto import tqdm

    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    n = len(dataset)
    if num_workers == 0:
        it = (dataset[i] for i in range(n))
    else:
        it = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                              collate_fn=_identity))
    for i, pair in enumerate(tqdm(it, total=n, disable=not progress, desc=f"pairs {getattr(dataset, 'name', '')}")):
        yield i, pair


def fill_cache(dataset, backbone, cache: FeatureCache, *, flip: bool = True, batch_size: int = 8,
               num_workers: int = 0, progress: bool = True) -> FeatureIndex:
    """Compute the missing features of every image of ``dataset``'s pairs (and of its mirror with
    ``flip=True``) into ``cache``; return the pairs' :class:`FeatureIndex`.

    Args:
        dataset: a :class:`semcorr_fast.data.PairDataset` (e.g. SPair-71k ``trn`` on ``pad_square(840)``).
        backbone: the frozen backbone (``name`` and ``canvas`` must match the cache's); each image is
            brought to its input with :func:`semcorr_fast.evaluate.backbone_input`, the mirror is the
            flipped dataset-canvas image brought the same way (as evaluation's pose alignment does).
        cache: a :class:`~semcorr_fast.backbones.FeatureCache`; existing keys are not recomputed, so an
            interrupted fill resumes.
        flip: also store the mirrored images' features under ``":flip"`` keys.
        batch_size: images per backbone call; num_workers: DataLoader workers decoding pairs.
    Returns:
        The :class:`FeatureIndex`; ``index.stats`` = ``{"computed", "skipped"}`` feature maps.
    """
    from ..evaluate import backbone_input

    if not isinstance(cache, FeatureCache):
        raise TypeError(f"fill_cache: cache must be a semcorr_fast.backbones.FeatureCache, got {type(cache).__name__}")
    if getattr(backbone, "name", None) != cache.backbone_name or getattr(backbone, "canvas", None) != cache.canvas:
        raise ValueError(f"fill_cache: the cache is for backbone {cache.backbone_name!r} on {cache.canvas}, got "
                         f"{getattr(backbone, 'name', None)!r} on {getattr(backbone, 'canvas', None)}")
    canvas = backbone.canvas
    thr_kind = getattr(dataset, "thr_kind", "bbox")
    metas: list[PairMeta] = []
    seen: set[str] = set()

    def items():
        for _, pair in _iter_pairs(dataset, num_workers, False):
            meta = PairMeta.from_pair(pair, canvas, thr_kind)
            metas.append(meta)
            for key, img in ((meta.src_key, pair.src_image), (meta.trg_key, pair.trg_image)):
                if key in seen:
                    continue
                seen.add(key)
                yield key, (lambda img=img: backbone_input(img, canvas)[0])
                if flip:
                    yield flip_key(key), (lambda img=img: backbone_input(img.flip(-1), canvas)[0])

    stats = cache.extract(backbone, items(), flip=False, batch_size=batch_size, progress=progress)
    index = FeatureIndex(metas, getattr(dataset, "name", type(dataset).__name__))
    index.stats = stats
    return index


class FeaturePairs(DatasetPairs):
    """Training pairs whose features come from a :class:`~semcorr_fast.backbones.FeatureCache`.

    Args:
        index: a :class:`FeatureIndex` (or the path of a saved one).
        cache: the cache holding every key of the index (and the ``":flip"`` keys with ``flip=True``).
        flip: load the mirrored images' features (GeoAware-SC's pose-variant augmentation needs them).
        check: verify at construction that every needed key is stored (a missing one is a KeyError
            naming it and saying how to fill the cache).

    Used through :class:`semcorr_fast.train.data.BatchStream` (seeded per-epoch order, rank sharding):
    ``BatchStream(FeaturePairs(index, cache), batch_size, seed)[step]`` is :meth:`make_batch` of that
    step's pairs (layout in the module docstring).
    """

    def __init__(self, index, cache: FeatureCache, *, flip: bool = True, check: bool = True):
        if isinstance(index, (str, os.PathLike)):
            index = FeatureIndex.load(index)
        if not isinstance(index, FeatureIndex):
            raise TypeError(f"FeaturePairs: index must be a FeatureIndex or the path of a saved one, got "
                            f"{type(index).__name__}")
        if not hasattr(cache, "get") or not hasattr(cache, "has"):
            raise TypeError(f"FeaturePairs: cache must be a FeatureCache, got {type(cache).__name__}")
        super().__init__(index)
        self.index, self.cache, self.flip = index, cache, bool(flip)
        if check:
            missing = [k for k in index.keys(flip=self.flip) if not cache.has(k)]
            if missing:
                raise KeyError(f"FeaturePairs: {len(missing)} feature map(s) missing from {cache!r}, e.g. "
                               f"{missing[:3]} (expected files like {cache.path(missing[0])}); fill the cache first "
                               f"with semcorr_fast.methods.feature_pairs.fill_cache(dataset, backbone, cache, "
                               f"flip={self.flip})")

    def __repr__(self) -> str:
        return f"FeaturePairs({self.index.name!r}, n={len(self)}, flip={self.flip}, cache={self.cache!r})"

    def make_batch(self, idx: Tensor) -> dict:
        """The batch of pairs ``idx`` (``(b,)`` int64 indices into the index); layout in the module docstring."""
        idx = torch.as_tensor(idx, dtype=torch.int64).reshape(-1)
        metas = [self.index[int(i)] for i in idx]
        b = len(metas)
        if b == 0:
            raise ValueError("FeaturePairs.make_batch: empty index list")
        feats = {k: [] for k in ("src_feat", "trg_feat") + (("src_feat_flip", "trg_feat_flip") if self.flip else ())}
        for m in metas:
            feats["src_feat"].append(self.cache.get(m.src_key))
            feats["trg_feat"].append(self.cache.get(m.trg_key))
            if self.flip:
                feats["src_feat_flip"].append(self.cache.get(flip_key(m.src_key)))
                feats["trg_feat_flip"].append(self.cache.get(flip_key(m.trg_key)))
        shapes = {tuple(t.shape) for v in feats.values() for t in v}
        if len(shapes) != 1:
            raise ValueError(f"FeaturePairs: the feature maps of one batch differ in shape {sorted(shapes)}; use a "
                             f"fixed-size dataset canvas (pad_square)")
        C, h, w = shapes.pop()
        K = max(m.src_kps.shape[0] for m in metas)
        out = {k: torch.stack(v) for k, v in feats.items()}
        src_kps = torch.full((b, K, 2), float("nan"))
        trg_kps = torch.full((b, K, 2), float("nan"))
        valid = torch.zeros(b, K, dtype=torch.bool)
        perm = torch.full((b, K), -1, dtype=torch.int64)
        sfw, tfw, thr, sthr = (torch.empty(b) for _ in range(4))
        for n, m in enumerate(metas):
            k = m.src_kps.shape[0]
            for side, kps, frame, hw_img, fw in (("src", m.src_kps, m.src_frame, m.src_hw, sfw),
                                                 ("trg", m.trg_kps, m.trg_frame, m.trg_hw, tfw)):
                x0, y0, x1, y1 = frame
                sx, sy = w / (x1 - x0), h / (y1 - y0)
                g = torch.stack(((kps[:, 0] - x0) * sx, (kps[:, 1] - y0) * sy), -1)
                (src_kps if side == "src" else trg_kps)[n, :k] = g
                fw[n] = (hw_img[1] - 2 * x0) * sx
            valid[n, :k] = m.valid
            if m.flip_perm is not None:
                perm[n] = torch.arange(K)
                perm[n, :k] = m.flip_perm
            tsx = w / (m.trg_frame[2] - m.trg_frame[0])
            ssx = w / (m.src_frame[2] - m.src_frame[0])
            thr[n] = m.thr * tsx
            sthr[n] = (m.src_thr if m.src_thr == m.src_thr else m.thr) * ssx  # NaN → the target's
        out.update(src_kps=src_kps, trg_kps=trg_kps, valid=valid, flip_perm=perm, src_flip_width=sfw,
                   trg_flip_width=tfw, thr=thr, src_thr=sthr, category=[m.category for m in metas],
                   pair_id=[m.pair_id for m in metas], src_key=[m.src_key for m in metas],
                   trg_key=[m.trg_key for m in metas], index=idx)
        return out


def build_feature_source(dataset, backbone, cache_root: str | os.PathLike, *, flip: bool = True,
                         index_path: str | os.PathLike | None = None, batch_size: int = 8, num_workers: int = 0,
                         progress: bool = True) -> FeaturePairs:
    """A ready training source: fill ``cache_root``'s cache for ``backbone`` from ``dataset`` (only what is
    missing) and wrap it in :class:`FeaturePairs`. With ``index_path`` the index is saved there and, when
    it already exists and every key is cached, read instead of decoding the dataset again."""
    cache = FeatureCache(cache_root, backbone.name, backbone.canvas)
    if index_path is not None and os.path.isfile(os.fspath(index_path)):
        index = FeatureIndex.load(index_path)
        if all(cache.has(k) for k in index.keys(flip=flip)):
            return FeaturePairs(index, cache, flip=flip, check=False)
    index = fill_cache(dataset, backbone, cache, flip=flip, batch_size=batch_size, num_workers=num_workers,
                       progress=progress)
    if index_path is not None:
        index.save(index_path)
    return FeaturePairs(index, cache, flip=flip)
