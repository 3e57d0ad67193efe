"""soft_argmax: expected target coordinates under softmax(sim / tau) over the whole target grid.

Shapes: src (B, Ns, C), tgt (B, Nt, C) with Nt = H*W; out (B, Ns, 2) fp32 = (x, y) in cells, cell v
at (v mod W, v // W); lse (B, Ns) fp32 = log sum_v exp(s_uv / tau).

Forward (``_soft_argmax_fwd_kernel``): attention with the value tile replaced by the coordinate grid,
generated in-kernel. Online softmax in base 2 (z2 = s * log2(e) / tau): a running max m and sum l,
rescaled by 2^(m_old - m_new) per tile, and two running coordinate sums. Rows with a NaN similarity
give NaN (out and lse).

Backward (``_soft_argmax_bwd_kernel``), recomputed from the saved lse (math.md):
  p_uv = exp(z_uv - lse_u), D_u = <G_u, y_u>, ds_uv = p_uv (<G_u, g_v> - D_u) / tau,
  d x_hat_u = sum_v ds_uv y_hat_v (dQ) and d y_hat_v = sum_u ds_uv x_hat_u (dK),
then the normalisation backward (``_stream.finalize_grad``) with <x_hat_u, d x_hat_u> = sum_v ds_uv s_uv.
As in flash attention, the tile GEMMs take ds rounded to the feature dtype. fp16 caveat: ds must
stay below 65504, i.e. |G| * (a few cells) / tau; bf16 and fp32 have no such limit.

dQ/dK strategy: one kernel per (row tile, column tile) pair that recomputes the score tile once and
adds its partial dQ and dK into fp32 buffers with atomics. Why not FA2's "own kernel per side with
register accumulators": those accumulators are BLOCK x C wide, and C reaches 4096 here (SD+DINO
features are 3968 wide), far past the register file; keeping them in registers would mean splitting C
across programs and recomputing the full-C score tile once per C slice (16x the GEMM work at C=3968).
The atomic scheme costs 3 tile GEMMs in total (S, dQ, dK) whatever C is. The price is fp32
atomic-add ordering: gradients are not bitwise reproducible run to run (differences ~1 ulp of fp32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import dot_precision, tile_config
from ._stream import (LOG2E, batch_offsets, check_features, cosine_tile, device_guard, emulate_bf16,
                      feature_grads_from_ds, finalize_grad, grid_xy, online_softmax_step, row_norms, tile_offsets)


@triton.jit
def _soft_argmax_fwd_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, out_ptr, lse_ptr,
                            M, N, C, W, scale2,
                            NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_C: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_ptr, k_ptr, qn_ptr, kn_ptr = batch_offsets(q_ptr, k_ptr, qn_ptr, kn_ptr, b, M, N, C)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_x = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc_y = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = cosine_tile(q_ptr, k_ptr, qn_ptr, kn_ptr, offs_m, offs_n, M, N, C,
                        NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
        p, alpha, m_new, n_nan = online_softmax_step(s, offs_n, N, scale2, m_i, n_nan)
        gx, gy = grid_xy(offs_n, W)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc_x = acc_x * alpha + tl.sum(p * gx[None, :], axis=1)
        acc_y = acc_y * alpha + tl.sum(p * gy[None, :], axis=1)
        m_i = m_new

    bad = n_nan > 0
    nan = float("nan")
    lse = tl.where(bad, nan, (m_i + tl.log2(l_i)) * 0.6931471805599453)
    ox = tl.where(bad, nan, acc_x / l_i)
    oy = tl.where(bad, nan, acc_y / l_i)
    m_ok = offs_m < M
    out_ptr += b * M * 2
    tl.store(out_ptr + offs_m * 2, ox, mask=m_ok)
    tl.store(out_ptr + offs_m * 2 + 1, oy, mask=m_ok)
    tl.store(lse_ptr + b * M + offs_m, lse, mask=m_ok)


@triton.jit
def _soft_argmax_bwd_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, go_ptr, out_ptr, lse_ptr,
                            dq_ptr, dk_ptr, qdot_ptr, kdot_ptr,
                            M, N, C, W, scale2, inv_tau,
                            NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_C: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q_ptr, k_ptr, qn_ptr, kn_ptr = batch_offsets(q_ptr, k_ptr, qn_ptr, kn_ptr, b, M, N, C)
    dq_ptr, dk_ptr, qdot_ptr, kdot_ptr = batch_offsets(dq_ptr, dk_ptr, qdot_ptr, kdot_ptr, b, M, N, C)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)

    s = cosine_tile(q_ptr, k_ptr, qn_ptr, kn_ptr, offs_m, offs_n, M, N, C,
                    NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
    lse2 = tl.load(lse_ptr + b * M + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    gox = tl.load(go_ptr + b * M * 2 + offs_m * 2, mask=m_ok, other=0.0)
    goy = tl.load(go_ptr + b * M * 2 + offs_m * 2 + 1, mask=m_ok, other=0.0)
    ox = tl.load(out_ptr + b * M * 2 + offs_m * 2, mask=m_ok, other=0.0)
    oy = tl.load(out_ptr + b * M * 2 + offs_m * 2 + 1, mask=m_ok, other=0.0)
    d_row = gox * ox + goy * oy
    gx, gy = grid_xy(offs_n, W)
    valid = m_ok[:, None] & n_ok[None, :]
    p = tl.exp2(s * scale2 - lse2[:, None])
    ds = p * (gox[:, None] * gx[None, :] + goy[:, None] * gy[None, :] - d_row[:, None]) * inv_tau
    ds = tl.where(valid, ds, 0.0)

    feature_grads_from_ds(ds, s, q_ptr, k_ptr, qn_ptr, kn_ptr, dq_ptr, dk_ptr, qdot_ptr, kdot_ptr,
                          offs_m, offs_n, M, N, C, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)


def soft_argmax_fwd(src: torch.Tensor, tgt: torch.Tensor, tau: float, H: int, W: int,
                    normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Ns, 2) fp32, lse (B, Ns) fp32); see the module docstring."""
    B, Ns, Nt, C = check_features(src, tgt, "soft_argmax")
    dev = src.device
    out = torch.empty((B, Ns, 2), device=dev, dtype=torch.float32)
    lse = torch.empty((B, Ns), device=dev, dtype=torch.float32)
    if B == 0 or Ns == 0:
        return out, lse
    if Nt == 0:
        return out.fill_(float("nan")), lse.fill_(float("-inf"))
    qn = row_norms(src) if normalize else lse
    kn = row_norms(tgt) if normalize else lse
    cfg = tile_config("score", src.dtype, C)
    grid = (triton.cdiv(Ns, cfg.BLOCK_M), B)
    with device_guard(src):
        _soft_argmax_fwd_kernel[grid](src, tgt, qn, kn, out, lse, Ns, Nt, C, W, LOG2E / float(tau),
                                      NORMALIZE=bool(normalize), PREC=dot_precision(src.dtype),
                                      EMU_BF16=emulate_bf16(src.dtype), **cfg.meta(), **cfg.launch())
    return out, lse


