"""Loaders of the Demystifying protocol datasets (CUB, Stanford Dogs, AFLW/MTFL, AwA-Pose) and pair lists.

Tiny datasets in each published format come from ``tests/fakedata/demystifying.py``; expected values
are computed by hand (literals) and from the fake's own annotation formulas times the canvas scale.
"""
import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fakedata import demystifying as fake
from semcorr_fast.data import Canvas, DatasetFormatError, build_dataset
from semcorr_fast.data.pairlist import PROTOCOL_N_PAIRS, flip_perm_from_names, read_pair_list

SHARED_PAIRS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "demystifying-pairs"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The four fake datasets, written once, read-only for the tests that use this fixture."""
    base = tmp_path_factory.mktemp("demy")
    return {"cub": fake.make_cub(str(base / "cub")), "stanford-dogs": fake.make_stanford_dogs(str(base / "sdogs")),
            "aflw": fake.make_aflw(str(base / "aflw")), "awa-pose": fake.make_awa(str(base / "awa"))}


def _copy(data, name, tmp_path):
    """A private copy of one fake dataset (for tests that corrupt files): (root, pair_list)."""
    root, pairs = data[name]
    dst = tmp_path / name
    shutil.copytree(root, dst)
    return str(dst), str(dst / os.path.relpath(pairs, root))


def _append(path, text):
    with open(path, "a") as f:
        f.write(text)


def _fails(pattern, exc=DatasetFormatError):
    """pytest.raises(exc) whose message must match the regex ``pattern``."""
    return pytest.raises(exc, match=pattern)


def _close(a, b):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=torch.float32), equal_nan=True, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------ pair lists
def test_read_pair_list_first_n_lines(tmp_path):
    p = tmp_path / "pairs.txt"
    p.write_text("".join(f"a{i}.jpg b{i}.jpg\n" for i in range(1, 8)))
    assert read_pair_list(str(p), 3) == [(1, "a1.jpg", "b1.jpg"), (2, "a2.jpg", "b2.jpg"), (3, "a3.jpg", "b3.jpg")]
    assert len(read_pair_list(str(p), None)) == 7 and read_pair_list(str(p), None)[-1] == (7, "a7.jpg", "b7.jpg")
    with _fails(r"holds 7 pairs, n_pairs=10000 .*n_pairs=None"):
        read_pair_list(str(p))
    for bad in (0, -1, True, "10", 2.0):
        with _fails("n_pairs must be a positive int or None", ValueError):
            read_pair_list(str(p), bad)
    _append(p, "x.jpg y.jpg z.jpg\n")
    assert len(read_pair_list(str(p), 7)) == 7  # the malformed 8th line is never read
    with _fails(r"pairs.txt, line 8: expected 2 whitespace-separated fields .*got 3"):
        read_pair_list(str(p), None)
    with _fails(r"nope.txt: not found \(expected a pair list", FileNotFoundError):
        read_pair_list(str(tmp_path / "nope.txt"))


REAL_LISTS = {  # file: (first line, pattern every field of the first 10,000 lines must match)
    "cub": (("10548", "7114"), r"[1-9]\d*"),
    "aflw": (("AFLW/1669-image36103.jpg", "AFLW/1715-image65794.jpg"), r"AFLW/\d{4}-image\d+\.jpg"),
    "awa": (("rabbit/rabbit_10028.jpg", "siamese+cat/siamese+cat_10297.jpg"), r"([a-z+]+)/\1_\d+\.jpg"),
}


@pytest.mark.parametrize("name", sorted(REAL_LISTS))
def test_real_shared_pair_lists_parse(name):
    path = SHARED_PAIRS / name / "random_pairs.txt"
    if not path.is_file():
        pytest.skip(f"{path} absent (the shared Demystifying pair lists are not beside this checkout)")
    first, pattern = REAL_LISTS[name]
    assert len(read_pair_list(str(path), None)) == 50_000
    pairs = read_pair_list(str(path))
    assert len(pairs) == PROTOCOL_N_PAIRS and pairs[0] == (1, *first) and pairs[-1][0] == PROTOCOL_N_PAIRS
    bad = [(n, f) for n, s, t in pairs for f in (s, t) if not re.fullmatch(pattern, f)]
    assert not bad, bad[:5]
    if name == "cub":
        assert max(int(f) for _, s, t in pairs for f in (s, t)) <= 11788  # ids of CUB's 11,788 images


@pytest.mark.parametrize("name,ds_name", [("cub", "cub"), ("aflw", "aflw"), ("awa", "awa-pose")])
def test_real_pair_list_through_loader_names_unknown_image(data, name, ds_name):
    """The real lists reach the loaders' name check: their first image is not in the tiny fake."""
    path = SHARED_PAIRS / name / "random_pairs.txt"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    first = REAL_LISTS[name][0][0]
    with _fails(rf"random_pairs.txt, line 1, field 1 \(source\): unknown image '{re.escape(first)}'"):
        build_dataset(ds_name, root=data[ds_name][0], pairs=str(path))


