"""Tests of semcorr_fast.metrics: hand-computed examples, properties, error messages."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from semcorr_fast import metrics as M

NAN = float("nan")
HSET = settings(max_examples=40, deadline=None)


def T(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def B(x):
    return torch.tensor(x, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------------
# PCK: hand-computed
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_pck_strict_boundary(dtype):
    # e = 5 exactly (3-4-5), d = 0.1 * 50 = 5: wrong under '<', right under '<='; e = 4 right in both.
    pred = T([[[3.0, 4.0], [4.0, 0.0]]], dtype)
    gt = T([[[0.0, 0.0], [0.0, 0.0]]], dtype)
    thr = T([50.0], dtype)
    assert M.pck(pred, gt, thr, 0.1).item() == 0.5
    assert M.pck(pred, gt, thr, 0.1, inclusive=True).item() == 1.0
    out = M.pck(pred, gt, thr, 0.1)
    assert out.dim() == 0 and out.dtype == torch.promote_types(dtype, torch.float32)


def test_pck_alpha_sequence_shape_and_values():
    pred = T([[[3.0, 4.0], [1.0, 0.0]]])
    gt = torch.zeros(1, 2, 2)
    thr = T([50.0])
    out = M.pck(pred, gt, thr, [0.01, 0.05, 0.1, 0.2])
    assert out.shape == (4,)
    assert out.tolist() == [0.0, 0.5, 0.5, 1.0]       # d = 0.5, 2.5, 5, 10; errors 5 and 1
    assert M.pck(pred, gt, thr, (0.1,)).shape == (1,)
    assert M.pck(pred, gt, thr, torch.tensor([0.05, 0.2])).tolist() == [0.5, 1.0]
    assert M.pck(pred, gt, thr, torch.tensor(0.2)).dim() == 0


def test_pck_per_image_vs_per_point():
    # pair 0: 1 of 1 correct; pair 1: 1 of 3 correct -> image (1 + 1/3)/2 = 2/3, point 2/4
    gt = torch.zeros(2, 3, 2)
    pred = T([[[0, 0], [0, 0], [0, 0]], [[0, 0], [9, 0], [9, 0]]])
    valid = B([[True, False, False], [True, True, True]])
    thr = T([10.0, 10.0])
    assert M.pck(pred, gt, thr, 0.1, valid=valid).item() == pytest.approx(2 / 3)
    assert M.pck(pred, gt, thr, 0.1, valid=valid, per="point").item() == pytest.approx(0.5)


def test_pck_pairs_without_valid_keypoints_are_skipped_and_all_empty_is_nan():
    gt = torch.zeros(3, 2, 2)
    pred = T([[[0, 0], [9, 9]], [[9, 9], [9, 9]], [[0, 0], [0, 0]]])
    valid = B([[True, True], [False, False], [True, False]])
    thr = T([10.0, NAN, 10.0])            # thr of the empty pair is ignored, NaN is fine there
    assert M.pck(pred, gt, thr, 0.1, valid=valid).item() == pytest.approx((0.5 + 1.0) / 2)
    assert M.pck(pred, gt, thr, 0.1, valid=valid, per="point").item() == pytest.approx(2 / 3)
    none = torch.zeros(3, 2, dtype=torch.bool)
    for per in ("image", "point"):
        assert math.isnan(M.pck(pred, gt, thr, 0.1, valid=none, per=per).item())
        assert torch.isnan(M.pck(pred, gt, thr, [0.1, 0.2], valid=none, per=per)).all()
    assert math.isnan(M.pck(torch.zeros(0, 3, 2), torch.zeros(0, 3, 2), torch.zeros(0), 0.1).item())


def test_pck_nan_and_inf_predictions_are_wrong():
    gt = torch.zeros(1, 4, 2)
    pred = T([[[0, 0], [NAN, 0], [0, NAN], [math.inf, 0]]])
    thr = T([1e30])
    assert M.pck(pred, gt, thr, 1.0).item() == 0.25
    assert M.pck_dagger(pred, gt, thr, 1.0).item() == 0.25


def test_pck_invalid_gt_may_hold_garbage():
    gt = T([[[0, 0], [NAN, NAN]]])
    pred = T([[[0, 0], [5, 5]]])
    valid = B([[True, False]])
    assert M.pck(pred, gt, T([10.0]), 0.1, valid=valid).item() == 1.0
    assert M.pck_dagger(pred, gt, T([10.0]), 0.1, valid=valid).item() == 1.0


# ---------------------------------------------------------------------------------------------------------
# PCK†
# ---------------------------------------------------------------------------------------------------------

def test_pck_dagger_below_pck_when_landing_on_another_gt():
    # GT0 (0,0), GT1 (4,0); kp0 predicted on GT1: e = 4 < d = 5 (PCK right) but nearest GT is GT1 (PCK† wrong)
    gt = T([[[0, 0], [4, 0]]])
    pred = T([[[4, 0], [4, 0]]])
    thr = T([50.0])
    assert M.pck(pred, gt, thr, 0.1).item() == 1.0
    assert M.pck_dagger(pred, gt, thr, 0.1).item() == 0.5
    # if GT1 is not a valid keypoint it is no candidate for "nearest"
    valid = B([[True, False]])
    assert M.pck_dagger(pred, gt, thr, 0.1, valid=valid).item() == 1.0


def test_pck_dagger_threshold_interplay():
    # own GT nearest but outside d: not counted; within d and nearest: counted
    gt = T([[[0, 0], [100, 0]]])
    pred = T([[[6, 0], [99, 0]]])
    thr = T([50.0])
    assert M.pck_dagger(pred, gt, thr, 0.1).item() == 0.5
    assert M.pck_dagger(pred, gt, thr, 0.2).item() == 1.0


def test_pck_dagger_ties():
    # duplicate GT keypoints at one location, both predicted there: a tie for the nearest GT.
    gt = T([[[5, 5], [5, 5], [50, 50]]])
    pred = T([[[5, 5], [5, 5], [50, 50]]])
    thr = T([10.0])
    assert M.pck_dagger(pred, gt, thr, 0.1).item() == 1.0                         # Eq. 5: delta == e
    assert M.pck_dagger(pred, gt, thr, 0.1, ties="argmin").item() == pytest.approx(2 / 3)   # first argmin


def test_pck_dagger_per_point_and_sequence():
    gt = T([[[0, 0], [4, 0]], [[0, 0], [40, 0]]])
    pred = T([[[4, 0], [4, 0]], [[1, 0], [40, 3]]])
    thr = T([50.0, 50.0])
    # pair 0: kp0 swap-correct (PCK yes, PCK† no), kp1 yes; pair 1: both yes
    assert M.pck_dagger(pred, gt, thr, 0.1, per="point").item() == 0.75
    assert M.pck_dagger(pred, gt, thr, 0.1).item() == pytest.approx((0.5 + 1) / 2)
    assert M.pck_dagger(pred, gt, thr, [0.01, 0.1]).tolist() == [0.25, 0.75]


# ---------------------------------------------------------------------------------------------------------
# error breakdown
# ---------------------------------------------------------------------------------------------------------

def test_error_breakdown_swap_case():
    # GT0 (0,0), GT1 (10,0), d = 9. kp0 predicted at (8,0): e = 8 < 9 (correct by PCK) but delta = 2 (GT1): swap.
    gt = T([[[0, 0], [10, 0]]])
    pred = T([[[8, 0], [10, 0]]])
    thr = T([90.0])
    out = M.error_breakdown(pred, gt, thr, 0.1, per="point")
    assert out["correct"].item() == 1.0
    assert out["swap"].item() == 0.5
    assert out["miss"].item() == 0.0 and out["jitter"].item() == 0.0
    # PCK - PCK† is the correct-and-swap rate
    assert M.pck(pred, gt, thr, 0.1).item() - M.pck_dagger(pred, gt, thr, 0.1).item() == pytest.approx(0.5)


def test_error_breakdown_jitter_and_miss_cases():
    # one keypoint per pair, d = 10. e = 12: jitter (10 < 12 < 20) and miss (no GT within 10); e = 25: miss only;
    # e = 3: correct only.
    gt = torch.zeros(3, 1, 2)
    pred = T([[[12, 0]], [[0, 25]], [[3, 0]]])
    thr = T([100.0, 100.0, 100.0])
    out = M.error_breakdown(pred, gt, thr, 0.1)
    assert out["jitter"].item() == pytest.approx(1 / 3)
    assert out["miss"].item() == pytest.approx(2 / 3)
    assert out["swap"].item() == 0.0
    assert out["correct"].item() == pytest.approx(1 / 3)
    assert set(out) == {"correct", "miss", "jitter", "swap"}


def test_error_breakdown_jitter_that_is_not_a_miss_is_a_swap():
    gt = T([[[0, 0], [20, 0]]])
    pred = T([[[12, 0], [20, 0]]])                 # kp0: e = 12 in (10, 20), delta = 8 < 10
    out = M.error_breakdown(pred, gt, T([100.0]), 0.1, per="point")
    assert out["jitter"].item() == 0.5 and out["swap"].item() == 0.5 and out["miss"].item() == 0.0


def test_error_breakdown_boundaries_paper_vs_code():
    # e = delta = d exactly (single GT, 3-4-5): paper: neither miss (d < delta) nor jitter (d < e);
    # code: miss (delta >= d) and jitter (d <= e <= 2d). e = 2d exactly: code jitter, paper not.
    gt = torch.zeros(2, 1, 2)
    pred = T([[[3, 4]], [[6, 8]]])
    thr = T([50.0, 50.0])
    p = M.error_breakdown(pred, gt, thr, 0.1, per="point")
    c = M.error_breakdown(pred, gt, thr, 0.1, per="point", convention="code", inclusive=True)
    assert p["miss"].item() == 0.5 and p["jitter"].item() == 0.0 and p["correct"].item() == 0.0
    assert c["miss"].item() == 1.0 and c["jitter"].item() == 1.0 and c["correct"].item() == 0.5


def test_error_breakdown_code_swap_uses_first_argmin():
    gt = T([[[5, 5], [5, 5]]])
    pred = T([[[5, 5], [5, 5]]])
    thr = T([10.0])
    assert M.error_breakdown(pred, gt, thr, 0.1, per="point")["swap"].item() == 0.0
    assert M.error_breakdown(pred, gt, thr, 0.1, per="point", convention="code")["swap"].item() == 0.5


def test_error_breakdown_nan_prediction_is_a_miss_and_sequence_alpha():
    gt = T([[[0, 0], [50, 0]]])
    pred = T([[[NAN, NAN], [50, 1]]])
    out = M.error_breakdown(pred, gt, T([100.0]), [0.05, 0.1], per="point")
    assert out["miss"].tolist() == [0.5, 0.5]
    assert out["jitter"].tolist() == [0.0, 0.0] and out["swap"].tolist() == [0.0, 0.0]
    assert out["correct"].shape == (2,)


# ---------------------------------------------------------------------------------------------------------
# properties
# ---------------------------------------------------------------------------------------------------------

@st.composite
def keypoint_sets(draw, same_count=False):
    """Integer-grid coordinates (many ties and exact-threshold cases), integer thresholds, some NaN
    predictions; the tensors come from a drawn seed (cheap to generate)."""
    P = draw(st.integers(1, 6))
    K = draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    span = draw(st.sampled_from([3, 12, 40]))
    pred = torch.randint(0, span + 1, (P, K, 2), generator=g).float()
    gt = torch.randint(0, span + 1, (P, K, 2), generator=g).float()
    thr = torch.randint(0, 61, (P,), generator=g).float()
    if same_count:
        m = draw(st.integers(1, K))
        order = torch.rand(P, K, generator=g).argsort(-1)
        valid = order < m
    else:
        valid = torch.rand(P, K, generator=g) < draw(st.sampled_from([0.0, 0.5, 0.8, 1.0]))
    nan_rate = draw(st.sampled_from([0.0, 0.0, 0.2]))
    pred[torch.rand(P, K, generator=g) < nan_rate] = NAN
    return pred, gt, thr, valid


ALPHAS = [0.0, 0.01, 0.05, 0.1, 0.15, 0.2, 0.5]


def _le(a, b):
    """a <= b elementwise with NaN == NaN."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return bool(((a <= b + 1e-12) | both_nan).all()) and bool((torch.isnan(a) == torch.isnan(b)).all())


