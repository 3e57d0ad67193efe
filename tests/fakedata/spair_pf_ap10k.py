"""Tiny SPair-71k, SPair-U, PF-PASCAL, PF-WILLOW and AP-10K datasets in their published on-disk formats.

Each ``make_*(root, ...)`` writes a few small images and the annotation files under ``root`` (created
if needed) and returns ``root``, ready for ``build_dataset(<name>, root=root)``. Everything written is
fixed by the functions below, so tests can recompute expected values:

* image ``j`` of a category/species is ``image_size(j)`` (W, H): 40×30 for even ``j``, 30×40 for odd;
* keypoint ``k`` of image ``j`` is at ``fake_kp(j, k)`` (None = not annotated / not visible);
* its box is ``fake_bbox(j)`` (x1, y1, x2, y2);
* pair ``i`` of a category/species is (image ``i``, image ``i + 1``).
"""
from __future__ import annotations

import itertools
import json
import os

import numpy as np
from PIL import Image

from semcorr_fast.data.pf import PF_PASCAL_CLASSES
from semcorr_fast.data.spair import SPAIR_CATEGORIES, SPAIR_NUM_KPS


def image_size(j: int) -> tuple[int, int]:
    """(W, H) of fake image ``j``: landscape 40×30 for even ``j``, portrait 30×40 for odd ``j``."""
    return (40, 30) if j % 2 == 0 else (30, 40)


def fake_kp(j: int, k: int, hide: bool = True) -> tuple[float, float] | None:
    """(x, y) of keypoint ``k`` in image ``j`` (inside the image); None when hidden ((j + k) % 3 == 2)."""
    if hide and (j + k) % 3 == 2:
        return None
    w, h = image_size(j)
    return 1.5 + (3 * k + 2 * j) % (w - 3), 1.25 + (2 * k + j) % (h - 3)


def fake_bbox(j: int) -> list[float]:
    """(x1, y1, x2, y2) box of image ``j``."""
    w, h = image_size(j)
    return [2.0, 3.0, w - 4.0, h - 5.0]


def _image(path: str, j: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    w, h = image_size(j)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, 40 * (j % 5))], -1)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _json(path: str, data) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh)


def _lines(path: str, lines) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as fh:
        fh.write("".join(f"{line}\n" for line in lines))


# ---------------------------------------------------------------------------------- SPair-71k / SPair-U
def spair_image_name(category: str, j: int) -> str:
    """File stem of SPair image ``j`` of ``category`` (e.g. ``"2007_000003"`` for the cat, j=3)."""
    return f"20{SPAIR_CATEGORIES.index(category):02d}_{j:06d}"