def test_flip_perm_from_names():
    assert flip_perm_from_names(["left eye", "nose", "right eye"]).tolist() == [2, 1, 0]
    assert flip_perm_from_names(["front_left_paw", "front_right_paw", "cleft"]).tolist() == [1, 0, 2]
    assert flip_perm_from_names(["left eye", "nose"]) is None            # no counterpart
    assert flip_perm_from_names(["left to right", "nose"]) is None        # both words
    assert flip_perm_from_names(["nose", "Nose"]) is None                 # repeated names


# ------------------------------------------------------------------------------------------ CUB
def test_cub_pairs_keypoints_thr_on_default_canvas(data):
    root, pairs = data["cub"]
    ds = build_dataset("cub", root=root, pairs=pairs, n_pairs=3)
    assert len(ds) == 3 and ds.name == "cub" and ds.canvas == Canvas.max_side(300)
    assert ds.kp_names == fake.CUB_PARTS and ds.categories == fake.CUB_CLASSES
    p = ds[0]  # image 1 (40x30, scale 7.5) -> image 2 (30x60, scale 5)
    assert p.src_image.shape == (3, 225, 300) and p.trg_image.shape == (3, 300, 150)
    _close(p.src_kps[0], [15.0, 11.25])        # part 1 of image 1 at (2.0, 1.5) * 7.5
    _close(p.trg_kps[2], [22.5, 18.75])        # part 3 of image 2 at (4.5, 3.75) * 5
    assert torch.isnan(p.trg_kps[0]).all()     # part 1 hidden in image 2
    assert p.valid[2] and not p.valid[0] and not p.valid[1]
    assert p.thr == pytest.approx(200.0)       # target bbox 25x40 -> 40 * 5
    _close(p.src_bbox, [30.0, 45.0, 180.0, 120.0])  # (4, 6, 20, 10) xywh -> xyxy * 7.5
    assert p.category == p.flags["trg_category"] == "001.Black_footed_Albatross" and p.pair_id == "1"
    assert p.src_name == fake.CUB_IMAGES[1][1]
    assert p.flip_perm.tolist() == [0, 1, 2, 3, 4, 5, 10, 11, 12, 9, 6, 7, 8, 13, 14]
    for i, (s, t) in enumerate(fake.CUB_PAIRS[:3]):
        q = ds[i]
        for img, kps, tf in ((s, q.src_kps, q.src_tf), (t, q.trg_kps, q.trg_tf)):
            r = 300 / max(fake.CUB_IMAGES[img][2])
            kp = [fake.cub_kp(img, k) for k in range(1, 16)]
            exp = [[x * r, y * r] if v else [math.nan] * 2 for x, y, v in kp]
            _close(kps, exp)
            assert tf.sx == tf.sy == pytest.approx(r)
        assert q.valid.tolist() == [bool(fake.cub_kp(s, k)[2] and fake.cub_kp(t, k)[2]) for k in range(1, 16)]
        assert q.thr == pytest.approx(max(fake.CUB_IMAGES[t][3][2:]) * 300 / max(fake.CUB_IMAGES[t][2]))
    assert ds[-1].pair_id == "3"
    with _fails("out of range for 3 pairs", IndexError):
        ds[3]