@HSET
@given(keypoint_sets(), st.sampled_from(["image", "point"]), st.booleans())
def test_prop_pck_monotone_in_alpha(data, per, inclusive):
    pred, gt, thr, valid = data
    v = M.pck(pred, gt, thr, ALPHAS, valid=valid, per=per, inclusive=inclusive)
    assert _le(v[:-1], v[1:])
    d = M.pck_dagger(pred, gt, thr, ALPHAS, valid=valid, per=per, inclusive=inclusive)
    assert _le(d[:-1], d[1:])


@HSET
@given(keypoint_sets(), st.sampled_from(["image", "point"]), st.booleans())
def test_prop_dagger_at_most_pck(data, per, inclusive):
    pred, gt, thr, valid = data
    p = M.pck(pred, gt, thr, ALPHAS, valid=valid, per=per, inclusive=inclusive)
    dp = M.pck_dagger(pred, gt, thr, ALPHAS, valid=valid, per=per, inclusive=inclusive)
    da = M.pck_dagger(pred, gt, thr, ALPHAS, valid=valid, per=per, inclusive=inclusive, ties="argmin")
    assert _le(dp, p) and _le(da, dp)


@HSET
@given(keypoint_sets(same_count=True), st.booleans())
def test_prop_point_equals_image_with_equal_counts(data, inclusive):
    pred, gt, thr, valid = data
    for fn in (M.pck, M.pck_dagger):
        a = fn(pred, gt, thr, ALPHAS, valid=valid, per="image", inclusive=inclusive)
        b = fn(pred, gt, thr, ALPHAS, valid=valid, per="point", inclusive=inclusive)
        torch.testing.assert_close(a, b)
    ea = M.error_breakdown(pred, gt, thr, ALPHAS, valid=valid, per="image")
    eb = M.error_breakdown(pred, gt, thr, ALPHAS, valid=valid, per="point")
    for k in ea:
        torch.testing.assert_close(ea[k], eb[k])


