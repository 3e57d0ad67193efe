"""Conformance suite: every correlation-family op, on every available backend, against the reference.

One file, parametrised over backends (fixture ``backend`` in conftest.py: "cpu", "triton" under the
interpreter without a GPU, "cuda" where built and a GPU exists), dtypes, and shapes that include
N = 1, C = 1 and sizes that are not multiples of any tile (also with tiles forced tiny).
"""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from semcorr_fast import ops
from semcorr_fast import reference as ref

@pytest.fixture(autouse=True)
def _cuda_kernel_ops_only(request):
    """backend="cuda" exists only for the ops with CUDA C++ kernels (the GPU path of the others is
    Triton); their tests also run in tests/test_cuda_kernels.py."""
    if request.node.callspec.params.get("backend") if hasattr(request.node, "callspec") else None:
        b = request.node.callspec.params.get("backend")
        if b == "cuda" and not any(k in request.node.name for k in ("window_soft_argmax", "window_grad", "match_topk",
                                                                    "topk_retrieval", "target_permutation")):
            pytest.skip("this op has no CUDA C++ kernel (its GPU path is backend='triton')")


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (B, Ns, (H, W), C)
SHAPES = [
    (1, 1, (1, 1), 1),
    (2, 5, (3, 4), 1),
    (1, 37, (5, 7), 19),
    (3, 70, (9, 13), 33),
    (2, 200, (29, 31), 20),  # crosses the default fp32 tiles (192 rows × 768 targets)
    (2, 150, (11, 14), 64),  # C a multiple of 32: bf16 backward with bf16 gradient GEMMs (cpu)
]
TRITON_SHAPES = SHAPES[:4]

TOL = {  # (atol, rtol) on coordinates / similarities for outputs computed from identical inputs
    torch.float32: (2e-4, 2e-4),
    torch.float64: (1e-9, 1e-9),
    torch.bfloat16: (3e-3, 3e-3),
    torch.float16: (3e-3, 3e-3),
}


def shapes_for(backend):
    return TRITON_SHAPES if backend == "triton" else SHAPES


def skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels have no fp64 path (fp64 is the reference/CPU gradcheck path)")


def make(shape, dtype, device, seed=0, planted=False):
    B, Ns, (H, W), C = shape
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randn(B, H * W, C, generator=g, dtype=torch.float64)
    if planted:  # each query is a noisy copy of one target: a clear argmax, no near-ties
        idx = torch.randint(0, H * W, (B, Ns), generator=g)
        src = torch.gather(tgt, 1, idx[..., None].expand(B, Ns, C)) + 0.05 * torch.randn(B, Ns, C, generator=g, dtype=torch.float64)
    else:
        src = torch.randn(B, Ns, C, generator=g, dtype=torch.float64)
    return src.to(dtype).to(device), tgt.to(dtype).to(device)


