"""SPair-71k, SPair-U, PF-PASCAL, PF-WILLOW and AP-10K loaders on tiny datasets in their real formats.

Canvas arithmetic used throughout (``Canvas.pad_square(84)``): a 40×30 (W×H) image scales by
r = 84/40 = 2.1 to 84×63 and is padded by (84 − 63)//2 = 10 rows on top; a 30×40 image scales by 2.1
to 63×84 and is padded by 10 columns on the left.
"""
import glob
import json
import os
import re
import shutil

import numpy as np
import pytest
import scipy.io
import torch

from semcorr_fast.data import Canvas, DatasetFormatError, build_dataset, list_datasets
from semcorr_fast.data.ap10k import AP10K_KP_NAMES
from semcorr_fast.data.spair import SPAIR_CATEGORIES, SPAIR_LR_PAIRS, SPAIR_NUM_KPS, flip_perm_from_pairs
from tests.fakedata.spair_pf_ap10k import (ap10k_visibility, fake_kp, make_ap10k, make_pf_pascal,
                                           make_pf_willow, make_spair, make_spair_u, spair_pair_flags, spair_u_kp)

C84 = Canvas.pad_square(84)

# GeoAware-SC's SPAIR_LR labels (0 neutral, 1 left, 2 right), an independent table to check flip_perm with.
GEOAWARE_SPAIR_LR = {
    "aeroplane": [0, 0, 0, 0, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 0, 0, 0],
    "bicycle": [0, 0, 2, 1, 0, 0, 2, 1, 0, 2, 1, 0, 0, 0],
    "bird": [0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1, 2, 1, 2, 1, 0],
    "boat": [0, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 0],
    "bottle": [1, 2, 1, 2, 1, 2, 1, 2, 1, 2],
    "bus": [2, 1, 2, 1, 0, 2, 1, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 2, 1],
    "car": [2, 1, 2, 1, 0, 0, 2, 1, 0, 0, 2, 2, 2, 2, 2, 2, 2, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 2, 1],
    "cat": [2, 1, 2, 1, 2, 1, 2, 1, 0, 2, 1, 2, 1, 0, 0],
    "chair": [2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1],
    "cow": [2, 1, 2, 1, 2, 1, 2, 1, 0, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1, 2, 1],
    "dog": [2, 1, 2, 1, 2, 1, 0, 0, 0, 2, 1, 2, 1, 0, 0, 0],
    "horse": [2, 1, 2, 1, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1],
    "motorbike": [2, 1, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    "person": [2, 1, 2, 1, 0, 0, 0, 0, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1],
    "pottedplant": [2, 0, 1, 0, 2, 1, 2, 0, 1],
    "sheep": [2, 1, 2, 1, 2, 1, 2, 1, 0, 2, 1, 2, 1, 0, 0, 2, 1, 2, 1, 2, 1],
    "train": [1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2],
    "tvmonitor": [2, 0, 1, 2, 2, 0, 1, 1, 2, 0, 1, 2, 2, 0, 1, 1],
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("data")
    return {"spair": make_spair(str(base / "SPair-71k"), splits=("trn", "test")),
            "spair-u": make_spair_u(str(base / "SPairU")),
            "pf-pascal": make_pf_pascal(str(base / "PF-PASCAL"), splits=("test", "trn")),
            "pf-willow": make_pf_willow(str(base / "PF-WILLOW")),
            "ap10k": make_ap10k(str(base / "ap-10k"))}


@pytest.fixture
def fresh(tmp_path):
    """Writers for a private copy that a test may corrupt."""
    return lambda make, **kw: make(str(tmp_path / "d"), **kw)


def edit_json(path, fn):
    with open(path) as fh:
        data = json.load(fh)
    fn(data)
    with open(path, "w") as fh:
        json.dump(data, fh)


def canvas84(x, y, portrait):
    """Hand-derived pad_square(84) map of an original point (see the module docstring)."""
    return (2.1 * x + 10, 2.1 * y) if portrait else (2.1 * x, 2.1 * y + 10)


def test_registered():
    assert {"spair", "spair-u", "pf-pascal", "pf-willow", "ap10k"} <= set(list_datasets())


# ------------------------------------------------------------------------------------------ SPair-71k
def test_spair_canvas_keypoints_bbox_thr(roots):
    ds = build_dataset("spair", root=roots["spair"], canvas=C84)
    assert len(ds) == 6 and ds.categories == ["car", "cat"]
    p = ds[0]  # pair 0 of "cat": image 0 (40×30) → image 1 (30×40)
    assert p.category == "cat" and p.src_name == "2007_000000.jpg" and p.trg_name == "2007_000001.jpg"
    assert p.src_kps.shape == (30, 2) and p.src_kps.dtype == torch.float32
    assert tuple(p.src_image.shape) == (3, 84, 84) and p.src_image.dtype == torch.float32
    # keypoint 0: (1.5, 1.25) in image 0, (3.5, 2.25) in image 1
    torch.testing.assert_close(p.src_kps[0], torch.tensor([3.15, 1.25 * 2.1 + 10]))
    torch.testing.assert_close(p.trg_kps[0], torch.tensor([3.5 * 2.1 + 10, 2.25 * 2.1]))
    # bboxes [2, 3, 36, 25] and [2, 3, 26, 35]; thr = max side of the target bbox = 32 · 2.1
    torch.testing.assert_close(p.src_bbox, torch.tensor([4.2, 16.3, 75.6, 62.5]))
    torch.testing.assert_close(p.trg_bbox, torch.tensor([14.2, 6.3, 64.6, 73.5]))
    assert p.thr == pytest.approx(67.2)
    # valid = annotated and visible in both: hidden where (j + k) % 3 == 2; the cat has 15 ids of 30
    expect = [k < SPAIR_NUM_KPS["cat"] and fake_kp(0, k) is not None and fake_kp(1, k) is not None
              for k in range(30)]
    assert p.valid.tolist() == expect and p.valid.sum() == 5
    for k in range(30):
        for kps, j in ((p.src_kps, 0), (p.trg_kps, 1)):
            pt = fake_kp(j, k) if k < SPAIR_NUM_KPS["cat"] else None
            want = canvas84(*pt, portrait=j % 2 == 1) if pt else (float("nan"), float("nan"))  # not visible → NaN
            torch.testing.assert_close(kps[k], torch.tensor(want, dtype=torch.float32), equal_nan=True)
    assert p.flags["src_visible"].sum() == 10 and p.flags["trg_visible"].sum() == 10
    assert p.flags["src_azimuth_id"] == 0 and p.flags["trg_azimuth_id"] == 1 and p.flags["split"] == "test"
    assert {k: p.flags[k] for k in spair_pair_flags(0)} == spair_pair_flags(0)
    assert p.kp_names is None and p.src_tf.oy == 10 and p.trg_tf.ox == 10


def test_spair_default_canvas_840(roots):
    ds = build_dataset("spair", root=roots["spair"], categories="cat")
    p = ds[0]
    assert tuple(p.src_image.shape) == (3, 840, 840)
    # r = 21, padding (840 − 630)//2 = 105 rows above the 40×30 source, 105 columns left of the target
    torch.testing.assert_close(p.src_kps[0], torch.tensor([31.5, 1.25 * 21 + 105]))
    torch.testing.assert_close(p.trg_kps[0], torch.tensor([3.5 * 21 + 105, 2.25 * 21]))
    assert p.thr == pytest.approx(32 * 21)
    assert p.src_image[:, :105].abs().max() == 0 and p.src_image[:, 735:].abs().max() == 0
    assert p.src_image[:, 105:735, 420].abs().max() > 0


def test_spair_image_thr_and_pair_source_agree(roots):
    ds = build_dataset("spair", root=roots["spair"], canvas=C84, thr="image", split="train")
    assert ds.split == "trn" and all(ds[i].thr == pytest.approx(84.0) for i in range(len(ds)))
    a = build_dataset("spair", root=roots["spair"], canvas=C84)
    b = build_dataset("spair", root=roots["spair"], canvas=C84, kps_source="pair")
    for i in range(len(a)):
        pa, pb = a[i], b[i]
        assert torch.equal(pa.valid, pb.valid) and pa.thr == pb.thr
        torch.testing.assert_close(pa.src_kps[pa.valid], pb.src_kps[pb.valid])
        torch.testing.assert_close(pa.trg_kps[pa.valid], pb.trg_kps[pb.valid])


def test_spair_flip_perm_matches_left_right_labels():
    for cat in SPAIR_CATEGORIES:
        perm = flip_perm_from_pairs(30, SPAIR_LR_PAIRS[cat])
        ids = [i for pair in SPAIR_LR_PAIRS[cat] for i in pair]
        assert len(ids) == len(set(ids)), cat  # each id in at most one left/right pair
        assert torch.equal(perm[perm], torch.arange(30)), cat  # an involution
        lr = GEOAWARE_SPAIR_LR[cat]
        assert len(lr) == SPAIR_NUM_KPS[cat]
        for k, label in enumerate(lr):
            partner = int(perm[k])
            assert partner < len(lr), (cat, k)
            assert lr[partner] == {0: 0, 1: 2, 2: 1}[label], (cat, k)  # left ↔ right, neutral fixed
            if label == 0:
                assert partner == k, (cat, k)


def test_spair_pair_carries_flip_perm(roots):
    ds = build_dataset("spair", root=roots["spair"], canvas=C84)
    for i in range(len(ds)):
        p = ds[i]
        assert p.flip_perm.dtype == torch.long and torch.equal(p.flip_perm[p.flip_perm], torch.arange(30))
        assert p.flip_perm[2] == 3 and p.flip_perm[8] == 8  # cat ears / car id 2↔3 both swap; 8 fixed
    car = [ds[i] for i in range(len(ds)) if ds[i].category == "car"][0]
    assert car.flip_perm[10] == 20 and car.flip_perm[20] == 10


def test_spair_filters(roots):
    ds = build_dataset("spair", root=roots["spair"], canvas=C84, flags={"viewpoint_variation": 1})
    assert len(ds) == 2 and all(ds[i].flags["viewpoint_variation"] == 1 for i in range(2))
    ds = build_dataset("spair", root=roots["spair"], canvas=C84, flags={"truncation": [0, 2], "mirror": 0},
                       categories=["car"])
    assert [ds[i].category for i in range(len(ds))] == ["car", "car"]
    assert sorted(ds[i].flags["truncation"] for i in range(len(ds))) == [0, 2]
    with pytest.raises(ValueError, match="unknown flag 'pose'"):
        build_dataset("spair", root=roots["spair"], flags={"pose": 1})
    with pytest.raises(ValueError, match="dog"):
        build_dataset("spair", root=roots["spair"], categories=["cat", "dog"])
    with pytest.raises(ValueError, match="no pairs selected"):
        build_dataset("spair", root=roots["spair"], flags={"occlusion": 3})


def test_spair_u(roots, tmp_path):
    ds = build_dataset("spair-u", root=roots["spair-u"], canvas=C84)
    assert len(ds) == 2 and ds.categories == ["cat"]
    p = ds[1]  # image 1 (30×40) → image 2 (40×30)
    assert p.flip_perm is None
    expect = [k < 4 and spair_u_kp(1, k) is not None and spair_u_kp(2, k) is not None for k in range(30)]
    assert p.valid.tolist() == expect and any(expect)
    k = expect.index(True)
    torch.testing.assert_close(p.src_kps[k], torch.tensor(canvas84(*spair_u_kp(1, k), portrait=True)))
    torch.testing.assert_close(p.trg_kps[k], torch.tensor(canvas84(*spair_u_kp(2, k), portrait=False)))
    # annotation folders anywhere: moved out of the root and passed as absolute paths
    for d in ("ExtraPairAnnotation", "ExtraImageAnnotation"):
        shutil.copytree(os.path.join(roots["spair-u"], d), tmp_path / d)
    moved = build_dataset("spair-u", root=roots["spair-u"], canvas=C84,
                          pair_ann_dir=str(tmp_path / "ExtraPairAnnotation"),
                          image_ann_dir=str(tmp_path / "ExtraImageAnnotation"))
    torch.testing.assert_close(moved[1].trg_kps, p.trg_kps, equal_nan=True, rtol=0, atol=0)
    with pytest.raises(ValueError, match="split"):
        build_dataset("spair-u", root=roots["spair-u"], split="val")


def test_spair_u_flags_optional(fresh):
    root = fresh(make_spair_u, n_pairs=1)
    pair = glob.glob(os.path.join(root, "ExtraPairAnnotation", "test", "*.json"))[0]
    edit_json(pair, lambda d: d.pop("viewpoint_variation"))
    p = build_dataset("spair-u", root=root, canvas=C84)[0]
    assert "viewpoint_variation" not in p.flags and p.flags["occlusion"] == 0
    with pytest.raises(DatasetFormatError, match=rf"{re.escape(pair)}: missing field 'viewpoint_variation' "
                                                 r"\(needed by the flags filter\)"):
        build_dataset("spair-u", root=root, flags={"viewpoint_variation": 0})
    with pytest.raises(DatasetFormatError, match="missing field 'viewpoint_variation'"):
        build_dataset("spair", root=root, pair_ann_dir="ExtraPairAnnotation", image_ann_dir="ExtraImageAnnotation",
                      layout=None)


# ------------------------------------------------------------------------------------------ PF
def test_pf_pascal(roots):
    ds = build_dataset("pf-pascal", root=roots["pf-pascal"], canvas=C84)
    assert len(ds) == 6 and ds.categories == ["aeroplane", "cat"]
    p = ds[0]  # aeroplane pair 0: image 0 (40×30) → image 1 (30×40)
    assert p.src_kps.shape == (20, 2) and p.thr == pytest.approx(84.0)  # image max side on the canvas
    expect = [k < 8 and fake_kp(0, k) is not None and fake_kp(1, k) is not None for k in range(20)]
    assert p.valid.tolist() == expect
    torch.testing.assert_close(p.src_kps[3], torch.tensor(canvas84(*fake_kp(0, 3), portrait=False)))
    torch.testing.assert_close(p.trg_kps[3], torch.tensor(canvas84(*fake_kp(1, 3), portrait=True)))
    torch.testing.assert_close(p.trg_bbox, torch.tensor([14.2, 6.3, 64.6, 73.5]))
    assert build_dataset("pf-pascal", root=roots["pf-pascal"], canvas=C84, thr="bbox")[0].thr == pytest.approx(67.2)
    # the csv's XA/YA/XB/YB list the same common keypoints, in vocabulary order, at positions 0..n-1
    csv_ds = build_dataset("pf-pascal", root=roots["pf-pascal"], canvas=C84, kps_source="csv")
    for i in range(len(ds)):
        a, b = ds[i], csv_ds[i]
        n = int(a.valid.sum())
        assert b.valid.tolist() == [True] * n + [False] * (20 - n)
        torch.testing.assert_close(b.src_kps[:n], a.src_kps[a.valid])
        torch.testing.assert_close(b.trg_kps[:n], a.trg_kps[a.valid])
    trn = build_dataset("pf-pascal", root=roots["pf-pascal"], canvas=C84, split="train", categories="cat")
    assert len(trn) == 3 and trn.categories == ["cat"] and trn[0].flags["split"] == "trn"
    with pytest.raises(ValueError, match="thr='bbox'"):
        build_dataset("pf-pascal", root=roots["pf-pascal"], kps_source="csv", thr="bbox")


def test_pf_willow(roots):
    ds = build_dataset("pf-willow", root=roots["pf-willow"], canvas=C84)
    assert len(ds) == 6 and ds.categories == ["car(G)", "duck(S)"]
    p = ds[4]  # duck(S) pair 1: image 1 (30×40) → image 2 (40×30)
    assert p.category == "duck(S)" and p.valid.all() and p.src_kps.shape == (10, 2)
    for k in range(10):
        torch.testing.assert_close(p.src_kps[k], torch.tensor(canvas84(*fake_kp(1, k, hide=False), True)))
        torch.testing.assert_close(p.trg_kps[k], torch.tensor(canvas84(*fake_kp(2, k, hide=False), False)))
    pts = np.array([fake_kp(2, k, hide=False) for k in range(10)])
    extent = (pts.max(0) - pts.min(0)).max() * 2.1  # max side of the target's keypoint box
    assert p.thr == pytest.approx(extent)
    assert build_dataset("pf-willow", root=roots["pf-willow"], canvas=C84, thr="image")[4].thr == pytest.approx(84)


# ------------------------------------------------------------------------------------------ AP-10K
def test_ap10k_intra_species(roots):
    ds = build_dataset("ap10k", root=roots["ap10k"], canvas=C84)
    assert len(ds) == 9 and ds.categories == ["cat", "dog", "fox"]
    p = ds[0]  # ids 1 → 2: images j = 0 (40×30) → 1 (30×40)
    assert p.kp_names == list(AP10K_KP_NAMES) and p.src_kps.shape == (17, 2)
    assert p.flags["src_species"] == "dog" and p.flags["trg_family"] == "canidae"
    expect = [ap10k_visibility(0, k) == 2 and ap10k_visibility(1, k) == 2 for k in range(17)]
    assert p.valid.tolist() == expect
    assert any(ap10k_visibility(j, k) == 1 for j in (0, 1) for k in range(17))  # v = 1 present, not valid
    k = expect.index(True)
    torch.testing.assert_close(p.src_kps[k], torch.tensor(canvas84(*fake_kp(0, k), portrait=False)))
    torch.testing.assert_close(p.trg_kps[k], torch.tensor(canvas84(*fake_kp(1, k), portrait=True)))
    # bbox [l, t, w, h] = [2, 3, 24, 32] → xyxy on the canvas; thr = max(w, h) · 2.1
    torch.testing.assert_close(p.trg_bbox, torch.tensor([14.2, 6.3, 64.6, 73.5]))
    assert p.thr == pytest.approx(32 * 2.1)
    # flip: GeoAware-SC's AP10K_FLIP pairs, derived here from the names
    geo = [(0, 1), (5, 8), (6, 9), (12, 15), (7, 10), (13, 16), (11, 14)]
    want = torch.arange(17)
    for a, b in geo:
        want[a], want[b] = b, a
    assert torch.equal(p.flip_perm, want) and torch.equal(p.flip_perm[p.flip_perm], torch.arange(17))


def test_ap10k_cross_splits(roots):
    cs = build_dataset("ap10k", root=roots["ap10k"], canvas=C84, split_kind="cross-species")
    assert cs.categories == ["canidae"] and len(cs) == 9
    assert all(cs[i].flags["src_species"] != cs[i].flags["trg_species"] for i in range(len(cs)))
    cf = build_dataset("ap10k", root=roots["ap10k"], canvas=C84, split_kind="cross-family")
    assert cf.categories == ["all"] and len(cf) == 18
    assert all(cf[i].flags["src_family"] != cf[i].flags["trg_family"] for i in range(0, 18, 5))
    only_fox = build_dataset("ap10k", root=roots["ap10k"], canvas=C84, categories="fox")
    assert len(only_fox) == 3 and only_fox[0].flags["trg_species"] == "fox"
    with pytest.raises(ValueError, match="split_kind"):
        build_dataset("ap10k", root=roots["ap10k"], split_kind="cross-genus")
    with pytest.raises(ValueError, match="intra-species only"):
        build_dataset("ap10k", root=roots["ap10k"], split="trn", split_kind="cross-family")
    with pytest.raises(FileNotFoundError, match="val_cross_family"):
        build_dataset("ap10k", root=roots["ap10k"], split="val", split_kind="cross-family")


# ------------------------------------------------------------------------------------------ errors
def test_missing_root_and_files(tmp_path, roots, fresh):
    for name in ("spair", "spair-u", "pf-pascal", "pf-willow", "ap10k"):
        with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere")) + ": directory not"):
            build_dataset(name, root=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"PairAnnotation/val: directory not found"):
        build_dataset("spair", root=roots["spair"], split="val")
    root = fresh(make_spair, n_pairs=1, categories=("cat",))
    os.remove(os.path.join(root, "Layout", "large", "test.txt"))
    with pytest.raises(FileNotFoundError, match=r"Layout/large/test\.txt: not found \(expected the spair pair list"):
        build_dataset("spair", root=root)
    assert len(build_dataset("spair", root=root, layout=None)) == 1
    with pytest.raises(FileNotFoundError, match=r"val_pairs_pf_pascal\.csv or .*val_pairs\.csv"):
        build_dataset("pf-pascal", root=roots["pf-pascal"], split="val")


def test_spair_errors(fresh):
    root = fresh(make_spair, n_pairs=2, categories=("cat",))
    pair = sorted(glob.glob(os.path.join(root, "PairAnnotation", "test", "*.json")))[0]
    original = json.load(open(pair))
    P = re.escape(pair)

    def raises(exc, match, **kw):
        with pytest.raises(exc, match=match):
            ds = build_dataset("spair", root=root, canvas=C84, **kw)
            ds[0]

    edit_json(pair, lambda d: d.pop("trg_bndbox"))
    raises(DatasetFormatError, rf"{P}: missing field 'trg_bndbox'")
    edit_json(pair, lambda d: d.update(trg_bndbox=[2, 3, 26]))
    raises(DatasetFormatError, r"field 'trg_bndbox' must be 4 finite numbers")
    edit_json(pair, lambda d: d.update(trg_bndbox=[2, 3, 26, 35], src_kps=[[1.0]] * len(d["src_kps"])))
    raises(DatasetFormatError, r"field 'src_kps' must hold \[x, y\] pairs", kps_source="pair")
    edit_json(pair, lambda d: d.update(src_kps=d["trg_kps"][:-1]))
    raises(DatasetFormatError, r"field 'src_kps' has 4 points, expected 5", kps_source="pair")
    edit_json(pair, lambda d: d.update(src_kps=d["trg_kps"], kps_ids=["0", "31"] + d["kps_ids"][2:]))
    raises(DatasetFormatError, r"kps_ids.*'?31'? is not an integer in \[0, 30\)", kps_source="pair")
    edit_json(pair, lambda d: d.update(category="dog"))
    raises(DatasetFormatError, r"field 'category' is 'dog' but the pair name says 'cat'")
    edit_json(pair, lambda d: d.update(category="cat", viewpoint_variation="high"))
    raises(DatasetFormatError, r"field 'viewpoint_variation' must be an integer")
    edit_json(pair, lambda d: d.update(viewpoint_variation=0, src_imsize=[41, 30, 3]))
    raises(DatasetFormatError, r"annotated image size 41x30 \(WxH\) but .*2007_000000.jpg is 40x30")

    img_ann = os.path.join(root, "ImageAnnotation", "cat", "2007_000000.json")
    edit_json(pair, lambda d: d.update(original))
    edit_json(img_ann, lambda d: d["kps"].update({"0": [1.0, 2.0, 3.0]}))
    raises(DatasetFormatError, rf"{re.escape(img_ann)}: field \"kps\['0'\]\" must hold \[x, y\] pairs")
    edit_json(img_ann, lambda d: d["kps"].update({"0": [45.0, 2.0]}))
    raises(DatasetFormatError, r"field 'kps': keypoint 0 at \(45.00, 2.00\) lies outside the 40x30 image")
    edit_json(img_ann, lambda d: d["kps"].update({"0": [1.5, 1.25], "x": None}))
    raises(DatasetFormatError, r"field 'kps': keypoint id 'x' is not an integer")
    with open(img_ann, "w") as fh:
        fh.write("{not json")
    raises(DatasetFormatError, rf"{re.escape(img_ann)}: not valid JSON")
    os.remove(img_ann)
    raises(FileNotFoundError, rf"{re.escape(img_ann)}: not found \(expected an spair image annotation\)")
    os.remove(os.path.join(root, "JPEGImages", "cat", "2007_000000.jpg"))
    raises(FileNotFoundError, r"2007_000000.jpg: not found \(expected an image\)", kps_source="pair")


def test_argument_errors(roots):
    for kw, match in ((dict(split="training"), "split"), (dict(thr="box"), "thr must be"),
                      (dict(kps_source="json"), "kps_source")):
        with pytest.raises(ValueError, match=match):
            build_dataset("spair", root=roots["spair"], **kw)
    with pytest.raises(ValueError, match="kps_source"):
        build_dataset("pf-pascal", root=roots["pf-pascal"], split="trn", kps_source="csv")
    with pytest.raises(ValueError, match="only split 'test'"):
        build_dataset("pf-willow", root=roots["pf-willow"], split="val")


def test_pf_errors(fresh, tmp_path):
    root = fresh(make_pf_pascal, n_pairs=1, classes=("cat",))
    mat = os.path.join(root, "Annotations", "cat", "cat_0000.mat")
    scipy.io.savemat(mat, {"bbox": np.array([[2.0, 3.0, 36.0, 25.0]])})
    with pytest.raises(DatasetFormatError, match=rf"{re.escape(mat)}: missing field 'kps'"):
        build_dataset("pf-pascal", root=root)
    scipy.io.savemat(mat, {"kps": np.ones((3, 3)), "bbox": np.array([[2.0, 3.0, 36.0, 25.0]])})
    with pytest.raises(DatasetFormatError, match=r"field 'kps' must be \(N, 2\)"):
        build_dataset("pf-pascal", root=root)
    scipy.io.savemat(mat, {"kps": np.array([[60.0, 2.0]]), "bbox": np.array([[2.0, 3.0, 36.0, 25.0]])})
    with pytest.raises(DatasetFormatError, match=r"keypoint 0 at \(60.00, 2.00\) lies outside the 40x30"):
        build_dataset("pf-pascal", root=root)[0]
    csv_path = os.path.join(root, "test_pairs_pf_pascal.csv")
    lines = open(csv_path).read().splitlines()
    cells = lines[1].split(",")
    assert cells[2] == "8"  # the cat's class id
    open(csv_path, "w").write("\n".join([lines[0], ",".join(cells[:2] + ["21"] + cells[3:])]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"test_pairs_pf_pascal.csv: line 2, column 'class'.*'21'"):
        build_dataset("pf-pascal", root=root)

    willow = make_pf_willow(str(tmp_path / "w"), n_pairs=1, categories=("car(G)",))
    csv_path = os.path.join(willow, "test_pairs_pf.csv")
    lines = open(csv_path).read().splitlines()
    open(csv_path, "w").write("\n".join([lines[0], lines[1].rsplit(",", 1)[0]]) + "\n")
    with pytest.raises(DatasetFormatError, match=r"test_pairs_pf.csv: line 2: expected 2 image paths and 40 "
                                                 r"coordinates.*got 41 cells"):
        build_dataset("pf-willow", root=willow)


def test_ap10k_errors(fresh):
    root = fresh(make_ap10k, n_images=2, families={"felidae": ("cat",)})
    inst = os.path.join(root, "ImageAnnotation", "felidae", "cat", "000000000001.json")
    pair = glob.glob(os.path.join(root, "PairAnnotation", "test", "*.json"))[0]
    edit_json(inst, lambda d: d.update(keypoints=d["keypoints"][:-1]))
    with pytest.raises(DatasetFormatError, match=rf"{re.escape(inst)}: field 'keypoints' must hold 17 .* got 50"):
        build_dataset("ap10k", root=root)
    edit_json(inst, lambda d: d.update(keypoints=d["keypoints"] + [3]))
    with pytest.raises(DatasetFormatError, match=r"visibility flags must be 0, 1 or 2, got .*3"):
        build_dataset("ap10k", root=root)
    edit_json(inst, lambda d: (d["keypoints"].__setitem__(-1, 0), d.pop("bbox")))
    with pytest.raises(DatasetFormatError, match=rf"{re.escape(inst)}: missing field 'bbox'"):
        build_dataset("ap10k", root=root)
    edit_json(inst, lambda d: d.update(bbox=[2, 3, 0, 32]))
    with pytest.raises(DatasetFormatError, match=r"field 'bbox' is an empty box \(xywh\)"):
        build_dataset("ap10k", root=root)
    edit_json(inst, lambda d: d.update(bbox=[2, 3, 34, 22]))
    assert len(build_dataset("ap10k", root=root)) == 1
    edit_json(pair, lambda d: d.update(src_json_path="data/ap-10k/annotations/000000000001.json"))
    with pytest.raises(DatasetFormatError, match=rf"{re.escape(pair)}: field 'src_json_path' must point into an "
                                                 r"ImageAnnotation/ folder"):
        build_dataset("ap10k", root=root)
