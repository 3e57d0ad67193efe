"""expected_cost: expected distance to a target location under softmax(sim / tau) over the target grid.

Shapes: src (B, Ns, C), tgt (B, Nt, C) with Nt = H*W, target_xy (B, Ns, 2) (x, y) in target cells;
loss (B, Ns) fp32 = L_u = sum_v p_uv d_uv with p_uv = softmax_v(s_uv / tau) and
d_uv = ||t_u - g_v||_2^p (g_v = (v mod W, v // W)); lse (B, Ns) fp32 = log sum_v exp(s_uv / tau).

Forward (``_expected_cost_fwd_kernel``): soft_argmax's streaming loop with the coordinate sums
replaced by one running sum of p * d. d is computed in-kernel from r2 = |t_u - g_v|^2: r2 itself
for p = 2, sqrt(r2) for p = 1, exp2(p/2 * log2 r2) otherwise, and exactly 0 where r2 = 0 for every
p > 0 (p < 1 at a cell centre: d = 0, and no derivative of d is ever taken). Rows whose similarities
contain NaN give NaN (loss and lse).

Backward (``_expected_cost_bwd_kernel``), recomputed from the saved lse and loss (math.md):
  ds_uv = G_u p_uv (d_uv - L_u) / tau,
one program per (row tile, target tile) adding its partial dQ and dK with fp32 atomics
(``_stream.feature_grads_from_ds``, the soft_argmax scheme: 3 tile GEMMs whatever C is), then the
normalisation backward. target_xy gets no gradient. fp16 caveat as in soft_argmax: |ds| must stay
below 65504, i.e. |G| * d_max / tau (d_max ~ the grid diagonal^p).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import dot_precision
from ._stream import (LOG2E, batch_offsets, check_features, cosine_tile, device_guard, emulate_bf16,
                      feature_grads_from_ds, FeatureGrads, grid_xy, loss_tile_config, online_softmax_step, row_norms,
                      tile_offsets)


@triton.jit
def _cost(tx, ty, offs_n, W, half_p, POW: tl.constexpr):
    """d[i, j] = ||(tx_i, ty_i) - g_(offs_n[j])||^p for p = 2 * half_p (POW: 2 -> p=2, 1 -> p=1, 0 -> any)."""
    gx, gy = grid_xy(offs_n, W)
    dx = tx[:, None] - gx[None, :]
    dy = ty[:, None] - gy[None, :]
    r2 = dx * dx + dy * dy
    if POW == 2:
        d = r2
    elif POW == 1:
        d = tl.sqrt(r2)
    else:
        d = tl.where(r2 > 0, tl.exp2(half_p * tl.log2(tl.maximum(r2, 1e-30))), 0.0)
    return d


@triton.jit
def _expected_cost_fwd_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, t_ptr, loss_ptr, lse_ptr,
                              M, N, C, W, scale2, half_p,
                              POW: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
                              EMU_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_ptr, k_ptr, qn_ptr, kn_ptr = batch_offsets(q_ptr, k_ptr, qn_ptr, kn_ptr, b, M, N, C)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    tx = tl.load(t_ptr + b * M * 2 + offs_m * 2, mask=m_ok, other=0.0)
    ty = tl.load(t_ptr + b * M * 2 + offs_m * 2 + 1, mask=m_ok, other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    c_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    n_nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = cosine_tile(q_ptr, k_ptr, qn_ptr, kn_ptr, offs_m, offs_n, M, N, C,
                        NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
        p, alpha, m_new, n_nan = online_softmax_step(s, offs_n, N, scale2, m_i, n_nan)
        d = _cost(tx, ty, offs_n, W, half_p, POW)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        c_i = c_i * alpha + tl.sum(p * d, axis=1)
        m_i = m_new

    bad = n_nan > 0
    nan = float("nan")
    lse = tl.where(bad, nan, (m_i + tl.log2(l_i)) * 0.6931471805599453)
    loss = tl.where(bad, nan, c_i / l_i)
    tl.store(loss_ptr + b * M + offs_m, loss, mask=m_ok)
    tl.store(lse_ptr + b * M + offs_m, lse, mask=m_ok)


@triton.jit
def _expected_cost_bwd_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, t_ptr, go_ptr, loss_ptr, lse_ptr,
                              dq_ptr, dk_ptr, qdot_ptr, kdot_ptr,
                              M, N, C, W, scale2, inv_tau, half_p,
                              POW: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
                              EMU_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q_ptr, k_ptr, qn_ptr, kn_ptr = batch_offsets(q_ptr, k_ptr, qn_ptr, kn_ptr, b, M, N, C)
    dq_ptr, dk_ptr, qdot_ptr, kdot_ptr = batch_offsets(dq_ptr, dk_ptr, qdot_ptr, kdot_ptr, b, M, N, C)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)

    s = cosine_tile(q_ptr, k_ptr, qn_ptr, kn_ptr, offs_m, offs_n, M, N, C,
                    NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
    lse2 = tl.load(lse_ptr + b * M + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    g = tl.load(go_ptr + b * M + offs_m, mask=m_ok, other=0.0) * inv_tau
    loss = tl.load(loss_ptr + b * M + offs_m, mask=m_ok, other=0.0)
    tx = tl.load(t_ptr + b * M * 2 + offs_m * 2, mask=m_ok, other=0.0)
    ty = tl.load(t_ptr + b * M * 2 + offs_m * 2 + 1, mask=m_ok, other=0.0)
    d = _cost(tx, ty, offs_n, W, half_p, POW)
    p = tl.exp2(s * scale2 - lse2[:, None])
    ds = p * (d - loss[:, None]) * g[:, None]
    ds = tl.where(m_ok[:, None] & n_ok[None, :], ds, 0.0)
    feature_grads_from_ds(ds, s, q_ptr, k_ptr, qn_ptr, kn_ptr, dq_ptr, dk_ptr, qdot_ptr, kdot_ptr,
                          offs_m, offs_n, M, N, C, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)


def _pow_mode(p: float) -> int:
    """POW constexpr: the exact specialisations p = 2 (r2) and p = 1 (sqrt), else the general power."""
    return 2 if p == 2.0 else (1 if p == 1.0 else 0)


def _check(src, tgt, target_xy, H, W, p, op):
    B, Ns, Nt, C = check_features(src, tgt, op)
    if tuple(target_xy.shape) != (B, Ns, 2):
        raise ValueError(f"{op}: expected target_xy of shape {(B, Ns, 2)}, got {tuple(target_xy.shape)}")
    if H * W != Nt:
        raise ValueError(f"{op}: H*W = {H}*{W} != Nt = {Nt}")
    if not p > 0:
        raise ValueError(f"{op}: expected p > 0, got {p}")
    return B, Ns, Nt, C


def expected_cost_fwd(src: torch.Tensor, tgt: torch.Tensor, target_xy: torch.Tensor, tau: float, H: int, W: int,
                      p: float = 1.0, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (B, Ns) fp32, lse (B, Ns) fp32) for src (B, Ns, C), tgt (B, Nt=H*W, C) of one dtype among
    fp32/fp16/bf16 and target_xy (B, Ns, 2) floating (read as fp32); see the module docstring."""
    B, Ns, Nt, C = _check(src, tgt, target_xy, H, W, p, "expected_cost")
    dev = src.device
    loss = torch.empty((B, Ns), device=dev, dtype=torch.float32)
    lse = torch.empty((B, Ns), device=dev, dtype=torch.float32)
    if B == 0 or Ns == 0:
        return loss, lse
    if Nt == 0:
        return loss.fill_(float("nan")), lse.fill_(float("-inf"))
    t = target_xy.to(torch.float32).contiguous()
    qn = row_norms(src) if normalize else lse
    kn = row_norms(tgt) if normalize else lse
    cfg = loss_tile_config("score", src.dtype, C)
    grid = (triton.cdiv(Ns, cfg.BLOCK_M), B)
    with device_guard(src):
        _expected_cost_fwd_kernel[grid](src, tgt, qn, kn, t, loss, lse, Ns, Nt, C, W, LOG2E / float(tau),
                                        0.5 * float(p), POW=_pow_mode(float(p)), NORMALIZE=bool(normalize),
                                        PREC=dot_precision(src.dtype), EMU_BF16=emulate_bf16(src.dtype),
                                        **cfg.meta(), **cfg.launch())
    return loss, lse


