"""Universal correspondences: the adapter, the losses against naive materialising formulas, the point
sampler, automatic pair curation and a few training steps on a tiny random-init DINO."""
import os

import pytest
import torch
import torch.nn.functional as F

from semcorr_fast import curation as C
from semcorr_fast.backbones import create_backbone
from semcorr_fast.methods import build_method, list_methods
from semcorr_fast.methods import universal as U

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(layers=2, heads=8, ffn_dim=64, pos_dim=16, n_points=24)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tests run many tiny ops: one intra-op thread avoids OpenMP oversubscription on a shared CPU
    (10× faster there); the previous setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return create_backbone("dino_vits8", pretrained=False, tiny=True)


def _images(seed, B=2, S=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, S, S, generator=g), torch.rand(B, 3, S, S, generator=g)


def _naive_softargmax(q, tgt, tau, h, w):
    """Expected cell centre (unit coordinates) under softmax(cos/τ), materialising the Q×N matrix."""
    sim = F.normalize(q, dim=-1) @ F.normalize(tgt, dim=-1).transpose(1, 2)
    p = torch.softmax(sim / tau, -1)
    centres = U._grid_centres(h, w, q.device, q.dtype)
    return p @ centres


# ------------------------------------------------------------------------------------------- adapter
def test_adapter_paper_size():
    a = U.UniversalAdapter(384)
    assert len(a.blocks) == 4
    assert all(b.heads == 8 and b.ff[0].out_features == 1024 for b in a.blocks)
    assert a.out.out_features == 384 and a.width == 384 + 64


def test_adapter_shapes_identity_free_differentiable():
    torch.manual_seed(0)
    B, Q, D, h, w = 2, 5, 16, 3, 4
    ad = U.UniversalAdapter(D, layers=2, heads=8, ffn_dim=32, pos_dim=16).double()
    q = torch.randn(B, Q, D, dtype=torch.float64)
    xy = torch.rand(B, Q, 2, dtype=torch.float64, requires_grad=True)
    src = torch.randn(B, h * w, D, dtype=torch.float64)
    cs, ct = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)
    out = ad(q, xy, src, (h, w), cs, ct)
    assert out.shape == (B, Q, D)
    assert (out - q).abs().max() > 1e-3                    # not the identity
    out.square().sum().backward()
    grads = [p.grad for p in ad.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert xy.grad is not None and xy.grad.abs().sum() > 0  # the position embedding is differentiable
    # queries never interact: a subset of queries gives the same rows
    with torch.no_grad():
        sub = ad(q[:, 1:3], xy[:, 1:3], src, (h, w), cs, ct)
        assert torch.allclose(sub, ad(q, xy, src, (h, w), cs, ct)[:, 1:3], atol=1e-12)
        # LGa sees the target only through cls(J); La ignores it
        assert (ad(q, xy, src, (h, w), cs, ct + 1) - ad(q, xy, src, (h, w), cs, ct)).abs().max() > 1e-6
    la = U.UniversalAdapter(D, layers=1, heads=8, ffn_dim=32, pos_dim=16, arch="la").double()
    with torch.no_grad():
        assert torch.equal(la(q, xy, src, (h, w), cs, ct), la(q, xy, src, (h, w), cs, ct + 1))
    lla = U.UniversalAdapter(D, layers=1, heads=8, ffn_dim=32, pos_dim=16, arch="lla").double()
    assert lla(q, xy, src, (h, w), trg_tokens=src, trg_hw=(h, w)).shape == (B, Q, D)
    with pytest.raises(ValueError, match="cls_trg"):
        ad(q, xy, src, (h, w), cs, None)
    with pytest.raises(ValueError, match="src_tokens"):
        ad(q, xy, src[:, :-1], (h, w), cs, ct)
    with pytest.raises(ValueError, match="divisible"):
        U.UniversalAdapter(20, heads=8, pos_dim=16)


def test_backbone_outputs_match_backbone(tiny):
    I, _ = _images(0)
    o = U.backbone_outputs(tiny, I)
    assert torch.equal(o.map, tiny(I))
    assert o.cls.shape == (2, tiny.dim) and o.cls_attn.shape == (2, 8, 8)
    assert (o.cls_attn > 0).all() and (o.cls_attn.sum((1, 2)) <= 1 + 1e-5).all()
    assert torch.allclose(U.backbone_outputs(tiny, I, cls_source="mean").cls, o.map.mean((2, 3)))
    assert not torch.allclose(U.backbone_outputs(tiny, I, cls_source="token").cls, o.cls)


# ------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("negatives", ["both", "source", "target"])
@pytest.mark.parametrize("pos_in", [True, False])
def test_contrastive_equals_naive(negatives, pos_in):
    torch.manual_seed(1)
    B, Q, Ns, Nt, D, tau = 2, 7, 12, 9, 6, 0.1
    f = torch.randn(B, Q, D, dtype=torch.float64)
    g = torch.randn(B, Q, D, dtype=torch.float64, requires_grad=True)
    S = torch.randn(B, Ns, D, dtype=torch.float64)
    T = torch.randn(B, Nt, D, dtype=torch.float64)
    got = U.contrastive_loss(f, g, S, T, tau, negatives=negatives, positive_in_denominator=pos_in)
    cols = {"both": torch.cat((S, T), 1), "source": S, "target": T}[negatives]
    gn = F.normalize(g, dim=-1)
    neg = gn @ F.normalize(cols, dim=-1).transpose(1, 2) / tau                      # (B, Q, N) materialised
    pos = (F.normalize(f, dim=-1) * gn).sum(-1, keepdim=True) / tau
    logits = torch.cat((pos, neg), -1) if pos_in else neg
    want = torch.logsumexp(logits, -1) - pos[..., 0]
    assert torch.allclose(got, want, atol=1e-10)
    gg, = torch.autograd.grad(got.sum(), g)
    gw, = torch.autograd.grad(want.sum(), g)
    assert torch.allclose(gg, gw, atol=1e-9)


def test_row_logsumexp_equals_naive():
    torch.manual_seed(2)
    r = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    c = torch.randn(3, 11, 4, dtype=torch.float64, requires_grad=True)
    got = U.row_logsumexp(r, c, 0.07)
    want = torch.logsumexp(F.normalize(r, dim=-1) @ F.normalize(c, dim=-1).transpose(1, 2) / 0.07, -1)
    assert torch.allclose(got, want, atol=1e-10)
    w = torch.randn_like(want)
    g1 = torch.autograd.grad((got * w).sum(), (r, c))
    g2 = torch.autograd.grad((want * w).sum(), (r, c))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-9)


