"""rowsoftmax_distill: per-row loss between a teacher's and a student's row softmaxes (LEAD, ASYM).

Shapes: teacher t_src (B, Ns, Ct), t_tgt (B, Nt, Ct); student s_src (B, Ns, Cs), s_tgt (B, Nt, Cs), all
of one dtype among fp32/fp16/bf16 (Ct and Cs may differ). a = softmax(s^T / tau_t) (teacher, no
gradient), b = softmax(s^S / tau_s) (student). loss (B, Ns) fp32: code 0 "ce" -sum_v a log b,
1 "mse" sum_v (a - b)^2, 2 "l1" sum_v |a - b|; stats (B, Ns, 3) fp32 = [LSE^T, LSE^S, c] with
c = -2 (sum ab - sum b^2) (mse), sum_v b_v h_v with h = -sign(a - b) (l1), 0 (ce).

Forward: both score tiles of the same (row tile, target tile) side by side, teacher over Ct and
student over Cs channels (``_distill_fwd_kernel``), online in base 2 with one running max per
softmax. ce and mse need one pass, every normaliser and cross sum rescaled by the factor(s) of its
own running max(es) (math.md; the C++ ``DistillOnline``):
  sT = sum e^T, sS = sum e^S, ce: sTz = sum e^T z^S; mse: sTT = sum (e^T)^2, sTS = sum e^T e^S,
  sSS = sum (e^S)^2  ->  sum a^2 = sTT/sT^2, sum ab = sTS/(sT sS), sum b^2 = sSS/sS^2, sum a z^S = sTz/sT.
l1 does not decompose: the same kernel gives the two LSEs, then ``_distill_l1_kernel`` streams both
tiles again for sum |a - b| and c. Rows with a NaN similarity (teacher or student) give NaN.

Backward (``_distill_bwd_kernel``), student only, both tiles recomputed from the saved LSEs:
  ce: ds^S = G (b - a) / tau_s;  mse: ds^S = G b (h - c) / tau_s with h = -2 (a - b);
  l1: ds^S = G b (h - c) / tau_s with h = -sign(a - b);
one program per (row tile, target tile), dQ/dK of the student added with fp32 atomics
(``_stream.feature_grads_from_ds``): 4 tile GEMMs (teacher S, student S, dQ, dK).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import TileConfig, dot_precision
from ._stream import (LOG2E, batch_offsets, check_features, cosine_tile, device_guard, emulate_bf16,
                      feature_grads_from_ds, FeatureGrads, loss_tile_config, row_norms, table_tile, table_tiles,
                      tile_offsets)

# Forward tiles (both forward kernels): (16-bit, fp32) as (BLOCK_M, BLOCK_N, BLOCK_C, warps, stages).
# 16-bit: _config's "score" tile. fp32: two exact-FMA score tiles are in flight at once (the teacher's
# is live while the student's accumulates), and the FMA dot holds its operand chunks in registers:
# with 32-channel chunks ptxas caps at 128 registers and spills on sm_80, 16-channel chunks fit.
_FWD_TABLE = ((128, 64, 64, 8, 3), (64, 64, 16, 8, 3))


def distill_fwd_config(dtype: torch.dtype) -> TileConfig:
    """Tile of the two forward kernels for features of ``dtype``."""
    return table_tile(_FWD_TABLE, dtype)


def aot_tiles(attr: str) -> list[tuple[str, TileConfig, dict]]:
    """Every (dtype-name, tile, extra constexprs) a GPU launch of kernel ``attr`` can use (aot.py)."""
    if attr not in ("_distill_fwd_kernel", "_distill_l1_kernel"):
        raise KeyError(f"{attr} has no table of its own")
    return [(dname, tc, {}) for dname, tc in table_tiles(_FWD_TABLE)]


@triton.jit
def _distill_fwd_kernel(tq_ptr, tk_ptr, tqn_ptr, tkn_ptr, sq_ptr, sk_ptr, sqn_ptr, skn_ptr, loss_ptr, stats_ptr,
                        M, N, CT, CS, scale_t2, scale_s2,
                        LOSS: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tq_ptr, tk_ptr, tqn_ptr, tkn_ptr = batch_offsets(tq_ptr, tk_ptr, tqn_ptr, tkn_ptr, b, M, N, CT)
    sq_ptr, sk_ptr, sqn_ptr, skn_ptr = batch_offsets(sq_ptr, sk_ptr, sqn_ptr, skn_ptr, b, M, N, CS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)

    mt = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    ms = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    x1 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # ce: sum e^T z^S (z in log2 units); mse: sum (e^T)^2
    x2 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # mse: sum e^T e^S
    x3 = tl.zeros((BLOCK_M,), dtype=tl.float32)  # mse: sum (e^S)^2
    n_nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = (offs_n < N)[None, :]
        st = cosine_tile(tq_ptr, tk_ptr, tqn_ptr, tkn_ptr, offs_m, offs_n, M, N, CT,
                         NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
        ss = cosine_tile(sq_ptr, sk_ptr, sqn_ptr, skn_ptr, offs_m, offs_n, M, N, CS,
                         NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
        zt = st * scale_t2
        zs = ss * scale_s2
        ok_t = col_ok & (zt == zt)
        ok_s = col_ok & (zs == zs)
        n_nan += tl.sum((col_ok & ((zt != zt) | (zs != zs))).to(tl.int32), axis=1)
        zt = tl.where(ok_t, zt, float("-inf"))
        zs = tl.where(ok_s, zs, float("-inf"))
        mt_new = tl.maximum(mt, tl.max(zt, axis=1))
        ms_new = tl.maximum(ms, tl.max(zs, axis=1))
        al_t = tl.exp2(mt - mt_new)
        al_s = tl.exp2(ms - ms_new)
        et = tl.exp2(zt - mt_new[:, None])
        es = tl.exp2(zs - ms_new[:, None])
        s_t = s_t * al_t + tl.sum(et, axis=1)
        s_s = s_s * al_s + tl.sum(es, axis=1)
        if LOSS == 0:
            x1 = x1 * al_t + tl.sum(et * tl.where(ok_s, zs, 0.0), axis=1)
        elif LOSS == 1:
            x1 = x1 * (al_t * al_t) + tl.sum(et * et, axis=1)
            x2 = x2 * (al_t * al_s) + tl.sum(et * es, axis=1)
            x3 = x3 * (al_s * al_s) + tl.sum(es * es, axis=1)
        mt = mt_new
        ms = ms_new

    bad = n_nan > 0
    nan = float("nan")
    ln2 = 0.6931471805599453
    lt2 = mt + tl.log2(s_t)
    ls2 = ms + tl.log2(s_s)
    if LOSS == 0:
        loss = (ls2 - x1 / s_t) * ln2
        c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    elif LOSS == 1:
        aa = x1 / (s_t * s_t)
        ab = x2 / (s_t * s_s)
        bb = x3 / (s_s * s_s)
        loss = aa - 2.0 * ab + bb
        c = -2.0 * (ab - bb)
    else:  # l1: the LSEs only; _distill_l1_kernel writes the loss and c
        loss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    m_ok = offs_m < M
    row = b * M + offs_m
    tl.store(loss_ptr + row, tl.where(bad, nan, loss), mask=m_ok)
    tl.store(stats_ptr + row * 3, tl.where(bad, nan, lt2 * ln2), mask=m_ok)
    tl.store(stats_ptr + row * 3 + 1, tl.where(bad, nan, ls2 * ln2), mask=m_ok)
    tl.store(stats_ptr + row * 3 + 2, tl.where(bad, nan, c), mask=m_ok)


@triton.jit
def _distill_l1_kernel(tq_ptr, tk_ptr, tqn_ptr, tkn_ptr, sq_ptr, sk_ptr, sqn_ptr, skn_ptr, loss_ptr, stats_ptr,
                       M, N, CT, CS, scale_t2, scale_s2,
                       NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    tq_ptr, tk_ptr, tqn_ptr, tkn_ptr = batch_offsets(tq_ptr, tk_ptr, tqn_ptr, tkn_ptr, b, M, N, CT)
    sq_ptr, sk_ptr, sqn_ptr, skn_ptr = batch_offsets(sq_ptr, sk_ptr, sqn_ptr, skn_ptr, b, M, N, CS)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    row = b * M + offs_m
    lt2 = tl.load(stats_ptr + row * 3, mask=m_ok, other=0.0) * 1.4426950408889634
    ls2 = tl.load(stats_ptr + row * 3 + 1, mask=m_ok, other=0.0) * 1.4426950408889634

    s1 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = (offs_n < N)[None, :]
        st = cosine_tile(tq_ptr, tk_ptr, tqn_ptr, tkn_ptr, offs_m, offs_n, M, N, CT,
                         NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
        ss = cosine_tile(sq_ptr, sk_ptr, sqn_ptr, skn_ptr, offs_m, offs_n, M, N, CS,
                         NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
        a = tl.where(col_ok, tl.exp2(st * scale_t2 - lt2[:, None]), 0.0)
        bb = tl.where(col_ok, tl.exp2(ss * scale_s2 - ls2[:, None]), 0.0)
        d = a - bb
        s1 += tl.sum(tl.abs(d), axis=1)
        # b * h with h = -sign(a - b): -b where a > b, +b where a < b, 0 on ties
        s2 += tl.sum(tl.where(d > 0, -bb, tl.where(d < 0, bb, 0.0)), axis=1)
    tl.store(loss_ptr + row, s1, mask=m_ok)
    tl.store(stats_ptr + row * 3 + 2, s2, mask=m_ok)


@triton.jit
def _distill_bwd_kernel(tq_ptr, tk_ptr, tqn_ptr, tkn_ptr, sq_ptr, sk_ptr, sqn_ptr, skn_ptr, go_ptr, stats_ptr,
                        dq_ptr, dk_ptr, qdot_ptr, kdot_ptr,
                        M, N, CT, CS, scale_t2, scale_s2, inv_tau_s,
                        LOSS: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    tq_ptr, tk_ptr, tqn_ptr, tkn_ptr = batch_offsets(tq_ptr, tk_ptr, tqn_ptr, tkn_ptr, b, M, N, CT)
    sq_ptr, sk_ptr, sqn_ptr, skn_ptr = batch_offsets(sq_ptr, sk_ptr, sqn_ptr, skn_ptr, b, M, N, CS)
    dq_ptr, dk_ptr, qdot_ptr, kdot_ptr = batch_offsets(dq_ptr, dk_ptr, qdot_ptr, kdot_ptr, b, M, N, CS)
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)

    st = cosine_tile(tq_ptr, tk_ptr, tqn_ptr, tkn_ptr, offs_m, offs_n, M, N, CT,
                     NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
    ss = cosine_tile(sq_ptr, sk_ptr, sqn_ptr, skn_ptr, offs_m, offs_n, M, N, CS,
                     NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
    row = b * M + offs_m
    lt2 = tl.load(stats_ptr + row * 3, mask=m_ok, other=0.0) * 1.4426950408889634
    ls2 = tl.load(stats_ptr + row * 3 + 1, mask=m_ok, other=0.0) * 1.4426950408889634
    c = tl.load(stats_ptr + row * 3 + 2, mask=m_ok, other=0.0)
    g = tl.load(go_ptr + row, mask=m_ok, other=0.0) * inv_tau_s
    a = tl.exp2(st * scale_t2 - lt2[:, None])
    bb = tl.exp2(ss * scale_s2 - ls2[:, None])
    if LOSS == 0:
        ds = g[:, None] * (bb - a)
    else:
        if LOSS == 1:
            h = -2.0 * (a - bb)
        else:
            h = tl.where(a > bb, -1.0, tl.where(a < bb, 1.0, 0.0))
        ds = g[:, None] * bb * (h - c[:, None])
    ds = tl.where(m_ok[:, None] & n_ok[None, :], ds, 0.0)
    feature_grads_from_ds(ds, ss, sq_ptr, sk_ptr, sqn_ptr, skn_ptr, dq_ptr, dk_ptr, qdot_ptr, kdot_ptr,
                          offs_m, offs_n, M, N, CS, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)


def _check(t_src, t_tgt, s_src, s_tgt, loss_code, op):
    B, Ns, Nt, Cs = check_features(s_src, s_tgt, op)
    Bt, Nst, Ntt, Ct = check_features(t_src, t_tgt, op)
    if (Bt, Nst, Ntt) != (B, Ns, Nt):
        raise ValueError(f"{op}: teacher and student must have the same B, Ns and Nt, got t_src "
                         f"{tuple(t_src.shape)}, t_tgt {tuple(t_tgt.shape)}, s_src {tuple(s_src.shape)}, "
                         f"s_tgt {tuple(s_tgt.shape)}")
    if t_src.dtype != s_src.dtype:
        raise TypeError(f"{op}: teacher and student must have the same dtype, got {t_src.dtype} and {s_src.dtype}")
    if int(loss_code) not in (0, 1, 2):
        raise ValueError(f"{op}: loss code must be 0 (ce), 1 (mse) or 2 (l1), got {loss_code}")
    return B, Ns, Nt, Ct, Cs


def rowsoftmax_distill_fwd(t_src: torch.Tensor, t_tgt: torch.Tensor, s_src: torch.Tensor, s_tgt: torch.Tensor,
                           tau_t: float, tau_s: float, loss_code: int,
                           normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss (B, Ns) fp32, stats (B, Ns, 3) fp32 = [LSE^T, LSE^S, c]) for teacher (B, N*, Ct) and student
    (B, N*, Cs) features; ``loss_code`` 0 ce, 1 mse, 2 l1. See the module docstring."""
    B, Ns, Nt, Ct, Cs = _check(t_src, t_tgt, s_src, s_tgt, loss_code, "rowsoftmax_distill")
    dev = s_src.device
    loss = torch.empty((B, Ns), device=dev, dtype=torch.float32)
    stats = torch.empty((B, Ns, 3), device=dev, dtype=torch.float32)
    if B == 0 or Ns == 0:
        return loss, stats
    if Nt == 0:
        return loss.fill_(float("nan")), stats.fill_(float("nan"))
    dummy = loss
    tn = (row_norms(t_src), row_norms(t_tgt)) if normalize else (dummy, dummy)
    sn = (row_norms(s_src), row_norms(s_tgt)) if normalize else (dummy, dummy)
    cfg = distill_fwd_config(s_src.dtype)
    grid = (triton.cdiv(Ns, cfg.BLOCK_M), B)
    args = (t_src, t_tgt, *tn, s_src, s_tgt, *sn, loss, stats, Ns, Nt, Ct, Cs,
            LOG2E / float(tau_t), LOG2E / float(tau_s))
    meta = dict(NORMALIZE=bool(normalize), PREC=dot_precision(s_src.dtype), EMU_BF16=emulate_bf16(s_src.dtype),
                **cfg.meta(), **cfg.launch())
    with device_guard(s_src):
        _distill_fwd_kernel[grid](*args, LOSS=int(loss_code), **meta)
        if int(loss_code) == 2:
            _distill_l1_kernel[grid](*args, **meta)
    return loss, stats


