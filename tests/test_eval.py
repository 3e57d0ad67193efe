"""The evaluation runner, `semcorr eval` / `semcorr demo`, and the torchrun-sharded evaluation."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from semcorr_fast import evaluate, matching
from semcorr_fast.data import Canvas, Pair
from semcorr_fast.evaluate import FeatureSource, backbone_input


class PoolBackbone(torch.nn.Module):
    """Features = the image's 8×8 average colours plus a high-frequency code: exact on identical images."""

    name = "pool8"
    dim = 3
    stride = 8

    def __init__(self, canvas):
        super().__init__()
        self.canvas = canvas
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return F.avg_pool2d(images, 8)


def _noise_image(h, w, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(3, h // 8, w // 8, generator=g).repeat_interleave(8, 1).repeat_interleave(8, 2)


def _pair(img, kps, valid=None, perm=None, name="a"):
    K = kps.shape[0]
    valid = torch.ones(K, dtype=torch.bool) if valid is None else valid
    return Pair(img, img, kps, kps.clone(), valid, 100.0, "cat", f"p-{name}", name, name, flip_perm=perm)


@pytest.mark.parametrize("canvas", [Canvas.resized(64, 64), Canvas.pad_square(96), Canvas.identity()])
def test_identical_images_match_exactly_through_any_backbone_canvas(canvas):
    img = _noise_image(48, 96, 0)  # non-square dataset canvas: pad_square pads it to a square first
    cells = torch.tensor([[1, 1], [10, 4], [5, 2], [0, 5]], dtype=torch.float32)
    kps = (cells + 0.5) * 8
    bb = PoolBackbone(canvas)
    inp, frame = backbone_input(img, canvas)
    if canvas.kind == "pad_square":
        assert inp.shape[-2:] == (96, 96) and frame == (0.0, -24.0, 96.0, 72.0)
    rec = evaluate.evaluate_pair(_pair(img, kps), FeatureSource(bb), "argmax")
    hw = (inp.shape[-2] // 8, inp.shape[-1] // 8)
    # identical images: the prediction is the centre of the backbone cell that holds the keypoint
    want = matching.from_grid(matching.to_grid(kps, frame, hw).floor(), frame, hw, "center")
    torch.testing.assert_close(rec.pred, want)
    if canvas.kind != "resize":  # 8-px cells aligned with the keypoints' cells: exact
        torch.testing.assert_close(rec.pred, kps)


def test_feature_cache_is_used(tmp_path):
    from semcorr_fast.backbones.cache import FeatureCache

    img = _noise_image(32, 32, 1)
    bb = PoolBackbone(Canvas.identity())
    cache = FeatureCache(str(tmp_path), bb.name, bb.canvas)
    p = _pair(img, torch.tensor([[4.0, 4.0]]))
    evaluate.evaluate_pair(p, FeatureSource(bb, cache), "argmax")
    calls = bb.calls
    assert calls >= 1
    rec = evaluate.evaluate_pair(p, FeatureSource(bb, cache), "argmax")
    assert bb.calls == calls
    torch.testing.assert_close(rec.pred, torch.tensor([[4.0, 4.0]]))


def test_pose_code_flip_on_mirrored_pair():
    # target = the mirrored source; keypoints 0/1 are a left/right pair: the flip pose must win and give
    # exact predictions, while the identity pose gets the pair swapped.
    src = _noise_image(64, 64, 2)
    trg = src.flip(-1)
    kps = torch.tensor([[12.0, 20.0], [52.0, 20.0], [36.0, 44.0]])
    perm = torch.tensor([1, 0, 2])
    gt = torch.stack((64 - kps[perm, 0], kps[perm, 1]), -1)
    pair = Pair(src, trg, kps, gt, torch.ones(3, dtype=torch.bool), 64.0, "cat", "mirror", "s", "t", flip_perm=perm)
    bb = PoolBackbone(Canvas.identity())
    rec = evaluate.evaluate_pair(pair, FeatureSource(bb), "argmax", pose="code")
    assert rec.pose == "flip"
    cell = lambda p: (torch.floor(p / 8) + 0.5) * 8  # noqa: E731  argmax predicts cell centres
    torch.testing.assert_close(rec.pred, cell(gt))


def test_evaluate_summary_and_json(tmp_path):
    pytest.importorskip("semcorr_fast.metrics")
    img = _noise_image(32, 32, 3)
    kps = torch.tensor([[4.0, 4.0], [20.0, 12.0]])

    class DS(list):
        name = "toy"

    ds = DS([_pair(img, kps, name="a"), _pair(img, kps, torch.tensor([True, False]), name="b")])
    res = evaluate.evaluate(ds, PoolBackbone(Canvas.identity()), "argmax", progress=False)
    assert res.info["n_pairs"] == 2
    overall = res.summary["overall"]
    assert abs(overall["pck@0.1/image"] - 1.0) < 1e-6 and abs(overall["pck@0.1/point"] - 1.0) < 1e-6
    out = tmp_path / "r.json"
    evaluate.write_json(res, str(out))
    data = json.loads(out.read_text())
    assert len(data["pairs"]) == 2 and data["pairs"][1]["valid"] == [True, False]


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "semcorr_fast.cli", *args], capture_output=True, text=True, **kw)


@pytest.mark.slow
def test_cli_eval_warps_plots_and_torchrun_equal(tmp_path):
    pytest.importorskip("semcorr_fast.data.warps")
    pytest.importorskip("semcorr_fast.backbones")
    one = tmp_path / "one.json"
    r = _cli(["eval", "--dataset", "warps", "--n-pairs", "4", "--backbone", "daisy", "--out", str(one),
              "--plot", str(tmp_path / "plots"), "--n-pictures", "1", "--quiet"])
    assert r.returncode == 0, r.stderr
    assert "all" in r.stdout
    assert (tmp_path / "plots" / "pck_curve.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "match_00000.png").stat().st_size > 1000
    two = tmp_path / "two.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "semcorr_fast.cli", "eval", "--dataset", "warps", "--n-pairs", "4", "--backbone", "daisy",
                        "--out", str(two), "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert b["info"]["world_size"] == 2 and a["info"]["world_size"] == 1
    assert a["summary"] == b["summary"]
    assert [p["pred"] for p in a["pairs"]] == [p["pred"] for p in b["pairs"]]


@pytest.mark.slow
def test_demo_writes_a_picture(tmp_path):
    pytest.importorskip("semcorr_fast.data.warps")
    pytest.importorskip("semcorr_fast.backbones")
    out = tmp_path / "demo.png"
    r = _cli(["demo", "--out", str(out)])
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 10000 and "PCK@0.1" in r.stdout


def _fake(name, tmp_path):
    import importlib.util
    here = os.path.join(os.path.dirname(__file__), "fakedata", name + ".py")
    spec = importlib.util.spec_from_file_location(f"fakedata_{name}", here)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_eval_fake_spair_with_pose_and_geo(tmp_path):
    fake = _fake("spair_pf_ap10k", tmp_path)
    root = fake.make_spair(str(tmp_path / "spair"), n_pairs=2, categories=("cat",))
    out = tmp_path / "spair.json"
    r = _cli(["eval", "--dataset", "spair", "--root", root, "--backbone", "daisy", "--matcher", "geoaware",
              "--pose", "code", "--geo", "spair", "--cache", str(tmp_path / "cache"), "--out", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["info"]["n_pairs"] == 2 and {p["pose"] for p in data["pairs"]} <= {"identity", "flip"}
    assert "cat" in data["summary"]["per_category"] and "pck@0.1/image" in data["summary"]["overall"]
    assert any(k.startswith("geo/") for k in data["summary"]["overall"])
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) >= 3   # both images + a flipped source
    # a second run reads every feature from the cache and gives the same numbers
    r2 = _cli(["eval", "--dataset", "spair", "--root", root, "--backbone", "daisy", "--matcher", "geoaware",
               "--pose", "code", "--geo", "spair", "--cache", str(tmp_path / "cache"), "--out", str(out) + "2", "--quiet"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    again = json.loads((tmp_path / "spair.json2").read_text())
    assert again["summary"] == data["summary"] and again["info"]["features_computed_rank0"] == 0


def test_cli_eval_missing_root_names_the_path(tmp_path):
    r = _cli(["eval", "--dataset", "spair", "--root", str(tmp_path / "nowhere"), "--backbone", "daisy", "--quiet"])
    assert r.returncode != 0 and "nowhere" in r.stderr


def test_pair_aware_model_frames_roundtrip():
    class Echo(PoolBackbone):
        name = "echo"

        def match_points(self, src_images, trg_images, src_xy):
            assert src_images.shape[-2:] == (96, 96) and trg_images.shape[-2:] == (96, 96)
            return src_xy  # "the same pixel": must come back as the same canvas point

    img = _noise_image(48, 96, 4)
    kps = torch.tensor([[10.0, 5.0], [90.0, 40.0]])
    rec = evaluate.evaluate_pair(_pair(img, kps), FeatureSource(Echo(Canvas.pad_square(96))), "argmax")
    torch.testing.assert_close(rec.pred, kps)
    with pytest.raises(ValueError, match="pair-aware"):
        evaluate.evaluate_pair(_pair(img, kps), FeatureSource(Echo(Canvas.pad_square(96))), "argmax", pose="code")


def test_cli_eval_of_a_trained_checkpoint(tmp_path):
    from semcorr_fast.train import load_config, train

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cfg = load_config(os.path.join(root, "configs", "demystifying", "eq_smallcnn.toml"),
                      ["train.steps=1", "train.ckpt_every=1", "data.n_images=4",
                       "eval.every=0", "eval.at_end=false", "eval.at_start=false", "train.progress=false",
                       f"train.out_dir={tmp_path / 'run'}"])
    train(cfg)
    out = tmp_path / "r.json"
    r = _cli(["eval", "--dataset", "warps", "--n-pairs", "2", "--checkpoint", str(tmp_path / "run" / "last.pt"),
              "--matcher", "demystifying", "--out", str(out), "--quiet"])
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(out.read_text())["info"]
    assert info["backbone"].startswith("eq") and info["n_pairs"] == 2


def test_instance_masks_for_pose_alignment(tmp_path):
    from PIL import Image

    # a 40x60 (HxW) original image on an 80x80 padded canvas (scale 4/3, offset y = 13)
    canvas = Canvas.pad_square(80)
    tf = canvas.transform_for(40, 60)
    m = torch.zeros(40, 60, dtype=torch.uint8)
    m[:, :20] = 255                                          # the object: the left third
    Image.fromarray(m.numpy()).save(tmp_path / "a.png")
    img = torch.zeros(3, 80, 80)
    p = Pair(img, img, torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, dtype=torch.bool), 1.0, "cat", "p", "a.jpg",
             "b.jpg", src_tf=tf, trg_tf=tf, src_bbox=torch.tensor([0.0, 0.0, 80.0, 80.0]))
    frame, hw = (0.0, 0.0, 80.0, 80.0), (8, 8)                # 10-px cells
    inside = evaluate._object_region(p, "src", str(tmp_path))
    got = evaluate._grid_mask(inside, frame, hw)
    xs = (torch.arange(8) + 0.5) * 10
    ys = (torch.arange(8) + 0.5) * 10
    want = ((xs / tf.sx) < 20)[None, :] & (((ys - tf.oy) / tf.sy >= 0) & ((ys - tf.oy) / tf.sy < 40))[:, None]
    assert torch.equal(got, want) and got.any()
    assert torch.equal(evaluate._grid_mask(inside, frame, hw, "flip", (80, 80)), want.flip(-1))
    assert torch.equal(evaluate._grid_mask(inside, frame, hw, "rot90", (80, 80)), torch.rot90(want, 1, (0, 1)))
    # no mask file and no bbox for the target: the image content (the canvas minus its padding) stands in
    content = ((ys >= tf.oy) & (ys <= tf.oy + 40 * tf.sy))[:, None].expand(8, 8)
    assert torch.equal(evaluate._grid_mask(evaluate._object_region(p, "trg", str(tmp_path)), frame, hw), content)