@HSET
@given(keypoint_sets(), st.booleans())
def test_prop_breakdown_relations(data, inclusive):
    pred, gt, thr, valid = data
    if not valid.any():
        return
    out = M.error_breakdown(pred, gt, thr, ALPHAS, valid=valid, per="point", inclusive=inclusive)
    p = M.pck(pred, gt, thr, ALPHAS, valid=valid, per="point", inclusive=inclusive)
    d = M.pck_dagger(pred, gt, thr, ALPHAS, valid=valid, per="point", inclusive=inclusive)
    torch.testing.assert_close(out["correct"], p)
    assert bool((out["correct"] + out["miss"] <= 1 + 1e-6).all())      # correct -> a GT within d
    assert bool((out["correct"] + out["jitter"] <= 1 + 1e-6).all())
    if not inclusive:  # strict: PCK - PCK† is exactly the correct-and-swap rate, so at most the swap rate
        assert bool((p - d <= out["swap"] + 1e-6).all())
    for k in ("correct", "miss", "jitter", "swap"):
        assert bool(((out[k] >= 0) & (out[k] <= 1)).all())


@HSET
@given(keypoint_sets(), st.sampled_from(["image", "point"]))
def test_prop_padding_and_pair_order_do_not_matter(data, per):
    pred, gt, thr, valid = data
    P, K = valid.shape
    perm = torch.randperm(P)
    pad = 2
    pred2 = torch.cat((pred, torch.full((P, pad, 2), 3.0)), 1)[perm]
    gt2 = torch.cat((gt, torch.full((P, pad, 2), NAN)), 1)[perm]
    valid2 = torch.cat((valid, torch.zeros(P, pad, dtype=torch.bool)), 1)[perm]
    for fn in (M.pck, M.pck_dagger):
        a = fn(pred, gt, thr, ALPHAS, valid=valid, per=per)
        b = fn(pred2, gt2, thr[perm], ALPHAS, valid=valid2, per=per)
        torch.testing.assert_close(a, b, equal_nan=True)


