"""GeoAware-SC supervised (semcorr_fast.methods.geoaware) and its cached-feature pairs (methods.feature_pairs)."""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from semcorr_fast import ops
from semcorr_fast.backbones import FeatureCache, create_backbone
from semcorr_fast.data import Canvas, build_dataset
from semcorr_fast.data.spair import SPAIR_LR_PAIRS
from semcorr_fast.evaluate import backbone_input, evaluate
from semcorr_fast.matching import to_grid
from semcorr_fast.methods import build_method, list_methods
from semcorr_fast.methods.feature_pairs import (FeatureIndex, FeaturePairs, build_feature_source, feature_frame,
                                                fill_cache)
from semcorr_fast.methods.geoaware import (FEATURE_BATCH_KEYS, PostProcessor, augmentation_terms, clip_loss, dense_rows,
                                           epe_loss, flip_keypoints, gather_cells, infer_feature_dims,
                                           naive_dense_rows)
from semcorr_fast.train import BatchStream, DatasetPairs, load_config, train
from tests.fakedata.spair_pf_ap10k import make_spair

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def one_thread():
    """The machine is shared: one intra-op thread avoids OpenMP spin contention (tiny shapes gain nothing)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StandIn(torch.nn.Module):
    """A backbone stand-in for feature batches (the method never calls it there)."""

    def __init__(self, dim=24, mode=None):
        super().__init__()
        self.name, self.dim, self.stride, self.canvas = "standin", dim, 8, Canvas.pad_square(128)
        if mode is not None:
            self.mode = mode

    def forward(self, images):
        raise AssertionError("feature batches must not run the backbone")


def _random_batch(B=3, K=6, C=24, hw=(6, 7), seed=0, perm=None):
    g = torch.Generator().manual_seed(seed)
    h, w = hw
    kps = lambda: torch.rand(B, K, 2, generator=g) * torch.tensor([w, h]) * 0.98  # noqa: E731
    src, trg = kps(), kps()
    src[0, 1] = float("nan")                       # not visible in the source
    valid = torch.isfinite(src).all(-1) & torch.isfinite(trg).all(-1)
    valid[1, 2] = False
    if perm is None:
        perm = torch.arange(K).repeat(B, 1)
        perm[:, [0, 1]] = perm[:, [1, 0]]
    return {"src_feat": torch.randn(B, C, h, w, generator=g), "trg_feat": torch.randn(B, C, h, w, generator=g),
            "src_feat_flip": torch.randn(B, C, h, w, generator=g), "trg_feat_flip": torch.randn(B, C, h, w, generator=g),
            "src_kps": src, "trg_kps": trg, "valid": valid, "flip_perm": perm,
            "src_flip_width": torch.full((B,), float(w)), "trg_flip_width": torch.full((B,), float(w)),
            "thr": torch.full((B,), 4.0), "src_thr": torch.full((B,), 3.0)}


def _method(**kw):
    kw = {"feature_dims": (12, 12), "out_dim": 16, "bottleneck": 8, "tiny": True, **kw}
    return build_method("geoaware", StandIn(), **kw)


# ------------------------------------------------------------------------------------------------------
# post-processor
# ------------------------------------------------------------------------------------------------------

def test_postprocessor_shapes_mixing_and_normalisation():
    torch.manual_seed(0)
    pp = PostProcessor((6, 10), out_dim=16, bottleneck=8, dropout=0.2, tiny=True).eval()
    x = torch.randn(2, 16, 5, 7)
    y = pp(x)
    assert y.shape == (2, 16, 5, 7) and y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=1), torch.ones(2, 5, 7))
    assert (y >= 0).all()                                        # final ReLU and positive mixing weights
    with torch.no_grad():
        pp.mixing_weights.copy_(torch.tensor([0.3, -1.2]))
    w = torch.softmax(torch.tensor([0.3, -1.2]), 0)
    torch.testing.assert_close(pp.mixing(), w)
    raw = w[0] * pp.bottleneck_layers[0](x[:, :6]) + w[1] * pp.bottleneck_layers[1](x[:, 6:])
    torch.testing.assert_close(pp(x, normalize=False), raw)
    torch.testing.assert_close(pp(x), raw / (raw.norm(dim=1, keepdim=True) + 1e-10))
    # block layout: 1x1 -> 3x3 -> 1x1, GN, projection shortcut only where the width changes
    blk = pp.bottleneck_layers[1][0]
    assert blk.conv2.kernel_size == (3, 3) and blk.conv1.bias is None and blk.conv2.norm.num_groups == 4
    assert PostProcessor((16,), 16, 8, tiny=True).bottleneck_layers[0][0].shortcut is None
    with pytest.raises(ValueError, match=r"\(B, 16, h, w\)"):
        pp(torch.randn(2, 15, 5, 7))
    with pytest.raises(ValueError, match="divisible by the GroupNorm groups"):
        PostProcessor((8,), out_dim=16, bottleneck=8)             # 32 groups do not divide 8


def test_postprocessor_paper_size_parameter_count():
    pp = PostProcessor()                                          # (640, 1280, 1280, 768) -> 768, bottleneck 192
    n = sum(p.numel() for p in pp.parameters())
    expect = 4                                                    # mixing weights
    for c in (640, 1280, 1280, 768):
        expect += c * 192 + 192 * 192 * 9 + 192 * 768 + 2 * (192 + 192 + 768)   # convs + GN affine
        expect += (c * 768 + 2 * 768) if c != 768 else 0                        # projection shortcut
    assert n == expect == 5_150_212                               # the paper's "5M"
    assert sorted(k for k in pp.state_dict() if k.startswith("bottleneck_layers.0."))[:2] == [
        "bottleneck_layers.0.0.conv1.norm.bias", "bottleneck_layers.0.0.conv1.norm.weight"]


def test_dropout_only_in_train_mode():
    torch.manual_seed(1)
    pp = PostProcessor((6, 10), out_dim=16, bottleneck=8, dropout=0.2, tiny=True)
    x = torch.rand(2, 16, 8, 8) + 0.5                             # no exact zeros in the input
    seen = []
    h = pp.bottleneck_layers[0].register_forward_pre_hook(lambda mod, inp: seen.append(inp[0].detach()))
    pp.train()
    a, b = pp(x), pp(x)
    assert not torch.equal(a, b)
    zero = (seen[0] == 0).float().mean()
    assert 0.1 < zero < 0.3                                       # element-wise, p = 0.2
    kept = seen[0] != 0
    torch.testing.assert_close(seen[0][kept], x[:, :6][kept] / 0.8)   # survivors scaled by 1/(1-p)
    h.remove()
    pp.eval()
    torch.testing.assert_close(pp(x), pp(x), rtol=0, atol=0)
    assert (pp(x) - a).abs().max() > 1e-3
    pp0 = PostProcessor((6, 10), out_dim=16, bottleneck=8, dropout=0.0, tiny=True)
    pp0.load_state_dict(pp.state_dict())
    torch.testing.assert_close(pp0.train()(x), pp.eval()(x))


# ------------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------------

def test_clip_loss_equals_naive_formula():
    g = torch.Generator().manual_seed(0)
    B, K, D = 4, 6, 8
    s = F.normalize(torch.randn(B, K, D, generator=g), dim=-1)
    t = F.normalize(torch.randn(B, K, D, generator=g), dim=-1)
    mask = torch.rand(B, K, generator=g) > 0.3
    mask[0] = True
    mask[2] = False
    mask[3] = False
    mask[3, 4] = True                                             # a single keypoint: loss 0
    ls = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss, present = clip_loss(s, t, mask, ls)
    assert present.tolist() == [True, mask[1].any().item(), False, True]
    ls2 = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    for b in range(B):
        sel = mask[b]
        if not sel.any():
            assert loss[b] == 0
            continue
        logits = ls2.exp() * s[b, sel] @ t[b, sel].T
        lab = torch.arange(int(sel.sum()))
        ref = (F.cross_entropy(logits, lab) + F.cross_entropy(logits.T, lab)) / 2
        torch.testing.assert_close(loss[b], ref)
    assert loss[3] == 0
    (ga,) = torch.autograd.grad(loss.sum(), ls)
    naive = sum((F.cross_entropy(ls2.exp() * s[b, mask[b]] @ t[b, mask[b]].T, torch.arange(int(mask[b].sum())))
                 + F.cross_entropy((ls2.exp() * s[b, mask[b]] @ t[b, mask[b]].T).T, torch.arange(int(mask[b].sum())))) / 2
                for b in range(B) if mask[b].any())
    (gb,) = torch.autograd.grad(naive, ls2)
    torch.testing.assert_close(ga, gb)


def test_epe_loss_value_and_gradients_equal_reference():
    g = torch.Generator().manual_seed(3)
    P, K, D, h, w = 3, 5, 16, 6, 7
    A = F.normalize(torch.randn(P, D, h, w, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    Bm = F.normalize(torch.randn(P, D, h, w, generator=g, dtype=torch.float64), dim=1).requires_grad_()
    sk = torch.rand(P, K, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h]) * 0.98
    tk = torch.rand(P, K, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h]) * 0.98
    mask = torch.rand(P, K, generator=g) > 0.2
    mask[0, 0] = True
    noise = torch.randn(P, K, 2, generator=g, dtype=torch.float64) * 0.3

    def run(mode):
        q = gather_cells(A, sk)
        tgt = Bm.flatten(2).transpose(1, 2)
        if mode == "naive":
            from semcorr_fast.methods.geoaware import _cells
            pred = naive_dense_rows(A.flatten(2).transpose(1, 2), tgt, (h, w), _cells(sk, (h, w))[1], 0.02)
        else:
            pred = dense_rows(q, tgt, (h, w), 0.02, backend=mode)
        loss, present = epe_loss(pred, sk, tk, mask, (h, w), noise)
        gA, gB = torch.autograd.grad(loss.sum(), (A, Bm))
        return loss, present, gA, gB

    ref, cpu, naive = run("reference"), run("cpu"), run("naive")
    for other in (cpu, naive):
        torch.testing.assert_close(other[0].double(), ref[0].double())
        torch.testing.assert_close(other[2], ref[2])
        torch.testing.assert_close(other[3], ref[3])
    assert ref[1].all()
    assert (ref[3].abs().sum(1) > 0).all()                        # every target cell receives a gradient
    # hand check of one row: flow relative to the integer source cell, GT from continuous coordinates
    pred = dense_rows(gather_cells(A, sk), Bm.flatten(2).transpose(1, 2), (h, w), 0.02).double()
    k = int(mask[0].nonzero()[0])
    one = torch.zeros(P, K, dtype=torch.bool)
    one[0, k] = True
    l1, _ = epe_loss(pred, sk, tk, one, (h, w), noise)
    want = ((pred[0, k] - sk[0, k].floor()) - (tk[0, k] - sk[0, k] + noise[0, k])).norm()
    torch.testing.assert_close(l1[0].double(), want.detach())


def test_method_loss_and_grads_match_reference_backend_and_naive():
    batch = _random_batch()
    out = {}
    for mode in ("cpu", "reference", "naive"):
        torch.manual_seed(0)
        m = _method(dropout=0.0, backend="cpu" if mode == "naive" else mode,
                    dense_impl="naive" if mode == "naive" else "fused")
        res = m.training_step({**batch, "generator": torch.Generator().manual_seed(5)}, 0)
        res["loss"].backward()
        out[mode] = (res, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    for mode in ("reference", "naive"):
        for k in ("loss", "sparse", "dense", "single", "double", "self"):
            torch.testing.assert_close(out[mode][0][k], out["cpu"][0][k], rtol=1e-4, atol=1e-5)
        assert out[mode][1].keys() == out["cpu"][1].keys()
        for n in out["cpu"][1]:
            torch.testing.assert_close(out[mode][1][n], out["cpu"][1][n], rtol=1e-3, atol=1e-5)
    assert "logit_scale" in out["cpu"][1] and "post.mixing_weights" in out["cpu"][1]


# ------------------------------------------------------------------------------------------------------
# flip augmentation
# ------------------------------------------------------------------------------------------------------

def test_flip_keypoints_mirror_and_permute():
    kps = torch.tensor([[[1.2, 2.5], [5.7, 3.5], [3.5, 0.5]]])
    vis = torch.tensor([[True, False, True]])
    perm = torch.tensor([[1, 0, 2]])
    kf, vf = flip_keypoints(kps, vis, perm, 8.0)
    torch.testing.assert_close(kf, torch.tensor([[[8 - 5.7, 3.5], [8 - 1.2, 2.5], [8 - 3.5, 0.5]]]))
    assert vf.tolist() == [[False, True, True]]
    # a mirror-symmetric object: its flipped keypoints are its keypoints
    sym = torch.tensor([[[2.3, 4.0], [8 - 2.3, 4.0], [4.0, 1.0]]])
    torch.testing.assert_close(flip_keypoints(sym, torch.ones(1, 3, dtype=torch.bool), perm, 8.0)[0], sym)
    # self flip maps an image onto its mirror: the mirrored map at flipped keypoint i holds what the
    # original holds at keypoint perm[i] (SPair cat's left/right permutation, per-pair widths)
    g = torch.Generator().manual_seed(0)
    K = 15
    cat = torch.arange(K)
    for a, b in SPAIR_LR_PAIRS["cat"]:
        cat[a], cat[b] = b, a
    M = torch.randn(2, 5, 6, 9, generator=g)
    k = torch.rand(2, K, 2, generator=g) * torch.tensor([9.0, 6.0]) * 0.999
    kf, _ = flip_keypoints(k, torch.ones(2, K, dtype=torch.bool), cat.repeat(2, 1), torch.tensor([9.0, 9.0]))
    torch.testing.assert_close(gather_cells(M.flip(-1), kf), gather_cells(M, k)[:, cat])
    with pytest.raises(ValueError, match="perm entries"):
        flip_keypoints(kps, vis, torch.tensor([[1, 0, 3]]), 8.0)


def test_flip_variants_and_weights():
    assert augmentation_terms("paper") == {"single": 1.0, "double": 1.0, "self": 0.25}
    assert augmentation_terms("code") == {"double": 1.0, "self": 0.25}          # single flip silently off
    assert augmentation_terms("none") == {}
    batch = _random_batch()
    for variant, expect in (("paper", {"sparse", "dense", "single", "double", "self"}),
                            ("code", {"sparse", "dense", "double", "self"}), ("none", {"sparse", "dense"})):
        torch.manual_seed(0)
        m = _method(dropout=0.0, flip_aug=variant)
        terms = m.loss_terms(batch, torch.Generator().manual_seed(2))
        assert set(terms) == expect
        torch.manual_seed(0)
        out = m.training_step({**batch, "generator": torch.Generator().manual_seed(2)}, 0)
        assert set(out) == expect | {"loss", "logit_scale"}
        # the per-pair weighted mean: (sparse + dense + Σ w·term) / (1 + Σ w) over terms with keypoints
        w = {"single": 1.0, "double": 1.0, "self": 0.25}
        per = []
        for b in range(3):
            num = terms["sparse"][0][b] + terms["dense"][0][b]
            den = 1.0
            for t in expect - {"sparse", "dense"}:
                if terms[t][1][b]:
                    num, den = num + w[t] * terms[t][0][b], den + w[t]
            per.append(num / den)
        torch.testing.assert_close(out["loss"], torch.stack(per).mean())
    # the flip terms use the flipped maps: the same batch with other flipped features changes only them
    m = _method(dropout=0.0)
    t1 = m.loss_terms(batch, torch.Generator().manual_seed(2))
    t2 = m.loss_terms({**batch, "trg_feat_flip": batch["trg_feat_flip"] + 1}, torch.Generator().manual_seed(2))
    assert torch.equal(t1["single"][0], t2["single"][0]) and torch.equal(t1["self"][0], t2["self"][0])
    assert not torch.equal(t1["double"][0], t2["double"][0])
    # pairs without a left/right permutation get no flip terms
    nb = {**batch, "flip_perm": torch.cat([batch["flip_perm"][:2], torch.full((1, 6), -1)])}
    t3 = m.loss_terms(nb, torch.Generator().manual_seed(2))
    assert t3["double"][1].tolist() == [True, True, False] and t3["dense"][1][2]


def test_method_options_and_errors():
    assert "geoaware" in list_methods()
    m = _method()
    assert m.dim == 16 and m.descriptor_from_features(torch.randn(2, 24, 4, 5)).shape == (2, 16, 4, 5)
    assert not _method(dense_loss=True, sparse_loss=False).logit_scale.requires_grad
    with pytest.raises(ValueError, match="mode='raw'"):
        build_method("geoaware", StandIn(mode="zero_shot"), feature_dims=(12, 12), out_dim=16, tiny=True)
    with pytest.raises(ValueError, match="flip_aug"):
        _method(flip_aug="sometimes")
    with pytest.raises(TypeError, match="unknown method_args"):
        build_method("geoaware", StandIn(), temperature=0.1)
    with pytest.raises(KeyError, match="src_feat_flip"):
        b = _random_batch()
        del b["src_feat_flip"]
        m.training_step(b, 0)

    class FakeSD:
        channels, order = {2: 64, 5: 64, 8: 32}, (8, 5, 2)

    class FakeFused:
        dim, sd, dino = 208, FakeSD(), type("D", (), {"dim": 48})()

    assert infer_feature_dims(FakeFused()) == (32, 64, 64, 48)
    # sparse-only baseline: flip terms become CLIP terms, as the released code without DENSE_OBJ
    sb = _method(dense_loss=False, flip_aug="code")
    assert set(sb.loss_terms(_random_batch())) == {"sparse", "double", "self"}


def test_init_checkpoint_from_released_state_dict(tmp_path):
    m = _method()
    with torch.no_grad():
        m.post.mixing_weights.copy_(torch.tensor([0.7, -0.1]))
        m.logit_scale.fill_(3.0)
    released = {k[len("post."):]: v for k, v in m.state_dict().items() if k.startswith("post.")}
    released.update(logit_scale=torch.tensor(3.0), self_logit_scale=torch.tensor(1.0))
    torch.save(released, tmp_path / "best.PTH")
    m2 = _method(init_checkpoint=str(tmp_path / "best.PTH"))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v)
    with pytest.raises(FileNotFoundError, match="init_checkpoint"):
        _method(init_checkpoint=str(tmp_path / "missing.PTH"))
    torch.save({"mixing_weights": torch.ones(2)}, tmp_path / "bad.PTH")
    with pytest.raises(KeyError, match="missing"):
        _method(init_checkpoint=str(tmp_path / "bad.PTH"))


# ------------------------------------------------------------------------------------------------------
# cached-feature pairs on a fake SPair with a tiny random-init backbone
# ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake_spair(tmp_path_factory):
    return make_spair(str(tmp_path_factory.mktemp("spair")), n_pairs=3, categories=("cat",), splits=("trn", "test"))


def test_feature_pairs_from_cache(fake_spair, tmp_path):
    torch.set_num_threads(1)
    ds = build_dataset("spair", root=fake_spair, split="trn")                 # 840 canvas, like evaluation
    bb = create_backbone("dinov2_vitb14", pretrained=False, tiny=True)        # pad_square(112) -> 8x8, 48-d
    cache = FeatureCache(tmp_path / "cache", bb.name, bb.canvas)
    index = fill_cache(ds, bb, cache, progress=False)
    assert index.stats == {"computed": 8, "skipped": 0}                       # 4 images and their mirrors
    assert len(index) == 3 and len(index.keys(flip=True)) == 8
    again = fill_cache(ds, bb, cache, progress=False)
    assert again.stats == {"computed": 0, "skipped": 8}

    src = FeaturePairs(index, cache)
    stream = BatchStream(src, 2, seed=0)
    order = torch.cat([stream.global_indices(s) for s in range(3)])
    assert sorted(order[:3].tolist()) == [0, 1, 2]                           # the pair source's epochs
    b = stream[0]
    i = int(b["index"][0])
    pair = ds[i]
    assert b["src_feat"].shape == (2, 48, 8, 8) and b["src_kps"].shape == (2, 30, 2)
    torch.testing.assert_close(b["src_feat"][0], cache.get(b["src_key"][0]))
    with torch.no_grad():
        mirror = bb(backbone_input(pair.src_image.flip(-1), bb.canvas)[0][None])[0]
    torch.testing.assert_close(b["src_feat_flip"][0], mirror.half().float())  # re-encoded mirror, fp16 cache
    frame = backbone_input(pair.src_image, bb.canvas)[1]
    assert frame == feature_frame(840, 840, bb.canvas) == (0.0, 0.0, 840.0, 840.0)
    torch.testing.assert_close(b["src_kps"][0], to_grid(pair.src_kps, frame, (8, 8)), equal_nan=True)
    torch.testing.assert_close(b["trg_kps"][0], to_grid(pair.trg_kps, frame, (8, 8)), equal_nan=True)
    assert torch.equal(b["valid"][0], pair.valid) and torch.equal(b["flip_perm"][0], pair.flip_perm)
    assert b["src_flip_width"][0] == 8.0
    torch.testing.assert_close(b["thr"][0], torch.tensor(pair.thr * 8 / 840))
    sb = pair.src_bbox
    torch.testing.assert_close(b["src_thr"][0], torch.tensor(float(max(sb[2] - sb[0], sb[3] - sb[1])) * 8 / 840))
    for H, W in ((30, 40), (41, 30)):                                          # padded non-square images
        assert feature_frame(H, W, bb.canvas) == backbone_input(torch.zeros(3, H, W), bb.canvas)[1]
    assert feature_frame(30, 40, bb.canvas) == (0.0, -5.0, 40.0, 35.0)
    # the evaluation layer finds these features (same keys): nothing is recomputed, flips included
    res = evaluate(ds, bb, "argmax", pose="code", cache=cache, progress=False)
    assert res.info["features_computed_rank0"] == 0

    # index save/load, and the method trains on the batches
    index.save(tmp_path / "index.pt")
    b2 = BatchStream(FeaturePairs(str(tmp_path / "index.pt"), cache), 2, seed=0)[0]
    assert torch.equal(b2["src_feat"], b["src_feat"]) and torch.equal(b2["trg_kps"].nan_to_num(), b["trg_kps"].nan_to_num())
    m = build_method("geoaware", bb, out_dim=16, bottleneck=8, tiny=True)
    out = m.training_step({**b, "generator": torch.Generator().manual_seed(0)}, 0)
    out["loss"].backward()
    assert math.isfinite(float(out["loss"].detach())) and m.post.mixing_weights.grad is not None
    assert out["double"] > 0 and out["self"] > 0
    # build_feature_source reuses the saved index when every key is cached
    fs = build_feature_source(ds, bb, tmp_path / "cache", index_path=tmp_path / "index.pt", progress=False)
    assert len(fs) == 3 and fs.flip

    # the trainer's image batches (data.source = "pairs", dataset on the backbone canvas) become the same
    # feature batch through the method's own cache (same keys), flip widths and thresholds included
    ds112 = build_dataset("spair", root=fake_spair, split="trn", canvas=bb.canvas)
    idx112 = fill_cache(ds112, bb, cache, progress=False)
    assert idx112.stats["computed"] == 8                                      # other keys: name@112x112
    stream = BatchStream(DatasetPairs(ds112), 2, seed=0)
    image_batch = stream[1]
    fb = FeaturePairs(idx112, cache).make_batch(stream.indices(1))
    conv = build_method("geoaware", bb, out_dim=16, bottleneck=8, tiny=True,
                        feature_cache=str(tmp_path / "cache")).features_from_images(image_batch)
    for k in FEATURE_BATCH_KEYS:
        torch.testing.assert_close(conv[k], fb[k], equal_nan=True, msg=k)

    with pytest.raises(KeyError, match="fill_cache"):
        FeaturePairs(index, FeatureCache(tmp_path / "empty", bb.name, bb.canvas))
    with pytest.raises(FileNotFoundError, match="feature-pair index"):
        FeatureIndex.load(tmp_path / "nope.pt")


def test_tiny_config_trains_through_the_trainer(fake_spair, tmp_path):
    cfg = load_config(os.path.join(ROOT, "configs", "geoaware", "geoaware_dinov2_vitb14_tiny.toml"),
                      [f"data.root={fake_spair}", f"eval.root={fake_spair}", f"train.out_dir={tmp_path / 'run'}",
                       f"method_args.feature_cache={tmp_path / 'cache'}", "train.steps=4", "train.log_every=2",
                       "train.progress=false"])
    res = train(cfg)
    assert [r["step"] for r in res.logs] == [2, 4]
    assert all(math.isfinite(r["loss"]) and r["double"] > 0 and r["single"] > 0 for r in res.logs)
    assert 0.0 <= res.last_eval["pck@0.1/image"] <= 1.0
    n_files = sum(len(f) for _, _, f in os.walk(tmp_path / "cache"))
    assert n_files == 8                                                       # 4 trn images + mirrors, once each
    for other in ("geoaware_sd_dino_ap10k", "geoaware_sd_dino_spair"):
        c = load_config(os.path.join(ROOT, "configs", "geoaware", other + ".toml"))
        assert c.optim.name == "adamw" and c.optim.schedule == "onecycle" and c.optim.lr == 1.25e-3
        assert c.backbone_args["mode"] == "raw" and c.train.batch_size == 1


def test_features_source_gives_the_same_losses_as_image_pairs(fake_spair, tmp_path):
    """data.source = "features" (pairs read from the feature cache) trains exactly like image pairs."""
    base = [f"data.root={fake_spair}", "eval.every=0", "eval.at_end=false", "train.steps=3", "train.log_every=1",
            "train.progress=false"]
    path = os.path.join(ROOT, "configs", "geoaware", "geoaware_dinov2_vitb14_tiny.toml")
    a = train(load_config(path, base + [f"train.out_dir={tmp_path / 'a'}", f"method_args.feature_cache={tmp_path / 'c1'}"]))
    b = train(load_config(path, base + [f"train.out_dir={tmp_path / 'b'}", "data.source=features",
                                        f"data.cache={tmp_path / 'c2'}"]))
    assert [r["step"] for r in b.logs] == [1, 2, 3]
    for ra, rb in zip(a.logs, b.logs):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-4, abs=1e-6)
    assert any(f.endswith(".json") for f in os.listdir(tmp_path / "c2"))


# ------------------------------------------------------------------------------------------------------
# end to end: consistent synthetic pairs
# ------------------------------------------------------------------------------------------------------

def _synthetic_pairs(n_pairs=16, K=8, hw=16, seed=0):
    """Feature maps of a K-part object (a fixed 2-D template under random shift/scale/rotation), each part
    rendered as a Gaussian blob carrying its own embedding, plus 16 channels of strong noise; the mirrored
    images render the mirrored scene (parts keep their embedding, so the identity permutation is right)."""
    g = torch.Generator().manual_seed(seed)
    T = torch.rand(K, 2, generator=g) * 2 - 1
    E = torch.randn(K, 8, generator=g) @ torch.randn(8, 8, generator=g)
    ys, xs = torch.meshgrid(torch.arange(hw) + 0.5, torch.arange(hw) + 0.5, indexing="ij")
    cells = torch.stack((xs, ys), -1)

    def render(p):
        a = torch.exp(-((cells[None] - p[:, None, None]) ** 2).sum(-1) / (2 * 1.2 ** 2))
        inf = torch.einsum("khw,kc->chw", a, E) + 0.1 * torch.randn(8, hw, hw, generator=g)
        return torch.cat((inf, torch.randn(16, hw, hw, generator=g)), 0)

    def image():
        c = 5.5 + torch.rand(2, generator=g) * 5
        s = 3.0 + 1.5 * float(torch.rand(1, generator=g))
        th = float(torch.rand(1, generator=g)) - 0.5
        R = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
        p = (c + s * T @ R.T).clamp(0.2, hw - 0.2)
        thr = float((p.max(0).values - p.min(0).values).max())
        return render(p), render(torch.stack((hw - p[:, 0], p[:, 1]), -1)), p, thr

    items = [(image(), image()) for _ in range(n_pairs)]
    st = lambda f: torch.stack([f(a, b) for a, b in items])  # noqa: E731
    return {"src_feat": st(lambda a, b: a[0]), "trg_feat": st(lambda a, b: b[0]),
            "src_feat_flip": st(lambda a, b: a[1]), "trg_feat_flip": st(lambda a, b: b[1]),
            "src_kps": st(lambda a, b: a[2]), "trg_kps": st(lambda a, b: b[2]),
            "valid": torch.ones(n_pairs, K, dtype=torch.bool), "flip_perm": torch.arange(K).repeat(n_pairs, 1),
            "src_flip_width": torch.full((n_pairs,), float(hw)), "trg_flip_width": torch.full((n_pairs,), float(hw)),
            "thr": torch.tensor([b[3] for a, b in items]), "src_thr": torch.tensor([a[3] for a, b in items])}


def _pck(m, data, alpha=0.1):
    """PCK of the training pairs with GeoAware-SC's evaluation (window soft-argmax, cell centres)."""
    m.eval()
    with torch.no_grad():
        ds, dt = m.descriptor_from_features(data["src_feat"]), m.descriptor_from_features(data["trg_feat"])
        q = gather_cells(ds, data["src_kps"])
        pred = ops.window_soft_argmax(q, dt.flatten(2).transpose(1, 2), 0.02, tuple(ds.shape[-2:]), 7,
                                      outside="zero") + 0.5
    m.train()
    return float(((pred - data["trg_kps"]).norm(dim=-1) < alpha * data["thr"][:, None]).float().mean())


def test_training_on_consistent_synthetic_pairs_improves():
    torch.manual_seed(0)
    data = _synthetic_pairs()
    m = build_method("geoaware", StandIn(24), feature_dims=(12, 12), out_dim=32, bottleneck=8, tiny=True)
    steps = 300
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=3e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.3)
    pck0 = _pck(m, data)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        idx = torch.randperm(16, generator=gen)[:4]
        out = m.training_step({**{k: v[idx] for k, v in data.items()}, "generator": gen}, step)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        sched.step()
        losses.append(float(out["loss"].detach()))
    pck1 = _pck(m, data)
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    assert last < 0.6 * first, (first, last)
    assert pck1 >= pck0 + 0.2 and pck1 >= 0.6, (pck0, pck1)