def test_cub_thr_image_and_non_uniform_canvas(data):
    root, pairs = data["cub"]
    assert build_dataset("cub", root=root, n_pairs=1, thr="image")[0].thr == pytest.approx(300.0)
    p = build_dataset("cub", root=root, n_pairs=1, canvas=Canvas.resized(100, 200))[0]
    assert p.trg_image.shape == (3, 100, 200)
    _close(p.trg_kps[2], [4.5 * 200 / 30, 3.75 * 100 / 60])
    assert p.thr == pytest.approx(max(25 * 200 / 30, 40 * 100 / 60))  # max side of the box on the canvas
    p = build_dataset("cub", root=root, n_pairs=1, canvas=Canvas.identity())[0]
    _close(p.src_kps[0], [2.0, 1.5])
    assert p.thr == pytest.approx(40.0)
    with _fails("thr must be None .*'bbox' or 'image', got 'img'", ValueError):
        build_dataset("cub", root=root, thr="img")


def test_cub_errors(data, tmp_path):
    with _fails(r"nowhere: directory not found \(expected the cub dataset root\)", FileNotFoundError):
        build_dataset("cub", root=str(tmp_path / "nowhere"))
    root, pairs = _copy(data, "cub", tmp_path)
    with _fails(r"holds 5 pairs, n_pairs=10000"):
        build_dataset("cub", root=root)
    original = open(pairs).read()
    _append(pairs, "1 99\n")
    with _fails(r"random_pairs.txt, line 6, field 2 \(target\): unknown image '99'"):
        build_dataset("cub", root=root, n_pairs=6)
    open(pairs, "w").write(original + "abc 2\n")
    with _fails(r"line 6, field 1 \(source\): expected a 1-based image id of images.txt, got 'abc'"):
        build_dataset("cub", root=root, n_pairs=None)
    locs = os.path.join(root, "parts", "part_locs.txt")
    lines = open(locs).read().splitlines()
    lines[2] = lines[2].rsplit(" ", 1)[0] + " 2"
    open(locs, "w").write("\n\n".join(lines) + "\n")  # blank lines between rows: line numbers still right
    with _fails(r"part_locs.txt, line 5, field 5 \(visible\): expected 0 or 1: \[1.0, 3.0, .*, 2.0\]"):
        build_dataset("cub", root=root, n_pairs=1)
    for bad, msg in (("9 3 1.0 1.0 1", r"line 3, field 1 \(image id\): not an image id of images.txt"),
                     ("1 16 1.0 1.0 1", r"line 3, field 2 \(part id\): expected an integer in 1..15"),
                     ("1 2 1.0 1.0 1", r"line 3, fields 1, 2 \(image id, part id\): repeats an earlier line: \[1.0, 2.0")):
        open(locs, "w").write("\n".join(lines[:2] + [bad] + lines[3:]) + "\n")
        with _fails(msg):
            build_dataset("cub", root=root, n_pairs=1)
    lines[2] = "1 3 1.0 y 1"
    open(locs, "w").write("\n".join(lines) + "\n")
    with _fails(r"part_locs.txt, line 3, field 4 \(y\): expected a finite float, got 'y'"):
        build_dataset("cub", root=root, n_pairs=1)
    open(locs, "w").write("\n".join(lines[:2] + lines[3:]) + "\n")
    with _fails(r"part_locs.txt: no row for image id 1 part\(s\) \[3\]"):
        build_dataset("cub", root=root, n_pairs=1)
    open(locs, "w").write("\n".join(lines[:2] + ["1 3 1.0 nan 1"] + lines[3:]) + "\n")
    with _fails(r"part_locs.txt, line 3, field 4 \(y\): expected a finite float, got 'nan'"):
        build_dataset("cub", root=root, n_pairs=1)
    shutil.copy(os.path.join(data["cub"][0], "parts", "part_locs.txt"), locs)
    for name, line, msg in (
            ("bounding_boxes.txt", "2 1.0 1.0 0.0 5.0", r"bounding_boxes.txt, line 2, fields 4, 5 \(w, h\): must be > 0"),
            ("image_class_labels.txt", "2 7", r"image_class_labels.txt, line 2, field 2 \(class id\): not in classes.txt"),
            ("image_class_labels.txt", "1 1", r"image_class_labels.txt, line 2, field 1 \(image id\): repeats an earlier line"),
            ("images.txt", "3 a.jpg", r"images.txt, line 3, field 1 \(id\): id 3 repeats line 2")):
        path = os.path.join(root, name)
        good = open(path).read().splitlines()
        open(path, "w").write("\n".join([good[0], line] + good[2:]) + "\n")
        with _fails(msg):
            build_dataset("cub", root=root, n_pairs=1)
        open(path, "w").write("\n".join(good) + "\n")
    lab = os.path.join(root, "image_class_labels.txt")
    kept = open(lab).read().splitlines()[:3]
    open(lab, "w").write("\n".join(kept) + "\n")
    with _fails(r"image_class_labels.txt: no row for image id 4"):
        build_dataset("cub", root=root, n_pairs=1)
    os.remove(os.path.join(root, "parts", "parts.txt"))
    with _fails(r"parts.txt: not found \(expected CUB parts: PART_ID NAME\)", FileNotFoundError):
        build_dataset("cub", root=root, n_pairs=1)