@HSET
@given(keypoint_sets())
def test_prop_float64_matches_float32_on_integer_data(data):
    pred, gt, thr, valid = data
    a = M.pck(pred, gt, thr, [0.0, 0.5, 1.0], valid=valid)
    b = M.pck(pred.double(), gt.double(), thr.double(), [0.0, 0.5, 1.0], valid=valid)
    assert b.dtype == torch.float64
    torch.testing.assert_close(a.double(), b, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------
# average precision and KAP
# ---------------------------------------------------------------------------------------------------------

def _ap_bruteforce(scores, labels):
    """AP over distinct thresholds, one threshold at a time (scikit-learn's definition)."""
    n_pos = sum(labels)
    if n_pos == 0:
        return NAN
    ap, prev_r = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        sel = [l for s, l in zip(scores, labels) if s >= t]
        tp = sum(sel)
        r = tp / n_pos
        ap += (r - prev_r) * tp / len(sel)
        prev_r = r
    return ap


def test_average_precision_hand_values():
    assert M.average_precision(T([0.9, 0.8, 0.6, 0.5]), B([True, False, True, False])).item() == \
        pytest.approx(0.5 + 0.5 * 2 / 3)
    assert M.average_precision(T([0.5, 0.5]), B([True, False])).item() == pytest.approx(0.5)   # a tie
    assert M.average_precision(T([1.0, -math.inf]), B([False, True])).item() == pytest.approx(0.5)
    assert math.isnan(M.average_precision(T([1.0]), B([False])).item())


@HSET
@given(st.lists(st.tuples(st.integers(0, 5).map(float), st.booleans()), min_size=1, max_size=12))
def test_prop_average_precision_matches_bruteforce(items):
    s = [x for x, _ in items]
    lab = [y for _, y in items]
    got = M.average_precision(T(s), B(lab)).item()
    want = _ap_bruteforce(s, lab)
    if math.isnan(want):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(want)


def _kap_example():
    # 1 pair, 2 keypoints, target grid 1 x 5 (cell j at x = j). GTs at x = 1 and x = 3, r = 0.1 * 10 = 1.
    sim = T([[0.1, 0.9, 0.2, 0.5, 0.3], [0.8, 0.1, 0.2, 0.6, 0.0]]).reshape(1, 2, 1, 5)
    gt = T([[[1.0, 0.0], [3.0, 0.0]]])
    return sim, gt, T([10.0])


def test_kap_hand_example():
    sim, gt, thr = _kap_example()
    v = torch.ones(1, 2, dtype=torch.bool)
    # positives 0.9 (cells 0..2), 0.6 (cells 2..4); negatives 0.5, 0.8 -> ranking + - + -
    want = 0.5 + 0.5 * 2 / 3
    for conv in ("paper", "code"):
        for norm in (False, True):
            assert M.kap(sim, gt, thr, 0.1, valid_src=v, valid_trg=v, normalize=norm,
                         convention=conv).item() == pytest.approx(want)
    # radius 0 (alpha 0): only the GT cell itself is "within"
    assert M.kap(sim, gt, thr, 0.0, valid_src=v, valid_trg=v, normalize=False).item() == pytest.approx(
        M.average_precision(T([0.9, 0.6, 0.5, 0.8]), B([True, True, False, False])).item())
    # strict radius: '< 1' keeps only the GT cell
    assert M.kap(sim, gt, thr, 0.1, valid_src=v, valid_trg=v, normalize=False, inclusive=False).item() == \
        pytest.approx(M.average_precision(T([0.9, 0.6, 0.5, 0.8]), B([True, True, False, False])).item())
    out = M.kap(sim, gt, thr, [0.0, 0.1], valid_src=v, valid_trg=v, normalize=False)
    assert out.shape == (2,) and out[1].item() == pytest.approx(want)


def test_kap_invisible_target_paper_vs_code():
    sim, gt, thr = _kap_example()
    vs = B([[True, True]])
    vt = B([[True, False]])
    gt[0, 1] = NAN                       # an invisible target keypoint's coordinates are ignored
    # paper: kp1 has no positive; its negative is the max over the whole map (0.8) -> scores + 0.9 | - 0.5, 0.8
    assert M.kap(sim, gt, thr, 0.1, valid_src=vs, valid_trg=vt, normalize=False).item() == 1.0
    # code: kp1's GT is (0, 0): positive = max over cells 0..1 = 0.8, negative = max over cells 2..4 = 0.6
    code = M.kap(sim, gt, thr, 0.1, valid_src=vs, valid_trg=vt, normalize=False, convention="code")
    assert code.item() == 1.0
    sim2 = sim.clone()
    sim2[0, 1, 0, 3] = 0.95              # now the code's negative 0.95 outranks every positive
    code2 = M.kap(sim2, gt, thr, 0.1, valid_src=vs, valid_trg=vt, normalize=False, convention="code").item()
    assert code2 == pytest.approx(M.average_precision(T([0.9, 0.8, 0.5, 0.95]), B([1, 1, 0, 0])).item())
    assert M.kap(sim2, gt, thr, 0.1, valid_src=vs, valid_trg=vt, normalize=False).item() == pytest.approx(
        M.average_precision(T([0.9, 0.5, 0.95]), B([1, 0, 0])).item())


def test_kap_source_invisible_rows_are_not_scored_and_no_positive_is_nan():
    sim, gt, thr = _kap_example()
    vs = B([[True, False]])
    vt = B([[True, True]])
    assert M.kap(sim, gt, thr, 0.1, valid_src=vs, valid_trg=vt, normalize=False).item() == 1.0
    none = B([[False, False]])
    assert math.isnan(M.kap(sim, gt, thr, 0.1, valid_src=none, valid_trg=vt).item())
    assert math.isnan(M.kap(sim, gt, thr, 0.1, valid_src=vs, valid_trg=B([[False, False]])).item())


def test_kap_per_point_and_normalisation():
    # two pairs, one keypoint each, GT at x = 1, r = 1 (cells 0..2 within)
    sim = T([[0.1, 0.9, 0.2, 0.5, 0.3], [0.0, 0.3, 0.1, 0.4, 0.2]]).reshape(2, 1, 1, 5)
    gt = T([[[1.0, 0.0]], [[1.0, 0.0]]])
    thr = T([10.0, 10.0])
    v = torch.ones(2, 1, dtype=torch.bool)
    # per image: pair A AP 1, pair B (pos 0.3 < neg 0.4) AP 0.5
    assert M.kap(sim, gt, thr, 0.1, valid_src=v, valid_trg=v).item() == pytest.approx(0.75)
    # pooled raw scores: + .9, - .5, - .4, + .3 -> 0.5 + 0.5 * 2/4
    assert M.kap(sim, gt, thr, 0.1, valid_src=v, valid_trg=v, per="point", normalize=False).item() == \
        pytest.approx(0.75)
    # pooled normalised: A: + 1.0, - 0.5; B: + 0.75, - 1.0 -> tie at 1.0 (P 1/2, R 1/2), then + (P 2/3, R 1)
    assert M.kap(sim, gt, thr, 0.1, valid_src=v, valid_trg=v, per="point").item() == \
        pytest.approx(0.25 + 0.5 * 2 / 3)


def _kap_bruteforce(sim, gt, thr, alpha, vs, vt, convention, normalize, inclusive, per):
    """KAP from the definition, one keypoint at a time with explicit radius masks."""
    P, K, H, W = sim.shape
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64),
                            indexing="ij")
    pooled_s, pooled_l, aps = [], [], []
    for p in range(P):
        S = sim[p].double().reshape(K, -1)
        if normalize and vs[p].any():
            blk = S[vs[p]]
            lo, hi = blk.min(), blk.max()
            S = (S - lo) / (hi - lo) if hi > lo else S - lo
        s_, l_ = [], []
        for k in range(K):
            if not vs[p, k]:
                continue
            g = gt[p, k].double() if (vt[p, k] or convention == "paper") else torch.zeros(2, dtype=torch.float64)
            d2 = ((xs - g[0]) ** 2 + (ys - g[1]) ** 2).reshape(-1)
            r2 = (alpha * float(thr[p])) ** 2
            within = d2 <= r2 if inclusive else d2 < r2
            if convention == "code":
                s_ += [float((S[k] * within).max()), float((S[k] * ~within).max())]
                l_ += [True, False]
            elif vt[p, k]:
                s_ += [float(S[k][within].max()) if within.any() else -math.inf,
                       float(S[k][~within].max()) if (~within).any() else -math.inf]
                l_ += [True, False]
            else:
                s_ += [float(S[k].max())]
                l_ += [False]
        pooled_s += s_
        pooled_l += l_
        if any(l_):
            aps.append(_ap_bruteforce(s_, l_))
    if per == "point":
        return _ap_bruteforce(pooled_s, pooled_l)
    return sum(aps) / len(aps) if aps else NAN


