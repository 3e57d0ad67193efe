"""The Demystifying protocol's random pair lists, and the dataset base the four loaders over them share.

Aygün & Mac Aodha (ECCV'22) evaluate CUB-200-2011, Stanford Dogs (StanfordExtra), AFLW (the MTFL
crops) and AwA-Pose on published lists of random test pairs, one pair per line, two
whitespace-separated fields (source, target), and evaluate the **first 10,000 lines** of each list
(``PROTOCOL_N_PAIRS``). The project never copies those files: every loader takes the list's path.

:class:`ListedPairDataset` turns a pair list plus per-image annotations (:class:`ImageRecord`) into
:class:`~semcorr_fast.data.base.Pair` s on the evaluation canvas. Shared conventions:

* Canvas default ``Canvas.max_side(300)``: Demystifying's evaluation resizes each image so its long
  side is 300 px (Hyperpixel-Flow ``util.resize``) and scales keypoints and the PCK threshold by the
  same ratio. HPF's ``resize`` only shrinks images whose long side exceeds 300; copies in other
  repositories replace that test by ``if True`` and always rescale; Demystifying's own copy is not in
  the public snapshot, so which one it ran is unknown.
  ``max_side`` always rescales (and rounds the pixel size where HPF truncates); a uniform scale of
  images, keypoints and threshold together leaves PCK unchanged up to that rounding.
* ``thr`` (PCK threshold base, canvas pixels): ``"bbox"`` = max side of the target bbox (CUB,
  Stanford Dogs, AwA-Pose), ``"image"`` = max side of the target image (AFLW, which has no bbox).
* Keypoints are indexed by the dataset's fixed keypoint list (``kp_names``). A keypoint not visible in
  an image has coordinates NaN there; ``valid`` = visible in both images. ``category`` is the source
  image's class (as the reference code reports per-class numbers).
"""
from __future__ import annotations

import math
import numbers
import os
import re
import warnings
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
import torch

from .base import DatasetFormatError, Pair, PairDataset, load_image, require_dir, require_file
from .canvas import Canvas, CanvasTransform

PROTOCOL_N_PAIRS = 10_000
DEFAULT_CANVAS_SIDE = 300


def read_pair_list(path: str, n_pairs: int | None = PROTOCOL_N_PAIRS) -> list[tuple[int, str, str]]:
    """Read the first ``n_pairs`` lines of a pair list (``None``: every line).

    Returns a list of ``(line_number, source_field, target_field)`` (1-based line numbers). A line
    without exactly two whitespace-separated fields, or a list shorter than ``n_pairs``, raises
    DatasetFormatError naming the file (and line); nothing is skipped.
    """
    if n_pairs is not None and (isinstance(n_pairs, bool) or not isinstance(n_pairs, numbers.Integral) or n_pairs < 1):
        raise ValueError(f"n_pairs must be a positive int or None (all lines), got {n_pairs!r}")
    require_file(path, "a pair list: one 'SOURCE TARGET' pair per line")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(islice(f, n_pairs), 1):
            toks = line.split()
            if len(toks) != 2:
                raise DatasetFormatError(f"{path}, line {lineno}: expected 2 whitespace-separated fields "
                                         f"(source, target), got {len(toks)}: {line.rstrip()!r}")
            out.append((lineno, toks[0], toks[1]))
    if n_pairs is not None and len(out) < n_pairs:
        raise DatasetFormatError(f"{path}: holds {len(out)} pairs, n_pairs={n_pairs} requested (the protocol "
                                 f"evaluates the first {PROTOCOL_N_PAIRS}); pass n_pairs=None to use every line")
    return out


def read_rows(path: str, what: str, ncols: int | tuple[int, ...], maxsplit: int = -1) -> list[tuple[int, list[str]]]:
    """Whitespace-separated table → ``[(line_number, fields)]``; blank lines hold no record.

    ``ncols``: the allowed field count(s); ``maxsplit`` as in ``str.split`` (for names with spaces).
    A missing file raises FileNotFoundError, a wrong field count DatasetFormatError (file, line).
    """
    require_file(path, what)
    allowed = (ncols,) if isinstance(ncols, int) else tuple(ncols)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            toks = line.strip().split(None, maxsplit)
            if not toks:
                continue
            if len(toks) not in allowed:
                raise DatasetFormatError(f"{path}, line {lineno}: expected {' or '.join(map(str, allowed))} "
                                         f"whitespace-separated fields ({what}), got {len(toks)}")
            rows.append((lineno, toks))
    return rows