def close(a, b, dtype, scale=1.0):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(a.double().cpu(), b.double().cpu(), atol=atol * scale, rtol=rtol, equal_nan=True)


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("si", range(len(SHAPES)))
@pytest.mark.parametrize("normalize", [True, False])
def test_soft_argmax_values(backend, device, dtype, si, normalize):
    skip_unsupported(backend, dtype)
    if si >= len(shapes_for(backend)):
        pytest.skip("shape too large for this backend's test budget")
    shape = SHAPES[si]
    src, tgt = make(shape, dtype, device)
    tau = 0.1 if normalize else 2.0
    out = ops.soft_argmax(src, tgt, tau, shape[2], normalize=normalize, backend=backend)
    exp = ref.soft_argmax(src, tgt, tau, shape[2], normalize)
    assert out.shape == (shape[0], shape[1], 2) and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    close(out, exp, dtype, scale=max(shape[2]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("si", range(len(SHAPES)))
@pytest.mark.parametrize("outside", ["exclude", "zero"])
@pytest.mark.parametrize("radius", [0, 1, 3])
def test_window_soft_argmax_values(backend, device, dtype, si, outside, radius):
    skip_unsupported(backend, dtype)
    if si >= len(shapes_for(backend)):
        pytest.skip("shape too large for this backend's test budget")
    shape = SHAPES[si]
    src, tgt = make(shape, dtype, device, planted=True)
    # with C = 1 every cosine is ±1: exact ties in math, near-ties in floating point; use raw products
    norm = shape[3] > 1
    tau = 0.05
    out = ops.window_soft_argmax(src, tgt, tau, shape[2], radius, outside=outside, normalize=norm, backend=backend)
    exp = ref.window_soft_argmax(src, tgt, tau, shape[2], radius, outside, norm)
    close(out, exp, dtype, scale=max(shape[2]))


def check_topk(v, i, src, tgt, k, mask, normalize, dtype):
    """Values must match; indices must match wherever the reference has no near-tie."""
    rv, ri = ref.match_topk(src, tgt, k, mask, normalize)
    close(v, rv, dtype)
    atol = TOL[dtype][0] * 4
    i, ri = i.cpu(), ri.cpu()
    s = ref.similarity(src, tgt, normalize).cpu().double()
    rvd = rv.cpu().double()
    for b, u, j in itertools.product(*(range(n) for n in ri.shape)):
        if ri[b, u, j] == i[b, u, j]:
            continue
        # a mismatch is only allowed between (near-)tied candidates
        assert i[b, u, j] >= 0 and ri[b, u, j] >= 0, (b, u, j, i[b, u], ri[b, u])
        assert abs(s[b, u, i[b, u, j]] - rvd[b, u, j]) <= atol + 1e-3 * abs(rvd[b, u, j]), (b, u, j)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("si", range(len(SHAPES)))
@pytest.mark.parametrize("k", [1, 3, 40])
@pytest.mark.parametrize("masked", [False, True])
def test_match_topk_values(backend, device, dtype, si, k, masked):
    skip_unsupported(backend, dtype)
    if si >= len(shapes_for(backend)):
        pytest.skip("shape too large for this backend's test budget")
    shape = SHAPES[si]
    src, tgt = make(shape, dtype, device, seed=1)
    mask = None
    if masked:
        mask = torch.rand(tgt.shape[:2], generator=torch.Generator().manual_seed(2)) > 0.4
        mask[0] = False  # a batch item with no valid target at all
        mask = mask.to(device)
    v, i = ops.match_topk(src, tgt, k, tgt_mask=mask, backend=backend)
    assert v.shape == i.shape == (shape[0], shape[1], k) and i.dtype == torch.int64
    check_topk(v, i, src, tgt, k, mask, True, dtype)
    if masked:
        assert (i[0] == -1).all() and (v[0] == -torch.inf).all()
        ok = i >= 0
        assert mask.gather(1, i.clamp(min=0).flatten(1)).view_as(i)[ok].all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_match_topk_ties_lowest_index(backend, device, dtype, small_tiles):
    skip_unsupported(backend, dtype)
    # integer features, raw dot products: exact arithmetic, many exact ties
    g = torch.Generator().manual_seed(3)
    src = torch.randint(-2, 3, (2, 23, 4), generator=g).to(dtype).to(device)
    tgt = torch.randint(-2, 3, (2, 77, 4), generator=g).to(dtype).to(device)
    v, i = ops.match_topk(src, tgt, 5, normalize=False, backend=backend)
    rv, ri = ref.match_topk(src, tgt, 5, None, False)
    assert torch.equal(i.cpu(), ri.cpu())
    assert torch.equal(v.cpu().double(), rv.cpu().double())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("si", range(len(SHAPES)))
def test_mutual_nn_values(backend, device, dtype, si):
    skip_unsupported(backend, dtype)
    if si >= len(shapes_for(backend)):
        pytest.skip("shape too large for this backend's test budget")
    shape = SHAPES[si]
    src, tgt = make(shape, dtype, device, planted=True)
    norm = shape[3] > 1  # C = 1: cosines are ±1 (ties); use raw products
    s2t, t2s, mu = ops.mutual_nn(src, tgt, normalize=norm, backend=backend)
    rs2t, rt2s, rmu = ref.mutual_nn(src, tgt, norm)
    assert torch.equal(s2t.cpu(), rs2t.cpu())
    # columns can have near-ties among rows (several queries planted on one target): compare values
    s = ref.similarity(src, tgt, norm).double().cpu()
    best = s.max(dim=1).values
    got = s.gather(1, t2s.cpu()[:, None, :]).squeeze(1)
    torch.testing.assert_close(got, best, atol=TOL[dtype][0] * 4, rtol=0)
    assert torch.equal(mu.cpu(), (torch.gather(t2s.cpu(), 1, s2t.cpu()) == torch.arange(shape[1])))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mutual_nn_ties(backend, device, dtype, small_tiles):
    skip_unsupported(backend, dtype)
    g = torch.Generator().manual_seed(4)
    src = torch.randint(-2, 3, (2, 41, 3), generator=g).to(dtype).to(device)
    tgt = torch.randint(-2, 3, (2, 53, 3), generator=g).to(dtype).to(device)
    got = ops.mutual_nn(src, tgt, normalize=False, backend=backend)
    exp = ref.mutual_nn(src, tgt, normalize=False)
    for a, b in zip(got, exp):
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("si", range(len(SHAPES)))
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_instance_matching_distance_values(backend, device, dtype, si, normalize, masked):
    skip_unsupported(backend, dtype)
    if si >= len(shapes_for(backend)):
        pytest.skip("shape too large for this backend's test budget")
    shape = SHAPES[si]
    src, tgt = make(shape, dtype, device, seed=5)
    sm = tm = None
    if masked:
        g = torch.Generator().manual_seed(6)
        sm = (torch.rand(src.shape[:2], generator=g) > 0.3).to(device)
        tm = (torch.rand(tgt.shape[:2], generator=g) > 0.3).to(device)
    d = ops.instance_matching_distance(src, tgt, src_mask=sm, tgt_mask=tm, normalize=normalize, backend=backend)
    e = ref.instance_matching_distance(src, tgt, sm, tm, normalize)
    assert d.shape == (shape[0],)
    close(d, e, dtype, scale=10)


def test_instance_matching_distance_empty_masks(backend, device):
    src, tgt = make((3, 6, (2, 3), 4), torch.float32, device)
    sm = torch.ones(3, 6, dtype=torch.bool, device=device)
    tm = torch.ones(3, 6, dtype=torch.bool, device=device)
    sm[0] = False  # no valid source row
    tm[1] = False  # no valid target row
    d = ops.instance_matching_distance(src, tgt, src_mask=sm, tgt_mask=tm, backend=backend).cpu()
    assert torch.isnan(d[0]) and torch.isnan(d[1]) and torch.isfinite(d[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_ncc_and_softmax_t_values(backend, device, dtype, normalize):
    skip_unsupported(backend, dtype)
    src, tgt = make((2, 13, (3, 5), 7), dtype, device)
    s = ops.ncc(src, tgt, normalize=normalize, backend=backend)
    assert s.shape == (2, 13, 15) and s.dtype == dtype
    close(s, ref.ncc(src, tgt, normalize), dtype, scale=4)
    p = ops.softmax_t(s, 0.3, backend=backend)
    close(p, ref.softmax_t(s, 0.3), dtype)
    if backend != "triton":
        close(ops.softmax_t(s, 0.3, dim=1, backend=backend), ref.softmax_t(s, 0.3, dim=1), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("exclude_self", [False, True])
def test_topk_retrieval(backend, device, dtype, exclude_self):
    g = torch.Generator().manual_seed(7)
    db = torch.randn(301, 9, generator=g).to(dtype)
    q = db[:40].clone().to(device)
    v, i = ops.topk_retrieval(q, db, 6, exclude_self=exclude_self, chunk_size=64, backend=backend)
    rv, ri = ref.topk_retrieval(q.cpu(), db, 6, True, exclude_self)
    close(v, rv, dtype)
    # same check as match_topk: mismatching indices only between near-ties
    s = ref.similarity(q.cpu()[None], db[None], True)[0].double()
    for u, j in itertools.product(range(40), range(6)):
        if i[u, j] != ri[u, j]:
            assert abs(s[u, i[u, j]] - rv[u, j].double()) <= 1e-3 * 4
    if exclude_self:
        assert not (i.cpu() == torch.arange(40)[:, None]).any()
    else:
        assert torch.equal(i[:, 0].cpu(), torch.arange(40))


# ----------------------------------------------------------------------------- gradients
def grad_pair(fn, src, tgt, seed=0):
    src = src.detach().clone().requires_grad_(True)
    tgt = tgt.detach().clone().requires_grad_(True)
    out = fn(src, tgt)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    (out * w).sum().backward()
    return out, src.grad, tgt.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("si", range(len(SHAPES)))
@pytest.mark.parametrize("normalize", [True, False])
def test_soft_argmax_grad_matches_reference(backend, device, dtype, si, normalize, small_tiles):
    skip_unsupported(backend, dtype)
    if si >= len(shapes_for(backend)):
        pytest.skip("shape too large for this backend's test budget")
    shape = SHAPES[si]
    src, tgt = make(shape, dtype, device, seed=8)
    tau = 0.2 if normalize else 3.0
    _, gs, gt = grad_pair(lambda a, b: ops.soft_argmax(a, b, tau, shape[2], normalize=normalize, backend=backend), src, tgt)
    _, rs, rt = grad_pair(lambda a, b: ref.soft_argmax(a, b, tau, shape[2], normalize), src, tgt)
    assert gs.dtype == dtype and gt.dtype == dtype
    scale = 10 * max(shape[2]) * (1 if dtype in (torch.float32, torch.float64) else 10)
    close(gs, rs, dtype, scale=scale)
    close(gt, rt, dtype, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("outside", ["exclude", "zero"])
@pytest.mark.parametrize("si", [1, 2, 3])
def test_window_grad_matches_reference(backend, device, dtype, outside, si):
    skip_unsupported(backend, dtype)
    shape = SHAPES[si]
    src, tgt = make(shape, dtype, device, seed=9, planted=True)
    fn = lambda a, b: ops.window_soft_argmax(a, b, 0.1, shape[2], 2, outside=outside, backend=backend)  # noqa: E731
    rfn = lambda a, b: ref.window_soft_argmax(a, b, 0.1, shape[2], 2, outside)  # noqa: E731
    _, gs, gt = grad_pair(fn, src, tgt)
    _, rs, rt = grad_pair(rfn, src, tgt)
    scale = 10 * max(shape[2]) * (1 if dtype in (torch.float32, torch.float64) else 10)
    close(gs, rs, dtype, scale=scale)
    close(gt, rt, dtype, scale=scale)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_fp64(backend, device, normalize, small_tiles):
    skip_unsupported(backend, torch.float64)
    g = torch.Generator().manual_seed(10)
    src = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, device=device, requires_grad=True)
    tgt = torch.randn(2, 12, 3, generator=g, dtype=torch.float64, device=device, requires_grad=True)
    tau = 0.5 if normalize else 2.0
    assert torch.autograd.gradcheck(
        lambda a, b: ops.soft_argmax(a, b, tau, (3, 4), normalize=normalize, backend=backend), (src, tgt))
    for outside in ("exclude", "zero"):
        assert torch.autograd.gradcheck(
            lambda a, b: ops.window_soft_argmax(a, b, tau, (3, 4), 1, outside=outside, normalize=normalize,
                                                backend=backend), (src, tgt))
    assert torch.autograd.gradcheck(lambda a, b: ops.ncc(a, b, normalize=normalize, backend=backend), (src, tgt))
    sim = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: ops.softmax_t(s, 0.7, backend=backend), (sim,))


def test_zero_norm_rows_gradient_is_defined(backend, device):
    skip_unsupported(backend, torch.float64)
    src, tgt = make((1, 4, (2, 3), 5), torch.float64, device)
    src[0, 1] = 0  # a zero feature vector: ‖x‖ ≤ ε branch of the normalisation
    tgt[0, 2] = 0
    _, gs, gt = grad_pair(lambda a, b: ops.soft_argmax(a, b, 0.3, (2, 3), backend=backend), src, tgt)
    _, rs, rt = grad_pair(lambda a, b: ref.soft_argmax(a, b, 0.3, (2, 3), True), src, tgt)
    close(gs, rs, torch.float64, scale=1e12)
    close(gt, rt, torch.float64, scale=1e12)


# ----------------------------------------------------------------------------- NaN and degenerate input
def test_nan_behaviour(backend, device):
    src, tgt = make((1, 6, (3, 4), 5), torch.float32, device, planted=True)
    src[0, 2, 0] = torch.nan  # one query row of NaN: its outputs are NaN / never chosen
    tgt[0, 7, 1] = torch.nan  # one NaN target: never chosen; every soft-argmax row sees it
    sa = ops.soft_argmax(src, tgt, 0.1, (3, 4), backend=backend)
    assert torch.isnan(sa).all()  # every row's softmax includes the NaN target
    v, i = ops.match_topk(src, tgt, 2, backend=backend)
    assert (i[0, 2] == -1).all() and (v[0, 2] == -torch.inf).all()
    assert not (i == 7).any()
    w = ops.window_soft_argmax(src, tgt, 0.1, (3, 4), 1, backend=backend)
    assert torch.isnan(w[0, 2]).all()
    s2t, t2s, mu = ops.mutual_nn(src, tgt, backend=backend)
    assert s2t[0, 2] == -1 and not mu[0, 2] and t2s[0, 7] == -1


def test_empty_query_rows(backend, device):
    src = torch.zeros(2, 0, 4, device=device)
    tgt = torch.randn(2, 6, 4, device=device)
    assert ops.soft_argmax(src, tgt, 0.1, (2, 3), backend=backend).shape == (2, 0, 2)
    assert ops.window_soft_argmax(src, tgt, 0.1, (2, 3), backend=backend).shape == (2, 0, 2)
    v, i = ops.match_topk(src, tgt, 2, backend=backend)
    assert v.shape == i.shape == (2, 0, 2)


def test_k_larger_than_targets(backend, device):
    src, tgt = make((1, 3, (1, 2), 4), torch.float32, device)
    v, i = ops.match_topk(src, tgt, 5, backend=backend)
    assert (i[..., 2:] == -1).all() and (v[..., 2:] == -torch.inf).all() and (i[..., :2] >= 0).all()


# ----------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), ns=st.integers(1, 9), h=st.integers(1, 5), w=st.integers(1, 5),
       c=st.integers(1, 6), k=st.integers(1, 4))
def test_property_target_permutation_permutes_indices(backend, device, seed, ns, h, w, c, k):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(1, ns, c, generator=g)
    tgt = torch.randn(1, h * w, c, generator=g)
    s = ref.similarity(src, tgt, True)[0]
    srt = s.sort(dim=-1, descending=True).values
    kk = min(k + 1, h * w)
    assume(h * w < 2 or (srt[:, : kk - 1] - srt[:, 1:kk]).min() > 1e-4)  # no near-ties in the top k
    perm = torch.randperm(h * w, generator=g)
    _, i1 = ops.match_topk(src.to(device), tgt.to(device), k, backend=backend)
    _, i2 = ops.match_topk(src.to(device), tgt[:, perm].to(device), k, backend=backend)
    i1, i2 = i1.cpu(), i2.cpu()
    mapped = torch.where(i2 >= 0, perm[i2.clamp(min=0)], i2)
    assert torch.equal(mapped, i1)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 6), w=st.integers(1, 6))
def test_property_tiny_tau_is_argmax(backend, device, seed, h, w):
    g = torch.Generator().manual_seed(seed)
    n = h * w
    tgt = torch.randn(1, n, 8, generator=g)
    pick = torch.randint(0, n, (1, 5), generator=g)
    src = tgt[:, pick[0]] + 0.01 * torch.randn(1, 5, 8, generator=g)
    s = ref.similarity(src, tgt, True)[0]
    top2 = s.topk(min(2, n), dim=-1).values
    assume(n == 1 or (top2[:, 0] - top2[:, 1]).min() > 0.05)
    out = ops.soft_argmax(src.to(device), tgt.to(device), 1e-4, (h, w), backend=backend).cpu()
    am = s.argmax(-1)
    exp = torch.stack([am % w, am // w], -1).float()
    torch.testing.assert_close(out[0], exp, atol=1e-3, rtol=0)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(1, 6), w=st.integers(1, 6), extra=st.integers(0, 3),
       outside=st.sampled_from(["exclude", "zero"]))
def test_property_full_window_equals_soft_argmax(backend, device, seed, h, w, extra, outside):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(2, 4, 5, generator=g).to(device)
    tgt = torch.randn(2, h * w, 5, generator=g).to(device)
    r = max(h, w) - 1 + extra  # the window covers the whole grid from any centre
    a = ops.window_soft_argmax(src, tgt, 0.2, (h, w), r, outside=outside, backend=backend)
    b = ops.soft_argmax(src, tgt, 0.2, (h, w), backend=backend)
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=1e-4, rtol=1e-4)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100.0))
def test_property_cosine_is_scale_invariant(backend, device, seed, scale):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(1, 7, 6, generator=g).to(device)
    tgt = torch.randn(1, 12, 6, generator=g).to(device)
    a = ops.soft_argmax(src, tgt, 0.3, (3, 4), backend=backend)
    b = ops.soft_argmax(src * scale, tgt, 0.3, (3, 4), backend=backend)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_reference_sanity():
    """The oracle itself, on cases whose answer is known by construction."""
    f = torch.eye(6)[None]
    torch.testing.assert_close(ref.soft_argmax(f, f, 1e-4, (2, 3), True),
                               ref.coordinate_grid(2, 3)[None], atol=1e-6, rtol=0)
    v, i = ref.match_topk(f, f, 2, None, True)
    assert i[0, :, 0].tolist() == list(range(6)) and i[0, 0, 1] == 1  # ties (all 0) → lowest index
    assert ref.instance_matching_distance(f, f).item() == 0.0


