"""softmax_aggregate: attention with cosine logits, O_u = sum_v softmax(s_u / tau)_v values_v (DVE's exchange).

Shapes: src (B, Ns, C), tgt (B, Nt, C), values (B, Nt, Cv); out (B, Ns, Cv) fp32,
lse (B, Ns) fp32 = log sum_v exp(s_uv / tau).

Forward (``_aggregate_fwd_kernel``): the flash-attention forward. One program per (row tile, slice of
BLOCK_V value channels, batch item): online softmax in base 2 over the target tiles with the
(BLOCK_M, BLOCK_V) output accumulator in registers, rescaled by 2^(m_old - m_new) per tile, plus
one P @ V tile GEMM per tile (P rounded to the values' dtype for the tensor cores, as in flash
attention). BLOCK_V is the smallest bucket of ``_AGG_FWD_TABLE`` (64, 128, 256) holding Cv, so Cv
up to 256 (DVE's descriptors, Demystifying's 256-d projections) costs one pass; a wider Cv is split
over ceil(Cv / 256) programs per row tile, each recomputing the score tiles. Rows with a NaN
similarity give NaN (out and lse).

Backward (``_aggregate_bwd_kernel``), recomputed from the saved lse (math.md):
  p_uv = exp(z_uv - lse_u), dV_v = sum_u p_uv dO_u, D_u = <dO_u, O_u>,
  ds_uv = p_uv (<dO_u, V_v> - D_u) / tau.
One program per (row tile, target tile): dP = dO V^T over BLOCK_C chunks of Cv, the score tile S
(C chunks), ds, dQ/dK as in soft_argmax (``_stream.feature_grads_from_ds``), then dV_tile += P^T dO
over the Cv chunks with fp32 atomics: 5 tile GEMMs, whatever C and Cv are. dO is rounded
once to the values' dtype for the GEMMs (the operand dtype of P @ V), and D is computed on the host
from that rounded dO and the fp32 output, so that sum_v p_uv ds_uv = 0 holds to fp32 accuracy.
fp16 caveats: |dO| must stay below 65504, and so must |ds| (as in soft_argmax).

values of another floating dtype than src (or fp64 values) are read as fp32; dvalues comes back in
the dtype of values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import TileConfig, dot_precision, interpreting
from ._stream import (INTERP_LOSS_TILE, LOG2E, batch_offsets, check_features, cosine_tile, device_guard, emulate_bf16,
                      feature_grads_from_ds, FeatureGrads, loss_tile_config, mma, online_softmax_step, row_norms,
                      table_tile, table_tiles, tile_offsets, to_dtype)

# Forward tiles per BLOCK_V bucket: (16-bit (BLOCK_M, BLOCK_N, BLOCK_C, warps, stages[, maxnreg]),
# fp32 (...)). The (BLOCK_M, BLOCK_V) fp32 accumulator lives in registers beside the score tile, so
# BLOCK_M shrinks as BLOCK_V grows. fp32 (exact FMA dots, tf32 off as torch's default) holds the
# P @ V operands in registers with the reduction dimension BLOCK_N whole: BLOCK_N = 32 and an explicit
# register cap (ptxas otherwise caps at 128 and spills). aot.py compiles every entry.
_AGG_FWD_TABLE = {
    64: ((128, 64, 64, 8, 3), (64, 32, 32, 8, 3, 255)),
    128: ((64, 64, 64, 8, 3), (64, 32, 32, 8, 2, 255)),
    256: ((64, 64, 64, 8, 2), (64, 32, 32, 8, 2, 255)),
}
# Under the interpreter: the loss tile and 4-wide value slices, so that the tests' Cv = 5 walks
# through two slices (the Cv > 256 path of GPUs).
_INTERP_BLOCK_V = 4


def aggregate_fwd_config(dtype: torch.dtype, Cv: int) -> tuple[TileConfig, int]:
    """(tile, BLOCK_V) of the forward for features of ``dtype`` and Cv value channels: BLOCK_V is the
    smallest bucket of ``_AGG_FWD_TABLE`` holding Cv (256 slices beyond)."""
    if interpreting():
        return INTERP_LOSS_TILE, _INTERP_BLOCK_V
    bv = next((b for b in sorted(_AGG_FWD_TABLE) if Cv <= b), max(_AGG_FWD_TABLE))
    return table_tile(_AGG_FWD_TABLE[bv], dtype), bv


def aot_tiles(attr: str) -> list[tuple[str, TileConfig, dict]]:
    """Every (dtype-name, tile, extra constexprs) a GPU launch of kernel ``attr`` can use (aot.py)."""
    if attr != "_aggregate_fwd_kernel":
        raise KeyError(f"{attr} has no table of its own")
    return [(dname, tc, {"BLOCK_V": bv})
            for bv in sorted(_AGG_FWD_TABLE) for dname, tc in table_tiles(_AGG_FWD_TABLE[bv])]


@triton.jit
def _aggregate_fwd_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, v_ptr, out_ptr, lse_ptr,
                          M, N, C, CV, scale2,
                          NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, PREC: tl.constexpr,
                          PREC_V: tl.constexpr, EMU_BF16: tl.constexpr, EMU_BF16_V: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q_ptr, k_ptr, qn_ptr, kn_ptr = batch_offsets(q_ptr, k_ptr, qn_ptr, kn_ptr, b, M, N, C)
    v_ptr += b * N * CV
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_ok = offs_v < CV

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    n_nan = tl.zeros((BLOCK_M,), dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        s = cosine_tile(q_ptr, k_ptr, qn_ptr, kn_ptr, offs_m, offs_n, M, N, C,
                        NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
        p, alpha, m_new, n_nan = online_softmax_step(s, offs_n, N, scale2, m_i, n_nan)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_ptr + offs_n[:, None] * CV + offs_v[None, :], mask=n_ok[:, None] & v_ok[None, :], other=0.0)
        acc = mma(to_dtype(p, v_ptr.dtype.element_ty, EMU_BF16_V), vt, acc * alpha[:, None], PREC_V, EMU_BF16_V)
        m_i = m_new

    bad = n_nan > 0
    nan = float("nan")
    m_ok = offs_m < M
    out = tl.where(bad[:, None], nan, acc / l_i[:, None])
    tl.store(out_ptr + b * M * CV + offs_m[:, None] * CV + offs_v[None, :], out, mask=m_ok[:, None] & v_ok[None, :])
    lse = tl.where(bad, nan, (m_i + tl.log2(l_i)) * 0.6931471805599453)
    tl.store(lse_ptr + b * M + offs_m, lse, mask=m_ok & (pid_v == 0))


@triton.jit
def _aggregate_bwd_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, v_ptr, go_ptr, d_ptr, lse_ptr,
                          dq_ptr, dk_ptr, qdot_ptr, kdot_ptr, dv_ptr,
                          M, N, C, CV, scale2, inv_tau,
                          NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_C: tl.constexpr, PREC: tl.constexpr, PREC_V: tl.constexpr,
                          EMU_BF16: tl.constexpr, EMU_BF16_V: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    q_ptr, k_ptr, qn_ptr, kn_ptr = batch_offsets(q_ptr, k_ptr, qn_ptr, kn_ptr, b, M, N, C)
    dq_ptr, dk_ptr, qdot_ptr, kdot_ptr = batch_offsets(dq_ptr, dk_ptr, qdot_ptr, kdot_ptr, b, M, N, C)
    v_ptr += b * N * CV
    dv_ptr += b * N * CV
    go_ptr += b * M * CV
    offs_m, offs_n, m_ok, n_ok = tile_offsets(pid_m, pid_n, M, N, BLOCK_M, BLOCK_N)
    valid = m_ok[:, None] & n_ok[None, :]

    # Three phases, ordered to keep few tiles live at once (the first version, with dP and dV in
    # one Cv loop beside S and P, spilled on sm_80): dP = dO V^T over the Cv chunks; then S, P and
    # ds, and dQ/dK; then dV += P^T dO over the Cv chunks again (dO chunks are re-read from L2).
    offs_c = tl.arange(0, BLOCK_C)
    dp = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, CV, BLOCK_C):
        cc = c0 + offs_c
        c_ok = cc < CV
        go_c = tl.load(go_ptr + offs_m[:, None] * CV + cc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        vt_c = tl.load(v_ptr + offs_n[None, :] * CV + cc[:, None], mask=n_ok[None, :] & c_ok[:, None], other=0.0)
        dp = mma(go_c, vt_c, dp, PREC_V, EMU_BF16_V)

    s = cosine_tile(q_ptr, k_ptr, qn_ptr, kn_ptr, offs_m, offs_n, M, N, C,
                    NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
    lse2 = tl.load(lse_ptr + b * M + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    d_row = tl.load(d_ptr + b * M + offs_m, mask=m_ok, other=0.0)
    p = tl.where(valid, tl.exp2(s * scale2 - lse2[:, None]), 0.0)
    ds = p * (dp - d_row[:, None]) * inv_tau
    p16_t = tl.trans(to_dtype(p, v_ptr.dtype.element_ty, EMU_BF16_V))
    feature_grads_from_ds(ds, s, q_ptr, k_ptr, qn_ptr, kn_ptr, dq_ptr, dk_ptr, qdot_ptr, kdot_ptr,
                          offs_m, offs_n, M, N, C, NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)

    for c0 in range(0, CV, BLOCK_C):
        cc = c0 + offs_c
        c_ok = cc < CV
        go_c = tl.load(go_ptr + offs_m[:, None] * CV + cc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        dv_c = mma(p16_t, go_c, tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32), PREC_V, EMU_BF16_V)
        tl.atomic_add(dv_ptr + offs_n[:, None] * CV + cc[None, :], dv_c,
                      mask=n_ok[:, None] & c_ok[None, :], sem="relaxed")


def _values_operand(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """values as the P @ V operand: kept when of the features' dtype, else fp32 (fp64 included)."""
    vdt = values.dtype if values.dtype == dtype else torch.float32
    return values.to(vdt).contiguous()


