"""Synthetic warps (semcorr_fast.warps) and the ``warps`` dataset (semcorr_fast.data.warps)."""
import math

import pytest
import torch
import torch.nn.functional as F

from semcorr_fast import warps as W
from semcorr_fast.data import Canvas, build_dataset
from semcorr_fast.data.warps import DEFAULT_PHOTOS, WarpsDataset, skimage_photo

PRESET_KINDS = [(p, k) for p in ("demystifying", "universal") for k in ("tps", "affine", "tps+affine")]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def pixel_lattice(H, Wd, dtype=torch.float64):
    ys, xs = torch.meshgrid(torch.arange(H, dtype=dtype), torch.arange(Wd, dtype=dtype), indexing="ij")
    return torch.stack((xs, ys), -1)  # (H, W, 2) pixel (x, y)


# ---------------------------------------------------------------------------------------------
# conventions and identity
# ---------------------------------------------------------------------------------------------

def test_pixel_convention_matches_grid_sample():
    H, Wd = 5, 7
    eye = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]], dtype=torch.float64)
    ag = F.affine_grid(eye, (1, 1, H, Wd), align_corners=False)[0]
    assert torch.allclose(W.pixel_to_norm(pixel_lattice(H, Wd), H, Wd), ag, atol=1e-12)
    assert torch.allclose(W.norm_to_pixel(ag, H, Wd), pixel_lattice(H, Wd), atol=1e-12)
    # the image borders are at ±1
    edges = W.pixel_to_norm(torch.tensor([[-0.5, -0.5], [Wd - 0.5, H - 0.5]], dtype=torch.float64), H, Wd)
    assert torch.allclose(edges, torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("preset,kind", PRESET_KINDS)
def test_zero_scale_is_identity(preset, kind):
    B, H, Wd = 2, 12, 16
    w = W.random_warp(B, H, Wd, kind, preset=preset, scale=0.0, generator=gen(1), dtype=torch.float64)
    assert torch.allclose(w.grid_pixels, pixel_lattice(H, Wd).expand(B, H, Wd, 2), atol=1e-9)
    img = torch.rand(B, 3, H, Wd, dtype=torch.float64, generator=gen(2))
    assert torch.allclose(w.apply(img), img, atol=1e-9)
    assert bool(w.valid_mask.all())
    xy = torch.rand(B, 9, 2, dtype=torch.float64, generator=gen(3)) * torch.tensor([Wd - 1.0, H - 1.0]).double()
    q, ok = w.points(xy, return_ok=True)
    assert bool(ok.all()) and torch.allclose(q, xy, atol=1e-8)
    assert not bool(w.folds().any())


def test_identity_warp_helper():
    w = W.Warp.identity(3, 6, 9)
    img = torch.rand(3, 2, 6, 9)
    assert torch.allclose(w.apply(img), img, atol=1e-6)
    assert bool(w.valid_mask.all()) and bool(W.Warp.identity(1, 7, 224).valid_mask.all())  # float32 rounding


# ---------------------------------------------------------------------------------------------
# affine exactness
# ---------------------------------------------------------------------------------------------

def test_affine_exact_against_hand_built_matrix():
    H, Wd = 30, 40
    # backward map in pixels: src = M·p + t (rotation 20°, scale 0.9, about a point, plus a shift)
    a = math.radians(20.0)
    M = 0.9 * torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], dtype=torch.float64)
    t = torch.tensor([3.0, -2.0], dtype=torch.float64)
    # the same map in normalised coordinates: u = S p + o with S = diag(2/W, 2/H), o = (1/W − 1, 1/H − 1)
    S = torch.diag(torch.tensor([2.0 / Wd, 2.0 / H], dtype=torch.float64))
    o = torch.tensor([1.0 / Wd - 1, 1.0 / H - 1], dtype=torch.float64)
    A = S @ M @ torch.linalg.inv(S)
    b = S @ t + o - A @ o
    theta = torch.cat((A, b[:, None]), 1)[None]
    w = W.Warp([theta], (H, Wd))
    P = pixel_lattice(H, Wd)
    assert torch.allclose(w.grid_pixels[0], P @ M.T + t, atol=1e-10)
    assert torch.allclose(w.grid[0], F.affine_grid(theta, (1, 1, H, Wd), align_corners=False)[0], atol=1e-12)
    xy = torch.tensor([[[5.0, 7.0], [20.5, 3.25], [39.0, 29.0]]], dtype=torch.float64)
    expect = (xy - t) @ torch.linalg.inv(M).T
    assert torch.allclose(w.points(xy), expect, atol=1e-9)
    assert torch.allclose(w.source_points(expect), xy, atol=1e-9)