# ----------------------------------------------------------------------------- compile / custom ops
def test_custom_ops_opcheck():
    src, tgt = make((2, 5, (2, 3), 4), torch.float32, "cpu")
    src.requires_grad_(True)
    tgt.requires_grad_(True)
    from semcorr_fast.ops import correlation as C
    torch.library.opcheck(C._soft_argmax_op, (src, tgt, 0.3, 2, 3, True, "cpu"))
    torch.library.opcheck(C._window_op, (src, tgt, 0.3, 2, 3, 1, True, True, "cpu"))
    torch.library.opcheck(C._ncc_op, (src, tgt, True, "cpu"))
    torch.library.opcheck(C._match_topk_op, (src.detach(), tgt.detach(), 2, None, True, "cpu"))
    torch.library.opcheck(C._mutual_nn_op, (src.detach(), tgt.detach(), True, "cpu"))
    torch.library.opcheck(C._imd_op, (src.detach(), tgt.detach(), None, None, False, "cpu"))


def test_torch_compile_soft_argmax():
    src, tgt = make((2, 9, (3, 4), 6), torch.float32, "cpu")
    src.requires_grad_(True)

    def f(a, b):
        return ops.soft_argmax(a, b, 0.2, (3, 4), backend="cpu").square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(src, tgt)
    (g,) = torch.autograd.grad(loss, src)
    loss_e = f(src, tgt)
    (ge,) = torch.autograd.grad(loss_e, src)
    torch.testing.assert_close(loss, loss_e)
    torch.testing.assert_close(g, ge)


