"""Jamais Vu: geometry helpers (EXR/MoGe I/O, lifting, MAD masks, FPS, kNN / pseudo-geodesic neighbourhoods,
point sampling), the prototype losses, and end-to-end training on the synthetic set of
tests/fakedata/jamaisvu.py (losses fall, the prototype recovers the 3-D template up to a similarity)."""
from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from semcorr_fast import geometry as G
from semcorr_fast import ops
from semcorr_fast.methods import build_method, list_methods
from semcorr_fast.methods import jamaisvu as JV
from tests.fakedata.jamaisvu import make_jamaisvu, render


@pytest.fixture(autouse=True)
def _one_thread():
    """Many tiny ops: one intra-op thread avoids OpenMP oversubscription on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    return make_jamaisvu(str(tmp_path_factory.mktemp("jv") / "SPair-71k"))


@pytest.fixture(scope="module")
def store(fake):
    return G.GeometryStore(fake.maps_root, fake.masks_root)


# ------------------------------------------------------------------------------------------ EXR / MoGe I/O
@pytest.mark.parametrize("compression", ["zip", "zips", "none"])
@pytest.mark.parametrize("pixel_type", ["float", "half"])
def test_exr_roundtrip(tmp_path, compression, pixel_type):
    rng = np.random.default_rng(0)
    ch = {"R": rng.normal(size=(37, 23)).astype(np.float32), "G": np.full((37, 23), np.inf, np.float32),
          "B": np.linspace(-3, 3, 37 * 23).reshape(37, 23)}
    p = G.write_exr(tmp_path / "a.exr", ch, compression, pixel_type)
    r = G.read_exr(p)
    dt = np.float32 if pixel_type == "float" else np.float16
    assert sorted(r) == ["B", "G", "R"]
    for k, v in ch.items():
        assert r[k].dtype == dt and np.array_equal(r[k], v.astype(dt))


def test_exr_reads_a_real_openexr_file():
    """CPython ships an RLE-compressed half-float RGBA EXR next to a PNG of the same picture: the decoded
    channels must equal the PNG's (the predictor/interleave step is shared with ZIP)."""
    import sysconfig
    d = os.path.join(sysconfig.get_paths()["stdlib"], "test", "imghdrdata")
    if not os.path.isfile(os.path.join(d, "python.exr")):
        pytest.skip("CPython's test/imghdrdata/python.exr is not installed here")
    from PIL import Image
    r = G.read_exr(os.path.join(d, "python.exr"))
    png = np.asarray(Image.open(os.path.join(d, "python.png")).convert("RGBA")).astype(np.float64) / 255
    for i, c in enumerate("RGBA"):
        assert r[c].shape == png.shape[:2]
        assert np.abs(r[c].astype(np.float64) - png[..., i]).max() < 1e-3


def test_exr_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.exr.*OpenEXR"):
        G.read_exr(tmp_path / "nope.exr")
    (tmp_path / "bad.exr").write_bytes(b"not an exr file")
    with pytest.raises(ValueError, match="bad.exr: not an OpenEXR"):
        G.read_exr(tmp_path / "bad.exr")


