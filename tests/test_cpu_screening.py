"""The cpu backend's fp32 ``match_topk`` by bf16 screening (csrc/correlation/correlation_cpu.cpp).

On CPUs with a bf16 tile GEMM (oneDNN's brgemm on AMX, our AVX512-BF16 kernel otherwise) fp32 top-k
runs its GEMM in bf16, re-ranks the candidates in fp32 and certifies the answer with a rounding-error
bound; rows the bound cannot certify go through the plain fp32 path. The answer must be the plain fp32
path's answer: same indices (up to fp32 rounding at exact near-ties of the two summation orders), same
values to fp32 rounding.
``SEMCORR_CPU_SCREEN=0`` is the plain path. The conformance suite runs the screened path against the
reference on every shape; this file aims at the certificate itself.
"""
from __future__ import annotations

import pytest
import torch

from semcorr_fast import _ext, ops

pytestmark = pytest.mark.skipif(_ext.cpu_bf16_gemm() == "off",
                                reason="no bf16 tile GEMM on this CPU: fp32 top-k never screens")


def _both(monkeypatch, src, tgt, k, **kw):
    monkeypatch.setenv("SEMCORR_CPU_SCREEN", "1")
    scr = ops.match_topk(src, tgt, k, backend="cpu", **kw)
    monkeypatch.setenv("SEMCORR_CPU_SCREEN", "0")
    plain = ops.match_topk(src, tgt, k, backend="cpu", **kw)
    return scr, plain


def _assert_same(scr, plain, tol=1e-6):
    (v1, i1), (v0, i0) = scr, plain
    torch.testing.assert_close(v1, v0, atol=tol, rtol=tol)
    # an index may differ only where the two values it ranks between tie to fp32 rounding
    diff = i1 != i0
    if diff.any():
        assert torch.allclose(v1[diff], v0[diff], atol=tol, rtol=tol)


@pytest.mark.parametrize("k", [1, 3, 16, 32])
@pytest.mark.parametrize("normalize", [True, False])
def test_screened_equals_plain_fp32(monkeypatch, k, normalize):
    g = torch.Generator().manual_seed(k)
    src, tgt = torch.randn(2, 130, 48, generator=g), torch.randn(2, 300, 48, generator=g) * 3
    scr, plain = _both(monkeypatch, src, tgt, k, normalize=normalize)
    _assert_same(scr, plain, 1e-5 if not normalize else 1e-6)
    ref = ops.match_topk(src, tgt, k, backend="reference", normalize=normalize)
    torch.testing.assert_close(scr[0], ref[0], atol=1e-4, rtol=1e-5)