# ----------------------------------------------------------------------------- memory
def test_no_ns_by_nt_matrix_forward_and_backward():
    """A 16,384² problem (1 GiB as an fp32 matrix) runs fwd+bwd in far less peak memory."""
    code = textwrap.dedent("""
        import resource, torch
        from semcorr_fast import ops
        n, c = 16384, 8
        a = torch.randn(1, n, c, requires_grad=True); b = torch.randn(1, n, c, requires_grad=True)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = ops.soft_argmax(a, b, 0.1, (128, 128), backend="cpu")
        out.sum().backward()
        v, i = ops.match_topk(a.detach(), b.detach(), 3, backend="cpu")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - base) / 1024)
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert res.returncode == 0, res.stderr
    extra_mib = float(res.stdout.strip().splitlines()[-1])
    assert extra_mib < 256, f"peak grew by {extra_mib:.0f} MiB; an Ns×Nt fp32 matrix is 1024 MiB"


# ============================================================================= training-loss family
LOSS_SHAPES = SHAPES[:4] + [(2, 150, (17, 19), 12), (2, 130, (9, 15), 64)]


def skip_loss(backend, dtype, fn, si=0):
    skip_unsupported(backend, dtype)
    if backend == "triton":
        import semcorr_fast.kernels as k
        if not hasattr(k, fn):
            pytest.skip(f"the Triton backend has no {fn} yet")
        if si >= len(TRITON_SHAPES) and not torch.cuda.is_available():
            pytest.skip("the interpreter runs the Triton loss kernels on the small shapes only (CI time)")


def make_target(shape, device, seed=11, dtype=torch.float32):
    B, Ns, (H, W), _ = shape
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(B, Ns, 2, generator=g) * torch.tensor([W - 1, H - 1]) if H * W > 1 else torch.zeros(B, Ns, 2)
    t[..., : max(1, Ns // 3), :] = t[..., : max(1, Ns // 3), :].round()  # some targets exactly on a cell centre
    return t.to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("si", range(len(LOSS_SHAPES)))
@pytest.mark.parametrize("p", [1.0, 0.5, 2.0])
def test_expected_cost_values_and_grads(backend, device, dtype, si, p, small_tiles):
    skip_loss(backend, dtype, "expected_cost_fwd", si)
    shape = LOSS_SHAPES[si]
    src, tgt = make(shape, dtype, device, seed=12)
    t = make_target(shape, device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    fn = lambda a, b: ops.expected_cost(a, b, 0.2, t, shape[2], p=p, backend=backend)  # noqa: E731
    rfn = lambda a, b: ref.expected_cost(a, b, 0.2, t, shape[2], p)  # noqa: E731
    out, gs, gt = grad_pair(fn, src, tgt)
    rout, rs, rt = grad_pair(rfn, src, tgt)
    assert out.shape == shape[:2]
    scale = max(shape[2])
    close(out, rout, dtype, scale=scale)
    gscale = 10 * scale * (1 if dtype in (torch.float32, torch.float64) else 10)
    close(gs, rs, dtype, scale=gscale)
    close(gt, rt, dtype, scale=gscale)
    assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("si", range(len(LOSS_SHAPES)))
def test_softmax_aggregate_values_and_grads(backend, device, dtype, si, small_tiles):
    skip_loss(backend, dtype, "softmax_aggregate_fwd", si)
    shape = LOSS_SHAPES[si]
    src, tgt = make(shape, dtype, device, seed=13)
    vals = make((shape[0], shape[1], shape[2], 5), dtype, device, seed=14)[1]
    vals = vals.detach().clone().requires_grad_(True)
    src = src.detach().clone().requires_grad_(True)
    tgt = tgt.detach().clone().requires_grad_(True)
    w = torch.randn(shape[0], shape[1], 5, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    out = ops.softmax_aggregate(src, tgt, vals, 0.1, backend=backend)
    (out * w.to(out)).sum().backward()
    got = [src.grad, tgt.grad, vals.grad]
    for x in (src, tgt, vals):
        x.grad = None
    rout = ref.softmax_aggregate(src, tgt, vals, 0.1)
    (rout * w.to(rout)).sum().backward()
    close(out, rout, dtype, scale=4)
    scale = 40 * (1 if dtype in (torch.float32, torch.float64) else 10)
    for g, r in zip(got, [src.grad, tgt.grad, vals.grad]):
        close(g, r, dtype, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("si", range(len(LOSS_SHAPES)))
@pytest.mark.parametrize("loss", ["ce", "mse", "l1"])
def test_rowsoftmax_distill_values_and_grads(backend, device, dtype, si, loss, small_tiles):
    skip_loss(backend, dtype, "rowsoftmax_distill_fwd", si)
    B, Ns, hw, C = LOSS_SHAPES[si]
    s_src, s_tgt = make((B, Ns, hw, C), dtype, device, seed=16)
    t_src, t_tgt = make((B, Ns, hw, C + 7), dtype, device, seed=17)  # teacher has other channels
    fn = lambda a, b: ops.rowsoftmax_distill(t_src, t_tgt, a, b, 0.2, 0.4, loss=loss, backend=backend)  # noqa: E731
    rfn = lambda a, b: ref.rowsoftmax_distill(t_src, t_tgt, a, b, 0.2, 0.4, loss)  # noqa: E731
    out, gs, gt = grad_pair(fn, s_src, s_tgt)
    rout, rs, rt = grad_pair(rfn, s_src, s_tgt)
    close(out, rout, dtype, scale=4)
    scale = 40 * (1 if dtype in (torch.float32, torch.float64) else 10)
    close(gs, rs, dtype, scale=scale)
    close(gt, rt, dtype, scale=scale)


def test_distill_teacher_gets_no_gradient(backend, device):
    skip_loss(backend, torch.float32, "rowsoftmax_distill_fwd")
    s_src, s_tgt = make((1, 6, (2, 4), 5), torch.float32, device)
    t_src, t_tgt = make((1, 6, (2, 4), 9), torch.float32, device, seed=3)
    t_src.requires_grad_(True)
    s_src.requires_grad_(True)
    ops.rowsoftmax_distill(t_src, t_tgt, s_src, s_tgt, 0.2, 0.4, loss="mse", backend=backend).sum().backward()
    assert t_src.grad is None and s_src.grad is not None


def test_gradcheck_losses_fp64(backend, device, small_tiles):
    skip_loss(backend, torch.float64, "expected_cost_fwd")
    g = torch.Generator().manual_seed(18)
    src = torch.randn(2, 5, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    tgt = torch.randn(2, 12, 3, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    vals = torch.randn(2, 12, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    t = make_target((2, 5, (3, 4), 3), device, dtype=torch.float64)
    for p in (1.0, 0.5):
        assert torch.autograd.gradcheck(lambda a, b: ops.expected_cost(a, b, 0.4, t, (3, 4), p=p, backend=backend),
                                        (src, tgt))
    assert torch.autograd.gradcheck(lambda a, b, v: ops.softmax_aggregate(a, b, v, 0.4, backend=backend),
                                    (src, tgt, vals))
    ts = torch.randn(2, 5, 6, generator=g, dtype=torch.float64).to(device)
    tt = torch.randn(2, 12, 6, generator=g, dtype=torch.float64).to(device)
    for loss in ("ce", "mse", "l1"):
        assert torch.autograd.gradcheck(
            lambda a, b: ops.rowsoftmax_distill(ts, tt, a, b, 0.3, 0.5, loss=loss, backend=backend), (src, tgt))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), tau_t=st.floats(0.05, 2.0), tau_s=st.floats(0.05, 2.0))
def test_property_distill(backend, device, seed, tau_t, tau_s):
    """ce ≥ entropy of a (Gibbs); mse = l1 = 0 and ce = entropy when teacher = student at the same τ."""
    if backend == "triton":
        skip_loss(backend, torch.float32, "rowsoftmax_distill_fwd")
    g = torch.Generator().manual_seed(seed)
    f_src = torch.randn(1, 7, 6, generator=g, dtype=torch.float64).to(device)
    f_tgt = torch.randn(1, 10, 6, generator=g, dtype=torch.float64).to(device)
    s_src = torch.randn(1, 7, 4, generator=g, dtype=torch.float64).to(device)
    s_tgt = torch.randn(1, 10, 4, generator=g, dtype=torch.float64).to(device)
    if backend == "triton":
        f_src, f_tgt, s_src, s_tgt = (x.float() for x in (f_src, f_tgt, s_src, s_tgt))
    a = torch.softmax(ref.similarity(f_src, f_tgt, True) / tau_t, -1)
    entropy = -(a * a.clamp_min(1e-300).log()).sum(-1)
    ce = ops.rowsoftmax_distill(f_src, f_tgt, s_src, s_tgt, tau_t, tau_s, loss="ce", backend=backend)
    assert (ce.double() >= entropy.double() - 1e-4).all()
    same_ce = ops.rowsoftmax_distill(f_src, f_tgt, f_src, f_tgt, tau_t, tau_t, loss="ce", backend=backend)
    torch.testing.assert_close(same_ce.double(), entropy.double(), atol=1e-4, rtol=1e-4)
    for loss in ("mse", "l1"):
        z = ops.rowsoftmax_distill(f_src, f_tgt, f_src, f_tgt, tau_t, tau_t, loss=loss, backend=backend)
        assert z.abs().max() < 1e-4


def test_temperature_conventions_agree(backend, device):
    """Demystifying's code scales each unit vector by t (logits = t²·cos): the same numbers as τ = 1/t²."""
    skip_loss(backend, torch.float32, "expected_cost_fwd")
    src, tgt = make((2, 9, (4, 5), 6), torch.float64 if backend != "triton" else torch.float32, device, seed=19)
    t = 20.0  # EQ's ×20 per vector
    scaled_src = torch.nn.functional.normalize(src, dim=-1) * t
    scaled_tgt = torch.nn.functional.normalize(tgt, dim=-1) * t
    target = make_target((2, 9, (4, 5), 6), device, dtype=src.dtype)
    tau = ops.tau_from_logit_scale(t)
    a = ops.expected_cost(src, tgt, tau, target, (4, 5), backend=backend)
    b = ops.expected_cost(scaled_src, scaled_tgt, 1.0, target, (4, 5), normalize=False, backend=backend)
    torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)
    # CLIP-style: the cosine multiplied once by t
    assert ops.tau_from_logit_scale(t, per_vector=False) == pytest.approx(1 / t)
    c = ops.rowsoftmax_distill(src, tgt, src, tgt, ops.tau_from_logit_scale(10.0), tau, loss="mse", backend=backend)
    d = ops.rowsoftmax_distill(torch.nn.functional.normalize(src, dim=-1) * 10, torch.nn.functional.normalize(tgt, dim=-1) * 10,
                               scaled_src, scaled_tgt, 1.0, 1.0, loss="mse", normalize=False, backend=backend)
    torch.testing.assert_close(c.double(), d.double(), atol=1e-5, rtol=1e-4)


