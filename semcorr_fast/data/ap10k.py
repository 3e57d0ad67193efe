"""AP-10K as GeoAware-SC's semantic-correspondence benchmark (intra-species / cross-species / cross-family).

GeoAware-SC's ``prepare_ap10k.ipynb`` turns the COCO-style AP-10K release into this layout, which is
what this loader reads (``root`` = the ``ap-10k`` folder)::

    ImageAnnotation/<family>/<species>/<id>.json   one instance each: the COCO annotation merged with its
                                                   image entry -- keypoints (17 × [x, y, v], v = 2 labelled
                                                   and visible), bbox [left, top, width, height], width,
                                                   height -- plus name (species) and supercategory (family)
    JPEGImages/<family>/<species>/<id>.jpg
    PairAnnotation/<dir>/<src>-<trg>:<category>.json   {"src_json_path", "trg_json_path"}

``<dir>`` by ``split_kind``: ``"intra-species"`` → ``<split>`` (category = species),
``"cross-species"`` → ``<split>_cross_species`` (category = family), ``"cross-family"`` →
``<split>_cross_family`` (category ``"all"``); ``split`` is ``"test"``, ``"val"`` or (intra-species
only) ``"trn"``. The stored json paths are relative to GeoAware-SC's working directory
(``data/ap-10k/ImageAnnotation/...``); the part after the last ``ImageAnnotation/`` is resolved
under ``root``, and the image is the same path under ``JPEGImages`` with ``.jpg``.

Protocol (``seed_geoaware.md`` §6, ``anchors.md`` A1): the 17 AP-10K keypoints in their fixed order
(``kp_names``), visible where v = 2 (GeoAware-SC weights keypoints by v/2, which equals this for
v ∈ {0, 2}; v = 1, COCO's "labelled, not visible", counts as not visible here); ``thr`` default
``"bbox"``: max(width, height) of the TARGET bbox on the canvas; default canvas ``pad_square(840)``.
``flip_perm`` swaps every ``left_*`` keypoint with its ``right_*`` namesake (GeoAware-SC's
``AP10K_FLIP``: eyes, shoulders, elbows, knees, front paws, back paws, hips).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .base import DatasetFormatError, Pair, PairDataset, register_dataset, require_dir
from .canvas import Canvas
from .spair import (ImageAnn, build_pair, check_selection, flip_perm_from_pairs, get_field, get_int, get_str,
                    name_filter, parse_box, read_json, resolve_thr)

AP10K_KP_NAMES = ("left_eye", "right_eye", "nose", "neck", "root_of_tail", "left_shoulder", "left_elbow",
                  "left_front_paw", "right_shoulder", "right_elbow", "right_front_paw", "left_hip", "left_knee",
                  "left_back_paw", "right_hip", "right_knee", "right_back_paw")
AP10K_K = len(AP10K_KP_NAMES)
AP10K_SPLIT_KINDS = {"intra-species": "", "cross-species": "_cross_species", "cross-family": "_cross_family"}


def lr_pairs_from_names(names) -> list[tuple[int, int]]:
    """(left index, right index) for every ``left_<part>`` with a ``right_<part>`` among ``names``."""
    index = {n: i for i, n in enumerate(names)}
    return [(i, index["right_" + n[5:]]) for i, n in enumerate(names)
            if n.startswith("left_") and "right_" + n[5:] in index]


@register_dataset("ap10k")
class AP10K(PairDataset):
    """AP-10K correspondence pairs on a canvas; see the module docstring for the files and the protocol.

    Args: ``root``; ``split`` ``"test"``/``"val"``/``"trn"`` (alias ``"train"``); ``canvas`` (None →
    ``pad_square(840)``); ``thr`` ``"bbox"`` (default) or ``"image"``; ``split_kind``
    ``"intra-species"``/``"cross-species"``/``"cross-family"``; ``categories`` (species, families or
    ``"all"`` by split kind). ``ds[i]`` has K = 17 keypoints; ``flags`` holds ``split``, ``split_kind``,
    ``src/trg_species``, ``src/trg_family`` and ``src/trg_visible`` ((K,) bool).
    """

    default_thr = "bbox"
    K = AP10K_K

    def __init__(self, root: str, split: str = "test", canvas: Canvas | None = None, thr: str | None = None,
                 split_kind: str = "intra-species", categories=None):
        super().__init__(canvas)
        split = {"train": "trn"}.get(split, split)
        if split_kind not in AP10K_SPLIT_KINDS:
            raise ValueError(f"ap10k: split_kind must be one of {list(AP10K_SPLIT_KINDS)}, got {split_kind!r}")
        if split not in ("test", "val") + (("trn",) if split_kind == "intra-species" else ()):
            raise ValueError(f"ap10k: split must be 'test', 'val' or (intra-species only) 'trn', got {split!r}")
        self.thr_kind = resolve_thr(thr, self.default_thr, "ap10k")
        self.root = require_dir(root, "the ap-10k folder (ImageAnnotation/, JPEGImages/, PairAnnotation/)")
        self.split, self.split_kind = split, split_kind
        pair_dir = require_dir(os.path.join(root, "PairAnnotation", split + AP10K_SPLIT_KINDS[split_kind]),
                               f"the AP-10K {split_kind} pair annotations of split {split!r}")
        wanted = name_filter(categories)
        cache: dict = {}
        self.items = []
        for file in sorted(f for f in os.listdir(pair_dir) if f.endswith(".json")):
            path = os.path.join(pair_dir, file)
            if ":" not in file:
                raise DatasetFormatError(f"{path}: pair file name must be '<src>-<trg>:<category>.json'")
            category = file[:-5].rsplit(":", 1)[1]
            if wanted is not None and category not in wanted:
                continue
            ann = read_json(path, "an AP-10K pair annotation")
            sides = [self._side(ann, path, s, cache) for s in ("src", "trg")]
            self.items.append((file[:-5], category, *sides))
        self.categories = check_selection("ap10k", [it[1] for it in self.items], wanted)
        self.flip_perm = flip_perm_from_pairs(self.K, lr_pairs_from_names(AP10K_KP_NAMES))

    def _side(self, ann: dict, path: str, s: str, cache: dict):
        stored = get_str(ann, f"{s}_json_path", path)
        parts = stored.replace("\\", "/").split("/")
        if "ImageAnnotation" not in parts or parts[-1] == "ImageAnnotation":
            raise DatasetFormatError(f"{path}: field '{s}_json_path' must point into an ImageAnnotation/ "
                                     f"folder, got {stored!r}")
        rel = parts[len(parts) - parts[::-1].index("ImageAnnotation"):]
        ann_path = os.path.join(self.root, "ImageAnnotation", *rel)
        if ann_path not in cache:
            cache[ann_path] = self._read_image_ann(ann_path)
        kps, vis, bbox, size, species, family = cache[ann_path]
        image_path = os.path.join(self.root, "JPEGImages", *rel[:-1], os.path.splitext(rel[-1])[0] + ".jpg")
        return ImageAnn(image_path, kps, vis, bbox, size, ann_path, "keypoints"), species, family

    def _read_image_ann(self, path: str):
        data = read_json(path, "an AP-10K instance annotation (ImageAnnotation/<family>/<species>/<id>.json)")
        raw = get_field(data, "keypoints", path)
        try:
            arr = np.asarray(raw, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            raise DatasetFormatError(f"{path}: field 'keypoints' must be a flat list of numbers") from None
        if arr.shape != (3 * self.K,) or not np.isfinite(arr).all():
            raise DatasetFormatError(f"{path}: field 'keypoints' must hold {self.K} finite [x, y, v] triples "
                                     f"({3 * self.K} numbers), got {arr.size}")
        arr = arr.reshape(self.K, 3)
        if not np.isin(arr[:, 2], (0, 1, 2)).all():
            raise DatasetFormatError(f"{path}: field 'keypoints': visibility flags must be 0, 1 or 2, "
                                     f"got {sorted(set(arr[:, 2].tolist()))}")
        vis = arr[:, 2] == 2
        size = (get_int(data, "width", path), get_int(data, "height", path))
        bbox = parse_box(get_field(data, "bbox", path), path, "bbox", "xywh")
        return (np.where(vis[:, None], arr[:, :2], 0.0), vis, bbox, size, get_str(data, "name", path),
                get_str(data, "supercategory", path))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Pair:
        pair_id, category, (src, src_species, src_family), (trg, trg_species, trg_family) = self.items[i]
        flags = {"split": self.split, "split_kind": self.split_kind, "src_species": src_species,
                 "trg_species": trg_species, "src_family": src_family, "trg_family": trg_family,
                 "src_visible": torch.from_numpy(src.visible.copy()),
                 "trg_visible": torch.from_numpy(trg.visible.copy())}
        return build_pair(self.canvas, src, trg, thr_kind=self.thr_kind, category=category, pair_id=pair_id,
                          flip_perm=self.flip_perm.clone(), kp_names=list(AP10K_KP_NAMES), flags=flags)
