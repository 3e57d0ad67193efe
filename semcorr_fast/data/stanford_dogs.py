"""Stanford Dogs with StanfordExtra keypoints (``build_dataset("stanford-dogs", root=..., pairs=...)``).

Layout under ``root``: ``Images/<synset>-<breed>/<img>.jpg`` (Stanford Dogs) and StanfordExtra's JSON,
by default ``StanfordExtra_V12/StanfordExtra_v12.json`` (``annotations=`` overrides it): a list of
entries with ``img_path`` (``<synset>-<breed>/<img>.jpg``), ``joints`` (24 × ``[x, y, visibility]``,
visibility 0/1), ``img_bbox`` (``[x, y, w, h]``), ``img_width``/``img_height`` and others not used.

**No pair list is shipped**: Demystifying's ``pairs/`` has none for Stanford Dogs and the project
holds none; pass ``pairs=`` (lines ``<img_path> <img_path>``, e.g. random pairs of StanfordExtra's
test split). The protocol evaluates the first 10,000 lines. Keypoints: the 24 StanfordExtra joints
(``KP_NAMES``, from its ``keypoint_definitions.csv``); a joint counts where its visibility is 1 in
both images. ``thr`` default "bbox": max(w, h) of the target ``img_bbox`` on the canvas (default
``Canvas.max_side(300)``). Category: the source image's breed folder.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .base import DatasetFormatError, register_dataset, require_file
from .pairlist import PROTOCOL_N_PAIRS, ImageRecord, ListedPairDataset, to_number

KP_NAMES = [
    "Left front leg: paw", "Left front leg: middle joint", "Left front leg: top",
    "Left rear leg: paw", "Left rear leg: middle joint", "Left rear leg: top",
    "Right front leg: paw", "Right front leg: middle joint", "Right front leg: top",
    "Right rear leg: paw", "Right rear leg: middle joint", "Right rear leg: top",
    "Tail start", "Tail end", "Base of left ear", "Base of right ear", "Nose", "Chin",
    "Left ear tip", "Right ear tip", "Left eye", "Right eye", "Withers", "Throat",
]


@register_dataset("stanford-dogs")
class StanfordDogs(ListedPairDataset):
    """Stanford Dogs / StanfordExtra pairs. ``root``: folder holding ``Images/``; ``pairs``: the pair
    list path (required in practice: none is shipped; default ``root/random_pairs.txt``);
    ``n_pairs``: first lines evaluated (None: all); ``canvas``: default ``Canvas.max_side(300)``;
    ``thr``: "bbox" (default) or "image"; ``annotations``: the StanfordExtra JSON path."""

    pair_list_hint = "none is shipped for Stanford Dogs: lines '<img_path> <img_path>' of StanfordExtra"

    def __init__(self, root, pairs=None, n_pairs: int | None = PROTOCOL_N_PAIRS, canvas=None, thr=None,
                 annotations=None):
        super().__init__(root, canvas, thr)
        ann = os.fspath(annotations) if annotations is not None else os.path.join(
            self.root, "StanfordExtra_V12", "StanfordExtra_v12.json")
        require_file(ann, "the StanfordExtra JSON (a list of {img_path, joints, img_bbox, ...})")
        try:
            with open(ann, encoding="utf-8") as fh:
                entries = json.load(fh)
        except json.JSONDecodeError as exc:
            raise DatasetFormatError(f"{ann}: not valid JSON ({exc})") from None
        if not isinstance(entries, list):
            raise DatasetFormatError(f"{ann}: expected a JSON list of entries, got {type(entries).__name__}")
        self.kp_names = list(KP_NAMES)
        self._ann, self._entries, self._index = ann, entries, {}
        for n, e in enumerate(entries):
            if not isinstance(e, dict) or not isinstance(e.get("img_path"), str):
                raise DatasetFormatError(f"{ann}, entry {n}, field 'img_path': missing or not a string")
            self._index.setdefault(e["img_path"], []).append(n)
        self.categories = sorted({p.split("/")[0] for p in self._index})
        self._bind_pairs(pairs, n_pairs)

    def _key(self, token: str) -> str:
        """Parse the StanfordExtra entry a pair-list field names (on first use) into ``self.records``."""
        if token in self.records or token not in self._index:
            return token
        hits = self._index[token]
        if len(hits) > 1:
            raise ValueError(f"{token!r} has {len(hits)} entries in {self._ann} (entries {hits}); "
                             "which to use is ambiguous")
        n = hits[0]
        e, where = self._entries[n], f"{self._ann}, entry {n} ({token})"
        joints = e.get("joints")
        if not isinstance(joints, list) or len(joints) != len(KP_NAMES) or not all(
                isinstance(j, list) and len(j) == 3 for j in joints):
            raise DatasetFormatError(f"{where}, field 'joints': expected {len(KP_NAMES)} [x, y, visibility] triples")
        try:
            arr = np.asarray(joints, dtype=np.float64)
        except (TypeError, ValueError):
            arr = np.full((len(joints), 3), np.nan)
        if not np.isfinite(arr).all():  # name the first bad value
            for k, j in enumerate(joints):
                for c, v in enumerate(j):
                    to_number(v, where, f"'joints'[{k}][{c}]")
        if not ((arr[:, 2] == 0) | (arr[:, 2] == 1)).all():
            raise DatasetFormatError(f"{where}, field 'joints': visibility must be 0 or 1, "
                                     f"got {sorted(set(arr[:, 2].tolist()))}")
        box = e.get("img_bbox")
        if not isinstance(box, list) or len(box) != 4:
            raise DatasetFormatError(f"{where}, field 'img_bbox': expected [x, y, w, h], got {box!r}")
        x, y, w, h = (to_number(v, where, f"'img_bbox'[{c}]") for c, v in enumerate(box))
        if w <= 0 or h <= 0:
            raise DatasetFormatError(f"{where}, field 'img_bbox': width/height must be > 0, got {w}, {h}")
        size = None
        if "img_height" in e and "img_width" in e:
            size = tuple(to_number(e[k], where, repr(k), int) for k in ("img_height", "img_width"))
        self.records[token] = ImageRecord(name=token, path=os.path.join(self.root, "Images", token), kps=arr[:, :2],
                                          vis=arr[:, 2] == 1.0, category=token.split("/")[0],
                                          bbox=(x, y, x + w, y + h), size=size)
        return token