@HSET
@given(st.integers(0, 2**31 - 1), st.integers(1, 4), st.integers(1, 4), st.sampled_from(["paper", "code"]),
       st.booleans(), st.booleans(), st.sampled_from(["image", "point"]))
def test_prop_kap_matches_bruteforce(seed, P, K, convention, normalize, inclusive, per):
    g = torch.Generator().manual_seed(seed)
    H, W = 3, 4
    sim = torch.randint(0, 5, (P, K, H, W), generator=g).float() / 4          # ties are frequent
    gt = torch.randint(0, 4, (P, K, 2), generator=g).float()
    thr = torch.randint(0, 30, (P,), generator=g).float()
    vs = torch.rand(P, K, generator=g) < 0.8
    vt = torch.rand(P, K, generator=g) < 0.6
    alphas = [0.0, 0.05, 0.1, 0.2]
    got = M.kap(sim, gt, thr, alphas, valid_src=vs, valid_trg=vt, convention=convention, normalize=normalize,
                inclusive=inclusive, per=per)
    for i, a in enumerate(alphas):
        want = _kap_bruteforce(sim, gt, thr, a, vs, vt, convention, normalize, inclusive, per)
        if math.isnan(want):
            assert math.isnan(got[i].item())
        else:
            assert got[i].item() == pytest.approx(want, abs=1e-6)


def test_kap_flat_map_with_cell_xy():
    sim, gt, thr = _kap_example()
    v = torch.ones(1, 2, dtype=torch.bool)
    xy = torch.stack((torch.arange(5.0), torch.zeros(5)), -1)          # (N, 2)
    a = M.kap(sim.reshape(1, 2, 5), gt, thr, 0.1, valid_src=v, valid_trg=v, cell_xy=xy)
    b = M.kap(sim, gt, thr, 0.1, valid_src=v, valid_trg=v)
    assert a.item() == pytest.approx(b.item())
    # pixel frame with cell centres at 14 j + 7: GT and threshold scaled accordingly give the same result
    xy_px = xy * 14 + 7
    c = M.kap(sim.reshape(1, 2, 5), gt * 14 + 7, thr * 14, 0.1, valid_src=v, valid_trg=v, cell_xy=xy_px)
    assert c.item() == pytest.approx(b.item())


# ---------------------------------------------------------------------------------------------------------
# geometry-aware subset
# ---------------------------------------------------------------------------------------------------------

# Table 6 of GeoAware-SC (notes seed_geoaware.md §1.1): group sizes per category (bus/car light: 4 in the code).
TABLE6 = {
    "aeroplane": [2] * 9, "bicycle": [2, 2, 2], "bird": [2, 2, 2, 2], "boat": [2] * 6, "bottle": [2] * 5,
    "bus": [2, 4, 2, 4, 4, 4, 4, 4], "car": [2, 4, 2, 2, 4, 4, 4, 4, 4], "cat": [2, 4], "chair": [2, 2, 4, 2, 2, 2],
    "cow": [2, 4, 4, 2], "dog": [2, 4], "horse": [2, 4, 4], "motorbike": [2, 2], "person": [2] * 6,
    "pottedplant": [4, 2, 2], "sheep": [2, 4, 4, 2], "train": [2] * 9, "tvmonitor": [4, 4, 4, 4],
}