def test_row_logsumexp_backends(backend, device):
    """The streamed log-sum-exp on every available kernel backend (Triton interpreted without a GPU)."""
    torch.manual_seed(12)
    r = torch.randn(2, 5, 8, device=device, requires_grad=True)
    c = torch.randn(2, 13, 8, device=device)
    got = U.row_logsumexp(r, c, 0.1, backend=backend)
    want = torch.logsumexp(F.normalize(r, dim=-1) @ F.normalize(c, dim=-1).transpose(1, 2) / 0.1, -1)
    assert torch.allclose(got, want, atol=1e-4)
    g1, = torch.autograd.grad(got.sum(), r)
    g2, = torch.autograd.grad(want.sum(), r)
    assert torch.allclose(g1, g2, atol=1e-4)


def test_warp_consistency_balance_is_stopgrad():
    torch.manual_seed(3)
    a = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    c = torch.rand(2, 6, dtype=torch.float64, requires_grad=True)
    m = torch.rand(2, 6) > 0.3
    lc, beta = U.warp_consistency_loss(a, b, c, mask_a=torch.ones_like(m), mask_bc=m)
    A, Bm, Cm = a.mean(), b[m].mean(), c[m].mean()
    assert torch.allclose(beta, A / (Bm + Cm), atol=1e-6) and not beta.requires_grad
    assert torch.allclose(lc, A + beta * (Bm + Cm))                       # numerically 2ā
    ga, gb, gc = torch.autograd.grad(lc, (a, b, c))
    # no gradient through β: ∂L/∂a is 1/n (it would be 2/n through β), ∂L/∂b = β/|m| on masked points
    assert torch.allclose(ga, torch.full_like(ga, 1 / a.numel()))
    want_b = torch.where(m, beta / m.sum(), torch.zeros_like(gb))
    assert torch.allclose(gb, want_b) and torch.allclose(gc, want_b)
    # per-point balance
    lp, _ = U.warp_consistency_loss(a, b, c, balance="point")
    ga, gb = torch.autograd.grad(lp, (a, b))
    assert torch.allclose(ga, torch.full_like(ga, 1 / a.numel()))
    assert torch.allclose(gb, (a / (b + c + 1e-8)).detach() / a.numel())
    with pytest.raises(ValueError, match="balance"):
        U.warp_consistency_loss(a, b, c, balance="mean")