def test_cub_real_pair_list_at_full_scale(tmp_path):
    """All 10,000 protocol pairs of the real CUB list resolve against annotations for CUB's 11,788
    image ids (annotation files only: images load lazily, so none is needed to build the dataset)."""
    path = SHARED_PAIRS / "cub" / "random_pairs.txt"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    n, j = 11788, lambda *p: str(tmp_path.joinpath(*p))  # noqa: E731
    os.makedirs(j("parts"))
    open(j("classes.txt"), "w").write("".join(f"{c} {c:03d}.Bird_{c}\n" for c in range(1, 201)))
    open(j("parts", "parts.txt"), "w").write("".join(f"{k} {p}\n" for k, p in enumerate(fake.CUB_PARTS, 1)))
    open(j("images.txt"), "w").write(
        "".join(f"{i} {i % 200 + 1:03d}.Bird_{i % 200 + 1}/img_{i}.jpg\n" for i in range(1, n + 1)))
    open(j("image_class_labels.txt"), "w").write("".join(f"{i} {i % 200 + 1}\n" for i in range(1, n + 1)))
    open(j("bounding_boxes.txt"), "w").write("".join(f"{i} 1.0 2.0 {i % 97 + 3}.0 40.0\n" for i in range(1, n + 1)))
    open(j("parts", "part_locs.txt"), "w").write("".join(
        f"{i} {p} {p}.5 {i % 50}.0 {(i + p) % 2}\n" for i in range(1, n + 1) for p in range(1, 16)))
    ds = build_dataset("cub", root=str(tmp_path), pairs=str(path))
    assert len(ds) == PROTOCOL_N_PAIRS and len(ds.records) == n and ds.pairs[0] == (1, "10548", "7114")
    rec = ds.records["10548"]
    assert rec.name == "149.Bird_149/img_10548.jpg" and rec.category == "149.Bird_149"
    assert rec.bbox == (1.0, 2.0, 10548 % 97 + 4.0, 42.0) and rec.kps[2].tolist() == [3.5, 10548 % 50]
    assert rec.vis.tolist() == [(10548 + p) % 2 == 1 for p in range(1, 16)]


def test_cub_images_load_lazily(data, tmp_path):
    root, pairs = _copy(data, "cub", tmp_path)
    os.remove(os.path.join(root, "images", fake.CUB_IMAGES[4][1]))
    ds = build_dataset("cub", root=root, n_pairs=None)  # annotations only: no image opened
    ds[0]
    with _fails(r"Laysan_Albatross_0004_4.jpg: not found \(expected an image\)", FileNotFoundError):
        ds[1]