def test_affine_params_are_rotations_in_pixels_on_nonsquare_images():
    H, Wd = 20, 50
    theta = W.affine_params(16, preset="demystifying", aspect=Wd / H, generator=gen(4), dtype=torch.float64)
    D = torch.diag(torch.tensor([Wd / 2.0, H / 2.0], dtype=torch.float64))
    A_pix = D @ theta[:, :, :2] @ torch.linalg.inv(D)  # the linear part in pixel units
    gram = A_pix @ A_pix.transpose(1, 2)
    s2 = gram[:, 0, 0]
    assert torch.allclose(gram, s2[:, None, None] * torch.eye(2, dtype=torch.float64), atol=1e-12)
    assert float((torch.linalg.det(A_pix) > 0).float().mean()) == 1.0
    # square images: exactly DVE's s·[[cos, sin], [−sin, cos]]
    th = W.affine_params(4, aspect=1.0, generator=gen(5), dtype=torch.float64)
    assert torch.allclose(th[:, 0, 0], th[:, 1, 1]) and torch.allclose(th[:, 0, 1], -th[:, 1, 0])


def test_crop_params_stay_inside_and_in_range():
    th = W.crop_params(200, preset="universal", generator=gen(6), dtype=torch.float64)
    fw, fh, cx, cy = th[:, 0, 0], th[:, 1, 1], th[:, 0, 2], th[:, 1, 2]
    assert bool(((fw * fh) >= 0.5 - 1e-9).all() and (fw <= 1).all() and (fh <= 1).all())
    assert bool(((cx.abs() + fw) <= 1 + 1e-12).all() and ((cy.abs() + fh) <= 1 + 1e-12).all())
    assert float(th[:, 0, 1].abs().max()) == 0.0 and float(th[:, 1, 0].abs().max()) == 0.0
    w = W.Warp([th[:8]], (32, 32))
    assert bool(w.valid_mask.all())  # a crop never samples outside the source


# ---------------------------------------------------------------------------------------------
# thin-plate splines
# ---------------------------------------------------------------------------------------------

def test_tps_fit_interpolates_control_points():
    g = gen(7)
    ctrl = torch.rand(13, 2, generator=g, dtype=torch.float64) * 2 - 1
    values = ctrl + 0.1 * torch.randn(3, 13, 2, generator=g, dtype=torch.float64)
    tps = W.tps_fit(ctrl, values)
    assert torch.allclose(tps(ctrl.expand(3, 13, 2)), values, atol=1e-10)
    # per-item centres give the same result
    tps_b = W.tps_fit(ctrl.expand(3, 13, 2).clone(), values)
    q = torch.rand(3, 20, 2, generator=g, dtype=torch.float64) * 2 - 1
    assert torch.allclose(tps(q), tps_b(q), atol=1e-10)
    # an affine target is reproduced exactly everywhere (zero bending)
    A = torch.tensor([[1.1, 0.2], [-0.1, 0.9]], dtype=torch.float64)
    aff = W.tps_fit(ctrl, (ctrl @ A.T + 0.05).expand(1, 13, 2))
    assert torch.allclose(aff(q[:1]), q[:1] @ A.T + 0.05, atol=1e-10)
    assert float(aff.weights.abs().max()) < 1e-10


def test_universal_tps_interpolates_its_jittered_grid():
    H, Wd = 40, 40
    w = W.random_warp(2, H, Wd, "tps", preset="universal", generator=gen(8), dtype=torch.float64)
    tps = w.stages[0]
    ctrl = W._ctrl_grid(10, "cpu", torch.float64)
    jit = tps(ctrl.expand(2, -1, -1)) - ctrl
    lim = W.PRESETS["universal"].tps_jitter_max
    assert float(jit.abs().max()) <= lim + 1e-9 and float(jit.abs().max()) > 0.01
    # the forward map sends each jittered control point back onto the lattice
    inside = (ctrl.abs() < 0.99).all(-1)
    src = W.norm_to_pixel(tps(ctrl.expand(2, -1, -1))[:, inside], H, Wd)
    assert torch.allclose(w.points(src), W.norm_to_pixel(ctrl[inside], H, Wd).expand(2, -1, -1), atol=1e-6)


