"""The CUDA C++ kernels (``backend="cuda"``) of match_topk and window_soft_argmax, against the reference.

The kernels are ``csrc/correlation/correlation.cu``. These tests run only where a GPU is present and
the extension was built with those kernels; elsewhere the whole file is skipped with the reason.
Shapes are chosen to cross every boundary of the kernels' tiling:

* match_topk: 32 query rows per block (Ns = 33, 37, 70, 200), 32 targets per tile (Nt not a multiple
  of 32), 32 channels per shared-memory chunk (C = 1, 19, 33, 70), lists in shared memory for k ≤ 16
  and in the output buffer beyond (k = 16, 17, 40), k > Nt, and the target split with its merge
  (few row blocks and Nt ≥ 512: B = 1, Ns ≤ 32, Nt = 1800 or 2000).
* window_soft_argmax: windows above the forward's 256-logit cache (radius 9 on 29×31), C above the
  backward's shared-memory dQ limit (C > 1536 in fp32, > 768 in fp64), rows whose centre is −1.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from semcorr_fast import _ext, ops
from semcorr_fast import reference as ref
from semcorr_fast.ops import _native


def _skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "no GPU is available"
    if not _ext.loaded():
        return f"the C++ extension is not built ({_ext.error()})"
    if not _ext.has_cuda_kernels():
        return "the extension was built without CUDA kernels (SEMCORR_BUILD_CUDA=1 and nvcc needed)"
    missing = [op for op in ("match_topk", "window_soft_argmax") if not _native.has_cuda_kernel(op)]
    if missing:
        return f"this build has no CUDA C++ kernel for {missing}"
    return None


REASON = _skip_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

DEV = "cuda"
# Shared with the conformance suite: dtypes, tolerances, value checks.
from test_conformance import DTYPES, TOL, check_topk, close  # noqa: E402
from test_conformance import make as _make  # noqa: E402

# (B, Ns, (H, W), C)
TOPK_SHAPES = [
    (1, 1, (1, 1), 1),
    (2, 5, (3, 4), 1),
    (1, 37, (5, 7), 19),
    (3, 70, (9, 13), 33),
    (1, 7, (40, 45), 70),  # one row block: the targets are split, then merged
    (2, 33, (29, 31), 20),
]
WINDOW_SHAPES = [
    (1, 1, (1, 1), 1),
    (2, 5, (3, 4), 1),
    (1, 37, (5, 7), 19),
    (3, 70, (9, 13), 33),
    (2, 45, (29, 31), 20),
]


def make(shape, dtype, seed=0, planted=False, device=DEV):
    return _make(shape, dtype, device, seed=seed, planted=planted)


def integer_features(B, Ns, Nt, C, dtype, seed, device=DEV):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(-2, 3, (B, Ns, C), generator=g).to(dtype).to(device)
    tgt = torch.randint(-2, 3, (B, Nt, C), generator=g).to(dtype).to(device)
    return src, tgt


def out_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- match_topk
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("si", range(len(TOPK_SHAPES)))
@pytest.mark.parametrize("k", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("masked", [False, True])
def test_match_topk_values(dtype, si, k, masked):
    shape = TOPK_SHAPES[si]
    src, tgt = make(shape, dtype, seed=1)
    mask = None
    if masked:
        mask = torch.rand(tgt.shape[:2], generator=torch.Generator().manual_seed(2)) > 0.4
        mask[0] = False  # a batch item with no valid target at all
        mask = mask.to(DEV)
    v, i = ops.match_topk(src, tgt, k, tgt_mask=mask, backend="cuda")
    assert v.shape == i.shape == (shape[0], shape[1], k)
    assert v.dtype == out_dtype(dtype) and i.dtype == torch.int64 and v.is_cuda and i.is_cuda
    check_topk(v, i, src, tgt, k, mask, True, dtype)
    if masked:
        assert (i[0] == -1).all() and (v[0] == -torch.inf).all()
        ok = i >= 0
        assert mask.gather(1, i.clamp(min=0).flatten(1)).view_as(i)[ok].all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Ns,Nt,C", [(2, 23, 77, 4), (1, 5, 2000, 3), (3, 41, 300, 5), (1, 33, 1025, 2)])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_match_topk_ties_lowest_index(dtype, B, Ns, Nt, C, k):
    # integer features, raw dot products: exact arithmetic, many exact ties (also across target splits)
    src, tgt = integer_features(B, Ns, Nt, C, dtype, seed=3)
    v, i = ops.match_topk(src, tgt, k, normalize=False, backend="cuda")
    rv, ri = ref.match_topk(src, tgt, k, None, False)
    assert torch.equal(i.cpu(), ri.cpu())
    assert torch.equal(v.cpu().double(), rv.cpu().double())


@pytest.mark.parametrize("Nt,k", [(2, 5), (40, 50), (1, 1), (700, 800)])
def test_match_topk_k_larger_than_targets(Nt, k):
    src, tgt = make((2, 3, (1, Nt), 4), torch.float32, seed=4)
    v, i = ops.match_topk(src, tgt, k, backend="cuda")
    assert (i[..., Nt:] == -1).all() and (v[..., Nt:] == -torch.inf).all() and (i[..., :Nt] >= 0).all()
    check_topk(v, i, src, tgt, k, None, True, torch.float32)


@pytest.mark.parametrize("Nt", [12, 1500])
def test_match_topk_nan(Nt):
    src, tgt = make((1, 6, (1, Nt), 5), torch.float32, planted=True)
    src[0, 2, 0] = torch.nan  # a NaN query row: every slot empty
    tgt[0, 7, 1] = torch.nan  # a NaN target: never chosen
    v, i = ops.match_topk(src, tgt, 3, backend="cuda")
    assert (i[0, 2] == -1).all() and (v[0, 2] == -torch.inf).all()
    assert not (i == 7).any()
    check_topk(v, i, src, tgt, 3, None, True, torch.float32)


def test_match_topk_empty_rows():
    src = torch.zeros(2, 0, 4, device=DEV)
    tgt = torch.randn(2, 6, 4, device=DEV)
    v, i = ops.match_topk(src, tgt, 2, backend="cuda")
    assert v.shape == i.shape == (2, 0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_topk_retrieval_cuda(dtype):
    g = torch.Generator().manual_seed(7)
    db = torch.randn(301, 9, generator=g).to(dtype)
    q = db[:40].clone().to(DEV)
    v, i = ops.topk_retrieval(q, db, 6, exclude_self=True, chunk_size=64, backend="cuda")
    rv, ri = ref.topk_retrieval(q.cpu(), db, 6, True, True)
    close(v, rv, dtype)
    s = ref.similarity(q.cpu()[None], db[None], True)[0].double()
    for u, j in itertools.product(range(40), range(6)):
        if i[u, j] != ri[u, j]:
            assert abs(s[u, i[u, j]] - rv[u, j].double()) <= 1e-3 * 4
    assert not (i.cpu() == torch.arange(40)[:, None]).any()


# ----------------------------------------------------------------------------- window_soft_argmax forward
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("si", range(len(WINDOW_SHAPES)))
@pytest.mark.parametrize("outside", ["exclude", "zero"])
@pytest.mark.parametrize("radius", [0, 1, 3, 9])  # 9: 361 cells, past the 256-logit cache
def test_window_soft_argmax_values(dtype, si, outside, radius):
    shape = WINDOW_SHAPES[si]
    src, tgt = make(shape, dtype, planted=True)
    norm = shape[3] > 1  # C = 1: cosines are ±1 (ties); use raw products
    out = ops.window_soft_argmax(src, tgt, 0.05, shape[2], radius, outside=outside, normalize=norm, backend="cuda")
    exp = ref.window_soft_argmax(src, tgt, 0.05, shape[2], radius, outside, norm)
    assert out.shape == (shape[0], shape[1], 2) and out.dtype == out_dtype(dtype) and out.is_cuda
    close(out, exp, dtype, scale=max(shape[2]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zero_outside", [False, True])
@pytest.mark.parametrize("B,Ns,H,W,C,radius", [(2, 23, 7, 11, 4, 2), (1, 5, 40, 50, 3, 1), (1, 9, 25, 25, 2, 10)])
def test_window_fwd_matches_cpu_kernel_on_ties(dtype, zero_outside, B, Ns, H, W, C, radius):
    """Centres (argmax, ties → lowest index) equal the CPU kernel's exactly; out and lse are close."""
    src, tgt = integer_features(B, Ns, H * W, C, dtype, seed=5)
    E = torch.ops.semcorr_ext
    out, lse, cen = E.window_soft_argmax_fwd(src, tgt, 0.7, H, W, radius, zero_outside, False)
    o2, l2, c2 = E.window_soft_argmax_fwd(src.cpu(), tgt.cpu(), 0.7, H, W, radius, zero_outside, False)
    assert cen.dtype == torch.int64 and out.dtype == lse.dtype == out_dtype(dtype)
    assert torch.equal(cen.cpu(), c2)
    close(out, o2, dtype, scale=max(H, W))
    close(lse, l2, dtype, scale=10)


