"""ncc and softmax_t: the two ops that materialise the (B, Ns, Nt) similarity.

* ``ncc(src (B,Ns,C), tgt (B,Nt,C)) -> (B, Ns, Nt)``: the streaming score tile
  (``_stream.cosine_tile``: C-chunked tl.dot, cosine scaling fused on the fp32 tile), rounded once
  to the input dtype in the store (as the reference op; the Ns*Nt write dominates this op's memory
  traffic, so a bf16 output halves it).
  Output offsets are int64 (Ns*Nt passes 2^31 at 240x240 grids).
* ``softmax_t(sim (..., L), tau) -> same shape``: a row softmax of sim / tau computed in fp32, two
  sweeps per row (online max/sum, then write), stored in ``sim``'s dtype. The kernel
  reduces the last dim; other dims are moved last in torch first.

Backward for both is left to torch (the lead's autograd wrappers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import SUPPORTED_DTYPES, dot_precision, row_launch, softmax_block, tile_config
from ._stream import (LOG2E, batch_offsets, check_features, cosine_tile, device_guard, emulate_bf16, row_norms,
                      to_dtype)


@triton.jit
def _ncc_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, out_ptr, M, N, C,
                NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_C: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q_ptr, k_ptr, qn_ptr, kn_ptr = batch_offsets(q_ptr, k_ptr, qn_ptr, kn_ptr, b, M, N, C)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    s = cosine_tile(q_ptr, k_ptr, qn_ptr, kn_ptr, offs_m, offs_n, M, N, C,
                    NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
    out_ptr += b * M * N
    o = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    msk = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(out_ptr + o, to_dtype(s, out_ptr.dtype.element_ty, EMU_BF16), mask=msk)


@triton.jit
def _softmax_t_kernel(x_ptr, y_ptr, L, scale2, BLOCK: tl.constexpr, EMU_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_ptr += row * L
    y_ptr += row * L
    offs = tl.arange(0, BLOCK)
    m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    # Sweep 1: per-lane online max and sum, combined at the end.
    for i0 in range(0, L, BLOCK):
        o = i0 + offs
        z = tl.load(x_ptr + o, mask=o < L, other=float("-inf")).to(tl.float32) * scale2
        m_new = tl.maximum(m_i, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.exp2(z - m_safe)
        m_i = m_new
    m = tl.max(m_i, axis=0)
    m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
    l = tl.sum(l_i * tl.exp2(m_safe - m), axis=0)
    # NaN anywhere in the row makes the whole row NaN (as torch.softmax).
    lse2 = m + tl.log2(l)
    for i0 in range(0, L, BLOCK):
        o = i0 + offs
        z = tl.load(x_ptr + o, mask=o < L, other=0.0).to(tl.float32) * scale2
        tl.store(y_ptr + o, to_dtype(tl.exp2(z - lse2), y_ptr.dtype.element_ty, EMU_BF16), mask=o < L)


def ncc(src: torch.Tensor, tgt: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """(B, Ns, Nt) similarities (cosine when ``normalize``), computed in fp32, stored in the input
    dtype."""
    B, Ns, Nt, C = check_features(src, tgt, "ncc")
    out = torch.empty((B, Ns, Nt), device=src.device, dtype=src.dtype)
    if out.numel() == 0:
        return out
    if normalize:
        qn, kn = row_norms(src), row_norms(tgt)
    else:  # never read
        qn = kn = torch.empty(1, device=src.device, dtype=torch.float32)
    cfg = tile_config("score", src.dtype, C)
    grid = (triton.cdiv(Ns, cfg.BLOCK_M), triton.cdiv(Nt, cfg.BLOCK_N), B)
    with device_guard(src):
        _ncc_kernel[grid](src, tgt, qn, kn, out, Ns, Nt, C, NORMALIZE=bool(normalize),
                          PREC=dot_precision(src.dtype), EMU_BF16=emulate_bf16(src.dtype),
                          **cfg.meta(), **cfg.launch())
    return out


def softmax_t(sim: torch.Tensor, tau: float, dim: int = -1) -> torch.Tensor:
    """softmax(sim / tau) along ``dim`` in fp32 arithmetic, stored in ``sim``'s dtype and shape."""
    if sim.dtype == torch.float64:
        raise NotImplementedError("softmax_t: the Triton backend has no fp64 kernel")
    if sim.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"softmax_t: expected fp32/fp16/bf16, got {sim.dtype}")
    if sim.dim() == 0:
        raise ValueError("softmax_t: expected at least one dimension")
    dim = dim % sim.dim()
    x = sim.movedim(dim, -1).contiguous()
    y = torch.empty_like(x)
    L = x.shape[-1]
    R = x.numel() // L if L else 0
    if R > 0:
        with device_guard(x):
            _softmax_t_kernel[(R,)](x, y, L, LOG2E / float(tau), BLOCK=softmax_block(L),
                                    EMU_BF16=emulate_bf16(x.dtype), **row_launch())
    return y.movedim(-1, dim)

