"""Tests of ``semcorr_fast.ops.kabsch`` (weighted Kabsch-Umeyama) against the SVD reference.

Backends: "reference" always; "cpu" when the C++ extension has the kabsch kernels; "cuda" when the
extension has CUDA kernels and a GPU is present. While the package's extension is not built yet
(development), this module JIT-compiles ``csrc/kabsch/kabsch_cpu.cpp`` into a temporary directory
and, for the duration of each native test only, makes ``semcorr_fast._ext`` report it as loaded.
"""
from __future__ import annotations

import doctest
import itertools
import sys
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

from semcorr_fast import _backend
from semcorr_fast.ops.kabsch import (
    KABSCH_DEGENERATE,
    KABSCH_EMPTY,
    KABSCH_NONFINITE,
    KABSCH_OK,
    _kabsch_op,
    apply_similarity,
    kabsch,
    row_matrix_to_similarity,
    similarity_to_row_matrix,
)
from semcorr_fast.reference.kabsch import kabsch_reference



# --------------------------------------------------------------------------------------------------
# Backend availability: the installed extension (semcorr_fast._C); no fallback
# --------------------------------------------------------------------------------------------------

_CPU_REASON = _backend.why_unavailable("cpu", torch.device("cpu"))


def _reason(backend: str) -> str | None:
    if backend == "cpu":
        return _CPU_REASON
    if backend == "cuda":
        return _backend.why_unavailable("cuda", torch.device("cuda"), op="kabsch", cuda_ops=("kabsch",))
    return _backend.why_unavailable(backend, torch.device("cpu"))


def _params(names):
    return [pytest.param(b, marks=pytest.mark.skipif(_reason(b) is not None, reason=str(_reason(b))), id=b)
            for b in names]


ALL = _params(["reference", "cpu", "cuda"])
NATIVE = _params(["cpu", "cuda"])
GRAD = _params(["reference", "cpu"])  # gradcheck (fp64) on CPU tensors


@pytest.fixture
def backend(request):
    return request.param