def test_near_ties_beyond_bf16_resolution_are_resolved_in_fp32(monkeypatch):
    """Targets 1e-4 apart (far below bf16's 2⁻⁸): bf16 cannot order them; the answer must still be
    fp32's. 80 near-copies of every source row exceed the candidate list, so the certificate fails
    and those rows take the plain path; rows with 3 copies are certified from the candidates."""
    g = torch.Generator().manual_seed(0)
    src = torch.randn(1, 40, 32, generator=g)
    many = src[:, :20].repeat_interleave(80, 1) + 1e-4 * torch.randn(1, 1600, 32, generator=g)
    few = src[:, 20:].repeat_interleave(3, 1) + 1e-4 * torch.randn(1, 60, 32, generator=g)
    tgt = torch.cat([many, few, torch.randn(1, 500, 32, generator=g)], 1)
    for k in (1, 5):
        scr, plain = _both(monkeypatch, src, tgt, k)
        _assert_same(scr, plain)
        # the true best of row u is one of its own near-copies
        i = scr[1][0, :, 0]
        assert ((i[:20] // 80) == torch.arange(20)).all()
        assert (((i[20:] - 1600) // 3) == torch.arange(20)).all()


def test_masks_zero_rows_and_short_rows(monkeypatch):
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randn(2, 50, 16, generator=g), torch.randn(2, 200, 16, generator=g)
    src[0, 3] = 0                                   # zero row: every cosine is 0, the first k valid indices win
    tgt[1, :10] = tgt[1, 10:20]                     # exact duplicates: the lower index first
    mask = torch.rand(2, 200, generator=g) > 0.5
    mask[1, :5] = False
    mask[0, 7:] = False                             # batch 0: only 7 valid targets (fewer than k = 9)
    mask[0, :7] = True
    scr, plain = _both(monkeypatch, src, tgt, 9, tgt_mask=mask)
    _assert_same(scr, plain)
    assert (scr[1][0, :, 7:] == -1).all() and torch.isinf(scr[0][0, :, 7:]).all()
    assert scr[1][0, 3].tolist()[:7] == list(range(7))
    assert not (scr[1][1].unsqueeze(-1) == torch.nonzero(~mask[1]).flatten()).any()


def test_non_finite_input_keeps_the_documented_behaviour(monkeypatch):
    g = torch.Generator().manual_seed(2)
    src, tgt = torch.randn(1, 20, 8, generator=g), torch.randn(1, 40, 8, generator=g)
    src[0, 2, 3] = float("nan")
    tgt[0, 5, 0] = float("nan")
    scr, plain = _both(monkeypatch, src, tgt, 2)
    torch.testing.assert_close(scr[0], plain[0], equal_nan=True)
    assert torch.equal(scr[1], plain[1])


def test_large_k_is_not_screened_and_still_right(monkeypatch):
    g = torch.Generator().manual_seed(3)
    src, tgt = torch.randn(1, 10, 8, generator=g), torch.randn(1, 300, 8, generator=g)
    scr, plain = _both(monkeypatch, src, tgt, 100)
    assert torch.equal(scr[1], plain[1]) and torch.equal(scr[0], plain[0])


@pytest.mark.parametrize("outside", ["exclude", "zero"])
def test_window_soft_argmax_centres_are_the_fp32_argmax(monkeypatch, outside):
    """window_soft_argmax's pass 1 (the row argmax = window centre) uses the same screening in fp32."""
    g = torch.Generator().manual_seed(4)
    H, W, C = 12, 10, 24
    src = torch.randn(2, 30, C, generator=g)
    tgt = torch.randn(2, H * W, C, generator=g)
    # two near-copies of each of 10 source rows, cosines 1 − O(1e-6) and 1 − O(1e-5): apart in fp32, tied in
    # bf16 (resolution ~4e-3); the centre must be the closer copy, whose window is far from the other's
    tgt[:, 50:60] = src[:, :10] + 3e-3 * torch.randn(2, 10, C, generator=g)
    tgt[:, 90:100] = src[:, :10] + 1e-3 * torch.randn(2, 10, C, generator=g)
    outs = []
    for flag in ("1", "0"):
        monkeypatch.setenv("SEMCORR_CPU_SCREEN", flag)
        outs.append(ops.window_soft_argmax(src, tgt, 0.05, (H, W), 2, outside=outside, backend="cpu"))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    # rows 0..9 are centred on their closer copy (cells 90..99: y = 9, x = 0..9), far from cells 50..59
    assert (outs[0][:, :10, 1] > 7).all()


def test_tiny_raw_dots_below_the_normal_range(monkeypatch):
    """Raw dots (normalize=False) of rows ~1e-20: every product is an fp32 subnormal, which the bf16
    tile GEMMs flush to zero. The certificate's absolute term must send these rows to the fp32 path."""
    g = torch.Generator().manual_seed(3)
    src = torch.randn(1, 20, 16, generator=g) * 1e-20
    tgt = torch.randn(1, 50, 16, generator=g) * 1e-20
    for k in (1, 4):
        scr, plain = _both(monkeypatch, src, tgt, k, normalize=False)
        assert torch.equal(scr[1], plain[1])
        torch.testing.assert_close(scr[0], plain[0], atol=0, rtol=1e-6)
