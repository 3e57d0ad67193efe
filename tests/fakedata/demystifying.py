"""Tiny datasets in the published on-disk formats of the Demystifying protocol's four datasets.

Each ``make_*(root)`` writes a few small JPEGs and the annotation files under ``root`` (created if
needed) and returns ``(root, pair_list_path)``. What they write is fixed by the module constants and
the ``*_kp`` functions below, so tests can compute the expected keypoints, masks and thresholds.
"""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
from PIL import Image


def _image(path: str, w: int, h: int) -> None:
    """A w×h RGB JPEG with a gradient (so resizing has something to interpolate)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                          np.full((h, w, 1), 128, np.float32)], axis=2)
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=95)


def _write(path: str, lines) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(f"{line}\n" for line in lines))
    return path


# ---------------------------------------------------------------- CUB-200-2011
CUB_PARTS = ["back", "beak", "belly", "breast", "crown", "forehead", "left eye", "left leg", "left wing",
             "nape", "right eye", "right leg", "right wing", "tail", "throat"]
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
# image id: (class id, relative path, (W, H), bbox (x, y, w, h))
CUB_IMAGES = {
    1: (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0001_1.jpg", (40, 30), (4, 6, 20, 10)),
    2: (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0002_2.jpg", (30, 60), (2, 5, 25, 40)),
    3: (2, "002.Laysan_Albatross/Laysan_Albatross_0003_3.jpg", (50, 50), (10, 10, 30, 20)),
    4: (2, "002.Laysan_Albatross/Laysan_Albatross_0004_4.jpg", (20, 40), (1, 2, 15, 30)),
}
CUB_PAIRS = [(1, 2), (3, 4), (2, 3), (4, 1), (1, 3)]


def cub_kp(img: int, part: int) -> tuple[float, float, int]:
    """(x, y, visible) the fake writes for 1-based image id and part id; hidden parts sit at (0, 0)."""
    if (img + part) % 3 == 0:
        return 0.0, 0.0, 0
    return 0.5 + part + img / 2, 0.25 + part + img / 4, 1


def make_cub(root: str) -> tuple[str, str]:
    """CUB_200_2011 layout; pair list ``root/random_pairs.txt`` (ids, ``CUB_PAIRS``)."""
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    _write(j("classes.txt"), [f"{k} {c}" for k, c in enumerate(CUB_CLASSES, 1)])
    _write(j("parts", "parts.txt"), [f"{k} {p}" for k, p in enumerate(CUB_PARTS, 1)])
    _write(j("images.txt"), [f"{i} {rel}" for i, (_, rel, _, _) in CUB_IMAGES.items()])
    _write(j("image_class_labels.txt"), [f"{i} {c}" for i, (c, _, _, _) in CUB_IMAGES.items()])
    _write(j("bounding_boxes.txt"), [f"{i} " + " ".join(f"{v:.1f}" for v in b)
                                     for i, (_, _, _, b) in CUB_IMAGES.items()])
    _write(j("parts", "part_locs.txt"), [f"{i} {p} {cub_kp(i, p)[0]:.2f} {cub_kp(i, p)[1]:.2f} {cub_kp(i, p)[2]}"
                                         for i in CUB_IMAGES for p in range(1, len(CUB_PARTS) + 1)])
    for _, rel, (w, h), _ in CUB_IMAGES.values():
        _image(j("images", rel), w, h)
    return root, _write(j("random_pairs.txt"), [f"{s} {t}" for s, t in CUB_PAIRS])


# ---------------------------------------------------------------- Stanford Dogs / StanfordExtra
# img_path: ((W, H), img_bbox [x, y, w, h])
SDOGS_IMAGES = {
    "n02085620-Chihuahua/n02085620_1.jpg": ((40, 30), [3, 2, 30, 24]),
    "n02085620-Chihuahua/n02085620_2.jpg": ((30, 45), [1, 4, 20, 36]),
    "n02086240-Shih-Tzu/n02086240_3.jpg": ((50, 20), [5, 1, 40, 18]),
}
SDOGS_PAIRS = [("n02085620-Chihuahua/n02085620_1.jpg", "n02086240-Shih-Tzu/n02086240_3.jpg"),
               ("n02086240-Shih-Tzu/n02086240_3.jpg", "n02085620-Chihuahua/n02085620_2.jpg"),
               ("n02085620-Chihuahua/n02085620_2.jpg", "n02085620-Chihuahua/n02085620_1.jpg")]


def sdogs_kp(n: int, k: int) -> tuple[float, float, float]:
    """[x, y, visibility] of joint k (0..23) of the n-th image (0-based, ``SDOGS_IMAGES`` order).

    Hidden joints are [0, 0, 0], except every 5th, which is occluded but placed (visibility 0)."""
    if (n + k) % 4 == 0:
        return (0.0, 0.0, 0.0) if k % 5 else (1.0 + k, 2.0, 0.0)
    return 1.0 + k + n / 3, 0.5 + k / 2 + n, 1.0


def make_stanford_dogs(root: str) -> tuple[str, str]:
    """Images/ + StanfordExtra_V12/StanfordExtra_v12.json; pair list ``root/test_pairs.txt`` (none is
    shipped with the real data, so the default ``random_pairs.txt`` is deliberately absent)."""
    entries = []
    for n, (path, ((w, h), box)) in enumerate(SDOGS_IMAGES.items()):
        _image(os.path.join(root, "Images", path), w, h)
        entries.append({"img_path": path, "img_width": w, "img_height": h,
                        "joints": [list(sdogs_kp(n, k)) for k in range(24)], "img_bbox": box,
                        "is_multiple_dogs": False, "seg": "fake-rle"})
    os.makedirs(os.path.join(root, "StanfordExtra_V12"), exist_ok=True)
    with open(os.path.join(root, "StanfordExtra_V12", "StanfordExtra_v12.json"), "w") as f:
        json.dump(entries, f)
    return root, _write(os.path.join(root, "test_pairs.txt"), [f"{s} {t}" for s, t in SDOGS_PAIRS])


# ---------------------------------------------------------------- AFLW (MTFL crops)
# name in testing.txt (Windows path, as MTFL writes it): ((W, H), attributes gender smile glasses pose)
AFLW_IMAGES = {
    "AFLW\\0001-image00011.jpg": ((40, 32), (1, 2, 2, 3)),
    "AFLW\\0002-image00022.jpg": ((24, 48), (2, 1, 2, 1)),
    "AFLW\\0003-image00033.jpg": ((36, 36), (1, 2, 1, 5)),
}
AFLW_PAIRS = [("AFLW/0001-image00011.jpg", "AFLW/0002-image00022.jpg"),
              ("AFLW/0003-image00033.jpg", "AFLW/0001-image00011.jpg"),
              ("AFLW/0002-image00022.jpg", "AFLW/0003-image00033.jpg")]


def aflw_kp(n: int, k: int) -> tuple[float, float]:
    """(x, y) of landmark k (0..4) of the n-th image (0-based, ``AFLW_IMAGES`` order)."""
    return 4.0 + 3 * k + n, 6.0 + 2 * k + n / 2


def make_aflw(root: str) -> tuple[str, str]:
    """MTFL layout: ``testing.txt`` (leading space, backslash paths, attributes) + ``AFLW/*.jpg``;
    pair list ``root/random_pairs.txt``."""
    lines = []
    for n, (name, ((w, h), attrs)) in enumerate(AFLW_IMAGES.items()):
        _image(os.path.join(root, name.replace("\\", "/")), w, h)
        xs = " ".join(f"{aflw_kp(n, k)[0]:.2f}" for k in range(5))
        ys = " ".join(f"{aflw_kp(n, k)[1]:.2f}" for k in range(5))
        lines.append(f" {name} {xs} {ys} " + " ".join(map(str, attrs)))
    _write(os.path.join(root, "testing.txt"), lines)
    return root, _write(os.path.join(root, "random_pairs.txt"), [f"{s} {t}" for s, t in AFLW_PAIRS])


# ---------------------------------------------------------------- AwA-Pose
AWA_PARTS = ["nose", "left_eye", "right_eye", "front_left_paw", "front_right_paw", "tail_end"]
# "<class>/<img>.jpg": ((W, H), bbox (x1, y1, x2, y2) or None)
AWA_IMAGES = {
    "zebra/zebra_10001.jpg": ((40, 30), (2.0, 3.0, 38.0, 27.0)),
    "zebra/zebra_10002.jpg": ((24, 36), (1.0, 1.0, 21.0, 31.0)),
    "siamese+cat/siamese+cat_10003.jpg": ((30, 30), None),
}
AWA_PAIRS = [("zebra/zebra_10001.jpg", "siamese+cat/siamese+cat_10003.jpg"),
             ("siamese+cat/siamese+cat_10003.jpg", "zebra/zebra_10002.jpg"),
             ("zebra/zebra_10002.jpg", "zebra/zebra_10001.jpg")]


def awa_kp(n: int, part: str) -> tuple[float, float] | None:
    """(x, y) of ``part`` in the n-th image (``AWA_IMAGES`` order); (-1, -1) = not visible; None =
    the part is absent from that image's dict."""
    k = AWA_PARTS.index(part)
    if (n + k) % 3 == 0:
        return (-1.0, -1.0) if k % 2 else None
    return 2.0 + 2 * k + n, 3.0 + k + n / 2


def make_awa(root: str) -> tuple[str, str]:
    """``Annotations/<class>/<img>.pickle`` ({'a1': {part: [x, y], 'bbox': [x1, y1, x2, y2]}}; the
    second image stores numpy arrays) + ``JPEGImages/``; pair list ``root/random_pairs.txt``."""
    _write(os.path.join(root, "Annotations", "Animal_Class.txt"), ["1.Zebra=2", "2.Siamese+cat=1"])
    for n, (name, ((w, h), bbox)) in enumerate(AWA_IMAGES.items()):
        _image(os.path.join(root, "JPEGImages", name), w, h)
        a1 = {p: list(xy) for p in AWA_PARTS if (xy := awa_kp(n, p)) is not None}
        if bbox is not None:
            a1["bbox"] = list(bbox)
        if n == 1:
            a1 = {k: np.asarray(v, dtype=np.float64) for k, v in a1.items()}
        path = os.path.join(root, "Annotations", name[:-len(".jpg")] + ".pickle")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            pickle.dump({"a1": a1}, f)
    return root, _write(os.path.join(root, "random_pairs.txt"), [f"{s} {t}" for s, t in AWA_PAIRS])
