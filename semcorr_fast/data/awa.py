"""AwA-Pose on Demystifying's random pair list (``build_dataset("awa-pose", root=..., pairs=...)``).

Layout under ``root`` (AwA2 images + the AwA-Pose annotation release, github.com/prinik/AwA-Pose):
``JPEGImages/<class>/<class>_<n>.jpg`` and ``Annotations/<class>/<class>_<n>.pickle``. What this loader
assumes of a pickle (the release documents only "pickle.load"; this is what Demystifying's loader
reads): a dict whose ``'a1'`` entry (the first animal; other entries are ignored) maps each part name
to its ``(x, y)`` in image pixels, a part that is not visible having x or y equal to -1 or being
absent, plus an optional ``'bbox'`` = ``(x1, y1, x2, y2)``. Values may be lists, tuples or numpy
arrays (numbers past the first two are ignored); the pickles are read with an unpickler that only
allows numpy arrays/scalars and plain containers, so a pickle naming anything else is refused.

Keypoints: the part names are not published as a list, so ``kp_names`` defaults to the sorted union
of the part names of every pickle under ``Annotations/`` (39 in the AwA-Pose authors' HRNet
config); pass
``kp_names=`` to fix the vocabulary (a part outside it is then an error). A part counts where it is
visible in both images. ``thr`` default "bbox": max(x2 − x1, y2 − y1) of the target box on the canvas
(default ``Canvas.max_side(300)``). A target without a box (or with an all-zero one) is what
``missing_bbox`` decides: ``"zero"`` (default) reproduces the reference code, whose image-size
fallback never fires (``if bbox != 0`` on a list is always true) so the threshold is
max(0 − 0, 0 − 0) = 0 and the pair's keypoints only count when exact; ``"image"`` uses the target
image's max side, the fallback the code evidently meant. ``flags['thr_source']`` says which applied.

Pair list (Demystifying ``pairs/awa/random_pairs.txt``): ``<class>/<img>.jpg <class>/<img>.jpg``; the
protocol evaluates the first 10,000 lines. Category: the source image's class folder.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from .base import DatasetFormatError, register_dataset
from .pairlist import PROTOCOL_N_PAIRS, ImageRecord, ListedPairDataset, join_dir

_SAFE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
                 ("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor")}
_SAFE_GLOBALS |= {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for n in ("_reconstruct", "scalar")}
_SAFE_GLOBALS |= {(m, n) for m in ("builtins", "__builtin__")
                  for n in ("list", "tuple", "dict", "set", "frozenset", "int", "float", "object")}


class _AnnotationUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name} (only numpy arrays and plain containers)")
        return super().find_class(module, name)


def read_awa_pickle(path: str) -> tuple[list[str], np.ndarray, tuple[float, float, float, float] | None]:
    """One AwA-Pose annotation → (part names, (P, 2) float64 (x, y) image pixels, bbox (x1, y1, x2, y2) or None)."""
    try:
        with open(path, "rb") as fh:
            d = _AnnotationUnpickler(fh, encoding="latin1").load()
    except Exception as exc:  # unpickling raises many types for corrupt files
        raise DatasetFormatError(f"{path}: not a readable AwA-Pose annotation pickle ({exc})") from None
    if not isinstance(d, dict) or not isinstance(d.get("a1"), dict):
        raise DatasetFormatError(f"{path}, field 'a1': expected a dict {{part name: (x, y), 'bbox': (x1, y1, x2, y2)}}")
    names = [k for k in d["a1"] if k != "bbox"]
    try:  # one conversion for the whole dict; per-part below only to name a bad one
        xy = np.asarray([d["a1"][k] for k in names], dtype=np.float64).reshape(len(names), -1)[:, :2]
        ok = xy.shape == (len(names), 2) and np.isfinite(xy).all()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        for k in names:
            _numbers(path, k, d["a1"][k], 2)
        raise DatasetFormatError(f"{path}, field 'a1': parts must all hold the same number of values")
    bbox = None
    if "bbox" in d["a1"]:
        box = _numbers(path, "bbox", d["a1"]["bbox"], 4, exact=True)
        if box.any():
            if box[2] <= box[0] or box[3] <= box[1]:
                raise DatasetFormatError(f"{path}, field 'a1'['bbox']: expected x1 < x2 and y1 < y2, "
                                         f"got {box.tolist()}")
            bbox = tuple(box.tolist())
    return [str(k) for k in names], xy, bbox


def _numbers(path: str, key, value, need: int, exact: bool = False) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        arr = np.empty(0)
    if arr.size < need or (exact and arr.size != need) or not np.isfinite(arr[:need]).all():
        raise DatasetFormatError(f"{path}, field 'a1'[{key!r}]: expected {need} finite numbers, got {value!r}")
    return arr


@register_dataset("awa-pose")
class AwAPose(ListedPairDataset):
    """AwA-Pose pairs. ``root``: folder with ``Annotations/`` and ``JPEGImages/``; ``pairs``: the pair
    list path (default ``root/random_pairs.txt``); ``n_pairs``: first lines evaluated (None: all);
    ``canvas``: default ``Canvas.max_side(300)``; ``thr``: "bbox" (default) or "image";
    ``kp_names``: the keypoint vocabulary (default: sorted union over all annotations);
    ``missing_bbox``: threshold base of a target without a box, "zero" (reference code) or "image"."""

    pair_list_hint = "Demystifying's pairs/awa/random_pairs.txt, '<class>/<img>.jpg <class>/<img>.jpg'"

    def __init__(self, root, pairs=None, n_pairs: int | None = PROTOCOL_N_PAIRS, canvas=None, thr=None,
                 kp_names: list[str] | None = None, missing_bbox: str = "zero"):
        super().__init__(root, canvas, thr)
        if missing_bbox not in ("zero", "image"):
            raise ValueError(f"missing_bbox must be 'zero' (reference code) or 'image', got {missing_bbox!r}")
        self.missing_bbox = missing_bbox
        ann_dir = join_dir(self.root, "Annotations", what="AwA-Pose Annotations/<class>/<img>.pickle")
        join_dir(self.root, "JPEGImages", what="AwA2 JPEGImages/<class>/<img>.jpg")
        self.categories = sorted(c for c in os.listdir(ann_dir) if os.path.isdir(os.path.join(ann_dir, c)))
        raw = {}
        for cls in self.categories:
            for fn in sorted(os.listdir(os.path.join(ann_dir, cls))):
                if fn.endswith(".pickle"):
                    path = os.path.join(ann_dir, cls, fn)
                    raw[f"{cls}/{fn[:-len('.pickle')]}.jpg"] = (path, cls, *read_awa_pickle(path))
        if not raw:
            raise FileNotFoundError(f"{ann_dir}: no <class>/<img>.pickle found (expected AwA-Pose annotations)")
        if kp_names is None:
            kp_names = sorted({p for _, _, parts, _, _ in raw.values() for p in parts})
        self.kp_names = list(kp_names)
        index = {p: k for k, p in enumerate(self.kp_names)}
        for name, (path, cls, parts, xy, bbox) in raw.items():
            unknown = [p for p in parts if p not in index]
            if unknown:
                raise DatasetFormatError(f"{path}, field 'a1'[{unknown[0]!r}]: part not in kp_names {self.kp_names}")
            kps, vis = np.zeros((len(index), 2)), np.zeros(len(index), dtype=bool)
            rows = [index[p] for p in parts]
            kps[rows], vis[rows] = xy, (xy != -1).all(axis=1)
            self.records[name] = ImageRecord(name=name, path=os.path.join(self.root, "JPEGImages", name), kps=kps,
                                             vis=vis, category=cls, bbox=bbox)
        self._bind_pairs(pairs, n_pairs)