def test_geo_table_matches_table6():
    assert set(M.SPAIR_GEO_GROUPS) == set(TABLE6)
    for cat, sizes in TABLE6.items():
        assert [len(g) for g in M.geoaware_groups(cat, groups="semantic")] == sizes, cat
        ids = [i for it in M.SPAIR_GEO_GROUPS[cat] for i in (it[1] if isinstance(it, tuple) else (it,))]
        assert len(ids) == len(set(ids)), cat
    assert M.geoaware_groups("cat", dataset="ap10k", groups="semantic") == [[5, 8], [6, 9, 12, 15],
                                                                          [7, 10, 13, 16], [11, 14]]


def test_geo_subset_cat_rule():
    vs = torch.zeros(15, dtype=torch.bool)
    vt = torch.zeros(15, dtype=torch.bool)
    vs[[2, 3, 9, 10, 11, 0]] = True
    vt[[2, 9, 10, 0, 1]] = True              # ear: only 2 in target; paw: 9, 10 in target; 11 source-only
    geo = M.geoaware_subset("cat", vs, vt)
    assert geo.nonzero().flatten().tolist() == [9, 10]
    vt[3] = True                             # ear now has 2 target-visible -> 2 and 3 (both mutual) are Geo
    assert M.geoaware_subset("cat", vs, vt).nonzero().flatten().tolist() == [2, 3, 9, 10]
    # a group member visible only in the target still makes its partner Geo
    vs2 = torch.zeros(15, dtype=torch.bool)
    vs2[2] = True
    assert M.geoaware_subset("cat", vs2, vt).nonzero().flatten().tolist() == [2]
    # padding beyond the vocabulary is never Geo
    pad = torch.ones(40, dtype=torch.bool)
    assert M.geoaware_subset("cat", pad, pad).nonzero().flatten().tolist() == [2, 3, 9, 10, 11, 12]


def test_geo_code_groups_differ_where_the_table_is_unordered():
    for cat in TABLE6:
        sem = M.geoaware_groups(cat, groups="semantic")
        code = M.geoaware_groups(cat, groups="code")
        if cat in ("bus", "car", "pottedplant", "tvmonitor"):
            assert sem != code, cat
        else:
            assert sem == code, cat
    assert M.geoaware_groups("bus") == [[0, 1], [2, 3, 4, 5], [6, 7], [10, 11, 12, 13], [14, 15, 16, 17],
                                        [18, 19, 20, 21], [22, 23, 24, 25], [26, 27, 28, 29]]
    assert M.geoaware_groups("pottedplant") == [[0, 1, 2, 3], [4, 5], [6, 7]]
    assert M.geoaware_groups("", dataset="ap10k") == [[5, 6], [7, 8, 9, 10], [11, 12, 13, 14], [15, 16]]
    # used_points shifts the code's positions: bus with its unused slots 8, 9 counted as used
    assert M.geoaware_groups("bus", used_points=range(30))[3] == [8, 9, 10, 11]


def test_geo_subset_code_vs_semantic_masks():
    v = torch.zeros(30, dtype=torch.bool)
    v[[5, 6]] = True                                     # bus rear lights
    assert M.geoaware_subset("bus", v, v, groups="semantic").nonzero().flatten().tolist() == [5, 6]
    assert not M.geoaware_subset("bus", v, v).any()     # code groups {2,3,4,5} and {6,7}
    a = torch.zeros(17, dtype=torch.bool)
    a[[5, 8]] = True                                     # AP-10K shoulders
    assert M.geoaware_subset("dog", a, a, dataset="ap10k", groups="semantic").nonzero().flatten().tolist() == [5, 8]
    assert not M.geoaware_subset("dog", a, a, dataset="ap-10k").any()


def test_geo_subset_batched():
    vs = torch.zeros(2, 30, dtype=torch.bool)
    vs[0, [2, 3]] = True
    vs[1, [8, 9]] = True
    geo = M.geoaware_subset(["cat", "person"], vs, vs)
    assert geo.shape == (2, 30)
    assert geo[0].nonzero().flatten().tolist() == [2, 3] and geo[1].nonzero().flatten().tolist() == [8, 9]
    assert M.geoaware_subset("cat", vs, vs)[1].nonzero().flatten().tolist() == []   # 8, 9 are cat singletons


def test_geo_subset_errors():
    v = torch.ones(15, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match="cub"):
        M.geoaware_subset("bird", v, v, dataset="cub")
    with pytest.raises(ValueError, match="unknown SPair-71k category 'tv'"):
        M.geoaware_subset("tv", v, v)
    with pytest.raises(ValueError, match=r"K >= 30"):
        M.geoaware_subset("bus", v, v)
    with pytest.raises(ValueError, match=r"valid_trg must have shape"):
        M.geoaware_subset("cat", v, v[:10])
    with pytest.raises(TypeError, match=r"valid_src must be a bool tensor"):
        M.geoaware_subset("cat", v.float(), v)
    with pytest.raises(ValueError, match="P = 2 names"):
        M.geoaware_subset(["cat"], torch.ones(2, 15, dtype=torch.bool), torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="groups must be one of"):
        M.geoaware_subset("cat", v, v, groups="paper")


# ---------------------------------------------------------------------------------------------------------
# summarize / format_table
# ---------------------------------------------------------------------------------------------------------

