"""PF-PASCAL and PF-WILLOW (Ham et al., Proposal Flow) in their published layouts.

PF-PASCAL, ``root`` = the ``PF-dataset-PASCAL`` folder::

    <split>_pairs_pf_pascal.csv     the pair list (GeoAware-SC / NCNet name; ``trn_pairs.csv``-style
                                    names of the HPF release are tried next): source image path, target
                                    image path, class id 1..20 (alphabetical VOC classes), then for
                                    test/val XA, YA, XB, YB (";"-separated coordinates of the common
                                    keypoints); a header row is recognised by a non-integer class cell
    Annotations/<class>/<img>.mat   ``kps`` (N, 2) with NaN rows for absent keypoints, ``bbox`` [x1 y1 x2 y2]
                                    (read with ``scipy.io.loadmat``)
    JPEGImages/<img>.jpg            (the csv's image paths are matched by file name)

PF-WILLOW, ``root`` = the folder holding the category folders (``car(G)/``, ``duck(S)/``, ...) and the
pair list ``test_pairs_pf.csv`` (WeakAlign / NCNet name) or ``test_pairs.csv``: imageA, imageB, then
XA1..XA10, YA1..YA10, XB1..XB10, YB1..YB10. An image ``.../<folder>/<file>`` of the csv is read from
``root/<folder>/<file>``; the folder is the pair's category.

Protocol:

* PF-PASCAL: keypoints indexed by the row of the class's ``kps`` array (the class vocabulary), padded
  to K = 20 as GeoAware-SC pads them; ``valid`` = present (non-NaN) in both. ``thr`` default
  ``"image"``: max side of the target image on the canvas (GeoAware-SC ``BBOX_THRE = False`` for
  PF-PASCAL, ``seed_geoaware.md`` §6.1, ``seed_jamaisvu.md`` §4.1; 840 on the default canvas).
  ``kps_source="csv"`` reads the csv's XA/YA/XB/YB columns instead, as GeoAware-SC's test/val loader
  does: those list only the common keypoints, so index k is then the k-th common keypoint, not a
  vocabulary id (same PCK, no part identity); it has no bbox, so ``thr="bbox"`` needs ``"mat"``.
* PF-WILLOW: 10 keypoints, all annotated in every image. ``thr`` default ``"bbox"``: max side of the
  tight box around the target's keypoints (PF-WILLOW has no object boxes; the Proposal-Flow
  protocol and the HPF/CATs loaders normalise by it); ``src_bbox``/``trg_bbox`` are those boxes.
  ``"image"``: the target image's max side. None of the four papers' notes evaluates PF-WILLOW.

Neither dataset has keypoint names or left/right partners: ``kp_names`` and ``flip_perm`` are None.
"""
from __future__ import annotations

import csv
import os

import numpy as np

from .base import DatasetFormatError, Pair, PairDataset, register_dataset, require_dir, require_file
from .canvas import Canvas
from .spair import ImageAnn, build_pair, check_selection, name_filter, resolve_thr

PF_PASCAL_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
                     "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
                     "train", "tvmonitor")
PF_PASCAL_K = 20
PF_WILLOW_K = 10


def read_pair_csv(root: str, names: list[str], what: str) -> tuple[str, list[tuple[int, list[str]]]]:
    """The first of ``names`` under ``root`` that exists → (its path, [(line number, cells)]), header dropped.

    A first row whose third cell is not a number is the header.
    """
    paths = [os.path.join(root, n) for n in names]
    path = next((p for p in paths if os.path.isfile(p)), None)
    if path is None:
        raise FileNotFoundError(f"{' or '.join(paths)}: not found (expected {what})")
    with open(path, newline="") as fh:
        rows = [(i + 1, [c.strip() for c in row]) for i, row in enumerate(csv.reader(fh)) if any(row)]
    if rows and (len(rows[0][1]) < 3 or not _is_number(rows[0][1][2])):
        rows = rows[1:]
    return path, rows


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _coords(text: str, path: str, line: int, column: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in text.split(";") if v.strip()], dtype=np.float64)
    except ValueError:
        raise DatasetFormatError(f"{path}: line {line}, column {column}: expected ';'-separated numbers, "
                                 f"got {text!r}") from None


def _pad(kps: np.ndarray, vis: np.ndarray, K: int, path: str, field: str) -> tuple[np.ndarray, np.ndarray]:
    if len(kps) > K:
        raise DatasetFormatError(f"{path}: field {field!r} has {len(kps)} keypoints, at most {K} expected")
    out_k, out_v = np.zeros((K, 2)), np.zeros(K, bool)
    out_k[:len(kps)], out_v[:len(kps)] = np.where(vis[:, None], kps, 0.0), vis
    return out_k, out_v