def test_moge_roundtrip_and_intrinsics(tmp_path):
    H, W = 6, 8
    K = G.intrinsics_from_fov(60.0, 48.0, H, W)
    assert K[0, 0] == pytest.approx(W * 0.5 / math.tan(math.radians(30))) and K[0, 2] == W / 2 and K[1, 2] == H / 2
    depth = np.full((H, W), 2.0, np.float32)
    depth[0, 0] = np.inf                                                       # MoGe's invalid pixels
    v, u = np.mgrid[0:H, 0:W] + 0.5
    pts = np.stack([(u - W / 2) / K[0, 0].item(), (v - H / 2) / K[1, 1].item(), np.ones_like(u)], -1) * depth[..., None]
    mask = np.ones((H, W), bool)
    mask[1, 1] = False
    G.write_moge(tmp_path / "img", pts, depth, mask, fov=(60.0, 48.0))
    g = G.read_moge(tmp_path / "img")
    assert g.size == (H, W) and g.points.dtype == torch.float32
    assert not g.valid[0, 0] and not g.valid[1, 1] and int(g.valid.sum()) == H * W - 2
    assert float(g.points[0, 0].abs().max()) <= G.POINT_CLIP                  # inf clipped like the code
    ok = np.isfinite(pts).all(-1)
    assert torch.allclose(g.points[torch.from_numpy(ok)], torch.from_numpy(pts[ok]).float())
    assert torch.allclose(g.intrinsics, K, rtol=1e-3)                          # fov.json keeps 2 decimals
    np.savez(tmp_path / "m.npz", points=pts, depth=depth, mask=mask,
             intrinsics=np.array([[0.8, 0, 0.5], [0, 1.0, 0.5], [0, 0, 1]]))
    g2 = G.read_moge(tmp_path / "m.npz")
    assert torch.equal(g2.valid, g.valid) and g2.intrinsics[0, 0] == pytest.approx(0.8 * W)
    with pytest.raises(FileNotFoundError, match="MoGe output folder"):
        G.read_moge(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ lifting
def test_lifting_matches_hand_computed_backprojection():
    K = torch.tensor([[50.0, 0, 16.0], [0, 40.0, 12.0], [0, 0, 1]], dtype=torch.float64)
    H, W = 24, 32
    depth = 2.0 + 0.05 * torch.arange(H * W, dtype=torch.float32).reshape(H, W) / (H * W)
    kps = torch.tensor([[3.25, 4.75], [16.0, 12.0], [31.9, 0.1], [40.0, 3.0], [5.0, 5.0]])
    valid = torch.tensor([True, True, True, True, False])
    xyz, ok = G.lift_keypoints(kps, valid, depth=depth, intrinsics=K)
    assert ok.tolist() == [True, True, True, False, False]                   # outside the map / not visible
    for i in range(3):                                                        # Eq. 2 by hand
        x, y = kps[i].tolist()
        z = depth[int(y), int(x)].item()
        want = [z * (x - 16.0) / 50.0, z * (y - 12.0) / 40.0, z]
        assert xyz[i].tolist() == pytest.approx(want, rel=1e-5)
    assert xyz[3:].abs().sum() == 0
    # a point map of the pixel centres (MoGe's) read at the keypoint's pixel
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    pm = G.backproject(torch.stack((u, v), -1).double(), depth.double(), K).float()
    assert pm[7, 3].tolist() == pytest.approx([depth[7, 3].item() * (3.5 - 16) / 50, depth[7, 3].item() * (7.5 - 12) / 40,
                                               depth[7, 3].item()], rel=1e-5)
    centres = torch.tensor([[3.5, 7.5], [20.5, 2.5]])
    a, oka = G.lift_keypoints(centres, torch.ones(2, dtype=torch.bool), points=pm)
    b, okb = G.lift_keypoints(centres, torch.ones(2, dtype=torch.bool), depth=depth, intrinsics=K)
    assert oka.all() and okb.all() and torch.allclose(a, b, atol=1e-5)
    c, _ = G.lift_keypoints(centres, torch.ones(2, dtype=torch.bool), points=pm, mode="bilinear")
    assert torch.allclose(a, c, atol=1e-5)                                    # at a pixel centre both agree
    bad = torch.ones(H, W, dtype=torch.bool)
    bad[7, 3] = False
    _, okc = G.lift_keypoints(centres, torch.ones(2, dtype=torch.bool), points=pm, ok=bad)
    assert okc.tolist() == [False, True]
    with pytest.raises(ValueError, match="exactly one of points"):
        G.lift_keypoints(centres, torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="kps must have shape"):
        G.lift_keypoints(torch.zeros(2, 3), torch.ones(2, dtype=torch.bool), points=pm)


def test_lifting_on_the_synthetic_set(fake, store):
    """Keypoints lifted from the written MoGe maps land on the posed template (within a pixel's footprint)."""
    cat = "cat"
    for j, stem in enumerate(fake.stems[cat]):
        g = store.load(cat, stem)
        xyz, ok = G.lift_keypoints(torch.tensor(fake.kps[cat][j]).float(), torch.tensor(fake.visible[cat][j]),
                                   points=g.points, ok=g.valid)
        s, R, t = fake.poses[cat][j]
        gt = s * fake.templates[cat] @ R.T + t
        assert ok.tolist() == fake.visible[cat][j].tolist()
        err = np.linalg.norm(xyz.numpy() - gt, axis=1)[ok.numpy()]
        assert err.max() < 0.06, (stem, err.max())


# ------------------------------------------------------------------------------------------ MAD refinement
def _mad_naive(mask, depth, n_mad):
    out = []
    for m, d in zip(mask, depth):
        vals = np.sort(d[m])
        med = vals[(len(vals) - 1) // 2]                                      # torch's lower median
        dev = np.sort(np.abs(vals - med))
        mad = dev[(len(dev) - 1) // 2]
        keep = m & (np.abs(d - med) < n_mad * mad)
        out.append(keep if keep.any() else m)
    return np.stack(out)


def test_mad_refinement_removes_outliers():
    g = torch.Generator().manual_seed(0)
    depth = 3.0 + 0.1 * (2 * torch.rand(3, 400, generator=g) - 1)             # MAD ≈ 0.05: 5 MAD > 0.1
    mask = torch.rand(3, 400, generator=g) < 0.7
    outl = torch.zeros(3, 400, dtype=torch.bool)
    outl[0, :20] = outl[1, 100:130] = True
    depth[outl] = 9.0                                                          # leaked background pixels
    mask |= outl
    depth[2] = 5.0                                                             # MAD = 0: nothing survives → raw
    out = G.refine_mask_mad(mask, depth, 5.0)
    assert not (out & outl).any()
    assert torch.equal(out[:2] | outl[:2], mask[:2])                          # only the outliers went
    assert torch.equal(out[2], mask[2])
    assert np.array_equal(out.numpy(), _mad_naive(mask.numpy(), depth.numpy(), 5.0))
    with pytest.raises(ValueError, match="mask must be a bool"):
        G.refine_mask_mad(mask.float(), depth)


def test_object_mask_on_the_synthetic_set(fake, store):
    """The written OWLv2-style mask leaks onto the far background and has a 0.95 strip: thresholding and
    the depth-MAD filter leave (almost exactly) the rendered silhouette."""
    for j, stem in enumerate(fake.stems["cat"][:4]):
        g = store.load("cat", stem)
        s, R, t = fake.poses["cat"][j]
        hit = torch.from_numpy(render(s, R, t, fake.K, fake.size)[3])
        raw = g.object_prob >= 0.99
        m = G.object_mask(g)
        assert (raw & ~hit).sum() > 20                                        # the leak is there ...
        assert not (m & ~hit).any()                                           # ... and removed
        assert (hit & ~m).sum() <= 0.01 * hit.sum()


# ------------------------------------------------------------------------------------------ FPS
def _fps_naive(pts, mask, n, start):
    P = pts.tolist()
    chosen = [start]
    dist = [(-1.0 if not mask[i] else sum((a - b) ** 2 for a, b in zip(P[i], P[start]))) for i in range(len(P))]
    for _ in range(1, n):
        best = max(range(len(P)), key=lambda i: (dist[i], -i))               # first index of the maximum
        chosen.append(best)
        for i in range(len(P)):
            if mask[i]:
                dist[i] = min(dist[i], sum((a - b) ** 2 for a, b in zip(P[i], P[best])))
    return chosen


def test_fps_matches_naive_loop_and_spreads():
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(2, 150, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 150, generator=g) < 0.8
    start = torch.stack([mask[b].nonzero()[0, 0] for b in range(2)])
    idx = G.farthest_point_sampling(pts, 20, mask, start=start)
    for b in range(2):
        assert idx[b].tolist() == _fps_naive(pts[b], mask[b].tolist(), 20, int(start[b]))
        sel = idx[b]
        assert mask[b, sel].all() and len(set(sel.tolist())) == 20
        # greedy FPS: the chosen points are at least the final covering radius apart
        d_sel = torch.cdist(pts[b, sel], pts[b, sel]) + torch.eye(20, dtype=torch.float64) * 1e9
        cover = torch.cdist(pts[b, mask[b]], pts[b, sel]).min(1).values.max()
        assert d_sel.min() >= cover - 1e-12
        rnd = torch.cdist(pts[b, mask[b]][:20], pts[b, mask[b]][:20]) + torch.eye(20, dtype=torch.float64) * 1e9
        assert d_sel.min() > rnd.min()                                        # better spread than 20 arbitrary points
    r = G.farthest_point_sampling(pts.float(), 5, mask, generator=torch.Generator().manual_seed(3))
    assert mask.gather(1, r).all()
    with pytest.raises(ValueError, match="empty row"):
        G.farthest_point_sampling(pts, 3, torch.zeros(2, 150, dtype=torch.bool))
    with pytest.raises(ValueError, match="start indices must be masked"):
        G.farthest_point_sampling(pts, 3, mask, start=(~mask).float().argmax(1))


# ------------------------------------------------------------------------------------------ neighbourhoods
def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    pts = torch.randn(2, 60, 3, generator=g, dtype=torch.float64)
    nb = G.knn_neighbourhoods(pts, 7)
    d = np.linalg.norm(pts.numpy()[:, :, None] - pts.numpy()[:, None], axis=-1)
    for b in range(2):
        for i in range(60):
            assert nb[b, i].tolist() == np.argsort(d[b, i], kind="stable")[:7].tolist()


def _dist_matrix(P):
    N = len(P)
    return [[float(((P[i] - P[j]) ** 2).sum()) for j in range(N)] for i in range(N)]


def _alg1_naive(P, k):
    d = _dist_matrix(P)                      # squared: the same arg-mins; one value per pair (exact ties)
    out = []
    for s in range(len(P)):
        B = [s]
        while len(B) < k:
            rest = [x for x in range(len(P)) if x not in B]
            dx = [min(d[x][y] for y in B) for x in rest]
            B.append(rest[dx.index(min(dx))])
        out.append(B)
    return out


def _code_variant_naive(P, k):
    """The released closest_geodesic_neighbors with explicit loops: after every seed i picks c_i, its row
    becomes D[i][j] = min(D[i][j], d(x_i, x_{c_j})). Ties (frequent: several seeds pick one point) go to
    the lowest index."""
    N = len(P)
    d = _dist_matrix(P)
    D = [row[:] for row in d]
    sel = [[i == j for j in range(N)] for i in range(N)]
    out = [[i] for i in range(N)]
    for _ in range(1, k):
        c = []
        for i in range(N):
            row = [math.inf if sel[i][j] else D[i][j] for j in range(N)]
            c.append(row.index(min(row)))
        for i in range(N):
            sel[i][c[i]] = True
            out[i].append(c[i])
        D = [[min(D[i][j], d[i][c[j]]) for j in range(N)] for i in range(N)]
    return out


def test_geodesic_matches_algorithm_1_and_the_code():
    g = torch.Generator().manual_seed(3)
    pts = torch.randn(1, 40, 3, generator=g, dtype=torch.float64)
    paper = G.geodesic_neighbourhoods(pts, 8, "paper")[0].tolist()
    code = G.geodesic_neighbourhoods(pts, 8, "code")[0].tolist()
    assert paper == _alg1_naive(pts[0].numpy(), 8)
    assert code == _code_variant_naive(pts[0].numpy(), 8)
    assert paper != code                                                      # the transpose matters
    assert all(len(set(n)) == 8 for n in paper + code)
    with pytest.raises(ValueError, match="variant must be one of"):
        G.geodesic_neighbourhoods(pts, 8, "other")


def test_pseudo_geodesic_stays_on_its_sheet():
    """Two parallel 10×10 sheets (spacing 0.1) 0.15 apart: kNN crosses the gap, Algorithm 1 grows along
    the sheet (every in-sheet step, 0.1, is shorter than the gap)."""
    xs, ys = torch.meshgrid(torch.arange(10) * 0.1, torch.arange(10) * 0.1, indexing="ij")
    sheet = torch.stack((xs.reshape(-1), ys.reshape(-1), torch.zeros(100)), -1).double()
    pts = torch.cat([sheet, sheet + torch.tensor([0.0, 0.0, 0.15], dtype=torch.float64)])[None]
    side = (torch.arange(200) >= 100)
    knn = G.knn_neighbourhoods(pts, 16)[0]
    geod = G.geodesic_neighbourhoods(pts, 16, "paper")[0]
    assert (side[geod] == side[:, None]).all()                                # never leaves the seed's sheet
    assert (side[knn] != side[:, None]).any(1).float().mean() > 0.9          # kNN mixes the sheets
    code = G.geodesic_neighbourhoods(pts, 16, "code")[0]
    assert not torch.equal(code, geod)


# ------------------------------------------------------------------------------------------ point sampling
def test_sample_at_points_equals_upsample_then_index():
    g = torch.Generator().manual_seed(4)
    feat = torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64, requires_grad=True)
    H, W = 31, 45
    pix = torch.stack((torch.randint(0, W, (2, 50), generator=g), torch.randint(0, H, (2, 50), generator=g)), -1)
    pix[0, 0] = torch.tensor([0, 0])
    pix[0, 1] = torch.tensor([W - 1, H - 1])                                  # the borders clamp alike
    ours = G.sample_at_points(feat, G.pixels_to_grid(pix.double() + 0.5, (H, W), (7, 9)))
    up = F.interpolate(feat, size=(H, W), mode="bilinear", align_corners=False)
    want = torch.stack([up[b, :, pix[b, :, 1], pix[b, :, 0]].T for b in range(2)])
    assert torch.allclose(ours, want, atol=1e-12)
    assert torch.allclose(JV.naive_sample_upsample(feat, pix, (H, W)), want, atol=1e-12)
    w = torch.randn_like(want)
    g1, = torch.autograd.grad((ours * w).sum(), feat)
    g2, = torch.autograd.grad((want * w).sum(), feat)
    assert torch.allclose(g1, g2, atol=1e-12)                                 # same gradient, no full map
    with pytest.raises(ValueError, match="xy must have shape"):
        G.sample_at_points(feat, torch.zeros(3, 4, 2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------ loss pieces
def _random_rotation(g):
    q = torch.randn(4, generator=g, dtype=torch.float64)
    q = q / q.norm()
    w, x, y, z = q.tolist()
    return torch.tensor([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                         [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                         [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]], dtype=torch.float64)


def test_naive_kabsch_loop_matches_ops_kabsch():
    g = torch.Generator().manual_seed(5)
    src = torch.randn(6, 20, 3, generator=g)
    tgt = torch.randn(6, 20, 3, generator=g)
    w = torch.rand(6, 20, generator=g)
    R1, t1, s1 = JV.naive_kabsch_loop(src, tgt, w)
    R2, t2, s2 = ops.kabsch(src, tgt, w, estimate_scale=True, min_scale=1.0)
    assert torch.allclose(R1, R2, atol=1e-4) and torch.allclose(t1, t2, atol=1e-4) and torch.allclose(s1, s2, atol=1e-4)


def test_rigidity_losses_vanish_for_rigid_maps():
    g = torch.Generator().manual_seed(6)
    posed = torch.randn(2, 80, 3, generator=g)
    R = torch.stack([_random_rotation(g) for _ in range(2)]).float()
    canon = (posed @ R.mT + torch.randn(2, 1, 3, generator=g)).requires_grad_(True)
    for rules in (("geodesic", "knn"), ("knn", "knn"), ("geodesic", "geodesic")):
        lf, lb = JV.local_rigidity_losses(canon, posed, 12, posed_rule=rules[0], canonical_rule=rules[1])
        assert lf.max() < 1e-3 and lb.max() < 1e-3
    noise = torch.randn(2, 80, 3, generator=g, requires_grad=True)
    lf, lb = JV.local_rigidity_losses(noise, posed, 12)
    assert lf.min() > 0.05 and lb.min() > 0.05
    lf2, lb2 = JV.local_rigidity_losses(noise, posed, 12, kabsch=lambda s, t, w: JV.naive_kabsch_loop(s, t, w))
    assert torch.allclose(lf, lf2, atol=1e-4) and torch.allclose(lb, lb2, atol=1e-4)
    (lf.sum() + lb.sum()).backward()
    assert torch.isfinite(noise.grad).all() and noise.grad.abs().sum() > 0
    # s >= 1: shrinking the canonical cloud can be undone one way only
    small = (0.5 * posed).requires_grad_(True)
    lf, lb = JV.local_rigidity_losses(small, posed, 12)
    assert lf.max() > 0.05 and lb.max() < 1e-3


def test_keypoint_alignment_and_ce_losses():
    g = torch.Generator().manual_seed(7)
    posed = torch.randn(3, 10, 3, generator=g)
    R = torch.stack([_random_rotation(g) for _ in range(3)]).float()
    proto = (1.7 * posed @ R.mT + 0.3).requires_grad_(True)                  # a similarity with s >= 1
    w = torch.rand(3, 10, generator=g) < 0.8
    w[2] = False
    loss, present, s = JV.keypoint_alignment_loss(posed, proto, w)
    assert present.tolist() == [True, True, False] and loss.max() < 1e-4
    assert s[:2].tolist() == pytest.approx([1.7, 1.7], rel=1e-4)
    loss2, _, _ = JV.keypoint_alignment_loss(posed, 0.5 * proto.detach(), w)  # would need s < 1
    assert loss2[:2].min() > 0.01
    proto2 = torch.randn(3, 10, 3, generator=g, requires_grad=True)
    posed2 = posed.clone().requires_grad_(True)
    loss, present, _ = JV.keypoint_alignment_loss(posed2, proto2, w)
    loss.sum().backward()
    assert proto2.grad.abs().sum() > 0 and posed2.grad is None               # gradients reach 𝒫 only
    assert (proto2.grad[~w] == 0).all()
    # Eq. 4 against F.cross_entropy over the valid slots
    feats = torch.randn(2, 5, 16, generator=g)
    Z = torch.randn(2, 8, 16, generator=g)
    slots = torch.arange(8)[None] < torch.tensor([[6], [8]])
    labels = torch.tensor([[0, 1, 2, 3, 5], [7, 6, 0, 1, 2]])
    km = torch.tensor([[True, True, False, True, True], [True, True, True, True, True]])
    lt = torch.tensor(0.7)
    loss, present = JV.prototype_ce_loss(feats, Z, slots, labels, km, lt)
    for b in range(2):
        logits = F.normalize(feats[b], dim=-1) @ F.normalize(Z[b], dim=-1).T * math.exp(0.7)
        ref = F.cross_entropy(logits[km[b]][:, slots[b]], labels[b][km[b]])
        assert loss[b].item() == pytest.approx(ref.item(), rel=1e-5)
    phi = JV.canonical_coordinates(feats, Z, torch.randn(2, 8, 3, generator=g), slots, lt)
    assert phi.shape == (2, 5, 3) and torch.isfinite(phi).all()


def test_prototype_fit_recovers_the_template(fake, store):
    """Fitting 𝒫 with L_𝒫 alone (Kabsch with s ≥ 1 each step) on the lifted keypoints of the synthetic
    views recovers the 3-D template up to a similarity, at the size of the largest object."""
    cat, K = "cat", fake.templates["cat"].shape[0]
    posed, lifted = [], []
    for j, stem in enumerate(fake.stems[cat]):
        g = store.load(cat, stem)
        xyz, ok = G.lift_keypoints(torch.tensor(fake.kps[cat][j]).float(), torch.tensor(fake.visible[cat][j]),
                                   points=g.points, ok=g.valid)
        posed.append(xyz)
        lifted.append(ok)
    posed, lifted = torch.stack(posed), torch.stack(lifted)
    P = torch.nn.Parameter(torch.randn(K, 3, generator=torch.Generator().manual_seed(0)) * 1e-5)
    opt = torch.optim.Adam([P], lr=0.02)
    first = None
    for it in range(300):
        loss, present, _ = JV.keypoint_alignment_loss(posed, P.expand(len(posed), K, 3), lifted)
        loss = loss[present].mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    tmpl = torch.tensor(fake.templates[cat]).float()
    rms, rel = JV.umeyama_aligned_error(P.detach(), tmpl)
    print(f"\nprototype fit (L_P only, 300 Adam steps): loss {first:.3f} -> {loss.item():.4f}; "
          f"aligned RMS error {rms:.4f} = {100 * rel:.2f}% of the template's RMS radius")
    assert loss.item() < 0.1 * first and rel < 0.05
    rad = lambda X: float(((X - X.mean(0)) ** 2).sum(-1).mean().sqrt())
    smax = max(s for s, _, _ in fake.poses[cat])
    assert rad(P.detach()) / rad(tmpl) == pytest.approx(smax, rel=0.1)        # the largest object's size


# ------------------------------------------------------------------------------------------ the method
TINY = dict(out_dim=32, bottleneck=8, tiny=True, n_points=96, n_neighbours=12)


@pytest.fixture(scope="module")
def tiny_backbone():
    from semcorr_fast.backbones import create_backbone
    return create_backbone("dinov2_vitb14", pretrained=False, tiny=True)


def _image_batch(fake, backbone, b=2, step=0):
    from semcorr_fast.data import build_dataset
    from semcorr_fast.train.data import BatchStream, DatasetPairs
    ds = build_dataset("spair", root=fake.root, split="trn", canvas=backbone.canvas)
    batch = BatchStream(DatasetPairs(ds), b, 0)[step]
    batch["generator"] = torch.Generator().manual_seed(step)
    return batch


def test_registry_and_errors(tiny_backbone, fake):
    assert "jamaisvu" in list_methods()
    with pytest.raises(TypeError, match="unknown method_args"):
        build_method("jamaisvu", tiny_backbone, n_pointz=3)
    with pytest.raises(ValueError, match="geodesic_variant must be one of"):
        build_method("jamaisvu", tiny_backbone, geodesic_variant="x", **TINY)
    with pytest.raises(ValueError, match="n_neighbours"):
        build_method("jamaisvu", tiny_backbone, **{**TINY, "n_points": 8, "n_neighbours": 9})
    m = build_method("jamaisvu", tiny_backbone, **TINY)
    batch = _image_batch(fake, tiny_backbone)
    with pytest.raises(KeyError, match="geometry_root"):
        m.training_step(batch, 0)
    m2 = build_method("jamaisvu", tiny_backbone, geometry_root=fake.maps_root, masks_root=fake.masks_root,
                      categories=["dog"], **TINY)
    with pytest.raises(KeyError, match=r"categories \['cat'\] have no prototype"):
        m2.training_step(batch, 0)


def test_losses_finite_with_gradients_to_the_right_parameters(tiny_backbone, fake):
    m = build_method("jamaisvu", tiny_backbone, geometry_root=fake.maps_root, masks_root=fake.masks_root, **TINY)
    batch = _image_batch(fake, tiny_backbone)
    feats = m.features_from_images(batch)
    desc = m.descriptor_from_features(feats["src_feat"])
    geoms = m._geometries(batch, 2)
    out = m.prototype_losses(desc, feats["src_kps"], batch["category"], geoms, tuple(batch["src"].shape[-2:]),
                             torch.Generator().manual_seed(0))
    assert out["n_geom"].item() == 2
    groups = {"post": [p for p in m.post.parameters()], "proto_kps": [m.proto_kps], "proto_feats": [m.proto_feats],
              "geom_temp": [m.geom_temp], "logit_scale": [m.logit_scale]}
    expect = {"proto_align": {"proto_kps"}, "proto_feat": {"post", "proto_feats", "geom_temp"},
              "geom_f": {"post", "proto_feats", "geom_temp"}, "geom_b": {"post", "proto_feats", "geom_temp"}}
    for term, want in expect.items():
        val = out[term]
        assert val.dim() == 0 and torch.isfinite(val) and val.item() > 0, term
        grads = torch.autograd.grad(val, [p for ps in groups.values() for p in ps], retain_graph=True,
                                    allow_unused=True)
        it = iter(grads)
        got = set()
        for name, ps in groups.items():
            gs = [next(it) for _ in ps]
            if any(g is not None and g.abs().sum() > 0 for g in gs):
                assert all(g is None or torch.isfinite(g).all() for g in gs)
                got.add(name)
        assert got == want, (term, got)
    # the whole step: finite, every trainable parameter reached
    m.zero_grad()
    res = m.training_step(batch, 0)
    res["loss"].backward()
    assert torch.isfinite(res["loss"])
    for k in ("sparse", "dense", "proto_align", "proto_feat", "geom_f", "geom_b", "tau"):
        assert k in res and torch.isfinite(res[k])
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_naive_impl_runs_and_agrees_on_a_step(tiny_backbone, fake):
    """impl="naive" (full upsample, SVD loop, FPS over the padded map, full N×N soft-argmax) gives losses of
    the same size as the fused step (not bit-equal: different FPS index spaces and upsample rounding)."""
    res = {}
    for impl in ("fused", "naive"):
        torch.manual_seed(0)
        m = build_method("jamaisvu", tiny_backbone, geometry_root=fake.maps_root, masks_root=fake.masks_root,
                         impl=impl, dropout=0.0, **TINY)
        res[impl] = m.training_step(_image_batch(fake, tiny_backbone), 0)
    for k in ("dense", "sparse", "proto_align", "proto_feat"):
        assert res["fused"][k].item() == pytest.approx(res["naive"][k].item(), rel=1e-3), k
    for k in ("geom_f", "geom_b"):
        assert res["fused"][k].item() == pytest.approx(res["naive"][k].item(), rel=0.3), k


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from semcorr_fast.train import load_config, train
    root = tmp_path_factory.mktemp("jvtrain")
    data = make_jamaisvu(str(root / "SPair-71k"))
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "jamaisvu",
                                   "jamaisvu_dinov2_vitb14_tiny.toml"),
                      [f'data.root="{data.root}"', f'method_args.geometry_root="{data.maps_root}"',
                       f'method_args.masks_root="{data.masks_root}"', f'method_args.feature_cache="{root / "cache"}"',
                       f'train.out_dir="{root / "run"}"', "train.log_every=25"])
    n = torch.get_num_threads()
    torch.set_num_threads(1)          # module fixtures run before the autouse one
    try:
        t0 = time.time()
        res = train(cfg)
        secs = time.time() - t0
    finally:
        torch.set_num_threads(n)
    return data, cfg, res, secs, root


def test_tiny_config_losses_fall_and_prototype_recovers_template(trained):
    from semcorr_fast.train import load_trained
    data, cfg, res, secs, root = trained
    logs = [l for l in res.logs if "loss" in l]
    assert len(logs) == cfg.train.steps // 25
    first, last = logs[0], logs[-1]
    lines = [f"tiny Jamais Vu, {cfg.train.steps} steps in {secs:.1f} s:"]
    for k in ("loss", "sparse", "dense", "proto_align", "proto_feat", "geom_f", "geom_b"):
        lines.append(f"  {k}: {first[k]:.4f} -> {last[k]:.4f}")
        assert last[k] < first[k], k
    assert last["proto_align"] < 0.2 * first["proto_align"]
    m = load_trained(os.path.join(str(root / "run"), "last.pt"))
    c = m.cat_index["cat"]
    K = data.templates["cat"].shape[0]
    rms, rel = JV.umeyama_aligned_error(m.proto_kps[c, :K].detach(), torch.tensor(data.templates["cat"]).float())
    lines.append(f"  learned prototype vs template after a similarity fit: RMS {rms:.4f} ({100 * rel:.2f}% of its radius)")
    print("\n" + "\n".join(lines))
    assert rel < 0.06


def test_feature_batches_give_the_image_batch_losses(trained, tiny_backbone):
    """The cached-feature layout (FeaturePairs, src_key) and the image layout (src_name) of the same pairs
    give the same losses (eval mode; the training run filled the cache)."""
    from semcorr_fast.data import build_dataset
    from semcorr_fast.methods.feature_pairs import build_feature_source
    from semcorr_fast.train.data import BatchStream, DatasetPairs
    data, cfg, res, secs, root = trained
    m = build_method("jamaisvu", tiny_backbone, **cfg.method_args).eval()
    ds = build_dataset("spair", root=data.root, split="trn", canvas=tiny_backbone.canvas)
    src = build_feature_source(ds, tiny_backbone, str(root / "cache"), progress=False)
    fb = BatchStream(src, 2, 0)[3]
    ib = BatchStream(DatasetPairs(ds), 2, 0)[3]
    assert fb["pair_id"] == ib["pair_id"]
    fb["generator"], ib["generator"] = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    with torch.no_grad():
        a, b = m.training_step(fb, 0), m.training_step(ib, 0)
    for k in ("loss", "proto_align", "proto_feat", "geom_f", "geom_b", "dense", "sparse"):
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-4, abs=1e-6), k


def test_cross_benchmark_protocol_runs_on_one_model(trained, tmp_path):
    """Tab. 3's protocol: the trained tiny model evaluated on fake SPair-71k, SPair-U, AP-10K (IS/CS/CF) and
    PF-PASCAL in their published layouts, window soft-argmax, per-image PCK at each set's thresholds."""
    from semcorr_fast.train import load_trained
    from tests.fakedata.spair_pf_ap10k import make_ap10k, make_pf_pascal, make_spair_u
    data, cfg, res, secs, root = trained
    model = load_trained(os.path.join(str(root / "run"), "last.pt"))
    roots = {"spair": make_spair_u(str(tmp_path / "spair"), n_pairs=2), "ap10k": make_ap10k(str(tmp_path / "ap10k"), 2),
             "pf-pascal": make_pf_pascal(str(tmp_path / "pf"), 2)}
    out = JV.evaluate_cross_benchmark(model, roots)
    assert list(out) == [c[0] for c in JV.CROSS_BENCHMARK]
    for label, r in out.items():
        keys = {"PF-PASCAL": ("pck@0.05/image", "pck@0.1/image", "pck@0.15/image")}.get(
            label, ("pck@0.01/image", "pck@0.05/image", "pck@0.1/image"))
        for k in keys:
            assert 0.0 <= r.summary["overall"][k] <= 1.0, (label, k)
        assert r.info["matcher"].startswith("Matcher") and "window" in r.info["matcher"]
    with pytest.raises(KeyError, match=r"roots\['ap10k'\]"):
        JV.evaluate_cross_benchmark(model, {"spair": roots["spair"]}, only=["AP-10K IS"])


def test_point_map_pixels_sample_the_upsampled_descriptor_map():
    """Mapping point-map pixels onto the feature grid: a 4:3 point map on a pad_square(96) canvas (grid
    12×12); the sampled feature equals Φ upsampled to the canvas (96×96) read at the canvas pixel that the
    point-map pixel's centre falls in (exact when the point map is at canvas resolution)."""
    from semcorr_fast.data.canvas import Canvas
    canvas = Canvas.pad_square(96)
    tf = canvas.transform_for(72, 96)                                          # the point map at canvas scale
    assert (tf.sx, tf.ox, tf.oy) == (1.0, 0.0, 12.0)
    g = torch.Generator().manual_seed(8)
    desc = torch.randn(1, 6, 12, 12, generator=g, dtype=torch.float64)
    pix = torch.stack((torch.randint(0, 96, (40,), generator=g), torch.randint(0, 72, (40,), generator=g)), -1)
    xy = JV.JamaisVu.pixel_grid_coords(pix, tf, (0.0, 0.0, 96.0, 96.0), (12, 12)).double()
    got = G.sample_at_points(desc, xy[None])[0]
    up = F.interpolate(desc, size=(96, 96), mode="bilinear", align_corners=False)[0]
    want = up[:, pix[:, 1] + 12, pix[:, 0]].T
    assert torch.allclose(got, want, atol=1e-12)