@pytest.mark.parametrize("outside", ["exclude", "zero"])
def test_window_nan(outside):
    src, tgt = make((1, 6, (3, 4), 5), torch.float32, planted=True)
    src[0, 2, 0] = torch.nan  # a NaN query row: centre −1, output NaN
    tgt[0, 7, 1] = torch.nan  # a NaN target: NaN for the rows whose window holds it
    out = ops.window_soft_argmax(src, tgt, 0.1, (3, 4), 1, outside=outside, backend="cuda")
    assert torch.isnan(out[0, 2]).all()
    close(out, ref.window_soft_argmax(src, tgt, 0.1, (3, 4), 1, outside, True), torch.float32, scale=4)
    _, lse, cen = torch.ops.semcorr_ext.window_soft_argmax_fwd(src, tgt, 0.1, 3, 4, 1, outside == "zero", True)
    assert cen[0, 2] == -1 and torch.isnan(lse[0, 2]) and (cen != 7).all()


@pytest.mark.parametrize("outside", ["exclude", "zero"])
def test_window_full_window_equals_soft_argmax_reference(outside):
    src, tgt = make((2, 9, (5, 6), 7), torch.float32, seed=11)
    a = ops.window_soft_argmax(src, tgt, 0.2, (5, 6), 5, outside=outside, backend="cuda")
    b = ref.soft_argmax(src, tgt, 0.2, (5, 6), True)
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-4, rtol=1e-4)


