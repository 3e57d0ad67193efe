"""SPair-71k (Min et al. 2019) and SPair-U (Jamais Vu, Mariotti et al. 2025) in their published layouts.

Files read (``root`` = the ``SPair-71k`` folder; ``<pairs>``/``<images>`` = the annotation folders,
``PairAnnotation``/``ImageAnnotation`` for SPair-71k, ``ExtraPairAnnotation``/``ExtraImageAnnotation``
for SPair-U)::

    Layout/<layout>/<split>.txt      one pair name per line (SPair-71k, ``layout="large"``); with
                                     ``layout=None`` every ``*.json`` of ``<pairs>/<split>/``, sorted
    <pairs>/<split>/<pair>.json      src_imname, trg_imname, category, src_imsize/trg_imsize ([W, H, C]),
                                     src_bndbox/trg_bndbox ([x1, y1, x2, y2]), viewpoint_variation,
                                     scale_variation, truncation, occlusion (and mirror where present);
                                     with ``kps_source="pair"`` also src_kps, trg_kps ([[x, y], ...]) and
                                     kps_ids (the vocabulary id of each row)
    <images>/<cat>/<img>.json        ``kps``: {"<id>": [x, y] or null} (``kps_source="image"``);
                                     ``azimuth_id`` is passed on in ``Pair.flags`` where present
    JPEGImages/<cat>/<img>.jpg

Protocol (GeoAware-SC / Jamais Vu, ``seed_geoaware.md`` §6, ``seed_jamaisvu.md`` §4, ``anchors.md`` A1/A2):

* keypoints are indexed by the SPair keypoint id, padded to ``K = 30`` for every category (GeoAware's
  ``load_spair_data`` reads ids ``0..29``), so ``src_kps[k]``/``trg_kps[k]`` are the same part;
* ``kps_source="image"`` (default) reads every image's own keypoints, as GeoAware-SC and Jamais Vu do
  (``ImageAnnotation``; SPair-U is read that way by ``--UNSEEN_KPS``); ``"pair"`` reads the pair file's
  mutually-visible keypoints (``kps_ids``), as the official SPair toolkit does. Both give the same
  ``valid`` set on consistent files; only ``"image"`` knows keypoints visible in one image only
  (``flags["src_visible"]``/``flags["trg_visible"]``, used by the geometry-aware subset);
* ``thr`` default ``"bbox"``: max side of the TARGET bbox on the canvas (``max(x2-x1, y2-y1)·scale``);
  ``"image"``: max side of the target image on the canvas;
* default canvas ``pad_square(840)``.

``flip_perm`` (SPair-71k only) is GeoAware-SC's left/right keypoint permutation in the raw SPair id
space (their ``SPAIR_FLIP_TRN``; their ``SPAIR_FLIP`` is the same permutation renumbered after
dropping the ids unused in the test split, bicycle 11/12 and bus 8/9). SPair-U's new keypoints have
no published id→name table, so its ``flip_perm`` is None. SPair has no keypoint names in its files,
so ``kp_names`` is None.

The helpers at the end of this module (``read_json``, ``parse_points``, ``build_pair``, ...) are
shared by ``pf.py`` and ``ap10k.py``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from .base import DatasetFormatError, Pair, PairDataset, load_image, register_dataset, require_dir, require_file
from .canvas import Canvas

SPAIR_K = 30

SPAIR_CATEGORIES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "train", "tvmonitor")

# Size of each category's raw id vocabulary (ids 0..n-1; bicycle 11, 12 and bus 8, 9 are ids that the
# test split never uses) -- the lengths of GeoAware-SC's per-category left/right label lists.
SPAIR_NUM_KPS = {"aeroplane": 25, "bicycle": 14, "bird": 17, "boat": 14, "bottle": 10, "bus": 30, "car": 30,
                 "cat": 15, "chair": 14, "cow": 21, "dog": 16, "horse": 20, "motorbike": 13, "person": 20,
                 "pottedplant": 9, "sheep": 21, "train": 18, "tvmonitor": 16}

# Left/right partner ids per category (raw SPair ids); every other id is its own mirror image.
SPAIR_LR_PAIRS = {
    "aeroplane": [(4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19), (20, 21)],
    "bicycle": [(2, 3), (6, 7), (9, 10)],
    "bird": [(1, 2), (4, 5), (7, 8), (10, 11), (12, 13), (14, 15)],
    "boat": [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)],
    "bottle": [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)],
    "bus": [(0, 1), (2, 3), (5, 6), (10, 20), (13, 23), (11, 21), (14, 24), (12, 22), (15, 25), (16, 17),
            (26, 27), (18, 19), (28, 29)],
    "car": [(0, 1), (2, 3), (6, 7), (10, 20), (13, 23), (11, 21), (14, 24), (12, 22), (15, 25), (16, 17),
            (26, 27), (18, 19), (28, 29)],
    "cat": [(0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12)],
    "chair": [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13)],
    "cow": [(0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12), (15, 16), (17, 18), (19, 20)],
    "dog": [(0, 1), (2, 3), (4, 5), (9, 10), (11, 12)],
    "horse": [(0, 1), (2, 3), (4, 5), (6, 7), (10, 11), (12, 13), (16, 17), (18, 19)],
    "motorbike": [(0, 1), (2, 3)],
    "person": [(0, 1), (2, 3), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17), (18, 19)],
    "pottedplant": [(0, 2), (4, 5), (6, 8)],
    "sheep": [(0, 1), (2, 3), (4, 5), (6, 7), (9, 10), (11, 12), (15, 16), (17, 18), (19, 20)],
    "train": [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11), (12, 13), (14, 15), (16, 17)],
    "tvmonitor": [(0, 2), (4, 6), (3, 7), (8, 10), (12, 14), (11, 15)],
}

SPAIR_FLAGS = ("viewpoint_variation", "scale_variation", "truncation", "occlusion")  # required in every pair
SPAIR_OPTIONAL_FLAGS = ("mirror",)


@register_dataset("spair")
class SPair71k(PairDataset):
    """SPair-71k pairs on a canvas; see the module docstring for the files and the protocol.

    Args:
        root: the ``SPair-71k`` folder.
        split: ``"trn"`` (alias ``"train"``), ``"val"`` or ``"test"``.
        canvas: the evaluation frame; None → ``Canvas.pad_square(840)``.
        thr: ``"bbox"`` (default, target bbox max side) or ``"image"``; ``Pair.thr`` is in canvas pixels.
        categories: a category name or list of names to keep (None: all).
        flags: difficulty filter, ``{flag: value or list of values}`` over viewpoint_variation,
            scale_variation, truncation, occlusion, mirror; e.g. ``{"viewpoint_variation": 2}``.
        kps_source: ``"image"`` (per-image annotations, GeoAware-SC) or ``"pair"`` (the pair file).
        layout: ``"large"``/``"small"`` (``Layout/<layout>/<split>.txt``) or None (every pair file).
        pair_ann_dir, image_ann_dir: the annotation folders, relative to ``root`` or absolute.

    ``ds[i]`` is a :class:`Pair` with K = 30 keypoints; ``flags`` holds the difficulty flags, ``split``,
    ``src_visible``/``trg_visible`` ((K,) bool) and ``src_azimuth_id``/``trg_azimuth_id`` where present.
    """

    default_thr = "bbox"
    K = SPAIR_K
    pair_ann_dir = "PairAnnotation"
    image_ann_dir = "ImageAnnotation"
    splits = ("trn", "val", "test")
    required_flags = SPAIR_FLAGS
    has_flip = True

    def __init__(self, root: str, split: str = "test", canvas: Canvas | None = None, thr: str | None = None,
                 categories=None, flags: dict | None = None, kps_source: str = "image",
                 layout: str | None = "large", pair_ann_dir: str | None = None, image_ann_dir: str | None = None):
        super().__init__(canvas)
        split = {"train": "trn"}.get(split, split)
        if split not in self.splits:
            raise ValueError(f"{self.name}: split must be one of {self.splits}, got {split!r}")
        if kps_source not in ("image", "pair"):
            raise ValueError(f"{self.name}: kps_source must be 'image' or 'pair', got {kps_source!r}")
        self.root = require_dir(root, f"the {self.name} root folder (JPEGImages/, {self.pair_ann_dir}/, ...)")
        self.split, self.kps_source = split, kps_source
        self.thr_kind = resolve_thr(thr, self.default_thr, self.name)
        pair_dir = require_dir(os.path.join(root, pair_ann_dir or self.pair_ann_dir, split),
                               f"the {self.name} pair annotations of split {split!r}")
        self.image_ann_root = os.path.join(root, image_ann_dir or self.image_ann_dir)
        wanted_cats, wanted_flags = name_filter(categories), flag_filter(flags, SPAIR_FLAGS + SPAIR_OPTIONAL_FLAGS)
        image_cache: dict = {}
        self.items = []
        for name in self._pair_names(pair_dir, layout):
            path = os.path.join(pair_dir, name + ".json")
            ann = read_json(path, f"an {self.name} pair annotation")
            category = get_str(ann, "category", path)
            if ":" in name and name.rsplit(":", 1)[1] != category:
                raise DatasetFormatError(f"{path}: field 'category' is {category!r} but the pair name says "
                                         f"{name.rsplit(':', 1)[1]!r}")
            if wanted_cats is not None and category not in wanted_cats:
                continue
            pair_flags = {f: get_int(ann, f, path) for f in SPAIR_FLAGS + SPAIR_OPTIONAL_FLAGS
                          if f in ann or f in self.required_flags}
            if not flags_match(pair_flags, wanted_flags, path):
                continue
            src, trg = (self._side(ann, path, s, category, image_cache, pair_flags) for s in ("src", "trg"))
            if kps_source == "pair":
                ids = parse_ids(get_field(ann, "kps_ids", path), path, "kps_ids", self.K)
                for s, side in (("src", src), ("trg", trg)):
                    side.kps[ids] = parse_points(get_field(ann, f"{s}_kps", path), path, f"{s}_kps", n=len(ids))
                    side.visible[ids] = True
            self.items.append((name, category, src, trg, pair_flags))
        self.categories = check_selection(self.name, [it[1] for it in self.items], wanted_cats)
        self._flip = {c: flip_perm_from_pairs(self.K, SPAIR_LR_PAIRS[c]) for c in self.categories
                      if self.has_flip and c in SPAIR_LR_PAIRS}

    def _pair_names(self, pair_dir: str, layout: str | None) -> list[str]:
        if layout is None:
            return sorted(f[:-5] for f in os.listdir(pair_dir) if f.endswith(".json"))
        path = require_file(os.path.join(self.root, "Layout", layout, self.split + ".txt"),
                            f"the {self.name} pair list of split {self.split!r} (or pass layout=None)")
        with open(path) as fh:
            return [line.strip() for line in fh if line.strip()]

    def _side(self, ann: dict, path: str, s: str, category: str, cache: dict, pair_flags: dict) -> "ImageAnn":
        imname = get_str(ann, f"{s}_imname", path)
        size = parse_size(get_field(ann, f"{s}_imsize", path), path, f"{s}_imsize")
        bbox = parse_box(get_field(ann, f"{s}_bndbox", path), path, f"{s}_bndbox", "xyxy")
        image_path = os.path.join(self.root, "JPEGImages", category, imname)
        if self.kps_source == "pair":  # filled from the pair file by the caller
            return ImageAnn(image_path, np.zeros((self.K, 2)), np.zeros(self.K, bool), bbox, size, path, f"{s}_kps")
        ann_path = os.path.join(self.image_ann_root, category, os.path.splitext(imname)[0] + ".json")
        if ann_path not in cache:
            cache[ann_path] = self._read_image_ann(ann_path)
        kps, vis, azimuth = cache[ann_path]
        if azimuth is not None:
            pair_flags[f"{s}_azimuth_id"] = azimuth
        return ImageAnn(image_path, kps, vis, bbox, size, ann_path, "kps")

    def _read_image_ann(self, path: str):
        """``kps`` {"<id>": [x, y] | null} → ((K, 2) float64, (K,) bool, azimuth_id or None)."""
        data = read_json(path, f"an {self.name} image annotation")
        table = get_field(data, "kps", path)
        if not isinstance(table, dict):
            raise DatasetFormatError(f"{path}: field 'kps' must be an object {{id: [x, y] or null}}, "
                                     f"got {type(table).__name__}")
        kps, vis = np.zeros((self.K, 2)), np.zeros(self.K, bool)
        for key, value in table.items():
            k = parse_ids([key], path, "kps", self.K)[0]
            if value is not None:
                kps[k] = parse_points([value], path, f"kps[{key!r}]", n=1)[0]
                vis[k] = True
        azimuth = get_int(data, "azimuth_id", path) if "azimuth_id" in data else None
        return kps, vis, azimuth

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Pair:
        name, category, src, trg, pair_flags = self.items[i]
        flags = dict(pair_flags, split=self.split, src_visible=torch.from_numpy(src.visible.copy()),
                     trg_visible=torch.from_numpy(trg.visible.copy()))
        return build_pair(self.canvas, src, trg, thr_kind=self.thr_kind, category=category, pair_id=name,
                          flip_perm=self._flip[category].clone() if category in self._flip else None,
                          flags=flags)


@register_dataset("spair-u")
class SPairU(SPair71k):
    """SPair-U (Jamais Vu): SPair-71k test pairs re-annotated with new keypoints, as a drop-in.

    Same files as SPair-71k test (module docstring) with the annotation folders
    ``ExtraPairAnnotation/test/`` and ``ExtraImageAnnotation/<cat>/`` (what Jamais Vu's ``--UNSEEN_KPS``
    reads under the SPair-71k root); pass ``pair_ann_dir``/``image_ann_dir`` (relative to ``root`` or
    absolute) where they were extracted elsewhere. Images come from ``root/JPEGImages``. There is no
    layout file: every pair file of the folder is used (8,254 pairs in the release). Protocol as
    SPair-71k (K = 30, target-bbox threshold); ``flip_perm`` is None (no published id→name table).
    The difficulty flags are read where the pair files carry them (Jamais Vu's code never reads them);
    filtering on a flag a file lacks is an error.
    """

    pair_ann_dir = "ExtraPairAnnotation"
    image_ann_dir = "ExtraImageAnnotation"
    splits = ("test",)
    required_flags = ()
    has_flip = False

    def __init__(self, root: str, split: str = "test", canvas: Canvas | None = None, thr: str | None = None,
                 categories=None, flags: dict | None = None, kps_source: str = "image",
                 layout: str | None = None, pair_ann_dir: str | None = None, image_ann_dir: str | None = None):
        super().__init__(root, split, canvas, thr, categories, flags, kps_source, layout, pair_ann_dir,
                         image_ann_dir)


# ------------------------------------------------------------------------------------------------
# Helpers shared by the SPair, PF and AP-10K loaders.

KP_TOLERANCE_PX = 1.0  # a visible keypoint may lie this far outside [0, W] x [0, H] (boundary clicks)


@dataclass
class ImageAnn:
    """One image of a pair, in original pixels, as read from its annotation.

    ``kps`` (K, 2) float64 (x, y) — rows where ``visible`` (K,) bool is False are ignored; ``bbox`` (4,)
    float64 (x0, y0, x1, y1) or None; ``size`` (W, H) annotated, checked against the image file, or None;
    ``ann_path``/``kps_field`` name where the keypoints came from, for error messages.
    """

    image_path: str
    kps: np.ndarray
    visible: np.ndarray
    bbox: np.ndarray | None
    size: tuple[int, int] | None
    ann_path: str
    kps_field: str


def build_pair(canvas: Canvas, src: ImageAnn, trg: ImageAnn, *, thr_kind: str, category: str, pair_id: str,
               flip_perm: torch.Tensor | None = None, kp_names: list[str] | None = None,
               flags: dict | None = None) -> Pair:
    """Load both images, bring images, keypoints and bboxes to ``canvas`` and compute ``thr``.

    Keypoints not visible in an image are NaN on the canvas; ``valid`` = visible in both. ``thr_kind``
    ``"bbox"``: max side of the target bbox on the canvas; ``"image"``: max side of the target image
    content on the canvas. Raises DatasetFormatError when an image's size differs from its annotated
    size or a visible keypoint lies outside its image.
    """
    out = []
    for side in (src, trg):
        image = load_image(side.image_path)
        w, h = image.size
        if side.size is not None and tuple(side.size) != (w, h):
            raise DatasetFormatError(f"{side.ann_path}: annotated image size {side.size[0]}x{side.size[1]} "
                                     f"(WxH) but {side.image_path} is {w}x{h}")
        x, y = side.kps[:, 0], side.kps[:, 1]
        outside = side.visible & ((x < -KP_TOLERANCE_PX) | (x > w + KP_TOLERANCE_PX) |
                                  (y < -KP_TOLERANCE_PX) | (y > h + KP_TOLERANCE_PX))
        if outside.any():
            k = int(np.flatnonzero(outside)[0])
            raise DatasetFormatError(f"{side.ann_path}: field {side.kps_field!r}: keypoint {k} at "
                                     f"({x[k]:.2f}, {y[k]:.2f}) lies outside the {w}x{h} image {side.image_path}")
        tensor, tf = canvas.apply(image)
        vis = torch.from_numpy(side.visible.copy())
        kps = tf.points(torch.from_numpy(side.kps)).float().masked_fill(~vis[:, None], float("nan"))
        box = None if side.bbox is None else tf.box(torch.from_numpy(side.bbox)).float()
        out.append((tensor, tf, kps, vis, box))
    (src_img, src_tf, src_kps, src_vis, src_box), (trg_img, trg_tf, trg_kps, trg_vis, trg_box) = out
    if thr_kind == "bbox":
        if trg.bbox is None:
            raise ValueError(f"pair {pair_id}: thr='bbox' but the target has no bounding box")
        x0, y0, x1, y1 = trg_tf.box(torch.from_numpy(trg.bbox)).tolist()
    else:
        x0, y0, x1, y1 = trg_tf.content_box
    return Pair(src_image=src_img, trg_image=trg_img, src_kps=src_kps, trg_kps=trg_kps, valid=src_vis & trg_vis,
                thr=float(max(x1 - x0, y1 - y0)), category=category, pair_id=pair_id,
                src_name=os.path.basename(src.image_path), trg_name=os.path.basename(trg.image_path),
                src_bbox=src_box, trg_bbox=trg_box, src_tf=src_tf, trg_tf=trg_tf, flip_perm=flip_perm,
                kp_names=kp_names, flags=flags or {})


def resolve_thr(thr: str | None, default: str, dataset: str) -> str:
    """``thr`` argument → ``"bbox"`` or ``"image"`` (None → the protocol default)."""
    thr = default if thr is None else thr
    if thr not in ("bbox", "image"):
        raise ValueError(f"{dataset}: thr must be 'bbox', 'image' or None (protocol default), got {thr!r}")
    return thr


def flip_perm_from_pairs(K: int, pairs) -> torch.Tensor:
    """(K,) long permutation swapping each (a, b) of ``pairs``; every other index maps to itself."""
    perm = list(range(K))
    for a, b in pairs:
        perm[a], perm[b] = b, a
    return torch.tensor(perm, dtype=torch.long)


def name_filter(names) -> set[str] | None:
    """A category filter argument (None, a name, or names) → a set of names or None."""
    if names is None:
        return None
    return {names} if isinstance(names, str) else set(names)


def flag_filter(flags: dict | None, known: tuple[str, ...]) -> dict[str, set[int]]:
    """``{flag: value or values}`` → ``{flag: set of accepted ints}``; unknown flag names are an error."""
    out = {}
    for key, value in (flags or {}).items():
        if key not in known:
            raise ValueError(f"flags: unknown flag {key!r}; known: {', '.join(known)}")
        out[key] = {int(v) for v in (value if isinstance(value, (list, tuple, set, frozenset)) else [value])}
    return out


def flags_match(pair_flags: dict, wanted: dict[str, set[int]], path: str) -> bool:
    for key, accepted in wanted.items():
        if key not in pair_flags:
            raise DatasetFormatError(f"{path}: missing field {key!r} (needed by the flags filter)")
        if pair_flags[key] not in accepted:
            return False
    return True


def check_selection(dataset: str, categories: list[str], wanted: set[str] | None) -> list[str]:
    """Sorted categories of the selected pairs; an empty selection or a requested category without
    pairs is an error naming what exists."""
    present = sorted(set(categories))
    missing = sorted(wanted - set(present)) if wanted is not None else []
    if missing or not present:
        raise ValueError(f"{dataset}: no pairs selected for categories {missing or '(any)'} with the given "
                         f"split/filters; selected categories: {present}")
    return present


def read_json(path: str, what: str):
    """Parse a JSON file; a missing file is FileNotFoundError, bad JSON is DatasetFormatError."""
    require_file(path, what)
    with open(path) as fh:
        try:
            return json.load(fh)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{path}: not valid JSON ({exc})") from exc


def get_field(data, key: str, path: str):
    if not isinstance(data, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object with field {key!r}, got {type(data).__name__}")
    if key not in data:
        raise DatasetFormatError(f"{path}: missing field {key!r}")
    return data[key]


def get_str(data, key: str, path: str) -> str:
    value = get_field(data, key, path)
    if not isinstance(value, str) or not value:
        raise DatasetFormatError(f"{path}: field {key!r} must be a non-empty string, got {value!r}")
    return value


def get_int(data, key: str, path: str) -> int:
    value = get_field(data, key, path)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
        raise DatasetFormatError(f"{path}: field {key!r} must be an integer, got {value!r}")
    return int(value)


def parse_ids(values, path: str, field: str, K: int) -> np.ndarray:
    """Keypoint ids (ints or digit strings) → (N,) int64, each in [0, K) and distinct."""
    if not isinstance(values, (list, tuple)):
        raise DatasetFormatError(f"{path}: field {field!r} must be a list of keypoint ids, got {values!r}")
    ids = []
    for v in values:
        if isinstance(v, str) and v.strip().isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < K:
            raise DatasetFormatError(f"{path}: field {field!r}: keypoint id {v!r} is not an integer in [0, {K})")
        ids.append(v)
    if len(set(ids)) != len(ids):
        raise DatasetFormatError(f"{path}: field {field!r}: repeated keypoint ids {ids}")
    return np.asarray(ids, dtype=np.int64)


def parse_points(value, path: str, field: str, n: int | None = None) -> np.ndarray:
    """``[[x, y], ...]`` → (N, 2) float64, finite; ``n`` fixes N."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{path}: field {field!r} must be a list of [x, y] pairs, got {value!r}") from None
    if arr.size == 0 and arr.ndim == 1:
        arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DatasetFormatError(f"{path}: field {field!r} must hold [x, y] pairs (2 coordinates each), "
                                 f"got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise DatasetFormatError(f"{path}: field {field!r} has {arr.shape[0]} points, expected {n}")
    if not np.isfinite(arr).all():
        raise DatasetFormatError(f"{path}: field {field!r} holds non-finite coordinates")
    return arr


def parse_box(value, path: str, field: str, fmt: str) -> np.ndarray:
    """A 4-number box in ``fmt`` ``"xyxy"`` or ``"xywh"`` → (4,) float64 (x0, y0, x1, y1), non-empty."""
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise DatasetFormatError(f"{path}: field {field!r} must be 4 numbers ({fmt}), got {value!r}") from None
    if arr.shape != (4,) or not np.isfinite(arr).all():
        raise DatasetFormatError(f"{path}: field {field!r} must be 4 finite numbers ({fmt}), got {value!r}")
    if fmt == "xywh":
        arr = np.array([arr[0], arr[1], arr[0] + arr[2], arr[1] + arr[3]])
    if not (arr[2] > arr[0] and arr[3] > arr[1]):
        raise DatasetFormatError(f"{path}: field {field!r} is an empty box ({fmt}): {value!r}")
    return arr


def parse_size(value, path: str, field: str) -> tuple[int, int]:
    """``[W, H, ...]`` → (W, H) positive ints."""
    if not isinstance(value, (list, tuple)) or len(value) < 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value[:2]):
        raise DatasetFormatError(f"{path}: field {field!r} must be [W, H, ...] positive integers, got {value!r}")
    return int(value[0]), int(value[1])
