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
