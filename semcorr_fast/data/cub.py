"""CUB-200-2011 on Demystifying's random pair list (``build_dataset("cub", root=..., pairs=...)``).

Layout under ``root`` (the official release): ``images.txt`` (``IMAGE_ID RELPATH``), ``images/RELPATH``,
``parts/parts.txt`` (``PART_ID NAME``: the 15 parts, back … throat), ``parts/part_locs.txt``
(``IMAGE_ID PART_ID X Y VISIBLE``), ``bounding_boxes.txt`` (``IMAGE_ID X Y W H``),
``image_class_labels.txt`` (``IMAGE_ID CLASS_ID``), ``classes.txt`` (``CLASS_ID NAME``).

Pair list (Demystifying ``pairs/cub/random_pairs.txt``): ``SRC_ID TRG_ID``, 1-based ids of
``images.txt``; the protocol evaluates the first 10,000 lines. Keypoints are the 15 parts in
``parts.txt`` order; a part counts where ``VISIBLE`` is 1 in both images. ``thr`` default "bbox":
max(W, H) of the target's ``bounding_boxes.txt`` box, on the canvas (default ``Canvas.max_side(300)``,
see :mod:`semcorr_fast.data.pairlist`). ``flip_perm`` swaps the left/right eye, leg and wing.
"""
from __future__ import annotations

import os

import numpy as np

from .base import DatasetFormatError, register_dataset
from .pairlist import PROTOCOL_N_PAIRS, ImageRecord, ListedPairDataset, line_of, read_numeric, read_rows, to_number


def _id_table(path: str, what: str, ncols: int) -> dict[int, tuple[int, list[str]]]:
    """``ID FIELDS...`` rows → {id: (line, fields)}; a repeated id is a DatasetFormatError."""
    out = {}
    for lineno, toks in read_rows(path, what, ncols, maxsplit=ncols - 1):
        key = to_number(toks[0], f"{path}, line {lineno}", "1 (id)", int)
        if key in out:
            raise DatasetFormatError(f"{path}, line {lineno}, field 1 (id): id {key} repeats line {out[key][0]}")
        out[key] = (lineno, toks[1:])
    return out


def _by_image(path: str, fields: tuple[str, ...], ids: np.ndarray, per_image: int = 1, checks=()) -> np.ndarray:
    """Numeric table whose first field is an image id (and, if ``per_image`` > 1, the second a 1-based
    sub-index such as the part id) → its rows aligned to ``ids``: (len(ids), per_image, len(fields)).

    Unknown ids, sub-indices out of range, repeated or missing (image, sub) rows and rows failing one
    of ``checks`` (``(message, fn(table) -> ok mask)``) raise DatasetFormatError naming file and line.
    """
    what = f"CUB {os.path.basename(path)}: " + " ".join(x.upper().replace(" ", "_") for x in fields)
    a = read_numeric(path, what, fields)
    n = np.searchsorted(ids, a[:, 0]).clip(0, max(len(ids) - 1, 0))
    bad = [(f"field 1 ({fields[0]}): not an image id of images.txt",
            ids[n] != a[:, 0] if len(ids) else np.ones(len(a), dtype=bool))]
    if per_image > 1:
        bad.append((f"field 2 ({fields[1]}): expected an integer in 1..{per_image}",
                    ~np.isin(a[:, 1], np.arange(1, per_image + 1))))
    flat = n * per_image + (a[:, 1].astype(np.int64) - 1 if per_image > 1 else 0)
    order = np.argsort(flat, kind="stable")
    dup = np.zeros(len(a), dtype=bool)
    dup[order[1:][flat[order][1:] == flat[order][:-1]]] = True
    key = f"fields 1, 2 ({fields[0]}, {fields[1]})" if per_image > 1 else f"field 1 ({fields[0]})"
    for msg, rows in bad + [(f"{key}: repeats an earlier line", dup)] + [(msg, ~fn(a)) for msg, fn in checks]:
        if rows.any():
            r = int(np.flatnonzero(rows)[0])
            raise DatasetFormatError(f"{path}, line {line_of(path, r)}, {msg}: {a[r].tolist()}")
    slot = np.full(len(ids) * per_image, -1, dtype=np.int64)
    slot[flat] = np.arange(len(a))
    slot = slot.reshape(len(ids), per_image)
    missing = np.flatnonzero((slot < 0).any(axis=1))
    if missing.size:
        sub = f" part(s) {(np.flatnonzero(slot[missing[0]] < 0) + 1).tolist()}" if per_image > 1 else ""
        raise DatasetFormatError(f"{path}: no row for image id {ids[missing[0]]}{sub}")
    return a[slot]