def _summary_data():
    # GTs at (0,0), (10,0), (20,0); a correct prediction sits on its GT, a wrong one 100 px to the right.
    gt = T([[[0, 0], [10, 0], [20, 0]]] * 3)
    off = T([[0, 100, 0], [0, 0, 0], [100, 100, 0]])
    pred = gt.clone()
    pred[..., 0] += off
    valid = B([[True, True, True], [True, False, False], [True, True, False]])
    thr = T([10.0, 10.0, 10.0])
    return pred, gt, thr, valid, ["cat", "cat", "dog"]


def test_summarize_hand_values():
    pred, gt, thr, valid, cats = _summary_data()
    geo = B([[False, True, True], [False, False, False], [True, False, False]])
    s = M.summarize(pred, gt, thr, valid, cats, alphas=(0.1,), dagger=True, geo_mask=geo)
    o = s["overall"]
    assert o["pck@0.1/image"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert o["pck@0.1/point"] == pytest.approx(3 / 6)
    assert o["pck_dagger@0.1/image"] == pytest.approx(o["pck@0.1/image"])
    c, d = s["per_category"]["cat"], s["per_category"]["dog"]
    assert c["pck@0.1/image"] == pytest.approx(5 / 6) and c["pck@0.1/point"] == pytest.approx(3 / 4)
    assert d["pck@0.1/image"] == 0.0 and d["pck@0.1/point"] == 0.0
    assert o["geo/pck@0.1/image"] == pytest.approx((0.5 + 0.0) / 2)
    assert o["geo/pck@0.1/point"] == pytest.approx(1 / 3)
    assert math.isnan(s["per_category"]["cat"]["geo/pck@0.1/image"]) is False
    assert (o["n_pairs"], o["n_points"], o["geo/n_pairs"], o["geo/n_points"]) == (3, 6, 2, 3)
    assert (c["n_pairs"], c["n_points"], d["n_pairs"], d["n_points"]) == (2, 4, 1, 2)
    assert s["n_pairs"] == 3 and s["n_points"] == 6
    assert list(s["per_category"]) == ["cat", "dog"]
    assert all(isinstance(v, float) for k, v in o.items() if "@" in k)


def test_summarize_default_alphas_keys_and_dagger_swap():
    pred, gt, thr, valid, cats = _summary_data()
    pred[0, 0] = T([9.0, 0.0])               # pair 0, kp0: within d = 10 of its GT but on GT1 -> a swap
    thr[0] = 100.0
    s = M.summarize(pred, gt, thr, valid, cats, dagger=True)
    keys = set(s["overall"])
    for a in ("0.01", "0.05", "0.1"):
        for fam in ("pck", "pck_dagger"):
            for per in ("image", "point"):
                assert f"{fam}@{a}/{per}" in keys
    assert not any(k.startswith("geo/") for k in keys)
    assert s["overall"]["pck_dagger@0.1/point"] == pytest.approx(2 / 6)
    assert s["overall"]["pck@0.1/point"] == pytest.approx(3 / 6)
    # consistent with the standalone functions
    assert s["overall"]["pck@0.05/image"] == pytest.approx(M.pck(pred, gt, thr, 0.05, valid=valid).item())


def test_summarize_empty_pairs_and_nan():
    pred, gt, thr, valid, cats = _summary_data()
    valid[2] = False
    s = M.summarize(pred, gt, thr, valid, cats, alphas=[0.1])
    assert s["per_category"]["dog"]["n_pairs_empty"] == 1
    assert math.isnan(s["per_category"]["dog"]["pck@0.1/image"])
    assert s["overall"]["pck@0.1/image"] == pytest.approx((2 / 3 + 1) / 2)
    table = M.format_table(s)
    assert table.splitlines()[4].split()[0] == "dog" and " -" in table.splitlines()[4]


def test_format_table_layout():
    pred, gt, thr, valid, cats = _summary_data()
    geo = B([[False, True, True], [False, False, False], [True, False, False]])
    s = M.summarize(pred, gt, thr, valid, cats, dagger=True, geo_mask=geo)
    text = M.format_table(s)
    lines = text.splitlines()
    assert len(lines) == 3 + 2 + 2                  # 2 header lines + rule, 2 categories, rule + "all"
    assert len({len(line) for line in lines}) == 1  # aligned
    assert lines[0].startswith("category") and "PCK@0.1" in lines[0] and "PCK†@0.1" in lines[0]
    assert "Geo PCK@0.1" in lines[0] and "img" in lines[1] and "pt" in lines[1]
    assert [ln.split()[0] for ln in lines[3:5]] == ["cat", "dog"] and lines[-1].split()[0] == "all"
    assert "83.33" in lines[3] and "75.00" in lines[3]    # cat per image / per point at 0.1
    with pytest.raises(TypeError, match="summary must be the dict"):
        M.format_table({"x": 1})


# ---------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------

def _ok():
    return torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), torch.ones(2)


@pytest.mark.parametrize("fn", [M.pck, M.pck_dagger, M.error_breakdown])
def test_shape_and_type_errors(fn):
    pred, gt, thr = _ok()
    with pytest.raises(ValueError, match=r"pred must have shape \(P, K, 2\), got \(2, 3\)"):
        fn(pred[..., 0], gt, thr, 0.1)
    with pytest.raises(ValueError, match=r"gt must have shape \(P, K, 2\) = \(2, 3, 2\).*got \(2, 4, 2\)"):
        fn(pred, torch.zeros(2, 4, 2), thr, 0.1)
    with pytest.raises(ValueError, match=r"thr must have shape \(P,\) = \(2,\), got \(2, 1\)"):
        fn(pred, gt, thr[:, None], 0.1)
    with pytest.raises(ValueError, match=r"valid must have shape \(P, K\) = \(2, 3\), got \(3, 2\)"):
        fn(pred, gt, thr, 0.1, valid=torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"valid must be a bool tensor"):
        fn(pred, gt, thr, 0.1, valid=torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"pred must be a float16, bfloat16, float32 or float64 tensor"):
        fn(pred.long(), gt, thr, 0.1)
    with pytest.raises(TypeError, match=r"gt must be a torch.Tensor"):
        fn(pred, gt.tolist(), thr, 0.1)
    with pytest.raises(ValueError, match=r"per must be one of"):
        fn(pred, gt, thr, 0.1, per="pair")
    with pytest.raises(ValueError, match=r"alpha must be finite and >= 0, got -0.1"):
        fn(pred, gt, thr, -0.1)
    with pytest.raises(ValueError, match=r"alpha must not be an empty sequence"):
        fn(pred, gt, thr, [])
    with pytest.raises(TypeError, match=r"alpha must be a number"):
        fn(pred, gt, thr, "0.1")
    with pytest.raises(TypeError, match=r"inclusive must be a bool"):
        fn(pred, gt, thr, 0.1, inclusive=1)