def _dev(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def random_rotation(B: int, d: int, dtype=torch.float64, gen=None) -> torch.Tensor:
    Q, Rr = torch.linalg.qr(torch.randn(B, d, d, dtype=torch.float64, generator=gen))
    Q = Q * torch.sign(torch.diagonal(Rr, dim1=-2, dim2=-1))[:, None, :]
    Q[:, :, 0] *= torch.sign(torch.linalg.det(Q))[:, None]
    return Q.to(dtype)


def make_problem(B, P, d, *, dtype=torch.float64, noise=0.05, weights="float", seed=0, scale=True):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(B, P, d, dtype=torch.float64, generator=g) * 2 + 3
    R = random_rotation(B, d, gen=g)
    s = torch.rand(B, dtype=torch.float64, generator=g) * 2 + 0.5 if scale else torch.ones(B, dtype=torch.float64)
    t = torch.randn(B, d, dtype=torch.float64, generator=g) * 5
    tgt = s[:, None, None] * src @ R.mT + t[:, None] + noise * torch.randn(B, P, d, dtype=torch.float64, generator=g)
    if weights == "float":
        w = torch.rand(B, P, dtype=torch.float64, generator=g) + 0.05
    elif weights == "mask":
        w = (torch.rand(B, P, generator=g) > 0.3).to(torch.float64)
        w[:, : d + 1] = 1  # enough points in general position
    else:
        w = None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(src), cast(tgt), cast(w), (R.to(dtype), t.to(dtype), s.to(dtype))


def objective(src, tgt, w, R, t, s):
    res = apply_similarity(src, R, t, s) - tgt
    e = (res * res).sum(-1)
    return (e if w is None else w * e).sum(-1)


def tols(dtype):
    return dict(atol=2e-4, rtol=2e-4) if dtype != torch.float64 else dict(atol=1e-9, rtol=1e-9)


def to(dev, *xs):
    return [None if x is None else x.to(dev) for x in xs]


# --------------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", NATIVE, indirect=True)
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("estimate_scale", [False, True], ids=["rigid", "scale"])
@pytest.mark.parametrize("weights", ["float", "mask", None], ids=["w", "mask", "now"])
def test_matches_reference(backend, d, dtype, estimate_scale, weights):
    src, tgt, w, _ = make_problem(37, 23, d, dtype=dtype, weights=weights, seed=d)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    R, t, s, info = kabsch(src, tgt, w, estimate_scale=estimate_scale, backend=backend, return_info=True)
    Rr, tr, sr, infor = kabsch_reference(src, tgt, w, estimate_scale=estimate_scale, return_info=True)
    assert R.dtype == t.dtype == s.dtype == dtype
    assert R.shape == (37, d, d) and t.shape == (37, d) and s.shape == (37,)
    torch.testing.assert_close(R, Rr, **tols(dtype))
    torch.testing.assert_close(t, tr, **tols(dtype))
    torch.testing.assert_close(s, sr, **tols(dtype))
    assert (info == KABSCH_OK).all() and (infor == KABSCH_OK).all()
    if not estimate_scale:
        assert (s == 1).all()


@pytest.mark.parametrize("backend", NATIVE, indirect=True)
@pytest.mark.parametrize("B,P,d", [(1, 3, 3), (1, 2, 2), (2, 3, 3), (1, 4000, 3), (3, 2500, 2), (5, 64, 3)])
def test_shapes_vs_reference(backend, B, P, d):
    src, tgt, w, _ = make_problem(B, P, d, seed=P, noise=0.3)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    out = kabsch(src, tgt, w, estimate_scale=True, backend=backend)
    ref = kabsch_reference(src, tgt, w, estimate_scale=True)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("d", [2, 3])
def test_recovers_known_similarity_with_P_equal_d(backend, d):
    # P = d points in general position already determine the similarity (d = 3: a plane).
    src, tgt, _, (R0, t0, s0) = make_problem(8, d, d, noise=0.0, weights=None, seed=11)
    src, tgt = to(_dev(backend), src, tgt)
    R, t, s, info = kabsch(src, tgt, estimate_scale=True, backend=backend, return_info=True)
    torch.testing.assert_close(R.cpu(), R0, atol=1e-9, rtol=0)
    torch.testing.assert_close(t.cpu(), t0, atol=1e-9, rtol=0)
    torch.testing.assert_close(s.cpu(), s0, atol=1e-9, rtol=0)
    assert (info == KABSCH_OK).all()


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_jamais_vu_workload(backend):
    # 2 x 1024 neighbourhoods of 64 offsets per image, scale clamped at 1 (seed_jamaisvu.md).
    src, tgt, _, _ = make_problem(2048, 64, 3, dtype=torch.float32, noise=0.02, weights=None, seed=5)
    src, tgt = to(_dev(backend), src, tgt)
    R, t, s = kabsch(src, tgt, estimate_scale=True, min_scale=1.0, backend=backend)
    assert (s >= 1).all()
    Rr, tr, sr = kabsch_reference(src.double(), tgt.double(), estimate_scale=True, min_scale=1.0)
    torch.testing.assert_close(R.double(), Rr, atol=1e-4, rtol=0)
    torch.testing.assert_close(s.double(), sr, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(t.double(), tr, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_inputs_compute_in_fp32(backend, dtype):
    src, tgt, w, _ = make_problem(9, 17, 3, dtype=dtype, noise=0.1, seed=3)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    R, t, s = kabsch(src, tgt, w, estimate_scale=True, backend=backend)
    assert R.dtype == t.dtype == s.dtype == torch.float32
    Rr, tr, sr = kabsch_reference(src.float(), tgt.float(), w.float(), estimate_scale=True)
    for a, b in zip((R, t, s), (Rr, tr, sr)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", NATIVE, indirect=True)
def test_non_contiguous_and_bool_mask(backend):
    src, tgt, w, _ = make_problem(6, 20, 3, weights="mask", seed=4)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    src_nc = src.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not src_nc.is_contiguous()
    a = kabsch(src_nc, tgt, w.bool(), estimate_scale=True, backend=backend)
    b = kabsch_reference(src, tgt, w, estimate_scale=True)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("c", [1e-12, 1e12])
def test_extreme_magnitudes(backend, d, dtype, c):
    # Entries of M of order c^2 (1e-24 or 1e24): their squares leave the float32 range, so the
    # eigen-solve must not square raw entries. Similarity is equivariant: R and s unchanged, t * c.
    src, tgt, w, _ = make_problem(6, 10, d, noise=0.1, seed=90)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    R1, t1, s1 = kabsch_reference(src, tgt, w, estimate_scale=True)
    R, t, s, info = kabsch((src * c).to(dtype), (tgt * c).to(dtype), w.to(dtype), estimate_scale=True,
                           backend=backend, return_info=True)
    assert (info == KABSCH_OK).all()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(R.double(), R1, **tol)
    torch.testing.assert_close(s.double(), s1, **tol)
    torch.testing.assert_close(t.double() / c, t1, **tol)


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_scale_clamp(backend):
    src, tgt, _, (_, _, s0) = make_problem(16, 12, 3, noise=0.0, weights=None, seed=8)
    src, tgt = to(_dev(backend), src, tgt)
    lo, hi = 0.9, 1.6
    R, t, s = kabsch(src, tgt, estimate_scale=True, min_scale=lo, max_scale=hi, backend=backend)
    torch.testing.assert_close(s.cpu(), s0.clamp(lo, hi), atol=1e-9, rtol=0)
    # t is computed after the clamp: t = mu_t - s R mu_s with the clamped s.
    mu_s, mu_t = src.mean(1), tgt.mean(1)
    torch.testing.assert_close(t, mu_t - s[:, None] * (R @ mu_s[..., None])[..., 0], atol=1e-9, rtol=0)


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", GRAD, indirect=True)
@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("scale", [None, "free", "clamped"])
def test_gradcheck(backend, d, scale):
    src, tgt, w, _ = make_problem(3, 7, d, noise=0.3, seed=20 + d)
    kw = {} if scale is None else {"estimate_scale": True}
    if scale == "clamped":
        kw.update(min_scale=1.0, max_scale=1.5)  # active on some problems of this batch
    inputs = tuple(x.clone().requires_grad_() for x in (src, tgt, w))
    assert gradcheck(lambda a, b, c: kabsch(a, b, c, backend=backend, **kw), inputs)


@pytest.mark.parametrize("backend", GRAD, indirect=True)
def test_gradcheck_unweighted(backend):
    src, tgt, _, _ = make_problem(2, 6, 3, noise=0.3, weights=None, seed=31)
    inputs = tuple(x.clone().requires_grad_() for x in (src, tgt))
    assert gradcheck(lambda a, b: kabsch(a, b, estimate_scale=True, backend=backend), inputs)


@pytest.mark.parametrize("backend", NATIVE, indirect=True)
@pytest.mark.parametrize("d", [2, 3])
def test_gradients_match_reference(backend, d):
    src, tgt, w, _ = make_problem(11, 9, d, noise=0.2, seed=40 + d)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    g = torch.Generator().manual_seed(1)
    cR, ct, cs = (torch.randn(11, d, d, generator=g, dtype=torch.float64).to(src.device),
                  torch.randn(11, d, generator=g, dtype=torch.float64).to(src.device),
                  torch.randn(11, generator=g, dtype=torch.float64).to(src.device))
    grads = []
    for fn in (lambda *a: kabsch(*a, estimate_scale=True, min_scale=0.8, backend=backend),
               lambda *a: kabsch_reference(*a, estimate_scale=True, min_scale=0.8)):
        xs = [x.clone().requires_grad_() for x in (src, tgt, w)]
        R, t, s = fn(*xs)
        ((R * cR).sum() + (t * ct).sum() + (s * cs).sum()).backward()
        grads.append([x.grad for x in xs])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("backend", NATIVE, indirect=True)
def test_clamp_passes_no_gradient(backend):
    src, tgt, _, _ = make_problem(4, 10, 3, noise=0.0, weights=None, seed=50)
    src, tgt = to(_dev(backend), src, tgt)
    x = src.clone().requires_grad_()
    y = tgt.clone().requires_grad_()
    _, _, s = kabsch(x, y, estimate_scale=True, min_scale=10.0, backend=backend)  # all clamped
    assert (s == 10.0).all()
    s.sum().backward()
    assert (x.grad == 0).all() and (y.grad == 0).all()


def _symmetric_clouds():
    # Exactly representable symmetric clouds: their covariance has exactly repeated eigenvalues.
    cube = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=torch.float64)
    tetra = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    octa = torch.cat([torch.eye(3), -torch.eye(3)]).double()
    square = torch.tensor([[-1.0, -1], [1, -1], [1, 1], [-1, 1]], dtype=torch.float64)
    plus = torch.tensor([[1.0, 0], [0, 1], [-1, 0], [0, -1], [2, 0], [0, 2], [-2, 0], [0, -2]], dtype=torch.float64)
    generic = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return {"cube": cube, "tetra": tetra, "octa": octa, "square": square, "plus": plus, "generic": generic}


_EXACT_ROT = {3: torch.tensor([[[0.0, -1, 0], [1, 0, 0], [0, 0, 1]]], dtype=torch.float64),
              2: torch.tensor([[[0.0, -1], [1, 0]]], dtype=torch.float64)}


@pytest.mark.parametrize("name", ["cube", "tetra", "octa", "square", "plus", "generic"])
@pytest.mark.parametrize("rotated", [False, True], ids=["identical", "rotated"])
def test_svd_backward_nan_but_ours_finite(name, rotated):
    """Identical or symmetric clouds: torch.linalg.svd's backward is NaN, the analytic one is not."""
    pts = _symmetric_clouds()[name][None]
    d = pts.shape[-1]
    # A 90-degree rotation, scale 1.5 and shift 0.25 are exact: singular values stay exactly repeated.
    tgt0 = pts @ _EXACT_ROT[d].mT * 1.5 + 0.25 if rotated else pts
    cR = torch.randn(1, d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def grads(fn):
        x, y = pts.clone().requires_grad_(), tgt0.clone().requires_grad_()
        R, t, s = fn(x, y)
        ((R * cR).sum() + t.sum() + s.sum()).backward()
        return torch.cat([x.grad.flatten(), y.grad.flatten()])

    g_svd = grads(lambda x, y: kabsch_reference(x, y, estimate_scale=True))
    # Exactly repeated singular values: the SVD backward's 1/(s_i^2 - s_j^2) terms are 1/0.
    assert bool(torch.isfinite(g_svd).all()) == (name == "generic")
    if _CPU_REASON is not None:
        pytest.skip(_CPU_REASON)
    g = grads(lambda x, y: kabsch(x, y, estimate_scale=True, backend="cpu"))
    assert torch.isfinite(g).all() and g.abs().max() < 1e3
    if name == "generic":
        torch.testing.assert_close(g, g_svd, atol=1e-10, rtol=1e-8)
    # ... and they are the true derivatives: R is smooth there (s_i + s_j > 0).
    inputs = (pts.clone().requires_grad_(), tgt0.clone().requires_grad_())
    assert gradcheck(lambda x, y: kabsch(x, y, estimate_scale=True, backend="cpu"), inputs)


@pytest.mark.parametrize("backend", NATIVE, indirect=True)
def test_custom_op_opcheck(backend):
    src, tgt, w, _ = make_problem(3, 8, 3, seed=60)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    args = (src.requires_grad_(), tgt.requires_grad_(), w.requires_grad_(), True, 0.5, math.inf)
    torch.library.opcheck(_kabsch_op, args)
    args = (src, tgt, None, False, -math.inf, math.inf)
    torch.library.opcheck(_kabsch_op, args)


# --------------------------------------------------------------------------------------------------
# The 3x3 rotation solve alone (semcorr_ext::kabsch_rotation3, CPU)
# --------------------------------------------------------------------------------------------------

def svd_rotation3(M: torch.Tensor) -> torch.Tensor:
    """argmax_R tr(R^T M) over SO(3) by the SVD route: U diag(1, 1, det(U V^T)) V^T."""
    U, _, Vh = torch.linalg.svd(M)
    d = torch.sign(torch.linalg.det(U @ Vh))
    D = torch.ones(M.shape[0], 3, dtype=M.dtype)
    D[:, 2] = d
    return U @ (D[..., None] * Vh)


@pytest.mark.parametrize("backend", _params(["cpu"]), indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["randn", "reflection", "scaled"])
def test_rotation3_matches_svd(backend, dtype, kind):
    g = torch.Generator().manual_seed(77)
    M = torch.randn(4096, 3, 3, dtype=torch.float64, generator=g)
    if kind == "reflection":  # det(M) < 0 for every matrix: the sign fix is needed everywhere
        M = M * torch.sign(torch.linalg.det(M))[:, None, None]
        M[:, :, 0] = -M[:, :, 0]
    elif kind == "scaled":  # rotation is scale-free; magnitudes far from 1
        M = M * torch.logspace(-12, 12, 4096, dtype=torch.float64)[:, None, None]
    # Conditioning: keep problems whose answer is well determined (s2 + s3 away from 0 relative to s1).
    S = torch.linalg.svdvals(M)
    sgn = torch.sign(torch.linalg.det(M))
    keep = (S[:, 1] + sgn * S[:, 2]) > 1e-3 * S[:, 0]
    M = M[keep]
    R = torch.ops.semcorr_ext.kabsch_rotation3(M.to(dtype))
    assert R.dtype == dtype and R.shape == M.shape
    ref = svd_rotation3(M).to(dtype)
    tol = dict(atol=2e-3, rtol=0) if dtype == torch.float32 else dict(atol=1e-9, rtol=0)
    torch.testing.assert_close(R, ref, **tol)
    # R is a proper rotation.
    R64 = R.double()
    eye = torch.eye(3, dtype=torch.float64).expand_as(R64)
    torch.testing.assert_close(R64.mT @ R64, eye, atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)
    assert (torch.linalg.det(R64) > 0).all()


@pytest.mark.parametrize("backend", _params(["cpu"]), indirect=True)
def test_rotation3_is_the_ops_solve(backend):
    """kabsch_rotation3 of the op's own cross-covariance M (stats) reproduces the op's R."""
    src, tgt, w, _ = make_problem(64, 16, 3, seed=78)
    R, _, _, stats = _kabsch_op(src, tgt, w, True, -math.inf, math.inf)
    M = stats[:, 5 + 6: 5 + 6 + 9].reshape(-1, 3, 3)
    torch.testing.assert_close(torch.ops.semcorr_ext.kabsch_rotation3(M), R, atol=1e-12, rtol=0)


@pytest.mark.parametrize("backend", _params(["cpu"]), indirect=True)
def test_rotation3_zero_and_bad_input(backend):
    R = torch.ops.semcorr_ext.kabsch_rotation3(torch.zeros(2, 3, 3))
    torch.testing.assert_close(R, torch.eye(3).expand(2, 3, 3))  # non-unique: closest to identity
    assert torch.ops.semcorr_ext.kabsch_rotation3(torch.zeros(0, 3, 3)).shape == (0, 3, 3)
    with pytest.raises(RuntimeError, match="shape"):
        torch.ops.semcorr_ext.kabsch_rotation3(torch.zeros(2, 3, 2))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.semcorr_ext.kabsch_rotation3(torch.zeros(2, 3, 3, dtype=torch.int32))


# --------------------------------------------------------------------------------------------------
# Degenerate input
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("d", [2, 3])
def test_all_zero_weights(backend, d):
    src, tgt, w, _ = make_problem(3, 5, d, seed=70)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    w = w.clone()
    w[1] = 0
    x, y, ww = (v.clone().requires_grad_() for v in (src, tgt, w))
    R, t, s, info = kabsch(x, y, ww, estimate_scale=True, min_scale=2.0, backend=backend, return_info=True)
    assert info.tolist() == [KABSCH_OK, KABSCH_EMPTY, KABSCH_OK]
    torch.testing.assert_close(R[1], torch.eye(d, dtype=R.dtype, device=R.device))
    assert (t[1] == 0).all() and s[1].item() == 2.0
    (R.sum() + t.sum() + s.sum()).backward()
    for g in (x.grad, y.grad, ww.grad):
        assert torch.isfinite(g).all() and (g[1] == 0).all()


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_no_points(backend):
    src = torch.zeros(2, 0, 3, dtype=torch.float64, device=_dev(backend))
    R, t, s, info = kabsch(src, src, estimate_scale=True, backend=backend, return_info=True)
    assert (info == KABSCH_EMPTY).all()
    torch.testing.assert_close(R, torch.eye(3, dtype=R.dtype, device=R.device).expand(2, 3, 3))
    assert (t == 0).all() and (s == 1).all()


@pytest.mark.parametrize("backend", ALL, indirect=True)
@pytest.mark.parametrize("d", [2, 3])
def test_single_point(backend, d):
    # Fewer than d points: one point with non-zero weight (the others masked out).
    src, tgt, _, _ = make_problem(2, 4, d, seed=71)
    src, tgt = to(_dev(backend), src, tgt)
    w = torch.tensor([[0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=src.dtype, device=src.device)
    R, t, s, info = kabsch(src, tgt, w, estimate_scale=True, backend=backend, return_info=True)
    assert (info == KABSCH_DEGENERATE).all()
    eye = torch.eye(d, dtype=R.dtype, device=R.device).expand(2, d, d)
    torch.testing.assert_close(R, eye)
    assert (s == 1).all()
    idx = torch.tensor([1, 3])
    torch.testing.assert_close(t, tgt[torch.arange(2), idx] - src[torch.arange(2), idx])


@pytest.mark.parametrize("backend", NATIVE, indirect=True)
@pytest.mark.parametrize("P", [2, 7])
def test_collinear_3d_minimal_rotation(backend, P):
    """Collinear 3-D points (P = 2 is 'fewer than d'): rotation about the line is free; the native
    backends return the optimal rotation closest to the identity, with finite gradients."""
    g = torch.Generator().manual_seed(P)
    B = 5
    u = torch.nn.functional.normalize(torch.randn(B, 3, dtype=torch.float64, generator=g), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(B, 3, dtype=torch.float64, generator=g), dim=-1)
    lam = torch.randn(B, P, dtype=torch.float64, generator=g)
    src = lam[..., None] * u[:, None] + torch.randn(B, 1, 3, dtype=torch.float64, generator=g)
    tgt = 1.7 * lam[..., None] * v[:, None] + torch.randn(B, 1, 3, dtype=torch.float64, generator=g)
    src, tgt = to(_dev(backend), src, tgt)
    u, v = to(_dev(backend), u, v)
    x, y = src.clone().requires_grad_(), tgt.clone().requires_grad_()
    R, t, s, info = kabsch(x, y, estimate_scale=True, backend=backend, return_info=True)
    assert (info == KABSCH_DEGENERATE).all()
    eye = torch.eye(3, dtype=R.dtype, device=R.device)
    torch.testing.assert_close(R.mT @ R, eye.expand_as(R), atol=1e-12, rtol=0)
    assert torch.allclose(torch.linalg.det(R), torch.ones(B, dtype=R.dtype, device=R.device))
    torch.testing.assert_close((R @ u[..., None])[..., 0], v, atol=1e-9, rtol=0)
    # Minimal rotation: its angle is the angle between u and v (tr R = 1 + 2 cos(angle)).
    cos = (u * v).sum(-1)
    torch.testing.assert_close(torch.diagonal(R, dim1=-2, dim2=-1).sum(-1), 1 + 2 * cos, atol=1e-9, rtol=0)
    # Optimal: same objective as the reference's (arbitrary) maximiser, and an exact fit.
    Rr, tr, sr = kabsch_reference(src, tgt, estimate_scale=True)
    torch.testing.assert_close(objective(src, tgt, None, R, t, s), objective(src, tgt, None, Rr, tr, sr),
                               atol=1e-9, rtol=0)
    torch.testing.assert_close(s, torch.full_like(s, 1.7))
    (R.sum() + t.sum() + s.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_collinear_2d_is_unique(backend):
    # In 2-D collinear points still fix the rotation: regular case, equal to the SVD answer.
    g = torch.Generator().manual_seed(9)
    lam = torch.randn(4, 6, 1, dtype=torch.float64, generator=g)
    src = lam * torch.tensor([0.6, 0.8], dtype=torch.float64) + 1
    R0 = random_rotation(4, 2, gen=g)
    tgt = src @ R0.mT - 2
    src, tgt = to(_dev(backend), src, tgt)
    R, t, s, info = kabsch(src, tgt, backend=backend, return_info=True)
    assert (info == KABSCH_OK).all()
    torch.testing.assert_close(R.cpu(), R0, atol=1e-9, rtol=0)


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_target_collapsed_to_a_point(backend):
    src, _, _, _ = make_problem(2, 6, 3, seed=72)
    src = src.to(_dev(backend))
    tgt = torch.ones_like(src) * torch.tensor([1.0, 2.0, 3.0], dtype=src.dtype, device=src.device)
    R, t, s, info = kabsch(src, tgt, estimate_scale=True, backend=backend, return_info=True)
    assert (info == KABSCH_DEGENERATE).all()
    torch.testing.assert_close(R, torch.eye(3, dtype=R.dtype, device=R.device).expand(2, 3, 3))
    assert (s == 0).all()  # collapse
    torch.testing.assert_close(t, tgt[:, 0])
    _, _, s1 = kabsch(src, tgt, estimate_scale=True, min_scale=1.0, backend=backend)
    assert (s1 == 1).all()


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_nan_propagates_per_problem(backend):
    src, tgt, w, _ = make_problem(4, 8, 3, seed=73)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    src, tgt, w = src.clone(), tgt.clone(), w.clone()
    src[1, 3, 0] = float("nan")   # positive-weight point -> problem 1 is NaN
    tgt[2, 5, 2] = float("inf")   # positive-weight point -> problem 2 is NaN
    w[3, 0] = float("nan")        # NaN weight -> problem 3 is NaN
    x, y, ww = (v.clone().requires_grad_() for v in (src, tgt, w))
    R, t, s, info = kabsch(x, y, ww, estimate_scale=True, backend=backend, return_info=True)
    assert info.tolist() == [KABSCH_OK, KABSCH_NONFINITE, KABSCH_NONFINITE, KABSCH_NONFINITE]
    for out in (R, t, s):
        assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()
    ref = kabsch_reference(src[:1], tgt[:1], w[:1], estimate_scale=True)
    for a, b in zip((R, t, s), ref):
        torch.testing.assert_close(a[:1], b, atol=1e-9, rtol=1e-9)
    if backend != "reference":
        (R.sum() + t.sum() + s.sum()).backward()
        for g in (x.grad, y.grad, ww.grad):
            assert torch.isfinite(g[0]).all() and torch.isnan(g[1:]).all()


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_zero_weight_points_are_ignored_even_if_nan(backend):
    src, tgt, w, _ = make_problem(3, 10, 3, seed=74, weights="mask")
    src, tgt, w = to(_dev(backend), src, tgt, w)
    src, tgt, w = src.clone(), tgt.clone(), w.clone()
    w[:, -2:] = 0
    src[:, -1] = float("nan")
    tgt[:, -2] = float("inf")
    x = src.clone().requires_grad_()
    R, t, s, info = kabsch(x, tgt, w, estimate_scale=True, backend=backend, return_info=True)
    assert (info == KABSCH_OK).all()
    ref = kabsch_reference(src[:, :-2], tgt[:, :-2], w[:, :-2], estimate_scale=True)
    for a, b in zip((R, t, s), ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    (R.sum() + t.sum() + s.sum()).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[:, -2:] == 0).all()


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

def _bad_cases():
    x = torch.randn(2, 5, 3)
    w = torch.rand(2, 5)
    return [
        ("src-not-tensor", (x.tolist(), x), {}, TypeError, "src must be a torch.Tensor"),
        ("src-int", (x.long(), x.long()), {}, TypeError, "src must be a floating-point"),
        ("src-rank", (x[0], x[0]), {}, ValueError, r"src must have shape \(B, P, d\)"),
        ("src-d4", (torch.randn(2, 5, 4),) * 2, {}, ValueError, "d = 4"),
        ("tgt-shape", (x, x[:, :4]), {}, ValueError, "tgt must have the shape of src"),
        ("tgt-B", (x, x[:1]), {}, ValueError, "tgt must have the shape of src"),
        ("tgt-dtype", (x, x.double()), {}, TypeError, "same dtype"),
        ("w-shape", (x, x, w[:, :4]), {}, ValueError, r"weights must have shape \(B, P\)"),
        ("w-rank", (x, x, w[..., None]), {}, ValueError, r"weights must have shape \(B, P\)"),
        ("w-int", (x, x, w.long()), {}, TypeError, "weights must be a floating-point or bool"),
        ("w-negative", (x, x, w - 0.5), {}, ValueError, "weights must be >= 0"),
        ("w-list", (x, x, w.tolist()), {}, TypeError, "weights must be a torch.Tensor"),
        ("min>max", (x, x), dict(estimate_scale=True, min_scale=2.0, max_scale=1.0), ValueError,
         r"min_scale \(2.0\) must be <= max_scale"),
        ("min<0", (x, x), dict(estimate_scale=True, min_scale=-1.0), ValueError, "min_scale must be >= 0"),
        ("max<=0", (x, x), dict(estimate_scale=True, max_scale=0.0), ValueError, "max_scale must be > 0"),
        ("min-nan", (x, x), dict(estimate_scale=True, min_scale=float("nan")), ValueError, "min_scale must not"),
        ("min-str", (x, x), dict(estimate_scale=True, min_scale="1"), TypeError, "min_scale must be a float"),
        ("bounds-no-scale", (x, x), dict(min_scale=1.0), ValueError, "estimate_scale=True"),
        ("estimate-not-bool", (x, x), dict(estimate_scale=1), TypeError, "estimate_scale must be a bool"),
        ("backend", (x, x), dict(backend="triton"), RuntimeError, "not implemented for this op"),
        ("backend-name", (x, x), dict(backend="nope"), ValueError, "backend must be"),
    ]


@pytest.mark.parametrize("args,kwargs,exc,match", [pytest.param(*c[1:], id=c[0]) for c in _bad_cases()])
def test_bad_input(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        kabsch(*args, **{"backend": "reference", **kwargs})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU is available")
def test_mixed_devices():  # pragma: no cover - needs a GPU
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="one device"):
        kabsch(x, x.cuda())


def test_unavailable_backend_message():
    if _reason("cuda") is None:
        pytest.skip("cuda is available here")
    with pytest.raises(RuntimeError, match="unavailable"):
        kabsch(torch.randn(1, 3, 3), torch.randn(1, 3, 3), backend="cuda")


# --------------------------------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------------------------------

_PROP = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("backend", ALL, indirect=True)
@_PROP
@given(d=st.sampled_from([2, 3]), P=st.integers(1, 40), seed=st.integers(0, 2**31 - 1),
       spread=st.floats(1e-2, 1e3), offset=st.floats(-1e3, 1e3), est=st.booleans())
def test_property_rotation_in_SO_d(backend, d, P, seed, spread, offset, est):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(1, P, d, dtype=torch.float64, generator=g) * spread + offset
    tgt = torch.randn(1, P, d, dtype=torch.float64, generator=g) * spread - offset
    w = torch.rand(1, P, dtype=torch.float64, generator=g)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    R, t, s = kabsch(src, tgt, w, estimate_scale=est, backend=backend)
    eye = torch.eye(d, dtype=R.dtype, device=R.device)[None]
    torch.testing.assert_close(R.mT @ R, eye, atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(1, dtype=R.dtype, device=R.device), atol=1e-10, rtol=0)
    assert torch.isfinite(t).all() and (s >= 0).all()


@pytest.mark.parametrize("backend", ALL, indirect=True)
@_PROP
@given(d=st.sampled_from([2, 3]), P=st.integers(4, 30), seed=st.integers(0, 2**31 - 1),
       scale=st.floats(0.05, 20.0))
def test_property_exact_recovery_noise_free(backend, d, P, seed, scale):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(1, P, d, dtype=torch.float64, generator=g)
    R0 = random_rotation(1, d, gen=g)
    t0 = torch.randn(1, d, dtype=torch.float64, generator=g) * 10
    tgt = scale * src @ R0.mT + t0[:, None]
    w = torch.rand(1, P, dtype=torch.float64, generator=g) + 0.1
    src, tgt, w = to(_dev(backend), src, tgt, w)
    R, t, s = kabsch(src, tgt, w, estimate_scale=True, backend=backend)
    torch.testing.assert_close(R.cpu(), R0, atol=1e-8, rtol=0)
    torch.testing.assert_close(s.cpu(), torch.tensor([scale], dtype=torch.float64), atol=0, rtol=1e-9)
    torch.testing.assert_close(t.cpu(), t0, atol=1e-8 * (1 + scale), rtol=0)


@pytest.mark.parametrize("backend", ALL, indirect=True)
@_PROP
@given(d=st.sampled_from([2, 3]), P=st.integers(4, 30), seed=st.integers(0, 2**31 - 1))
def test_property_permutation_invariance(backend, d, P, seed):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(2, P, d, dtype=torch.float64, generator=g)
    tgt = torch.randn(2, P, d, dtype=torch.float64, generator=g)
    w = torch.rand(2, P, dtype=torch.float64, generator=g)
    perm = torch.randperm(P, generator=g)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    a = kabsch(src, tgt, w, estimate_scale=True, backend=backend)
    b = kabsch(src[:, perm], tgt[:, perm], w[:, perm], estimate_scale=True, backend=backend)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=1e-9, rtol=1e-9)


# --------------------------------------------------------------------------------------------------
# apply_similarity and the row-vector 4x4 convention
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d", [2, 3])
def test_row_matrix_round_trip_and_convention(d):
    g = torch.Generator().manual_seed(d)
    R = random_rotation(5, d, gen=g)
    t = torch.randn(5, d, dtype=torch.float64, generator=g)
    s = torch.rand(5, dtype=torch.float64, generator=g) + 0.5
    pts = torch.randn(5, 7, d, dtype=torch.float64, generator=g)
    M = similarity_to_row_matrix(R, t, s)
    assert M.shape == (5, d + 1, d + 1)
    homog = torch.cat([pts, torch.ones(5, 7, 1, dtype=torch.float64)], -1)
    out = homog @ M  # row-vector convention of Jamais Vu / pytorch3d
    torch.testing.assert_close(out[..., :d], apply_similarity(pts, R, t, s))
    torch.testing.assert_close(out[..., d], torch.ones(5, 7, dtype=torch.float64))
    # Explicit column-vector form.
    col = s[:, None, None] * torch.einsum("bij,bpj->bpi", R, pts) + t[:, None]
    torch.testing.assert_close(apply_similarity(pts, R, t, s), col)
    R2, t2, s2 = row_matrix_to_similarity(M)
    for a, b in zip((R2, t2, s2), (R, t, s)):
        torch.testing.assert_close(a, b)
    # Without scale.
    torch.testing.assert_close(similarity_to_row_matrix(R, t), similarity_to_row_matrix(R, t, torch.ones_like(s)))


@pytest.mark.parametrize("backend", ALL, indirect=True)
def test_kabsch_output_aligns_through_row_matrix(backend):
    src, tgt, w, _ = make_problem(4, 16, 3, noise=0.0, seed=80)
    src, tgt, w = to(_dev(backend), src, tgt, w)
    R, t, s = kabsch(src, tgt, w, estimate_scale=True, backend=backend)
    M = similarity_to_row_matrix(R, t, s)
    homog = torch.cat([src, torch.ones_like(src[..., :1])], -1)
    torch.testing.assert_close((homog @ M)[..., :3], tgt, atol=1e-9, rtol=0)


def test_similarity_helpers_bad_input():
    R, t, s = torch.eye(3)[None], torch.zeros(1, 3), torch.ones(1)
    pts = torch.zeros(1, 4, 3)
    with pytest.raises(ValueError, match="R must have shape"):
        apply_similarity(pts, R[0], t, s)
    with pytest.raises(ValueError, match="to match the points"):
        apply_similarity(torch.zeros(1, 4, 2), R, t, s)
    with pytest.raises(ValueError, match=r"t must have shape \(B, d\)"):
        apply_similarity(pts, R, t[:, :2], s)
    with pytest.raises(ValueError, match=r"s must have shape \(B,\)"):
        apply_similarity(pts, R, t, s[None])
    with pytest.raises(ValueError, match="points must have B = 1"):
        apply_similarity(torch.zeros(2, 4, 3), R, t, s)
    with pytest.raises(TypeError, match="points must be a floating-point"):
        apply_similarity(pts.long(), R, t, s)
    with pytest.raises(ValueError, match=r"M must have shape \(B, d\+1, d\+1\)"):
        row_matrix_to_similarity(torch.eye(5)[None])
    M = similarity_to_row_matrix(R, t, s)
    bad = M.clone()
    bad[0, 0, 3] = 1.0
    with pytest.raises(ValueError, match="last column"):
        row_matrix_to_similarity(bad)
    refl = M.clone()
    refl[0, 0, 0] = -1.0
    with pytest.raises(ValueError, match="det"):
        row_matrix_to_similarity(refl)
    shear = M.clone()
    shear[0, 0, 1] = 0.5
    with pytest.raises(ValueError, match="not a scaled rotation"):
        row_matrix_to_similarity(shear)


@pytest.mark.parametrize("backend", _params(["cpu"]), indirect=True)
def test_docstring_examples(backend):
    module = sys.modules["semcorr_fast.ops.kabsch"]
    result = doctest.testmod(module, extraglobs={"torch": torch}, verbose=False)
    assert result.attempted >= 10 and result.failed == 0