def test_tps_jacobian_matches_finite_differences():
    tps = W.tps_warp_params(2, preset="demystifying", generator=gen(9), dtype=torch.float64)
    q = torch.rand(2, 5, 2, generator=gen(10), dtype=torch.float64) * 1.6 - 0.8
    J = tps.jacobian(q)
    eps = 1e-6
    for j in range(2):
        dq = torch.zeros_like(q)
        dq[..., j] = eps
        fd = (tps(q + dq) - tps(q - dq)) / (2 * eps)
        assert torch.allclose(J[..., :, j], fd, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# forward map of points vs grid_sample
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset,kind", PRESET_KINDS)
def test_gaussian_blob_lands_at_warped_point(preset, kind):
    """A Gaussian blob drawn at source point x and warped by grid_sample is centred at warp.points(x).

    The centroid of the warped blob is weighted by |det ∂g⁻¹/∂p| (finite differences of the grid),
    which turns it into E[g(x)] under the blob: that is g(x0) up to ½σ²∇²g. The warps run at half
    strength on 96 px so that this curvature term stays below 0.13 px (Universal's jittered TPS bends
    at the 10-px scale of its control cells); a half-pixel convention error would show as ≥ 0.5 px.
    """
    H = Wd = 96
    B, K, sigma = 2, 6, 1.2
    g = gen(11)
    w = W.random_warp(B, H, Wd, kind, preset=preset, scale=0.5, generator=g, dtype=torch.float64)
    xy = H / 4 + torch.rand(B, K, 2, generator=g, dtype=torch.float64) * (H / 2)
    q, ok = w.points(xy, return_ok=True)
    P = pixel_lattice(H, Wd)
    d2 = ((P[None, None] - xy[:, :, None, None, :]) ** 2).sum(-1)      # (B, K, H, W)
    warped = w.apply(torch.exp(-d2 / (2 * sigma ** 2)))                # channel k: blob at xy[:, k]
    gp = w.grid_pixels
    gx, gy = torch.gradient(gp, dim=2)[0], torch.gradient(gp, dim=1)[0]
    area = (gx[..., 0] * gy[..., 1] - gx[..., 1] * gy[..., 0]).abs()   # (B, H, W)
    checked = 0
    for b in range(B):
        for k in range(K):
            qx, qy = q[b, k].tolist()
            if not (bool(ok[b, k]) and 8 <= qx <= Wd - 9 and 8 <= qy <= H - 9):
                continue
            m = warped[b, k] * area[b] * ((P - q[b, k]).norm(dim=-1) <= 4 * sigma)
            c = (m[..., None] * P).sum((0, 1)) / m.sum()
            assert float((c - q[b, k]).norm()) < 0.2, (b, k, c.tolist(), q[b, k].tolist())
            checked += 1
    assert checked >= B * K // 2


@pytest.mark.parametrize("preset,kind", PRESET_KINDS)
def test_points_round_trip_and_grid_consistency(preset, kind):
    H, Wd = 48, 56
    w = W.random_warp(3, H, Wd, kind, preset=preset, generator=gen(13), dtype=torch.float64)
    # source_points at pixel centres equals the dense grid
    P = pixel_lattice(H, Wd).reshape(1, -1, 2).expand(3, -1, -1)
    assert torch.allclose(w.source_points(P), w.grid_pixels.reshape(3, -1, 2), atol=1e-10)
    xy = torch.rand(3, 40, 2, generator=gen(14), dtype=torch.float64) * torch.tensor([Wd - 1.0, H - 1.0]).double()
    q, ok = w.points(xy, tol=1e-4, return_ok=True)
    assert torch.isnan(q[~ok]).all()
    back = w.source_points(torch.nan_to_num(q))
    assert float((back[ok] - xy[ok]).norm(dim=-1).max()) <= 1e-4
    if preset == "universal" or kind == "affine":
        assert bool(ok.all())  # bijective warps: every point has its image
    else:
        assert float(ok.float().mean()) > 0.8


def test_points_float32_input_and_shared_points():
    w = W.random_warp(2, 32, 32, "tps+affine", generator=gen(15))
    xy = torch.tensor([[10.0, 12.0], [20.0, 16.0]])
    q = w.points(xy)  # (N, 2) broadcast to every batch item
    assert q.shape == (2, 2, 2) and q.dtype == torch.float32
    q64 = w.to(dtype=torch.float64).points(xy.double().expand(2, 2, 2))
    assert torch.allclose(q.double(), q64, atol=1e-3, equal_nan=True)


def test_points_gradients_implicit_function():
    tps = W.tps_warp_params(1, preset="universal", grid=3, generator=gen(16), dtype=torch.float64)
    theta = W.affine_params(1, generator=gen(17), dtype=torch.float64)
    weights = tps.weights.clone().requires_grad_(True)
    xy = torch.tensor([[[7.0, 9.0]]], dtype=torch.float64, requires_grad=True)

    def f(xy_, w_):
        warp = W.Warp([theta, W.TPS(tps.ctrl, w_, tps.affine)], (20, 24))
        return warp.points(xy_, tol=1e-9)

    assert torch.autograd.gradcheck(f, (xy, weights), eps=1e-6, atol=1e-6)
    # a point without an answer (NaN in, NaN out) leaves every gradient finite
    xy2 = torch.tensor([[[7.0, 9.0], [math.nan, 3.0]]], dtype=torch.float64, requires_grad=True)
    out = f(xy2, weights)
    assert torch.isnan(out[0, 1]).all() and torch.isfinite(out[0, 0]).all()
    out[0, 0].sum().backward()
    assert torch.isfinite(weights.grad).all() and torch.isfinite(xy2.grad).all()
    assert float(xy2.grad[0, 1].abs().max()) == 0.0


# ---------------------------------------------------------------------------------------------
# composition, folds, pairs
# ---------------------------------------------------------------------------------------------

def test_random_warp_pair_and_then():
    B, H, Wd = 2, 24, 24
    first, second = W.random_warp_pair(B, H, Wd, generator=gen(18), dtype=torch.float64)
    g = gen(18)
    ref1 = W.random_warp(B, H, Wd, scale=0.5, affine_scale=1.0, generator=g, dtype=torch.float64)
    ref2 = W.random_warp(B, H, Wd, generator=g, dtype=torch.float64)
    assert torch.allclose(first.grid, ref1.grid) and torch.allclose(second.grid, ref2.grid)
    both = first.then(second)
    p = torch.rand(B, 10, 2, generator=gen(19), dtype=torch.float64) * 23
    assert torch.allclose(both.source_points(p), first.source_points(second.source_points(p)), atol=1e-12)
    # the first warp's TPS is half as strong: its non-affine displacement is smaller on average
    assert float(ref1.stages[0].weights.abs().mean()) < float(ref2.stages[0].weights.abs().mean())


def test_folds_detects_mirror_and_accepts_identity():
    mirror = torch.tensor([[[-1.0, 0, 0], [0, 1.0, 0]]])
    assert bool(W.Warp([mirror], (8, 8)).folds()[0])
    assert not bool(W.Warp.identity(1, 8, 8).folds()[0])


def test_determinism_and_seeds():
    a = W.random_warp(3, 16, 16, generator=gen(20))
    b = W.random_warp(3, 16, 16, generator=gen(20))
    c = W.random_warp(3, 16, 16, generator=gen(21))
    assert torch.equal(a.grid, b.grid)
    assert not torch.allclose(a.grid, c.grid)
    assert not torch.allclose(a.grid[0], a.grid[1])  # a different warp per batch item


# ---------------------------------------------------------------------------------------------
# colour jitter
# ---------------------------------------------------------------------------------------------

def test_color_jitter():
    x = torch.rand(4, 3, 8, 8, generator=gen(22)) * 0.8 + 0.1
    assert torch.allclose(W.color_jitter(x, generator=gen(0)), x, atol=1e-6)  # all strengths 0
    y1, p1 = W.color_jitter(x, preset="universal", generator=gen(23), return_params=True)
    y2 = W.color_jitter(x, preset="universal", generator=gen(23))
    assert torch.equal(y1, y2) and y1.shape == x.shape and float(y1.min()) >= 0 and float(y1.max()) <= 1
    assert not torch.allclose(y1[0], y1[1])
    assert bool((p1[:, :3] >= 0.6 - 1e-6).all() and (p1[:, :3] <= 1.4 + 1e-6).all() and (p1[:, 3].abs() <= 0.1).all())
    yb, pb = W.color_jitter(x, brightness=0.3, generator=gen(24), return_params=True)
    assert torch.allclose(yb, (x * pb[:, 0].view(-1, 1, 1, 1)).clamp(0, 1), atol=1e-6)
    # hue-lite rotates chroma only: luma is unchanged where nothing clips
    mid = torch.full((2, 3, 4, 4), 0.5) + 0.05 * torch.randn(2, 3, 4, 4, generator=gen(25))
    yh = W.color_jitter(mid, hue=0.5, generator=gen(26))
    luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert torch.allclose((yh * luma).sum(1), (mid * luma).sum(1), atol=1e-5)
    assert not torch.allclose(yh, mid, atol=1e-3)
    xg = x.clone().requires_grad_(True)
    W.color_jitter(xg, preset="universal", generator=gen(27)).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def test_errors():
    with pytest.raises(ValueError, match="B must be"):
        W.random_warp(0, 8, 8)
    with pytest.raises(ValueError, match="kind"):
        W.random_warp(1, 8, 8, "perspective")
    with pytest.raises(ValueError, match="preset"):
        W.random_warp(1, 8, 8, preset="nope")
    with pytest.raises(ValueError, match="scale"):
        W.random_warp(1, 8, 8, scale=-1.0)
    with pytest.raises(ValueError, match="grid"):
        W.tps_warp_params(1, grid=1)
    with pytest.raises(TypeError, match="dtype"):
        W.random_warp(1, 8, 8, dtype=torch.int64)
    with pytest.raises(ValueError, match="aspect"):
        W.affine_params(1, aspect=0.0)
    w = W.random_warp(2, 8, 8, generator=gen(0))
    with pytest.raises(ValueError, match=r"images must have shape \(B=2, C, H=8, W=8\)"):
        w.apply(torch.rand(2, 3, 8, 9))
    with pytest.raises(TypeError, match="images"):
        w.apply(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"xy must have shape \(B=2, N, 2\)"):
        w.points(torch.rand(3, 4, 2))
    with pytest.raises(TypeError, match="xy"):
        w.points([[1.0, 2.0]])
    with pytest.raises(ValueError, match="values"):
        W.tps_fit(torch.rand(5, 2), torch.rand(5, 2))
    with pytest.raises(ValueError, match="ctrl"):
        W.tps_fit(torch.rand(4, 2), torch.rand(1, 5, 2))
    with pytest.raises(ValueError, match="same batch size"):
        W.Warp([torch.rand(2, 2, 3), torch.rand(3, 2, 3)], (4, 4))
    with pytest.raises(ValueError, match="hue"):
        W.color_jitter(torch.rand(1, 3, 4, 4), hue=0.7)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        W.color_jitter(torch.rand(1, 4, 4, 4))
    with pytest.raises(ValueError, match="then"):
        w.then(W.random_warp(3, 8, 8))


# ---------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------

def test_default_photos_load_offline():
    for name in DEFAULT_PHOTOS:
        im = skimage_photo(name)
        assert im.mode == "RGB" and min(im.size) >= 256
    with pytest.raises(ValueError, match="available without download"):
        skimage_photo("no_such_photo")


@pytest.mark.parametrize("kind,kp_mode,preset", [("tps+affine", "corners", "demystifying"),
                                                  ("tps", "grid", "universal"),
                                                  ("affine", "corners", "universal")])
def test_dataset_pairs_are_exact_and_in_bounds(kind, kp_mode, preset):
    S = 64
    ds = WarpsDataset(n_pairs=3, size=S, kind=kind, n_kps=10, seed=3, kp_mode=kp_mode, preset=preset)
    assert len(ds) == 3 and ds.default_thr == "image"
    names, matched, shuffled = set(), [], []
    for i in range(3):
        p = ds[i]
        assert p.src_image.shape == (3, S, S) and p.trg_image.shape == (3, S, S)
        assert p.src_kps.shape == (10, 2) and p.valid.dtype == torch.bool and p.thr == float(S)
        assert p.category == DEFAULT_PHOTOS[i % len(DEFAULT_PHOTOS)] and p.category in ds.categories
        assert bool(((p.src_kps >= 0) & (p.src_kps <= S - 1)).all())
        v = p.valid
        assert int(v.sum()) >= 3
        assert bool(((p.trg_kps[v] >= 0) & (p.trg_kps[v] <= S - 1)).all())
        warp = ds.get_warp(i)
        q = warp.to(dtype=torch.float64).points(p.src_kps.double()[None])[0]
        assert torch.allclose(p.trg_kps[v].double(), q[v], atol=1e-3)
        # the target image at the target keypoints shows the source image at the source keypoints
        a, b = sample(p.trg_image, p.trg_kps[v], S), sample(p.src_image, p.src_kps[v], S)
        matched.append((a - b).abs().mean(0))
        shuffled.append((a - b.roll(1, dims=1)).abs().mean(0))
        names.add(p.trg_name)
        assert p.src_name in p.trg_name and "/" not in p.pair_id
    assert len(names) == 3
    # bilinear resampling blurs corners on a 64-px canvas, so compare with mismatched points
    assert float(torch.cat(matched).mean()) < 0.5 * float(torch.cat(shuffled).mean())


def sample(img, xy, S):
    g = W.pixel_to_norm(xy, S, S).view(1, 1, -1, 2).float()
    return F.grid_sample(img[None], g, align_corners=False)[0, :, 0]


def test_dataset_deterministic_in_any_order_and_seed_dependent():
    kw = dict(n_pairs=4, size=48, n_kps=6)
    a = build_dataset("warps", seed=5, **kw)
    b = WarpsDataset(seed=5, **kw)
    pa = [a[i] for i in range(4)]
    pb = [b[i] for i in reversed(range(4))][::-1]
    for x, y in zip(pa, pb):
        assert torch.equal(x.trg_image, y.trg_image) and torch.equal(x.src_kps, y.src_kps)
        assert torch.equal(x.trg_kps, y.trg_kps) and torch.equal(x.valid, y.valid)
        assert x.trg_name == y.trg_name
    c = WarpsDataset(seed=6, **kw)[1]
    assert not torch.equal(c.trg_image, pa[1].trg_image)
    assert c.trg_name != pa[1].trg_name and c.src_name == pa[1].src_name
    assert torch.equal(a[-1].trg_image, pa[3].trg_image)


def test_dataset_custom_images_canvas_and_color():
    img = torch.rand(3, 40, 60, generator=gen(30))
    ds = WarpsDataset(n_pairs=2, images={"noise": img}, canvas=Canvas.resized(32, 48), n_kps=5,
                      kp_mode="grid", color=True, preset="universal")
    p = ds[1]
    assert p.trg_image.shape == (3, 32, 48) and p.thr == 48.0 and p.category == "noise"
    assert "color" in p.trg_name and p.src_name == "warps/noise/resize32x48"
    ds0 = WarpsDataset(n_pairs=2, images=["chelsea"], size=32, n_kps=4, scale=0.0)
    q = ds0[0]
    assert torch.allclose(q.trg_kps, q.src_kps, atol=1e-4) and bool(q.valid.all())
    assert torch.allclose(q.trg_image, q.src_image, atol=1e-5)


def test_dataset_errors():
    with pytest.raises(ValueError, match="n_pairs"):
        WarpsDataset(n_pairs=0)
    with pytest.raises(ValueError, match="either size or canvas"):
        WarpsDataset(size=64, canvas=Canvas.resized(64, 64))
    with pytest.raises(ValueError, match="kind"):
        WarpsDataset(kind="flow")
    with pytest.raises(ValueError, match="kp_mode"):
        WarpsDataset(kp_mode="random")
    with pytest.raises(ValueError, match="available without download"):
        WarpsDataset(images=["not_a_photo"])
    with pytest.raises(ValueError, match="preset"):
        WarpsDataset(preset="nope")
    ds = WarpsDataset(n_pairs=2, size=32)
    with pytest.raises(IndexError, match="out of range"):
        ds[2]