def test_transfer_equals_naive_softargmax(tiny):
    torch.manual_seed(4)
    m = build_method("universal", tiny, **SMALL).double()
    I, J = _images(1)
    s, t = m.outputs(I), m.outputs(J)
    s = U.BackboneOutputs(s.map.double(), s.cls.double(), s.cls_attn)
    t = U.BackboneOutputs(t.map.double(), t.cls.double(), t.cls_attn)
    xy = torch.rand(2, 9, 2, dtype=torch.float64)
    got = m.transfer(s, t, xy)
    fq = m.adapt(s, t, xy)
    want = _naive_softargmax(fq, U.ops.flatten_map(t.map)[0], m.tau_h, 8, 8)
    assert torch.allclose(got, want, atol=1e-9)
    # bilinear query descriptors at cell centres are the cells themselves
    cen = U._grid_centres(8, 8, torch.device("cpu"), torch.float64).expand(2, -1, -1)
    assert torch.allclose(U.sample_features(s.map, cen), U.ops.flatten_map(s.map)[0], atol=1e-10)


def test_training_step_fused_equals_reference(tiny):
    """The whole loss through the fused ops equals the materialising reference backend (and grads)."""
    I, J = _images(2)
    results = []
    for backend in ("auto", "reference"):
        torch.manual_seed(5)
        m = build_method("universal", tiny, backend=backend, **SMALL)
        out = m.training_step({"src": I, "trg": J, "generator": torch.Generator().manual_seed(7)}, 0)
        out["loss"].backward()
        results.append((out, [p.grad.clone() for p in m.adapter.parameters()]))
    (o1, g1), (o2, g2) = results
    for k in ("loss", "loss_d", "loss_c", "a", "b", "c", "beta"):
        assert torch.allclose(o1[k], o2[k], rtol=1e-4, atol=1e-6), k
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)
    assert float(o1["pair_k"]) == 5.0 and 0 < float(o1["warp_valid"]) <= 1


@pytest.mark.parametrize("cycle", ["i_j_i", "gi_j_i", "literal"])
def test_cycle_variants_run(tiny, cycle):
    torch.manual_seed(6)
    calls = []

    def one_cell(images, outputs):
        calls.append(1)
        m = torch.zeros(images.shape[0], 4, 4, dtype=torch.bool)
        m[:, 1, 2] = True
        return m

    m = build_method("universal", tiny, cycle=cycle, mask_source=one_cell, **SMALL)
    I, J = _images(3)
    out = m.training_step({"src": I, "trg": J, "generator": torch.Generator().manual_seed(1)}, 20000)
    assert torch.isfinite(out["loss"]) and float(out["pair_k"]) == 100.0 and calls
    out["loss"].backward()


# ------------------------------------------------------------------------------------------- points / saliency
def test_sample_points_respect_mask():
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(3, 5, 7, dtype=torch.bool)
    mask[0, 1, 2] = True
    mask[1, 3:5, 0:3] = True
    xy = U.sample_points(mask, 500, generator=g)
    assert xy.shape == (3, 500, 2) and (xy >= 0).all() and (xy < 1).all()
    cx, cy = (xy[..., 0] * 7).floor().long(), (xy[..., 1] * 5).floor().long()
    for b in range(2):
        assert mask[b, cy[b], cx[b]].all()
    # an empty mask samples the whole image
    assert xy[2, :, 0].min() < 0.1 and xy[2, :, 0].max() > 0.9
    # float weights: zero-weight cells never drawn; the same seed gives the same points
    w = torch.zeros(1, 2, 2)
    w[0, 0, 1], w[0, 1, 0] = 1.0, 3.0
    p = U.sample_points(w, 400, generator=torch.Generator().manual_seed(1))
    cells = (p[0, :, 1] * 2).floor() * 2 + (p[0, :, 0] * 2).floor()
    assert set(cells.long().tolist()) == {1, 2} and (cells == 2).sum() > (cells == 1).sum()
    assert torch.equal(p, U.sample_points(w, 400, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="mask"):
        U.sample_points(torch.ones(4, 4), 3)
    with pytest.raises(ValueError, match=">= 0"):
        U.sample_points(-torch.ones(1, 2, 2), 3)


def test_cls_attention_and_tokencut_masks():
    attn = torch.tensor([[[0.5, 0.2], [0.2, 0.1]]])
    out = U.BackboneOutputs(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4), attn)
    assert U.cls_attention_mask(None, out, mass=0.6).tolist() == [[[True, True], [False, False]]]
    assert U.cls_attention_mask(None, out, mass=0.1).sum() == 1
    with pytest.raises(ValueError, match="class attention"):
        U.cls_attention_mask(None, U.BackboneOutputs(out.map, out.cls, None))
    # TokenCut: a foreground blob on a background, plus a second disconnected blob that is dropped
    torch.manual_seed(0)
    a, b = torch.zeros(16), torch.zeros(16)
    a[0], b[1] = 1.0, 1.0
    fmap = b[:, None, None].repeat(1, 8, 10)
    fmap[:, 2:5, 3:7] = a[:, None, None]
    fmap[:, 6:8, 0:2] = a[:, None, None]
    fmap = fmap + 0.05 * torch.randn(16, 8, 10)
    m = U.tokencut_mask(None, U.BackboneOutputs(fmap[None], torch.zeros(1, 16)))[0]
    want = torch.zeros(8, 10, dtype=torch.bool)
    want[2:5, 3:7] = True
    assert torch.equal(m, want)