# ------------------------------------------------------------------------------------------ Stanford Dogs
def test_stanford_dogs(data):
    root, pairs = data["stanford-dogs"]
    ds = build_dataset("stanford-dogs", root=root, pairs=pairs, n_pairs=None)
    assert len(ds) == 3 and len(ds.kp_names) == 24 and ds.categories == ["n02085620-Chihuahua", "n02086240-Shih-Tzu"]
    p = ds[0]  # image 0 (40x30, scale 7.5) -> image 2 (50x20, scale 6)
    _close(p.src_kps[1], [15.0, 7.5])          # joint 1 of image 0 at (2.0, 1.0)
    assert torch.isnan(p.src_kps[0]).all() and not p.valid[0]  # occluded but placed: visibility 0
    assert p.thr == pytest.approx(240.0)       # img_bbox w=40, h=18 -> 40 * 6
    _close(p.trg_bbox, [30.0, 6.0, 270.0, 114.0])
    assert p.category == "n02085620-Chihuahua" and p.flags["trg_category"] == "n02086240-Shih-Tzu"
    perm = p.flip_perm.tolist()
    assert [perm[k] for k in (0, 5, 6, 12, 14, 16, 18, 20, 22)] == [6, 11, 0, 12, 15, 16, 19, 21, 22]
    names = list(fake.SDOGS_IMAGES)
    for i, (s, t) in enumerate(fake.SDOGS_PAIRS):
        q, ns, nt = ds[i], names.index(s), names.index(t)
        for n, kps in ((ns, q.src_kps), (nt, q.trg_kps)):
            r = 300 / max(fake.SDOGS_IMAGES[names[n]][0])
            kp = [fake.sdogs_kp(n, k) for k in range(24)]
            _close(kps, [[x * r, y * r] if v else [math.nan] * 2 for x, y, v in kp])
        assert q.valid.tolist() == [bool(fake.sdogs_kp(ns, k)[2] and fake.sdogs_kp(nt, k)[2]) for k in range(24)]


def test_stanford_dogs_errors(data, tmp_path):
    root, pairs = _copy(data, "stanford-dogs", tmp_path)
    with _fails(r"random_pairs.txt: not found \(expected a stanford-dogs pair list \(none is shipped", FileNotFoundError):
        build_dataset("stanford-dogs", root=root)
    ann = os.path.join(root, "StanfordExtra_V12", "StanfordExtra_v12.json")
    entries = json.load(open(ann))
    dump = lambda: json.dump(entries, open(ann, "w"))  # noqa: E731
    entries[0]["img_width"] = 41
    dump()
    with _fails(r"n02085620_1.jpg: image is 30x40 \(HxW\) but its annotation declares 30x41"):
        build_dataset("stanford-dogs", root=root, pairs=pairs, n_pairs=1)[0]
    entries[2]["joints"][3][2] = 0.5
    dump()
    with _fails(r"entry 2 \(n02086240-Shih-Tzu/n02086240_3.jpg\), field 'joints': visibility must be 0 or 1"):
        build_dataset("stanford-dogs", root=root, pairs=pairs, n_pairs=1)
    entries[2]["joints"] = entries[2]["joints"][:23]
    dump()
    with _fails(r"entry 2 .*field 'joints': expected 24 \[x, y, visibility\] triples"):
        build_dataset("stanford-dogs", root=root, pairs=pairs, n_pairs=1)
    entries = json.load(open(os.path.join(data["stanford-dogs"][0], "StanfordExtra_V12", "StanfordExtra_v12.json")))
    entries.append(dict(entries[0]))
    dump()
    with _fails(r"test_pairs.txt, line 1, field 1 \(source\): 'n02085620-Chihuahua/n02085620_1.jpg' "
                                                 r"has 2 entries in .*StanfordExtra_v12.json \(entries \[0, 3\]\)"):
        build_dataset("stanford-dogs", root=root, pairs=Path(pairs), n_pairs=1)
    entries.pop()
    dump()
    _append(pairs, "n02085620-Chihuahua/n02085620_1.jpg n02085620-Chihuahua/n02085620_9.jpg\n")
    with _fails(r"test_pairs.txt, line 4, field 2 \(target\): unknown image 'n02085620-Chihuahua/n02085620_9.jpg'"):
        build_dataset("stanford-dogs", root=root, pairs=pairs, n_pairs=None)