def soft_argmax_bwd(grad_out: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, out: torch.Tensor,
                    lse: torch.Tensor, tau: float, H: int, W: int,
                    normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(dsrc, dtgt) in the dtypes of src/tgt, recomputed flash-style from ``lse``."""
    B, Ns, Nt, C = check_features(src, tgt, "soft_argmax_bwd")
    dev = src.device
    grad_out = grad_out.to(torch.float32).contiguous()
    out = out.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    dq = torch.zeros((B, Ns, C), device=dev, dtype=torch.float32)
    dk = torch.zeros((B, Nt, C), device=dev, dtype=torch.float32)
    if B == 0 or Ns == 0 or Nt == 0 or C == 0:
        return dq.to(src.dtype), dk.to(tgt.dtype)
    qn = row_norms(src) if normalize else None
    kn = row_norms(tgt) if normalize else None
    qdot = torch.zeros((B, Ns), device=dev, dtype=torch.float32)
    kdot = torch.zeros((B, Nt), device=dev, dtype=torch.float32)
    cfg = tile_config("bwd", src.dtype, C)
    grid = (triton.cdiv(Ns, cfg.BLOCK_M), triton.cdiv(Nt, cfg.BLOCK_N), B)
    with device_guard(src):
        _soft_argmax_bwd_kernel[grid](src, tgt, qn if normalize else qdot, kn if normalize else kdot,
                                      grad_out, out, lse, dq, dk, qdot, kdot,
                                      Ns, Nt, C, W, LOG2E / float(tau), 1.0 / float(tau),
                                      NORMALIZE=bool(normalize), PREC=dot_precision(src.dtype),
                                      EMU_BF16=emulate_bf16(src.dtype), **cfg.meta(), **cfg.launch())
    dsrc = finalize_grad(dq, src, qn, qdot, normalize)
    dtgt = finalize_grad(dk, tgt, kn, kdot, normalize)
    return dsrc, dtgt