@register_dataset("cub")
class CUB(ListedPairDataset):
    """CUB-200-2011 pairs. ``root``: the CUB_200_2011 folder; ``pairs``: the pair list path
    (default ``root/random_pairs.txt``); ``n_pairs``: first lines evaluated (None: all);
    ``canvas``: default ``Canvas.max_side(300)``; ``thr``: "bbox" (default) or "image"."""

    pair_list_hint = "Demystifying's pairs/cub/random_pairs.txt, 'SRC_ID TRG_ID' ids of images.txt"

    def __init__(self, root, pairs=None, n_pairs: int | None = PROTOCOL_N_PAIRS, canvas=None, thr=None):
        super().__init__(root, canvas, thr)
        f = lambda *p: os.path.join(self.root, *p)  # noqa: E731
        parts = _id_table(f("parts", "parts.txt"), "CUB parts: PART_ID NAME", 2)
        if sorted(parts) != list(range(1, len(parts) + 1)):
            raise DatasetFormatError(f"{f('parts', 'parts.txt')}: part ids must be 1..{len(parts)}, "
                                     f"got {sorted(parts)}")
        self.kp_names = [parts[k][1][0] for k in range(1, len(parts) + 1)]
        classes = {k: v[0] for k, (_, v) in _id_table(f("classes.txt"), "CUB classes: CLASS_ID NAME", 2).items()}
        self.categories = [classes[k] for k in sorted(classes)]
        images = _id_table(f("images.txt"), "CUB images: IMAGE_ID RELPATH", 2)
        ids, P = np.array(sorted(images), dtype=np.int64), len(self.kp_names)

        labels = _by_image(f("image_class_labels.txt"), ("image id", "class id"), ids, checks=[
            ("field 2 (class id): not in classes.txt", lambda a: np.isin(a[:, 1], list(classes)))])[:, 0]
        boxes = _by_image(f("bounding_boxes.txt"), ("image id", "x", "y", "w", "h"), ids, checks=[
            ("fields 4, 5 (w, h): must be > 0", lambda a: (a[:, 3:] > 0).all(axis=1))])[:, 0]
        locs = _by_image(f("parts", "part_locs.txt"), ("image id", "part id", "x", "y", "visible"), ids, P, checks=[
            ("field 5 (visible): expected 0 or 1", lambda a: np.isin(a[:, 4], (0.0, 1.0)))])
        xyxy = np.concatenate([boxes[:, 1:3], boxes[:, 1:3] + boxes[:, 3:5]], axis=1).tolist()
        for k, img in enumerate(ids.tolist()):
            rel = images[img][1][0]
            self.records[str(img)] = ImageRecord(
                name=rel, path=f("images", rel), kps=locs[k, :, 2:4], vis=locs[k, :, 4] == 1,
                category=classes[int(labels[k, 1])], bbox=tuple(xyxy[k]))
        self._bind_pairs(pairs, n_pairs)

    def _key(self, token: str) -> str:
        try:
            return str(int(token))
        except ValueError:
            raise ValueError(f"expected a 1-based image id of images.txt, got {token!r}") from None