# ------------------------------------------------------------------------------------------ AFLW
def test_aflw(data):
    root, pairs = data["aflw"]
    ds = build_dataset("aflw", root=root, n_pairs=3)
    assert ds.thr == "image"
    assert ds.kp_names == ["left eye", "right eye", "nose", "left mouth corner", "right mouth corner"]
    p = ds[0]  # image 0 (40x32, scale 7.5) -> image 1 (24x48, scale 6.25)
    _close(p.src_kps[0], [30.0, 45.0])         # (4, 6) * 7.5
    _close(p.trg_kps[4], [106.25, 90.625])     # (17, 14.5) * 6.25
    assert p.valid.all() and p.thr == pytest.approx(300.0) and p.flags["thr_source"] == "image"
    assert p.src_bbox is None and p.category == "face" and p.flip_perm.tolist() == [1, 0, 2, 4, 3]
    assert (p.flags["src_gender"], p.flags["src_pose"], p.flags["trg_smile"]) == (1, 3, 1)
    assert p.src_name == "AFLW/0001-image00011.jpg"
    names = list(fake.AFLW_IMAGES)
    for i, (s, t) in enumerate(fake.AFLW_PAIRS):
        q = ds[i]
        for nm, kps in ((s, q.src_kps), (t, q.trg_kps)):
            n = names.index(nm.replace("/", "\\"))
            r = 300 / max(fake.AFLW_IMAGES[names[n]][0])
            _close(kps, [[fake.aflw_kp(n, k)[0] * r, fake.aflw_kp(n, k)[1] * r] for k in range(5)])
    assert build_dataset("aflw", root=root, n_pairs=1, canvas=Canvas.identity())[0].thr == 48.0  # target 24x48
    with _fails("aflw has no bounding boxes", ValueError):
        build_dataset("aflw", root=root, thr="bbox")


def test_aflw_classes_and_errors(data, tmp_path):
    root, pairs = _copy(data, "aflw", tmp_path)
    (Path(root) / "test_classes.txt").write_text("3\n0\n3\n")
    ds = build_dataset("aflw", root=root, n_pairs=3, classes="test_classes.txt")
    assert ds.categories == ["0", "3"] and [ds[i].category for i in range(3)] == ["3", "3", "0"]
    (Path(root) / "test_classes.txt").write_text("3\n0\n")
    with _fails(r"test_classes.txt: 2 labels for the 3 lines of .*testing.txt"):
        build_dataset("aflw", root=root, n_pairs=3, classes="test_classes.txt")
    ann = Path(root) / "testing.txt"
    good = ann.read_text()
    ann.write_text(good + " AFLW\\0009-image9.jpg 1 2 3 4 5 6 7 8 9 10 11 12\n")
    with _fails(r"testing.txt, line 4: expected 11 or 15 whitespace-separated fields .*got 13"):
        build_dataset("aflw", root=root, n_pairs=3)
    ann.write_text(good + " AFLW\\0009-image9.jpg 1 x 3 4 5 6 7 8 9 10\n")
    with _fails(r"testing.txt, line 4, field 3 \(x2\): expected a finite float, got 'x'"):
        build_dataset("aflw", root=root, n_pairs=3)
    ann.write_text(good + good.splitlines()[0] + "\n")
    with _fails(r"testing.txt, line 4, field 1 \(path\): 'AFLW/0001-image00011.jpg' repeats an earlier line"):
        build_dataset("aflw", root=root, n_pairs=3)
    ann.write_text(good)
    _append(pairs, "AFLW/0001-image00011.jpg AFLW/0009-image9.jpg\n")
    with _fails(r"line 4, field 2 \(target\): unknown image 'AFLW/0009-image9.jpg'"):
        build_dataset("aflw", root=root, n_pairs=4)


