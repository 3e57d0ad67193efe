"""AFLW as Demystifying uses it: the MTFL release's AFLW face crops (``build_dataset("aflw", ...)``).

Layout under ``root`` (MTFL): ``testing.txt`` (``annotations=`` picks another file, e.g.
``training.txt``), one image per line: ``PATH X1..X5 Y1..Y5 [GENDER SMILE GLASSES POSE]`` (the five
x's, then the five y's, of left eye, right eye, nose, left mouth corner, right mouth corner; leading
blanks are ignored and backslashes in PATH, as in MTFL's Windows-style paths, are read as ``/``, so
``AFLW\\0001-image20056.jpg`` is ``AFLW/0001-image20056.jpg``), and the images at ``root/PATH``.
The four attributes, when present, go to the pair's flags (``src_gender`` …; MTFL codes gender
1 male / 2 female, smile and glasses 1 yes / 2 no, pose 1..5 left profile … right profile).

Pair list (Demystifying ``pairs/aflw/random_pairs.txt``): ``AFLW/<src>.jpg AFLW/<trg>.jpg``; the
protocol evaluates the first 10,000 lines. All five landmarks are always annotated, so ``valid`` is
all true. There are no bboxes: ``thr`` is "image" (max side of the target image on the canvas, i.e.
300 on the default ``Canvas.max_side(300)``). Category: "face", or with ``classes=`` a file of one
label per annotation line (the reference code's ``test_classes.txt``, not part of MTFL).
"""
from __future__ import annotations

import os

import numpy as np

from .base import DatasetFormatError, register_dataset
from .pairlist import PROTOCOL_N_PAIRS, ImageRecord, ListedPairDataset, read_rows, to_number

KP_NAMES = ["left eye", "right eye", "nose", "left mouth corner", "right mouth corner"]
ATTRIBUTES = ("gender", "smile", "glasses", "pose")


@register_dataset("aflw")
class AFLW(ListedPairDataset):
    """AFLW (MTFL crops) pairs. ``root``: the MTFL folder; ``pairs``: the pair list path (default
    ``root/random_pairs.txt``); ``n_pairs``: first lines evaluated (None: all); ``canvas``: default
    ``Canvas.max_side(300)``; ``thr``: "image" only; ``annotations``: the MTFL list (relative to
    ``root`` or absolute); ``classes``: optional per-line category file."""

    default_thr = "image"
    has_bboxes = False
    pair_list_hint = "Demystifying's pairs/aflw/random_pairs.txt, 'AFLW/<src>.jpg AFLW/<trg>.jpg'"

    def __init__(self, root, pairs=None, n_pairs: int | None = PROTOCOL_N_PAIRS, canvas=None, thr=None,
                 annotations="testing.txt", classes=None):
        super().__init__(root, canvas, thr)
        ann = os.path.join(self.root, os.fspath(annotations))
        rows = read_rows(ann, "MTFL landmarks: PATH X1..X5 Y1..Y5 [GENDER SMILE GLASSES POSE]",
                         (11, 11 + len(ATTRIBUTES)))
        labels = None
        if classes is not None:
            labels = [t[0] for _, t in read_rows(os.path.join(self.root, os.fspath(classes)),
                                                 "one category label per annotation line", 1)]
            if len(labels) != len(rows):
                raise DatasetFormatError(f"{classes}: {len(labels)} labels for the {len(rows)} lines of {ann}")
        self.kp_names = list(KP_NAMES)
        for n, (lineno, toks) in enumerate(rows):
            where = f"{ann}, line {lineno}"
            name = toks[0].replace("\\", "/")
            if name in self.records:
                raise DatasetFormatError(f"{where}, field 1 (path): {name!r} repeats an earlier line")
            xy = np.array([to_number(t, where, f"{j + 2} ({'xy'[j // 5]}{j % 5 + 1})")
                           for j, t in enumerate(toks[1:11])])
            flags = {a: to_number(t, where, f"{12 + j} ({a})", int)
                     for j, (a, t) in enumerate(zip(ATTRIBUTES, toks[11:]))}
            self.records[name] = ImageRecord(name=name, path=os.path.join(self.root, name),
                                             kps=np.stack([xy[:5], xy[5:]], axis=1), vis=np.ones(5, dtype=bool),
                                             category="face" if labels is None else labels[n], flags=flags)
        self.categories = ["face"] if labels is None else sorted(set(labels))
        self._bind_pairs(pairs, n_pairs)

    def _key(self, token: str) -> str:
        return token.replace("\\", "/")