@register_dataset("pf-pascal")
class PFPascal(PairDataset):
    """PF-PASCAL pairs on a canvas; see the module docstring for the files and the protocol.

    Args: ``root``; ``split`` ``"test"``/``"val"``/``"trn"`` (alias ``"train"``); ``canvas`` (None →
    ``pad_square(840)``); ``thr`` ``"image"`` (default) or ``"bbox"``; ``categories`` (class names to
    keep); ``kps_source`` ``"mat"`` (default) or ``"csv"``; ``pairs_csv`` (a file name under ``root``
    or a path, overriding the default names). ``ds[i]`` has K = 20 keypoints.
    """

    default_thr = "image"
    K = PF_PASCAL_K

    def __init__(self, root: str, split: str = "test", canvas: Canvas | None = None, thr: str | None = None,
                 categories=None, kps_source: str = "mat", pairs_csv: str | None = None):
        super().__init__(canvas)
        split = {"train": "trn"}.get(split, split)
        if split not in ("trn", "val", "test"):
            raise ValueError(f"pf-pascal: split must be 'trn', 'val' or 'test', got {split!r}")
        if kps_source not in ("mat", "csv") or (kps_source == "csv" and split == "trn"):
            raise ValueError(f"pf-pascal: kps_source must be 'mat' or (test/val only) 'csv', got {kps_source!r}")
        self.thr_kind = resolve_thr(thr, self.default_thr, "pf-pascal")
        if self.thr_kind == "bbox" and kps_source == "csv":
            raise ValueError("pf-pascal: thr='bbox' needs the .mat bboxes (kps_source='mat')")
        self.root = require_dir(root, "the PF-dataset-PASCAL folder (JPEGImages/, Annotations/, pair csv)")
        self.split, self.kps_source = split, kps_source
        long_name = "train" if split == "trn" else split
        names = [pairs_csv] if pairs_csv else [f"{long_name}_pairs_pf_pascal.csv", f"{split}_pairs.csv"]
        path, rows = read_pair_csv(root, names, f"the PF-PASCAL {split} pair list")
        wanted = name_filter(categories)
        mats: dict = {}
        self.items = []
        for line, cells in rows:
            if len(cells) < (7 if kps_source == "csv" else 3):
                raise DatasetFormatError(f"{path}: line {line}: expected source, target, class"
                                         f"{', XA, YA, XB, YB' if kps_source == 'csv' else ''}, got {cells}")
            if not cells[2].isdigit() or not 1 <= int(cells[2]) <= len(PF_PASCAL_CLASSES):
                raise DatasetFormatError(f"{path}: line {line}, column 'class': expected an id in 1..20, "
                                         f"got {cells[2]!r}")
            category = PF_PASCAL_CLASSES[int(cells[2]) - 1]
            if wanted is not None and category not in wanted:
                continue
            sides = [self._mat_side(cells[j], category, mats) for j in (0, 1)]
            if kps_source == "csv":
                sides = self._csv_sides(cells, sides, path, line)
            pair_id = "-".join(os.path.splitext(os.path.basename(c))[0] for c in cells[:2])
            self.items.append((pair_id, category, *sides))
        self.categories = check_selection("pf-pascal", [it[1] for it in self.items], wanted)

    def _mat_side(self, image: str, category: str, cache: dict) -> ImageAnn:
        name = os.path.basename(image)
        image_path = os.path.join(self.root, "JPEGImages", name)
        if self.kps_source == "csv":
            return ImageAnn(image_path, np.zeros((self.K, 2)), np.zeros(self.K, bool), None, None, "", "")
        ann = os.path.join(self.root, "Annotations", category, os.path.splitext(name)[0] + ".mat")
        if ann not in cache:
            cache[ann] = self._read_mat(ann)
        kps, vis, bbox = cache[ann]
        return ImageAnn(image_path, kps, vis, bbox, None, ann, "kps")

    def _read_mat(self, path: str):
        require_file(path, "a PF-PASCAL keypoint annotation (.mat with 'kps' and 'bbox')")
        try:
            import scipy.io
        except ImportError as exc:  # scipy is needed for this dataset only
            raise ImportError("pf-pascal reads Annotations/*.mat with scipy.io.loadmat: install scipy, "
                              "or pass kps_source='csv' for the test/val splits") from exc
        try:
            mat = scipy.io.loadmat(path)
        except Exception as exc:  # scipy raises several types for corrupt files
            raise DatasetFormatError(f"{path}: not a readable .mat file ({exc})") from exc
        for key in ("kps", "bbox"):
            if key not in mat:
                raise DatasetFormatError(f"{path}: missing field {key!r}")
        kps = np.asarray(mat["kps"], dtype=np.float64)
        if kps.size == 0:
            kps = kps.reshape(0, 2)
        if kps.ndim != 2 or kps.shape[1] != 2:
            raise DatasetFormatError(f"{path}: field 'kps' must be (N, 2) [x, y] rows, got shape {kps.shape}")
        vis = ~np.isnan(kps).any(axis=1)
        if np.isinf(kps).any():
            raise DatasetFormatError(f"{path}: field 'kps' holds infinite coordinates")
        bbox = np.asarray(mat["bbox"], dtype=np.float64).reshape(-1)
        if bbox.shape != (4,) or not np.isfinite(bbox).all() or not (bbox[2] > bbox[0] and bbox[3] > bbox[1]):
            raise DatasetFormatError(f"{path}: field 'bbox' must be a non-empty [x1 y1 x2 y2], got {mat['bbox']!r}")
        return (*_pad(kps, vis, self.K, path, "kps"), bbox)

    def _csv_sides(self, cells, sides, path, line) -> list[ImageAnn]:
        cols = [_coords(cells[3 + j], path, line, c) for j, c in enumerate(("XA", "YA", "XB", "YB"))]
        if len({len(c) for c in cols}) != 1:
            raise DatasetFormatError(f"{path}: line {line}: XA, YA, XB, YB must have equal lengths, "
                                     f"got {[len(c) for c in cols]}")
        out = []
        for side, (xs, ys), field in zip(sides, (cols[:2], cols[2:]), ("XA/YA", "XB/YB")):
            kps, vis = _pad(np.stack([xs, ys], 1), np.ones(len(xs), bool), self.K, path, field)
            out.append(ImageAnn(side.image_path, kps, vis, None, None, f"{path} line {line}", field))
        return out

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Pair:
        pair_id, category, src, trg = self.items[i]
        return build_pair(self.canvas, src, trg, thr_kind=self.thr_kind, category=category, pair_id=pair_id,
                          flags={"split": self.split, "kps_source": self.kps_source})


