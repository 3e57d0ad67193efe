"""Matchers (semcorr_fast.matching) against naive full-similarity implementations of each protocol."""
import pytest
import torch
import torch.nn.functional as F

from semcorr_fast import matching
from semcorr_fast.matching import Matcher, build_matcher, match_keypoints, pose_align, sample_rows


def _map(C, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(C, h, w, generator=g)


def _naive(src_feat, trg_feat, kps, frame_s, frame_t, grid=None, to_pixels="center"):
    """Every anchor's way: upsample both maps, normalise, full similarity, argmax, map back."""
    if grid is not None:
        src_feat = F.interpolate(src_feat[None], size=grid, mode="bilinear", align_corners=False)[0]
        trg_feat = F.interpolate(trg_feat[None], size=grid, mode="bilinear", align_corners=False)[0]
    C, hs, ws = src_feat.shape
    _, ht, wt = trg_feat.shape
    a = F.normalize(src_feat.reshape(C, -1).t(), dim=-1)
    b = F.normalize(trg_feat.reshape(C, -1).t(), dim=-1)
    sim = a @ b.t()                                              # (hs·ws, ht·wt): the matrix we avoid
    x0, y0, x1, y1 = frame_s
    cx = ((kps[:, 0] - x0) * ws / (x1 - x0)).floor().long().clamp(0, ws - 1)
    cy = ((kps[:, 1] - y0) * hs / (y1 - y0)).floor().long().clamp(0, hs - 1)
    j = sim[cy * ws + cx].argmax(-1)
    col, row = (j % wt).float(), (j // wt).float()
    X0, Y0, X1, Y1 = frame_t
    sx, sy = (X1 - X0) / wt, (Y1 - Y0) / ht
    if to_pixels == "center":
        return torch.stack((X0 + (col + 0.5) * sx, Y0 + (row + 0.5) * sy), -1)
    return torch.stack((X0 + torch.floor(col * sx), Y0 + torch.floor(row * sy)), -1)


def _kps(K, W, H, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(K, 2, generator=g) * torch.tensor([W - 1.0, H - 1.0])


def test_argmax_matches_naive_center():
    s, t = _map(16, 12, 10, 0), _map(16, 12, 10, 1)
    kps = _kps(9, 140, 168)
    frame = (0.0, 0.0, 140.0, 168.0)
    got = match_keypoints(s, t, kps, "argmax", src_frame=frame, trg_frame=frame)
    torch.testing.assert_close(got, _naive(s, t, kps, frame, frame))


def test_demystifying_grid_matches_naive_upsampled():
    s, t = _map(8, 7, 9, 2), _map(8, 6, 5, 3)
    kps = _kps(15, 300, 200, seed=4)
    fs, ft = (0.0, 0.0, 300.0, 200.0), (0.0, 0.0, 250.0, 300.0)
    got = match_keypoints(s, t, kps, "demystifying", src_frame=fs, trg_frame=ft)
    want = _naive(s, t, kps, fs, ft, grid=(128, 128), to_pixels="corner")
    torch.testing.assert_close(got, want)


def test_sample_rows_equals_interpolate_then_index():
    f = _map(5, 6, 7, 5)
    up = F.interpolate(f[None], size=(13, 11), mode="bilinear", align_corners=False)[0]
    g = torch.tensor([[0.2, 0.3], [10.9, 12.99], [5.5, 6.0]])
    rows = sample_rows(f, g, "cell", (13, 11))
    cx, cy = g[:, 0].floor().long(), g[:, 1].floor().long()
    torch.testing.assert_close(rows, up[:, cy, cx].t())


def test_shift_is_recovered_with_padded_frame():
    # target = source shifted by 2 cells right, 1 down; the maps cover a padded frame (negative origin)
    C, h, w = 32, 10, 10
    base = _map(C, h + 4, w + 4, 7)
    s = base[:, 2:2 + h, 2:2 + w]
    t = base[:, 1:1 + h, 0:0 + w]        # t[y, x] = base[y+1, x] = s[y-1, x-2]
    frame = (-20.0, -10.0, 80.0, 90.0)   # 10 px cells
    cells = torch.tensor([[3, 3], [5, 4], [6, 7]], dtype=torch.float32)
    kps = torch.stack((frame[0] + (cells[:, 0] + 0.5) * 10, frame[1] + (cells[:, 1] + 0.5) * 10), -1)
    got = match_keypoints(s, t, kps, "argmax", src_frame=frame, trg_frame=frame)
    torch.testing.assert_close(got, kps + torch.tensor([20.0, 10.0]))
    soft = match_keypoints(s * 50, t * 50, kps, "geoaware", src_frame=frame, trg_frame=frame)
    assert (soft - got).abs().max() < 5.0   # a window soft-argmax near the true cell (sub-cell)


def test_window_matches_reference_op():
    from semcorr_fast import reference
    s, t = _map(8, 9, 9, 8), _map(8, 9, 9, 9)
    kps = _kps(6, 90, 90, 10)
    frame = (0.0, 0.0, 90.0, 90.0)
    m = build_matcher("geoaware", radius=2)
    got = match_keypoints(s, t, kps, m, src_frame=frame, trg_frame=frame)
    rows = sample_rows(s, matching.to_grid(kps, frame, (9, 9)))
    g = reference.correlation.window_soft_argmax(rows[None], t.reshape(8, -1).t()[None], 0.02, (9, 9), 2, "zero", True)[0]
    torch.testing.assert_close(got, (g + 0.5) * 10.0, atol=1e-4, rtol=1e-4)


def test_nan_keypoints_and_mask():
    s, t = _map(4, 5, 5, 11), _map(4, 5, 5, 12)
    kps = torch.tensor([[10.0, 10.0], [float("nan"), 3.0]])
    frame = (0.0, 0.0, 50.0, 50.0)
    got = match_keypoints(s, t, kps, "argmax", src_frame=frame, trg_frame=frame)
    assert torch.isfinite(got[0]).all() and torch.isnan(got[1]).all()
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[4, 4] = True
    got = match_keypoints(s, t, kps[:1], "argmax", src_frame=frame, trg_frame=frame, trg_mask=mask)
    torch.testing.assert_close(got, torch.tensor([[45.0, 45.0]]))


def test_errors_name_the_argument():
    f = _map(4, 5, 5)
    fr = (0.0, 0.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="src_feat"):
        match_keypoints(f[0], f, torch.zeros(1, 2), "argmax", src_frame=fr, trg_frame=fr)
    with pytest.raises(ValueError, match="src_kps"):
        match_keypoints(f, f, torch.zeros(3), "argmax", src_frame=fr, trg_frame=fr)
    with pytest.raises(ValueError, match="same C"):
        match_keypoints(f, f[:2], torch.zeros(1, 2), "argmax", src_frame=fr, trg_frame=fr)
    with pytest.raises(ValueError, match="trg_frame"):
        match_keypoints(f, f, torch.zeros(1, 2), "argmax", src_frame=fr, trg_frame=(0, 0, 0, 1))
    with pytest.raises(ValueError, match="unknown preset"):
        build_matcher("nope")
    with pytest.raises(ValueError, match="kind"):
        Matcher("bogus")


def test_pose_align_picks_flip_and_uses_partner():
    # The re-encoded flipped source looks like the target (up to noise); the identity pose does not.
    C, h, w = 24, 8, 8
    W = 80.0
    s, t = _map(C, h, w, 13), _map(C, h, w, 14)
    frame = (0.0, 0.0, W, W)
    # keypoints 0 and 1 are a left/right pair, 2 is a singleton
    perm = torch.tensor([1, 0, 2])
    kps = torch.tensor([[15.0, 25.0], [65.0, 25.0], [45.0, 55.0]])
    # on the mirrored target, part 0 (left) is at the mirror of where part 1 was, and vice versa
    valid = torch.tensor([True, True, True])
    feats = {"identity": s, "flip": t + 0.01 * _map(C, h, w, 15)}
    frames = {"identity": frame, "flip": frame}
    pred, chosen, scores = pose_align(feats, t, kps, valid, "argmax", canvas_hw=(80, 80), src_frames=frames,
                                      trg_frame=frame, flip_perm=perm, score="imd")
    assert chosen == "flip" and scores["flip"] < scores["identity"]
    want = torch.stack((W - kps[perm, 0], kps[perm, 1]), -1)
    want = (torch.floor(want / 10) + 0.5) * 10
    torch.testing.assert_close(pred, want)
    _, chosen2, _ = pose_align(feats, t, kps, valid, "argmax", canvas_hw=(80, 80), src_frames=frames,
                               trg_frame=frame, flip_perm=perm, score="mutual_nn")
    assert chosen2 == "flip"
    # with the partner of 0 invisible, keypoint 0 keeps its identity-pose prediction
    valid2 = torch.tensor([True, False, True])
    pred2, _, _ = pose_align(feats, t, kps, valid2, "argmax", canvas_hw=(80, 80), src_frames=frames,
                             trg_frame=frame, flip_perm=perm)
    ident = match_keypoints(s, t, kps, "argmax", src_frame=frame, trg_frame=frame)
    torch.testing.assert_close(pred2[0], ident[0])
    torch.testing.assert_close(pred2[2], pred[2])


def test_rotate_query_roundtrip_matches_rot90():
    H, W = 6, 6
    img = torch.zeros(1, H, W)
    img[0, 1, 4] = 1.0                                   # pixel at x=4, y=1 (centre 4.5, 1.5)
    for k in range(4):
        r = torch.rot90(img, k, dims=(-2, -1))
        y, x = (r[0] == 1).nonzero()[0].tolist()
        q = matching.rotate_query(torch.tensor([[4.5, 1.5]]), k, (H, W))
        torch.testing.assert_close(q, torch.tensor([[x + 0.5, y + 0.5]]))
    assert matching.pose_candidates("bottle", "paper")[-1] == "rot270"
    assert matching.pose_candidates("bottle", "code") == ["identity", "flip"]