# ------------------------------------------------------------------------------------------- curation
def test_curate_pairs_true_topk_never_self():
    torch.manual_seed(8)
    x = torch.randn(257, 12)
    v, i = C.curate_pairs(x, 9, chunk_size=50, query_chunk=100)
    sim = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    sim.fill_diagonal_(-float("inf"))
    tv, ti = torch.topk(sim, 9, dim=1)
    assert torch.equal(i, ti) and torch.allclose(v, tv, atol=1e-5)
    assert not (i == torch.arange(257)[:, None]).any()
    # with self: rank 0 is the image itself
    _, i2 = C.curate_pairs(x, 3, exclude_self=False, chunk_size=64)
    assert torch.equal(i2[:, 0], torch.arange(257))
    # fewer images than k + 1: the tail is -1, never self
    v3, i3 = C.curate_pairs(x[:4], 6)
    assert (i3[:, 3:] == -1).all() and (v3[:, 3:] == -float("inf")).all()
    assert not (i3 == torch.arange(4)[:, None]).any()
    assert C.curate_pairs(x, 2, index_dtype=torch.int32)[1].dtype == torch.int32
    with pytest.raises(ValueError, match="class_tokens"):
        C.curate_pairs(x[0], 2)
    with pytest.raises(ValueError, match="k must be"):
        C.curate_pairs(x, 0)


def test_neighbours_at_boundaries():
    assert [C.neighbours_at(s) for s in (0, 1, 9999, 10000, 10001, 29999, 30000, 10 ** 7)] == \
        [5, 5, 5, 100, 100, 100, 500, 500]
    assert C.neighbours_at(7, ((0, 2), (7, 3))) == 3
    for bad in ([], ((1, 5),), ((0, 5), (0, 6)), ((0, 0),), "abc"):
        with pytest.raises(ValueError):
            C.neighbours_at(0, bad)
    with pytest.raises(ValueError, match="step"):
        C.neighbours_at(-1)


def test_pair_sampler_follows_curriculum():
    torch.manual_seed(9)
    x = torch.randn(40, 8)
    _, nb = C.curate_pairs(x, 20)
    sched = ((0, 1), (5, 4), (9, 20))
    s = C.PairSampler(nb, sched, seed=3)
    p0 = s.pairs(0, 64)
    assert torch.equal(p0[:, 1], nb[p0[:, 0], 0])                       # k = 1: the nearest neighbour
    p5 = torch.cat([s.pairs(t, 64) for t in range(5, 9)])
    rank = (nb[p5[:, 0]] == p5[:, 1:2]).float().argmax(1)
    assert rank.max() <= 3 and rank.max() >= 1
    assert torch.equal(s.pairs(6, 64), C.PairSampler(nb, sched, seed=3).pairs(6, 64))
    assert not torch.equal(s.pairs(6, 64), s.pairs(7, 64))
    assert not (p5[:, 0] == p5[:, 1]).any()
    # -1 slots are never drawn
    _, small = C.curate_pairs(x[:3], 20)
    ps = C.PairSampler(small, sched).pairs(10, 200)
    assert (ps >= 0).all() and not (ps[:, 0] == ps[:, 1]).any()
    with pytest.raises(ValueError, match="k = 20"):
        C.PairSampler(nb[:, :5], sched)


def test_curated_batch_stream():
    class Src:
        def __len__(self):
            return 6

        def image(self, i):
            return torch.full((3, 8, 8), i / 10)

    x = torch.randn(6, 4)
    _, nb = C.curate_pairs(x, 5)
    st = C.CuratedBatchStream(Src(), 4, seed=0, neighbours=nb, schedule=((0, 1),))
    batch = st[3]
    idx = batch["index"]
    assert torch.equal(idx[:, 1], nb[idx[:, 0], 0])
    assert torch.allclose(batch["src"][:, 0, 0, 0], idx[:, 0] / 10)