def test_value_errors():
    pred, gt, thr = _ok()
    bad = gt.clone()
    bad[0, 1, 0] = NAN
    with pytest.raises(ValueError, match=r"gt must be finite at every valid keypoint"):
        M.pck(pred, bad, thr, 0.1)
    with pytest.raises(ValueError, match=r"thr must be finite and >= 0"):
        M.pck(pred, gt, T([1.0, -1.0]), 0.1)
    with pytest.raises(ValueError, match=r"ties must be one of"):
        M.pck_dagger(pred, gt, thr, 0.1, ties="first")
    with pytest.raises(ValueError, match=r"convention must be one of"):
        M.error_breakdown(pred, gt, thr, 0.1, convention="eccv")
    with pytest.raises(ValueError, match=r"categories must hold P = 2 names"):
        M.summarize(pred, gt, thr, None, ["cat"])
    with pytest.raises(TypeError, match=r"categories must be a sequence"):
        M.summarize(pred, gt, thr, None, "cat")
    with pytest.raises(ValueError, match=r"geo_mask must have shape \(P, K\) = \(2, 3\)"):
        M.summarize(pred, gt, thr, None, ["a", "b"], geo_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"scores must not contain NaN"):
        M.average_precision(T([NAN]), B([True]))


def test_kap_errors():
    sim, gt, thr = _kap_example()
    v = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"sim must have shape \(P, K, H, W\) or \(P, K, N\)"):
        M.kap(sim[0, 0], gt, thr, 0.1, valid_src=v, valid_trg=v)
    with pytest.raises(ValueError, match=r"cell_xy \(N, 2\) is required"):
        M.kap(sim.reshape(1, 2, 5), gt, thr, 0.1, valid_src=v, valid_trg=v)
    with pytest.raises(ValueError, match=r"cell_xy must have shape \(H, W, 2\) = \(1, 5, 2\)"):
        M.kap(sim, gt, thr, 0.1, valid_src=v, valid_trg=v, cell_xy=torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"gt must have shape \(P, K, 2\) = \(1, 2, 2\)"):
        M.kap(sim, gt[:, :1], thr, 0.1, valid_src=v, valid_trg=v)
    with pytest.raises(ValueError, match=r"valid_trg must have shape \(P, K\) = \(1, 2\)"):
        M.kap(sim, gt, thr, 0.1, valid_src=v, valid_trg=v[:, :1])
    with pytest.raises(ValueError, match=r"convention must be one of"):
        M.kap(sim, gt, thr, 0.1, valid_src=v, valid_trg=v, convention="sph")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    P, K = 300, 12
    pred = torch.randint(0, 40, (P, K, 2), generator=g).float()
    gt = torch.randint(0, 40, (P, K, 2), generator=g).float()
    thr = torch.randint(5, 200, (P,), generator=g).float()
    valid = torch.rand(P, K, generator=g) > 0.3
    alphas = [0.01, 0.05, 0.1, 0.2]
    dev = torch.device("cuda")
    args_cuda = (pred.to(dev), gt.to(dev), thr.to(dev), alphas)
    for per in ("image", "point"):
        a = M.pck(pred, gt, thr, alphas, valid=valid, per=per)
        b = M.pck(*args_cuda, valid=valid.to(dev), per=per)
        assert b.device.type == "cuda"
        torch.testing.assert_close(a, b.cpu())
        torch.testing.assert_close(M.pck_dagger(pred, gt, thr, alphas, valid=valid, per=per),
                                   M.pck_dagger(*args_cuda, valid=valid.to(dev), per=per).cpu())
        ea = M.error_breakdown(pred, gt, thr, alphas, valid=valid, per=per)
        eb = M.error_breakdown(*args_cuda, valid=valid.to(dev), per=per)
        for k in ea:
            torch.testing.assert_close(ea[k], eb[k].cpu())
    sim = torch.rand(4, K, 8, 8, generator=g)
    vs, vt = torch.rand(4, K, generator=g) > 0.2, torch.rand(4, K, generator=g) > 0.4
    gk, tk = gt[:4] / 5, torch.full((4,), 20.0)
    for per in ("image", "point"):
        a = M.kap(sim, gk, tk, alphas, valid_src=vs, valid_trg=vt, per=per)
        b = M.kap(sim.to(dev), gk.to(dev), tk.to(dev), alphas, valid_src=vs.to(dev), valid_trg=vt.to(dev), per=per)
        torch.testing.assert_close(a, b.cpu())
    s1 = M.summarize(pred, gt, thr, valid, ["a", "b", "c"] * 100, dagger=True)
    s2 = M.summarize(pred.to(dev), gt.to(dev), thr.to(dev), valid.to(dev), ["a", "b", "c"] * 100, dagger=True)
    assert s1["overall"] == pytest.approx(s2["overall"])