def read_numeric(path: str, what: str, fields: tuple[str, ...]) -> np.ndarray:
    """All-numeric whitespace table → (rows, len(fields)) float64, blank lines skipped.

    Parsed by numpy's C reader; if that fails (or a value is not finite) the file is re-read row by
    row so that the DatasetFormatError names the line and the field (``fields`` are their names).
    """
    require_file(path, what)
    try:
        with warnings.catch_warnings():  # an empty file warns; it is simply a table of no rows
            warnings.simplefilter("ignore")
            arr = np.loadtxt(path, dtype=np.float64, ndmin=2, comments=None)
        if arr.shape[0] == 0 or (arr.shape[1] == len(fields) and np.isfinite(arr).all()):
            return arr.reshape(-1, len(fields))
    except ValueError:
        pass
    for lineno, toks in read_rows(path, what, len(fields)):
        for j, tok in enumerate(toks):
            to_number(tok, f"{path}, line {lineno}", f"{j + 1} ({fields[j]})")
    raise DatasetFormatError(f"{path}: not a table of {len(fields)} numbers per line ({what})")


def line_of(path: str, row: int) -> int:
    """1-based line number of the ``row``-th (0-based) non-blank line of ``path`` (for error messages)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if row == 0:
                    return lineno
                row -= 1
    raise IndexError(f"{path}: has no record {row}")


def to_number(tok, where: str, field: str, kind: type = float):
    """Parse one finite number (``kind`` float or int); else DatasetFormatError naming ``where``/``field``."""
    try:
        v = float(tok)
    except (TypeError, ValueError):
        v = math.nan
    if not math.isfinite(v) or (kind is int and v != int(v)):
        raise DatasetFormatError(f"{where}, field {field}: expected a finite {kind.__name__}, got {tok!r}")
    return int(v) if kind is int else v


_LEFT_RIGHT = re.compile(r"(?<![a-z])(left|right)(?![a-z])", re.IGNORECASE)


def flip_perm_from_names(names: list[str]) -> torch.Tensor | None:
    """Left/right mirror permutation (K,) long from keypoint names, or None where the names leave it open.

    A name holding the word "left" (or "right", separated by non-letters: ``"left eye"``,
    ``"front_left_paw"``, ``"Base of left ear"``) maps to the name with that word swapped; a name
    with neither maps to itself. None if a name has both words, a counterpart is missing, or names repeat.
    """
    low = [n.lower() for n in names]
    index = {n: i for i, n in enumerate(low)}
    if len(index) != len(low):
        return None
    perm = []
    for n in low:
        hits = _LEFT_RIGHT.findall(n)
        if len(hits) > 1:
            return None
        mirrored = _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", n)
        if mirrored not in index:
            return None
        perm.append(index[mirrored])
    return torch.tensor(perm, dtype=torch.long)


@dataclass
class ImageRecord:
    """One annotated image. ``kps`` (K, 2) float64 original pixels (x, y); ``vis`` (K,) bool;
    ``bbox`` (x0, y0, x1, y1) original pixels or None; ``size`` (H, W) the annotation declares, or None."""

    name: str
    path: str
    kps: np.ndarray
    vis: np.ndarray
    category: str
    bbox: tuple[float, float, float, float] | None = None
    size: tuple[int, int] | None = None
    flags: dict = field(default_factory=dict)


class ListedPairDataset(PairDataset):
    """Base of the Demystifying-protocol loaders: a pair list over a dict of :class:`ImageRecord` s.

    Subclasses parse their annotation files into ``self.records`` (keyed by what a pair-list field
    names, after :meth:`_key`), set ``kp_names``/``categories`` and call :meth:`_bind_pairs`.
    """

    default_thr = "bbox"
    has_bboxes = True
    missing_bbox = "image"  # thr="bbox" on a target without a box: "image" (its max side) or "zero"
    pair_list_hint = "the dataset's random_pairs.txt"

    @classmethod
    def default_canvas(cls) -> Canvas:
        return Canvas.max_side(DEFAULT_CANVAS_SIDE)

    def __init__(self, root, canvas: Canvas | None, thr: str | None):
        super().__init__(canvas)
        self.root = require_dir(os.fspath(root), f"the {self.name} dataset root")
        thr = self.default_thr if thr is None else thr
        if thr not in ("bbox", "image"):
            raise ValueError(f"thr must be None (protocol default {self.default_thr!r}), 'bbox' or 'image', "
                             f"got {thr!r}")
        if thr == "bbox" and not self.has_bboxes:
            raise ValueError(f"thr='bbox': {self.name} has no bounding boxes; use thr='image' (its protocol)")
        self.thr = thr
        self.records: dict[str, ImageRecord] = {}
        self.kp_names: list[str] = []
        self.flip_perm: torch.Tensor | None = None
        self.pairs: list[tuple[int, str, str]] = []
        self.pair_list: str | None = None

    def _key(self, token: str) -> str:
        """Pair-list field → record key; raise ValueError with a reason for a malformed field."""
        return token

    def _bind_pairs(self, pairs, n_pairs: int | None) -> None:
        path = os.fspath(pairs) if pairs is not None else os.path.join(self.root, "random_pairs.txt")
        require_file(path, f"a {self.name} pair list ({self.pair_list_hint}); pass pairs=<path>")
        self.pair_list = path
        bound = []
        for lineno, *toks in read_pair_list(path, n_pairs):
            keys = []
            for fld, (role, tok) in enumerate(zip(("source", "target"), toks), 1):
                try:
                    key = self._key(tok)
                except DatasetFormatError:
                    raise
                except ValueError as exc:
                    raise DatasetFormatError(f"{path}, line {lineno}, field {fld} ({role}): {exc}") from None
                if key not in self.records:
                    raise DatasetFormatError(f"{path}, line {lineno}, field {fld} ({role}): unknown image "
                                             f"{tok!r} (not in the {self.name} annotations under {self.root})")
                keys.append(key)
            bound.append((lineno, keys[0], keys[1]))
        self.pairs = bound
        self.flip_perm = flip_perm_from_names(self.kp_names)

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, rec: ImageRecord) -> tuple[torch.Tensor, CanvasTransform]:
        image = load_image(rec.path)
        if rec.size is not None and (image.height, image.width) != tuple(rec.size):
            raise DatasetFormatError(f"{rec.path}: image is {image.height}x{image.width} (HxW) but its "
                                     f"annotation declares {rec.size[0]}x{rec.size[1]}")
        return self.canvas.apply(image)

    def _thr(self, rec: ImageRecord, tf: CanvasTransform) -> tuple[float, str]:
        if self.thr == "bbox" and rec.bbox is not None:
            x0, y0, x1, y1 = rec.bbox
            return max((x1 - x0) * tf.sx, (y1 - y0) * tf.sy), "bbox"
        if self.thr == "bbox" and self.missing_bbox == "zero":
            return 0.0, "zero (no bbox)"
        h, w = tf.in_size
        return max(w * tf.sx, h * tf.sy), "image" if self.thr == "image" else "image (no bbox)"

    @staticmethod
    def _kps(rec: ImageRecord, tf: CanvasTransform) -> torch.Tensor:
        kps = tf.points(torch.from_numpy(rec.kps).to(torch.float64)).to(torch.float32)
        kps[~torch.from_numpy(rec.vis)] = float("nan")
        return kps

    def __getitem__(self, i: int) -> Pair:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.name}: pair index {i} out of range for {len(self)} pairs")
        lineno, s, t = self.pairs[i]
        src, trg = self.records[s], self.records[t]
        src_img, stf = self._load(src)
        trg_img, ttf = self._load(trg)
        thr, thr_source = self._thr(trg, ttf)
        flags = {"line": lineno, "trg_category": trg.category, "thr_source": thr_source}
        for side, rec in (("src", src), ("trg", trg)):
            flags.update({f"{side}_{k}": v for k, v in rec.flags.items()})
        box = (lambda rec, tf: None if rec.bbox is None
               else tf.box(torch.tensor(rec.bbox, dtype=torch.float64)).to(torch.float32))
        return Pair(src_image=src_img, trg_image=trg_img, src_kps=self._kps(src, stf), trg_kps=self._kps(trg, ttf),
                    valid=torch.from_numpy(src.vis & trg.vis), thr=float(thr), category=src.category,
                    pair_id=str(lineno), src_name=src.name, trg_name=trg.name, src_bbox=box(src, stf),
                    trg_bbox=box(trg, ttf), src_tf=stf, trg_tf=ttf, flip_perm=self.flip_perm,
                    kp_names=list(self.kp_names), flags=flags)


def join_dir(root: str, *parts: str, what: str) -> str:
    """``os.path.join(root, *parts)`` that must be a directory (FileNotFoundError naming it otherwise)."""
    return require_dir(os.path.join(root, *parts), what)