def expected_cost_bwd(grad: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, target_xy: torch.Tensor,
                      loss: torch.Tensor, lse: torch.Tensor, tau: float, H: int, W: int, p: float = 1.0,
                      normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(dsrc, dtgt) in the dtypes of src/tgt from grad (B, Ns) and the forward's loss and lse (B, Ns),
    recomputed flash-style; target_xy gets no gradient."""
    B, Ns, Nt, C = _check(src, tgt, target_xy, H, W, p, "expected_cost_bwd")
    acc = FeatureGrads(src, tgt, normalize)
    if B == 0 or Ns == 0 or Nt == 0:
        return acc.finish()
    grad = grad.to(torch.float32).contiguous()
    loss = loss.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    t = target_xy.to(torch.float32).contiguous()
    cfg = loss_tile_config("bwd", src.dtype, C)
    grid = (triton.cdiv(Ns, cfg.BLOCK_M), triton.cdiv(Nt, cfg.BLOCK_N), B)
    with device_guard(src):
        _expected_cost_bwd_kernel[grid](*acc.features(), t, grad, loss, lse, *acc.accumulators(),
                                        Ns, Nt, C, W, LOG2E / float(tau), 1.0 / float(tau), 0.5 * float(p),
                                        POW=_pow_mode(float(p)), NORMALIZE=bool(normalize),
                                        PREC=dot_precision(src.dtype), EMU_BF16=emulate_bf16(src.dtype),
                                        **cfg.meta(), **cfg.launch())
    return acc.finish()