# ------------------------------------------------------------------------------------------ AwA-Pose
def test_awa_pose(data):
    root, pairs = data["awa-pose"]
    ds = build_dataset("awa-pose", root=root, n_pairs=3)
    assert ds.kp_names == sorted(fake.AWA_PARTS) and ds.categories == ["siamese+cat", "zebra"]
    assert ds.flip_perm.tolist() == [1, 0, 4, 3, 2, 5]
    p = ds[0]  # zebra_10001 (40x30, scale 7.5) -> siamese+cat_10003 (30x30, scale 10, no bbox)
    nose, eye = ds.kp_names.index("nose"), ds.kp_names.index("right_eye")
    _close(p.src_kps[eye], [45.0, 37.5])       # (6, 5) * 7.5
    assert torch.isnan(p.src_kps[nose]).all() and not p.valid[nose]  # nose absent from the dict
    assert p.thr == 0.0 and p.flags["thr_source"] == "zero (no bbox)" and p.trg_bbox is None  # reference code
    p = build_dataset("awa-pose", root=root, n_pairs=1, missing_bbox="image")[0]
    assert p.thr == pytest.approx(300.0) and p.flags["thr_source"] == "image (no bbox)"
    with _fails("missing_bbox must be 'zero' .* or 'image', got 'img'", ValueError):
        build_dataset("awa-pose", root=root, missing_bbox="img")
    q = ds[2]  # zebra_10002 -> zebra_10001: bbox (2, 3, 38, 27) -> 36 * 7.5
    assert q.thr == pytest.approx(270.0) and q.flags["thr_source"] == "bbox"
    _close(q.trg_bbox, [15.0, 22.5, 285.0, 202.5])
    names = list(fake.AWA_IMAGES)
    for i, (s, t) in enumerate(fake.AWA_PAIRS):
        q = ds[i]
        seen = []
        for nm, kps in ((s, q.src_kps), (t, q.trg_kps)):
            n, r = names.index(nm), 300 / max(fake.AWA_IMAGES[nm][0])
            xy = [fake.awa_kp(n, part) for part in ds.kp_names]
            vis = [v is not None and v != (-1.0, -1.0) for v in xy]
            _close(kps, [[v[0] * r, v[1] * r] if ok else [math.nan] * 2 for v, ok in zip(xy, vis)])
            seen.append(vis)
        assert q.valid.tolist() == [a and b for a, b in zip(*seen)]
        assert q.category == s.split("/")[0]
    assert build_dataset("awa-pose", root=root, n_pairs=1, thr="image")[0].flags["thr_source"] == "image"
    fixed = build_dataset("awa-pose", root=root, n_pairs=1, kp_names=fake.AWA_PARTS + ["chin"])
    assert fixed.kp_names[-1] == "chin" and not fixed[0].valid[-1] and fixed.flip_perm.tolist() == [0, 2, 1, 4, 3, 5, 6]


def test_awa_pose_errors(data, tmp_path):
    root, pairs = _copy(data, "awa-pose", tmp_path)
    with _fails(r"siamese\+cat_10003.pickle, field 'a1'\['left_eye'\]: part not in kp_names \['nose'\]"):
        build_dataset("awa-pose", root=root, kp_names=["nose"])
    bad = Path(root) / "Annotations" / "zebra" / "zebra_10009.pickle"

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))
    bad.write_bytes(pickle.dumps({"a1": {"nose": Evil()}}))
    with _fails(r"zebra_10009.pickle: not a readable AwA-Pose annotation pickle \(refusing global"):
        build_dataset("awa-pose", root=root, n_pairs=3)
    bad.write_bytes(pickle.dumps({"a1": {"nose": [1.0, 2.0], "bbox": [5, 5, 2, 9]}}))
    with _fails(r"zebra_10009.pickle, field 'a1'\['bbox'\]: expected x1 < x2 and y1 < y2"):
        build_dataset("awa-pose", root=root, n_pairs=3)
    bad.write_bytes(pickle.dumps({"a1": {"nose": [1.0]}}))
    with _fails(r"field 'a1'\['nose'\]: expected 2 finite numbers, got \[1.0\]"):
        build_dataset("awa-pose", root=root, n_pairs=3)
    bad.write_bytes(pickle.dumps({"b1": {}}))
    with _fails(r"zebra_10009.pickle, field 'a1': expected a dict"):
        build_dataset("awa-pose", root=root, n_pairs=3)
    bad.unlink()
    _append(pairs, "zebra/zebra_10001.jpg zebra/zebra_10009.jpg\n")
    with _fails(r"line 4, field 2 \(target\): unknown image 'zebra/zebra_10009.jpg'"):
        build_dataset("awa-pose", root=root, n_pairs=4)
    shutil.rmtree(os.path.join(root, "JPEGImages"))
    with _fails(r"JPEGImages: directory not found \(expected AwA2 JPEGImages", FileNotFoundError):
        build_dataset("awa-pose", root=root, n_pairs=3)


def test_numpy_pickle_values_read(data):
    """The fake's second AwA image stores numpy arrays: they go through the restricted unpickler."""
    root, _ = data["awa-pose"]
    with open(os.path.join(root, "Annotations", "zebra", "zebra_10002.pickle"), "rb") as f:
        assert isinstance(pickle.load(f)["a1"]["nose"], np.ndarray)
    ds = build_dataset("awa-pose", root=root, n_pairs=3)
    assert ds.records["zebra/zebra_10002.jpg"].bbox == (1.0, 1.0, 21.0, 31.0)