def spair_pair_flags(i: int) -> dict:
    """Difficulty flags written for pair ``i`` of a category."""
    return {"viewpoint_variation": i % 3, "scale_variation": (i + 1) % 3, "truncation": i % 4,
            "occlusion": (i // 2) % 4, "mirror": i % 2}


def _spair_pairs(root, pair_dir, image_dir, n_pairs, categories, splits, kp_fn, n_kps, layout):
    index = 0
    for split in splits:
        names = []
        for cat in categories:
            for i in range(n_pairs):
                src, trg = spair_image_name(cat, i), spair_image_name(cat, i + 1)
                ids = [k for k in range(n_kps(cat)) if kp_fn(i, k) is not None and kp_fn(i + 1, k) is not None]
                name = f"{index:06d}-{src}-{trg}:{cat}"
                index += 1
                _json(os.path.join(root, pair_dir, split, name + ".json"), {
                    "pair_id": index, "filename": name, "src_imname": src + ".jpg", "trg_imname": trg + ".jpg",
                    "src_imsize": [*image_size(i), 3], "trg_imsize": [*image_size(i + 1), 3],
                    "src_bndbox": fake_bbox(i), "trg_bndbox": fake_bbox(i + 1), "category": cat,
                    "src_pose": "Unspecified", "trg_pose": "Unspecified",
                    "src_kps": [list(kp_fn(i, k)) for k in ids], "trg_kps": [list(kp_fn(i + 1, k)) for k in ids],
                    "kps_ids": [str(k) for k in ids], **spair_pair_flags(i)})
                names.append(name)
        if layout:
            _lines(os.path.join(root, "Layout", "large", split + ".txt"), names)
    for cat in categories:
        for j in range(n_pairs + 1):
            _json(os.path.join(root, image_dir, cat, spair_image_name(cat, j) + ".json"), {
                "filename": spair_image_name(cat, j) + ".jpg", "image_width": image_size(j)[0],
                "image_height": image_size(j)[1], "category": cat, "bndbox": fake_bbox(j), "azimuth_id": j % 8,
                "kps": {str(k): (None if kp_fn(j, k) is None else list(kp_fn(j, k))) for k in range(n_kps(cat))}})


def make_spair(root: str, n_pairs: int = 3, categories=("cat", "car"), splits=("test",)) -> str:
    """SPair-71k layout: JPEGImages/, ImageAnnotation/, PairAnnotation/<split>/, Layout/large/<split>.txt.

    Per category, images 0..n_pairs with the category's full id vocabulary (``SPAIR_NUM_KPS``) at
    ``fake_kp``; pairs (i, i + 1) for i < n_pairs in every split, flags ``spair_pair_flags(i)``.
    """
    for cat in categories:
        for j in range(n_pairs + 1):
            _image(os.path.join(root, "JPEGImages", cat, spair_image_name(cat, j) + ".jpg"), j)
    _spair_pairs(root, "PairAnnotation", "ImageAnnotation", n_pairs, categories, splits, fake_kp,
                 SPAIR_NUM_KPS.__getitem__, layout=True)
    return root


def spair_u_kp(j: int, k: int) -> tuple[float, float] | None:
    """(x, y) of SPair-U keypoint ``k`` (ids 0..3) in image ``j``; None when hidden."""
    return fake_kp(j, k + 5)


def make_spair_u(root: str, n_pairs: int = 2, categories=("cat",)) -> str:
    """SPair-71k test (``make_spair``) plus SPair-U's ExtraImageAnnotation/ and ExtraPairAnnotation/test/.

    SPair-U keypoints: ids 0..3 at ``spair_u_kp``; no layout file (the loader lists the folder).
    """
    make_spair(root, n_pairs, categories, splits=("test",))
    _spair_pairs(root, "ExtraPairAnnotation", "ExtraImageAnnotation", n_pairs, categories, ("test",), spair_u_kp,
                 lambda cat: 4, layout=False)
    return root


# ---------------------------------------------------------------------------------- PF-PASCAL / PF-WILLOW
PF_PASCAL_NUM_KPS = 8


def pf_image_name(category: str, j: int) -> str:
    return f"{category}_{j:04d}"


def make_pf_pascal(root: str, n_pairs: int = 3, classes=("aeroplane", "cat"), splits=("test",)) -> str:
    """PF-dataset-PASCAL layout: JPEGImages/<img>.jpg, Annotations/<class>/<img>.mat (``kps`` (8, 2), NaN
    rows for hidden ``fake_kp``; ``bbox`` = ``fake_bbox``), ``<split>_pairs_pf_pascal.csv`` with header;
    test/val rows carry XA;YA;XB;YB of the common keypoints, trn rows a ``flip`` column (0)."""
    import scipy.io  # only this writer needs scipy
    for cls in classes:
        for j in range(n_pairs + 1):
            name = pf_image_name(cls, j)
            _image(os.path.join(root, "JPEGImages", name + ".jpg"), j)
            kps = np.array([fake_kp(j, k) or (np.nan, np.nan) for k in range(PF_PASCAL_NUM_KPS)], dtype=np.float64)
            os.makedirs(os.path.join(root, "Annotations", cls), exist_ok=True)
            scipy.io.savemat(os.path.join(root, "Annotations", cls, name + ".mat"),
                             {"kps": kps, "bbox": np.array([fake_bbox(j)])})
    for split in splits:
        long_name = "train" if split == "trn" else split
        rows = ["source_image,target_image,class," + ("flip" if split == "trn" else "XA,YA,XB,YB")]
        for cls in classes:
            for i in range(n_pairs):
                images = [f"PF-dataset-PASCAL/JPEGImages/{pf_image_name(cls, j)}.jpg" for j in (i, i + 1)]
                row = [*images, str(PF_PASCAL_CLASSES.index(cls) + 1)]
                if split == "trn":
                    row.append("0")
                else:
                    common = [k for k in range(PF_PASCAL_NUM_KPS) if fake_kp(i, k) and fake_kp(i + 1, k)]
                    row += [";".join(f"{fake_kp(j, k)[c]:g}" for k in common) for j in (i, i + 1) for c in (0, 1)]
                rows.append(",".join(row))
        _lines(os.path.join(root, f"{long_name}_pairs_pf_pascal.csv"), rows)
    return root


def make_pf_willow(root: str, n_pairs: int = 3, categories=("car(G)", "duck(S)")) -> str:
    """PF-WILLOW layout: <category>/<img>.png and ``test_pairs_pf.csv`` (imageA, imageB, XA1..XA10,
    YA1..YA10, XB1..XB10, YB1..YB10; paths ``PF-dataset/<category>/<img>.png``); all 10 keypoints
    visible at ``fake_kp(j, k, hide=False)``."""
    head = ["imageA", "imageB"] + [f"{c}{s}{n}" for s in "AB" for c in "XY" for n in range(1, 11)]
    rows = [",".join(head)]
    for cat in categories:
        for j in range(n_pairs + 1):
            _image(os.path.join(root, cat, f"{pf_image_name(cat.split('(')[0], j)}.png"), j)
        for i in range(n_pairs):
            row = [f"PF-dataset/{cat}/{pf_image_name(cat.split('(')[0], j)}.png" for j in (i, i + 1)]
            row += [f"{fake_kp(j, k, hide=False)[c]:g}" for j in (i, i + 1) for c in (0, 1) for k in range(10)]
            rows.append(",".join(row))
    _lines(os.path.join(root, "test_pairs_pf.csv"), rows)
    return root


# ---------------------------------------------------------------------------------- AP-10K
AP10K_FAMILIES = {"canidae": ("dog", "fox"), "felidae": ("cat",)}


def ap10k_visibility(j: int, k: int) -> int:
    """COCO visibility flag of keypoint ``k`` in AP-10K image ``j``: 0 hidden, 1 labelled-not-visible, 2."""
    if fake_kp(j, k) is None:
        return 0
    return 1 if (j + 2 * k) % 7 == 3 else 2


def make_ap10k(root: str, n_images: int = 3, families=None) -> str:
    """GeoAware-SC's AP-10K layout for split ``test``, all three split kinds.

    ``families`` {family: species names} (default ``AP10K_FAMILIES``); each species gets ``n_images``
    instances with global ids ``1, 2, ...`` (image ``j`` = id - 1 for ``image_size``/``fake_kp``; the
    instance json is ``ImageAnnotation/<family>/<species>/<id:012d>.json``). Pairs: intra-species all
    C(n, 2) per species (``<split>/<a>-<b>:<species>.json``), cross-species every image pair across
    two species of one family (``:<family>``), cross-family every image pair across two families
    (``:all``); stored paths start with ``data/ap-10k/ImageAnnotation/`` as GeoAware-SC writes them.
    """
    families = AP10K_FAMILIES if families is None else families
    members: dict = {}
    next_id = 1
    for fam, species in families.items():
        for sp in species:
            for _ in range(n_images):
                j = next_id - 1
                w, h = image_size(j)
                l, t, x2, y2 = fake_bbox(j)
                kps = []
                for k in range(17):
                    v = ap10k_visibility(j, k)
                    kps += [*(fake_kp(j, k) if v else (0, 0)), v]
                stem = f"{next_id:012d}"
                _json(os.path.join(root, "ImageAnnotation", fam, sp, stem + ".json"), {
                    "id": next_id, "image_id": next_id, "category_id": 1, "bbox": [l, t, x2 - l, y2 - t],
                    "keypoints": kps, "num_keypoints": sum(1 for v in kps[2::3] if v), "iscrowd": 0,
                    "area": float((x2 - l) * (y2 - t)), "file_name": stem + ".jpg", "width": w, "height": h,
                    "name": sp, "supercategory": fam})
                _image(os.path.join(root, "JPEGImages", fam, sp, stem + ".jpg"), j)
                members.setdefault(fam, {}).setdefault(sp, []).append(stem)
                next_id += 1

    def write(kind_dir, a, b, fam_a, sp_a, fam_b, sp_b, category):
        _json(os.path.join(root, "PairAnnotation", kind_dir, f"{a}-{b}:{category}.json"), {
            "src_json_path": f"data/ap-10k/ImageAnnotation/{fam_a}/{sp_a}/{a}.json",
            "trg_json_path": f"data/ap-10k/ImageAnnotation/{fam_b}/{sp_b}/{b}.json"})

    for fam, by_species in members.items():
        for sp, stems in by_species.items():
            for a, b in itertools.combinations(stems, 2):
                write("test", a, b, fam, sp, fam, sp, sp)
        for sp_a, sp_b in itertools.combinations(by_species, 2):
            for a, b in itertools.product(by_species[sp_a], by_species[sp_b]):
                write("test_cross_species", a, b, fam, sp_a, fam, sp_b, fam)
    for fam_a, fam_b in itertools.combinations(members, 2):
        for (sp_a, sa), (sp_b, sb) in itertools.product(members[fam_a].items(), members[fam_b].items()):
            for a, b in itertools.product(sa, sb):
                write("test_cross_family", a, b, fam_a, sp_a, fam_b, sp_b, "all")
    return root