def test_window_empty_rows():
    E = torch.ops.semcorr_ext
    src = torch.zeros(2, 0, 4, device=DEV)
    tgt = torch.randn(2, 6, 4, device=DEV)
    assert ops.window_soft_argmax(src, tgt, 0.1, (2, 3), backend="cuda").shape == (2, 0, 2)
    out, lse, cen = E.window_soft_argmax_fwd(src, tgt, 0.1, 2, 3, 1, False, True)
    assert out.shape == (2, 0, 2) and lse.shape == cen.shape == (2, 0)
    ds, dt = E.window_soft_argmax_bwd(out, src, tgt, out, lse, cen, 0.1, 2, 3, 1, False, True)
    assert ds.shape == src.shape and torch.equal(dt.cpu(), torch.zeros(2, 6, 4))


# ----------------------------------------------------------------------------- window_soft_argmax backward
def grad_pair(fn, src, tgt, seed=0):
    src = src.detach().clone().requires_grad_(True)
    tgt = tgt.detach().clone().requires_grad_(True)
    out = fn(src, tgt)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    (out * w).sum().backward()
    return out, src.grad, tgt.grad


GRAD_SHAPES = [
    ((1, 1, (1, 1), 3), 2),
    ((2, 5, (3, 4), 1), 2),
    ((1, 37, (5, 7), 19), 2),
    ((3, 70, (9, 13), 33), 2),
    ((2, 45, (29, 31), 20), 9),  # windows past the forward's logit cache
    ((1, 6, (5, 6), 1600), 2),   # C past the shared-memory dQ limit (fp32 and fp64)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("outside", ["exclude", "zero"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("gi", range(len(GRAD_SHAPES)))
def test_window_grad_matches_reference(dtype, outside, normalize, gi):
    shape, radius = GRAD_SHAPES[gi]
    norm = normalize and shape[3] > 1
    src, tgt = make(shape, dtype, seed=9, planted=True)
    if not norm:  # keep raw logits O(1)
        src, tgt = src / shape[3] ** 0.5, tgt / shape[3] ** 0.5
    tau = 0.1
    fn = lambda a, b: ops.window_soft_argmax(a, b, tau, shape[2], radius, outside=outside,  # noqa: E731
                                             normalize=norm, backend="cuda")
    rfn = lambda a, b: ref.window_soft_argmax(a, b, tau, shape[2], radius, outside, norm)  # noqa: E731
    _, gs, gt = grad_pair(fn, src, tgt)
    _, rs, rt = grad_pair(rfn, src, tgt)
    assert gs.dtype == dtype and gt.dtype == dtype and gs.is_cuda and gt.is_cuda
    scale = 10 * max(shape[2]) * (1 if dtype in (torch.float32, torch.float64) else 10)
    close(gs, rs, dtype, scale=scale)
    close(gt, rt, dtype, scale=scale)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("outside", ["exclude", "zero"])
@pytest.mark.parametrize("B,Ns,H,W,C,radius", [(2, 5, 3, 4, 3, 1), (1, 4, 6, 7, 33, 2), (1, 3, 2, 2, 1, 0)])
def test_gradcheck_fp64(normalize, outside, B, Ns, H, W, C, radius):
    g = torch.Generator().manual_seed(10)
    src = torch.randn(B, Ns, C, generator=g, dtype=torch.float64).to(DEV).requires_grad_(True)
    tgt = torch.randn(B, H * W, C, generator=g, dtype=torch.float64).to(DEV).requires_grad_(True)
    tau = 0.5 if normalize else 2.0
    assert torch.autograd.gradcheck(
        lambda a, b: ops.window_soft_argmax(a, b, tau, (H, W), radius, outside=outside, normalize=normalize,
                                            backend="cuda"), (src, tgt))


@pytest.mark.parametrize("outside", ["exclude", "zero"])
def test_zero_norm_rows_gradient_matches_cpu_kernel(outside):
    src, tgt = make((1, 4, (2, 3), 5), torch.float64, planted=True)
    src[0, 1] = 0  # zero feature vectors: the ‖x‖ ≤ ε branch of the normalisation backward
    tgt[0, 2] = 0
    fn = lambda dev: (lambda a, b: ops.window_soft_argmax(a, b, 0.3, (2, 3), 1, outside=outside,  # noqa: E731
                                                          backend=dev))
    out, gs, gt = grad_pair(fn("cuda"), src, tgt)
    out_c, gs_c, gt_c = grad_pair(fn("cpu"), src.cpu(), tgt.cpu())
    close(out, out_c, torch.float64)
    close(gs, gs_c, torch.float64, scale=1e12)
    close(gt, gt_c, torch.float64, scale=1e12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("zero_outside", [False, True])
def test_window_bwd_matches_cpu_kernel(dtype, zero_outside):
    """Raw ops, CUDA against CPU, including a row whose centre is −1 (NaN query)."""
    E = torch.ops.semcorr_ext
    src, tgt = make((2, 40, (9, 10), 21), dtype, seed=12, planted=True)
    src[1, 3] = torch.nan
    out, lse, cen = E.window_soft_argmax_fwd(src, tgt, 0.2, 9, 10, 2, zero_outside, True)
    assert cen[1, 3] == -1
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(13), dtype=torch.float64).to(out)
    ds, dt = E.window_soft_argmax_bwd(grad, src, tgt, out, lse, cen, 0.2, 9, 10, 2, zero_outside, True)
    ds_c, dt_c = E.window_soft_argmax_bwd(grad.cpu(), src.cpu(), tgt.cpu(), out.cpu(), lse.cpu(), cen.cpu(), 0.2,
                                          9, 10, 2, zero_outside, True)
    assert ds.dtype == dt.dtype == dtype
    close(ds, ds_c, dtype, scale=100)
    close(dt, dt_c, dtype, scale=100)


# ----------------------------------------------------------------------------- input checks
def test_raw_op_input_checks():
    E = torch.ops.semcorr_ext
    src, tgt = make((1, 4, (2, 3), 6), torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        E.match_topk(src.transpose(1, 2).contiguous().transpose(1, 2), tgt, 2, None, True)
    with pytest.raises(RuntimeError):
        E.match_topk(src, tgt.cpu(), 2, None, True)
    with pytest.raises(RuntimeError, match="H\\*W"):
        E.window_soft_argmax_fwd(src, tgt, 0.1, 2, 2, 1, False, True)
    with pytest.raises(RuntimeError, match="k must be"):
        E.match_topk(src, tgt, 0, None, True)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        E.match_topk(src.to(torch.int32), tgt.to(torch.int32), 1, None, True)