def test_curation_scaling_and_class_tokens(tiny):
    res = C.curation_scaling((40, 80), C=8, k=5)
    assert [n for n, _ in res] == [40, 80] and all(t > 0 for _, t in res)

    class Src:
        def __len__(self):
            return 3

        def image(self, i):
            return torch.full((3, 64, 64), 0.2 * (i + 1))

    tok = C.extract_class_tokens(tiny, Src(), batch_size=2)
    assert tok.shape == (3, tiny.dim)


# ------------------------------------------------------------------------------------------- training
def test_training_reduces_loss_on_fixed_batch(tiny):
    torch.manual_seed(10)
    m = build_method("universal", tiny, **SMALL)
    opt = torch.optim.Adam(m.trainable_parameters(), lr=2e-3)
    I, J = _images(4)
    losses = []
    for _ in range(10):
        out = m.training_step({"src": I, "trg": J, "generator": torch.Generator().manual_seed(0)}, 0)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert min(losses[-3:]) < losses[0] - 0.05, losses
    assert all(not p.requires_grad for p in m.backbone.parameters())


def test_match_points_and_descriptor(tiny):
    m = build_method("universal", tiny, **SMALL)
    I, J = _images(5)
    xy = torch.tensor([[[10.0, 20.0], [float("nan"), 3.0], [63.0, 0.0]]]).expand(2, -1, -1)
    out = m.match_points(I, J, xy)
    assert out.shape == (2, 3, 2) and torch.isnan(out[:, 1]).all()
    ok = out[:, [0, 2]]
    assert ((ok - 3.5) % 8 == 0).all() and (ok >= 0).all() and (ok <= 63).all()   # 8-px cell centres
    m.test_grid = 16
    out16 = m.match_points(I, J, xy)
    assert ((out16[:, 0] - 1.5) % 4 == 0).all()
    assert m.adapted_descriptor(I, J).shape == (2, tiny.dim, 8, 8)
    assert torch.equal(m(I), tiny(I))


def test_method_registry_and_errors(tiny):
    assert "universal" in list_methods()
    for kw, msg in ((dict(cycle="xyz"), "cycle"), (dict(tau_d=0), "tau_d"), (dict(arch="abc"), "arch"),
                    (dict(pair_schedule=((5, 1),)), "pair_schedule"), (dict(mask_source="foo"), "mask_source")):
        with pytest.raises(ValueError, match=msg):
            build_method("universal", tiny, **kw)
    with pytest.raises(TypeError, match="unknown method_args"):
        build_method("universal", tiny, temperature=0.1)
    m = build_method("universal", tiny, **SMALL)
    with pytest.raises(KeyError, match="src"):
        m.training_step({"trg": torch.rand(1, 3, 64, 64)}, 0)


def test_configs_load_and_build(tiny):
    from semcorr_fast.train.config import load_config
    paper = load_config(os.path.join(ROOT, "configs/universal/universal_dino_vits8.toml"))
    ma = paper.method_args
    assert paper.method == "universal" and paper.backbone == "dino_vits8"
    assert (ma["tau_d"], ma["tau_h"], ma["lam"], ma["n_points"]) == (0.1, 0.05, 5.0, 200)
    assert (ma["layers"], ma["heads"], ma["ffn_dim"]) == (4, 8, 1024)
    m = build_method("universal", tiny, **ma)                    # every paper option is accepted
    assert m.pair_schedule == ((0, 5), (10000, 100), (30000, 500))
    demo = load_config(os.path.join(ROOT, "configs/universal/universal_dino_vits8_tiny.toml"))
    assert demo.data.source == "photos" and demo.backbone_args["tiny"] is True
    bb = create_backbone(demo.backbone, **demo.backbone_args)
    md = build_method(demo.method, bb, **demo.method_args)
    I, J = _images(6, S=bb.canvas.size[0])
    out = md.training_step({"src": I, "trg": J, "generator": torch.Generator().manual_seed(0)}, 0)
    assert torch.isfinite(out["loss"])
    run = load_config(os.path.join(ROOT, "configs/universal/universal_dino_vits8_demo.toml"))  # docs/benchmarks.md
    assert (run.data.curation, run.data.n_images, run.train.steps) == ("knn", 2000, 300)
    assert build_method(run.method, bb, **run.method_args).pair_schedule == ((0, 5), (100, 20), (200, 50))