def _check(src, tgt, values, op):
    B, Ns, Nt, C = check_features(src, tgt, op)
    if values.dim() != 3 or tuple(values.shape[:2]) != (B, Nt):
        raise ValueError(f"{op}: expected values of shape (B, Nt, Cv) = ({B}, {Nt}, Cv), got {tuple(values.shape)}")
    if not values.dtype.is_floating_point:
        raise TypeError(f"{op}: expected floating values, got {values.dtype}")
    Cv = values.shape[2]
    if Cv < 1:
        raise ValueError(f"{op}: values must have at least one channel, got shape {tuple(values.shape)}")
    if max(Ns, Nt) * Cv >= 2 ** 31:
        raise ValueError(f"{op}: N*Cv = {max(Ns, Nt) * Cv} exceeds the kernels' int32 in-batch indexing")
    return B, Ns, Nt, C, Cv


def softmax_aggregate_fwd(src: torch.Tensor, tgt: torch.Tensor, values: torch.Tensor, tau: float,
                          normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (B, Ns, Cv) fp32, lse (B, Ns) fp32) for src (B, Ns, C), tgt (B, Nt, C) of one dtype among
    fp32/fp16/bf16 and values (B, Nt, Cv) floating; see the module docstring."""
    B, Ns, Nt, C, Cv = _check(src, tgt, values, "softmax_aggregate")
    dev = src.device
    out = torch.empty((B, Ns, Cv), device=dev, dtype=torch.float32)
    lse = torch.empty((B, Ns), device=dev, dtype=torch.float32)
    if B == 0 or Ns == 0:
        return out, lse
    if Nt == 0:
        return out.fill_(float("nan")), lse.fill_(float("-inf"))
    v = _values_operand(values, src.dtype)
    qn = row_norms(src) if normalize else lse
    kn = row_norms(tgt) if normalize else lse
    cfg, bv = aggregate_fwd_config(src.dtype, Cv)
    grid = (triton.cdiv(Ns, cfg.BLOCK_M), triton.cdiv(Cv, bv), B)
    with device_guard(src):
        _aggregate_fwd_kernel[grid](src, tgt, qn, kn, v, out, lse, Ns, Nt, C, Cv, LOG2E / float(tau),
                                    NORMALIZE=bool(normalize), BLOCK_V=bv, PREC=dot_precision(src.dtype),
                                    PREC_V=dot_precision(v.dtype), EMU_BF16=emulate_bf16(src.dtype),
                                    EMU_BF16_V=emulate_bf16(v.dtype), **cfg.meta(), **cfg.launch())
    return out, lse


def softmax_aggregate_bwd(grad: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, values: torch.Tensor,
                          out: torch.Tensor, lse: torch.Tensor, tau: float,
                          normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dsrc, dtgt, dvalues) in the dtypes of src/tgt/values from grad (B, Ns, Cv) and the forward's
    out (B, Ns, Cv) and lse (B, Ns), recomputed flash-style."""
    B, Ns, Nt, C, Cv = _check(src, tgt, values, "softmax_aggregate_bwd")
    acc = FeatureGrads(src, tgt, normalize)
    dv = torch.zeros((B, Nt, Cv), device=src.device, dtype=torch.float32)
    if B == 0 or Ns == 0 or Nt == 0:
        ds, dt = acc.finish()
        return ds, dt, dv.to(values.dtype)
    v = _values_operand(values, src.dtype)
    go = grad.to(v.dtype).contiguous()  # the dO operand of the GEMMs, rounded once
    d_row = (go.to(torch.float32) * out.to(torch.float32)).sum(-1).contiguous()
    lse = lse.to(torch.float32).contiguous()
    cfg = loss_tile_config("bwd", src.dtype, C)
    grid = (triton.cdiv(Ns, cfg.BLOCK_M), triton.cdiv(Nt, cfg.BLOCK_N), B)
    with device_guard(src):
        _aggregate_bwd_kernel[grid](*acc.features(), v, go, d_row, lse, *acc.accumulators(), dv,
                                    Ns, Nt, C, Cv, LOG2E / float(tau), 1.0 / float(tau),
                                    NORMALIZE=bool(normalize), PREC=dot_precision(src.dtype),
                                    PREC_V=dot_precision(v.dtype), EMU_BF16=emulate_bf16(src.dtype),
                                    EMU_BF16_V=emulate_bf16(v.dtype), **cfg.meta(), **cfg.launch())
    ds, dt = acc.finish()
    return ds, dt, dv.to(values.dtype)