@register_dataset("pf-willow")
class PFWillow(PairDataset):
    """PF-WILLOW pairs on a canvas; see the module docstring for the files and the protocol.

    Args: ``root``; ``split`` (only ``"test"`` exists); ``canvas`` (None → ``pad_square(840)``); ``thr``
    ``"bbox"`` (default, keypoint box of the target) or ``"image"``; ``categories`` (folder names such
    as ``"car(G)"``); ``pairs_csv`` (overrides the default file names). ``ds[i]`` has K = 10 keypoints.
    """

    default_thr = "bbox"
    K = PF_WILLOW_K

    def __init__(self, root: str, split: str = "test", canvas: Canvas | None = None, thr: str | None = None,
                 categories=None, pairs_csv: str | None = None):
        super().__init__(canvas)
        if split != "test":
            raise ValueError(f"pf-willow: only split 'test' exists, got {split!r}")
        self.thr_kind = resolve_thr(thr, self.default_thr, "pf-willow")
        self.root = require_dir(root, "the PF-WILLOW folder (category folders and test_pairs_pf.csv)")
        names = [pairs_csv] if pairs_csv else ["test_pairs_pf.csv", "test_pairs.csv"]
        path, rows = read_pair_csv(root, names, "the PF-WILLOW pair list")
        wanted = name_filter(categories)
        self.items = []
        for line, cells in rows:
            if len(cells) != 2 + 4 * self.K:
                raise DatasetFormatError(f"{path}: line {line}: expected 2 image paths and {4 * self.K} "
                                         f"coordinates (XA1..YB{self.K}), got {len(cells)} cells")
            try:
                xy = np.array([float(c) for c in cells[2:]], dtype=np.float64).reshape(4, self.K)
            except ValueError:
                raise DatasetFormatError(f"{path}: line {line}: keypoint coordinates must be numbers") from None
            if not np.isfinite(xy).all():
                raise DatasetFormatError(f"{path}: line {line}: non-finite keypoint coordinates")
            parts = [c.replace("\\", "/").split("/") for c in cells[:2]]
            if min(len(p) for p in parts) < 2:
                raise DatasetFormatError(f"{path}: line {line}: image paths {cells[:2]} need a category folder")
            category = parts[0][-2]
            if wanted is not None and category not in wanted:
                continue
            sides = []
            for p, (xs, ys), field in zip(parts, (xy[:2], xy[2:]), ("XA/YA", "XB/YB")):
                box = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
                if not (box[2] > box[0] and box[3] > box[1]):
                    raise DatasetFormatError(f"{path}: line {line}: columns {field}: the keypoints span an "
                                             f"empty box {box.tolist()}")
                sides.append(ImageAnn(os.path.join(root, p[-2], p[-1]), np.stack([xs, ys], 1),
                                      np.ones(self.K, bool), box, None, f"{path} line {line}", field))
            pair_id = "-".join(os.path.splitext(os.path.basename(c))[0] for c in cells[:2])
            self.items.append((pair_id, category, *sides))
        self.categories = check_selection("pf-willow", [it[1] for it in self.items], wanted)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Pair:
        pair_id, category, src, trg = self.items[i]
        return build_pair(self.canvas, src, trg, thr_kind=self.thr_kind, category=category, pair_id=pair_id,
                          flags={"split": "test"})