def test_expected_cost_p_below_one_at_cell_centres(backend, device):
    """p < 1 with targets exactly on cell centres: finite value and finite gradients."""
    skip_loss(backend, torch.float32, "expected_cost_fwd")
    src, tgt = make((1, 12, (3, 4), 5), torch.float32, device, planted=True)
    grid = ref.coordinate_grid(3, 4)[None, :12].to(device)
    for p in (0.25, 0.5):
        _, gs, gt = grad_pair(lambda a, b: ops.expected_cost(a, b, 0.1, grid, (3, 4), p=p, backend=backend), src, tgt)
        assert torch.isfinite(gs).all() and torch.isfinite(gt).all()


def test_losses_opcheck():
    from semcorr_fast.ops import losses as Lo
    src, tgt = make((2, 5, (2, 3), 4), torch.float32, "cpu")
    t = make_target((2, 5, (2, 3), 4), "cpu")
    v = torch.randn(2, 6, 3)
    src.requires_grad_(True)
    tgt.requires_grad_(True)
    torch.library.opcheck(Lo._ec_op, (src, tgt, t, 0.3, 2, 3, 1.0, True, "cpu"))
    torch.library.opcheck(Lo._agg_op, (src, tgt, v.requires_grad_(True), 0.3, True, "cpu"))
    ts, tt = make((2, 5, (2, 3), 7), torch.float32, "cpu", seed=3)
    torch.library.opcheck(Lo._distill_op, (ts, tt, src, tgt, 0.2, 0.4, 1, True, "cpu"))
