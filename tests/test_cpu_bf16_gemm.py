"""The cpu backend's bf16 tile GEMMs (csrc/common/tile_gemm.cpp): oneDNN's brgemm (AMX CPUs) and our
AVX512-BF16 micro-kernel (AVX-512 CPUs without AMX), both reading targets packed in VNNI-2 layout.

The conformance suite checks every bf16 op against the reference at bf16 tolerances. Here the tile
GEMM is held to fp32 accumulation: the scores of bf16 inputs must equal the exact (float64) dot
products of those bf16 values to within the fp32 summation bound, on tile edges (row counts around
the 6-row micro-tile, column counts around the 32/64-column panels, odd and tiny channel counts).
"""
from __future__ import annotations

import pytest
import torch

from semcorr_fast import _ext, ops

KERNELS = ["brgemm", "avx512bf16", "off"]


def _available(name: str) -> bool:
    with _ext.use_cpu_bf16_gemm(name) as got:
        return got == name


@pytest.fixture(params=KERNELS)
def kernel(request):
    if not _available(request.param):
        pytest.skip(f"bf16 tile GEMM '{request.param}' is not available on this CPU")
    with _ext.use_cpu_bf16_gemm(request.param):
        yield request.param


@pytest.mark.parametrize("Ns,Nt,C", [(1, 1, 1), (5, 31, 3), (6, 32, 2), (7, 33, 17), (13, 64, 64),
                                     (12, 65, 9), (37, 97, 77), (130, 200, 768), (6, 130, 1)])
def test_scores_are_fp32_accumulated_dots(kernel, Ns, Nt, C):
    g = torch.Generator().manual_seed(Ns * 1000 + Nt + C)
    src = torch.randn(2, Ns, C, generator=g).bfloat16()
    tgt = torch.randn(2, Nt, C, generator=g).bfloat16()
    k = min(Nt, 5)
    vals, idx = ops.match_topk(src, tgt, k, normalize=False, backend="cpu")
    exact = torch.einsum("bsc,btc->bst", src.double(), tgt.double())
    bound = (C + 2) * 2.0 ** -23 * torch.einsum("bsc,btc->bst", src.double().abs(), tgt.double().abs())
    got = exact.gather(2, idx)
    err = (vals.double() - got).abs()
    assert (err <= bound.gather(2, idx) + 1e-30).all(), f"max error {err.max().item():.3g}"
    # the indices are a top-k of the exact scores (up to that bound)
    kth = exact.topk(k, dim=2).values[..., -1:]
    assert (got >= kth - 2 * bound.amax(2, keepdim=True)).all()


def test_soft_argmax_bf16_same_across_kernels():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, 150, 40, generator=g).bfloat16()
    tgt = torch.randn(1, 13 * 11, 40, generator=g).bfloat16()
    outs = {}
    for name in KERNELS:
        if _available(name):
            with _ext.use_cpu_bf16_gemm(name):
                outs[name] = ops.soft_argmax(src, tgt, 0.05, (13, 11), backend="cpu").float()
    base = outs.pop("off")
    for name, out in outs.items():
        torch.testing.assert_close(out, base, atol=2e-3, rtol=0, msg=f"{name} vs fp32 sgemm")


def test_choice_is_reported_and_validated():
    assert _ext.cpu_bf16_gemm() in ("brgemm", "avx512bf16", "off")
    with _ext.use_cpu_bf16_gemm("off") as got:
        assert got == "off" and _ext.cpu_bf16_gemm() == "off"
    with pytest.raises(RuntimeError, match="auto, brgemm, avx512bf16, off"):
        with _ext.use_cpu_bf16_gemm("amx-please"):
            pass


# ---------------------------------------------------------------- bf16 backward (stream_backward_bf16)
# With our AVX512-BF16 kernel, bf16 inputs run all three tile GEMMs of the backward in bf16 (dS rounded
# to bf16 once); SEMCORR_CPU_BF16_BWD=0 is the fp32 path. Both must be within bf16 accuracy of the
# float64 reference; the bf16 path must be the one taken where it applies (C a multiple of 32).

def _grads(fn, *xs):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    fn(*xs).float().pow(2).sum().backward()
    return [x.grad for x in xs]


def _loss_fns(hw):
    H, W = hw
    txy = torch.rand(2, 150, 2, generator=torch.Generator().manual_seed(5)) * torch.tensor([W - 1.0, H - 1.0])

    def xy(a):  # the target coordinates in the op's coordinate dtype (fp64 for the fp64 reference)
        return txy.double() if a.dtype == torch.float64 else txy

    return {
        "soft_argmax": lambda a, b, be: ops.soft_argmax(a, b, 0.05, hw, backend=be),
        "soft_argmax_raw": lambda a, b, be: ops.soft_argmax(a, b, 4.0, hw, normalize=False, backend=be),
        "expected_cost": lambda a, b, be: ops.expected_cost(a, b, 0.05, xy(a), hw, backend=be),
        "distill_ce": lambda a, b, be: ops.rowsoftmax_distill(a.detach(), b.detach(), a, b, 0.04, 0.05, loss="ce",
                                                              backend=be),
    }


@pytest.mark.parametrize("op", ["soft_argmax", "soft_argmax_raw", "expected_cost", "distill_ce"])
def test_bf16_backward_paths(monkeypatch, op):
    hw = (12, 13)
    g = torch.Generator().manual_seed(1)
    src = torch.randn(2, 150, 64, generator=g).bfloat16()
    tgt = torch.randn(2, hw[0] * hw[1], 64, generator=g).bfloat16()
    fn = _loss_fns(hw)[op]
    ref = _grads(lambda a, b: fn(a, b, "reference"), src.double(), tgt.double())
    monkeypatch.setenv("SEMCORR_CPU_BF16_BWD", "1")
    fast = _grads(lambda a, b: fn(a, b, "cpu"), src, tgt)
    monkeypatch.setenv("SEMCORR_CPU_BF16_BWD", "0")
    plain = _grads(lambda a, b: fn(a, b, "cpu"), src, tgt)
    for f, p, r in zip(fast, plain, ref):
        assert f.dtype == torch.bfloat16
        scale = r.abs().max().item()
        assert (f.double() - r).abs().max().item() <= 1.5e-2 * scale
        assert (p.double() - r).abs().max().item() <= 1.5e-2 * scale
    if _ext.cpu_bf16_gemm() == "avx512bf16":  # the bf16 GEMMs ran: not the fp32 path's bits
        assert any(not torch.equal(f, p) for f, p in zip(fast, plain))


def test_bf16_backward_falls_back_where_it_does_not_apply(monkeypatch):
    """C not a multiple of 32, or fewer row blocks than threads (keypoint rows): the fp32 path, bitwise."""
    g = torch.Generator().manual_seed(2)
    for ns, c in ((150, 40), (1, 64)):
        src = torch.randn(1, ns, c, generator=g).bfloat16()
        tgt = torch.randn(1, 100, c, generator=g).bfloat16()
        fn = lambda a, b: ops.soft_argmax(a, b, 0.05, (10, 10), backend="cpu")  # noqa: E731
        monkeypatch.setenv("SEMCORR_CPU_BF16_BWD", "1")
        fast = _grads(fn, src, tgt)
        monkeypatch.setenv("SEMCORR_CPU_BF16_BWD", "0")
        plain = _grads(fn, src, tgt)
        for f, p in zip(fast, plain):
            assert torch.equal(f, p)