def rowsoftmax_distill_bwd(grad: torch.Tensor, t_src: torch.Tensor, t_tgt: torch.Tensor, s_src: torch.Tensor,
                           s_tgt: torch.Tensor, stats: torch.Tensor, tau_t: float, tau_s: float, loss_code: int,
                           normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(ds_src, ds_tgt) in the student's dtype from grad (B, Ns) and the forward's stats (B, Ns, 3);
    the teacher gets no gradient."""
    B, Ns, Nt, Ct, Cs = _check(t_src, t_tgt, s_src, s_tgt, loss_code, "rowsoftmax_distill_bwd")
    acc = FeatureGrads(s_src, s_tgt, normalize)
    if B == 0 or Ns == 0 or Nt == 0:
        return acc.finish()
    grad = grad.to(torch.float32).contiguous()
    stats = stats.to(torch.float32).contiguous()
    q, k, qn, kn = acc.features()
    tn = (row_norms(t_src), row_norms(t_tgt)) if normalize else (qn, kn)
    cfg = loss_tile_config("bwd", s_src.dtype, max(Ct, Cs))
    grid = (triton.cdiv(Ns, cfg.BLOCK_M), triton.cdiv(Nt, cfg.BLOCK_N), B)
    with device_guard(s_src):
        _distill_bwd_kernel[grid](t_src, t_tgt, *tn, q, k, qn, kn, grad, stats, *acc.accumulators(),
                                  Ns, Nt, Ct, Cs, LOG2E / float(tau_t), LOG2E / float(tau_s), 1.0 / float(tau_s),
                                  LOSS=int(loss_code), NORMALIZE=bool(normalize), PREC=dot_precision(s_src.dtype),
                                  EMU_BF16=emulate_bf16(s_src.dtype), **cfg.meta(), **cfg.launch())
    return acc.finish()
