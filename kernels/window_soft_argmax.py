"""window_soft_argmax: soft-argmax restricted to a window around each row's argmax.

Shapes: src (B, Ns, C), tgt (B, Nt, C), Nt = H*W; out (B, Ns, 2) fp32, lse (B, Ns) fp32,
center (B, Ns) int64 (-1 for a row whose similarities are all NaN; out and lse are NaN there).

Pass 1 is the streaming row argmax of ``topk._argmax_kernel`` over the whole target (ties to the
lowest index). Pass 2 (``_window_fwd_kernel``) visits only the window cells
W_u = {v : |x_v - x_c| <= r, |y_v - y_c| <= r} clipped at the border (w = |W_u| <= (2r+1)^2): one
program per row gathers BLOCK_W window cells at a time and scores them against the row over BLOCK_C
channel chunks. The window is a per-row gather (each row has its own centre), so this pass is a
batch of small GEMVs on CUDA cores, bounded by the gather bandwidth rather than by tensor cores.
Online softmax in base 2 over the window cells, then:

* ``zero_outside=False`` ("exclude"): softmax over W_u only; lse = log sum_W e^z.
* ``zero_outside=True`` (GeoAware-SC "zero"): logits outside W_u are 0 and join a softmax over all
  N cells, in closed form (math.md): m = max(max_W z, 0) (max_W z when w = N),
  Z = sum_W e^(z-m) + (N-w) e^(-m), y = [sum_W e^(z-m) g + e^(-m) (G_tot - sum_W g)] / Z,
  lse = m + log Z. G_tot - sum_W g is computed exactly in integers.

Backward (``_window_bwd_kernel``): the soft-argmax formula on the window cells only, with
p = e^(z - lse), D_u = <G_u, y_u>, ds = p (<G_u, g_v> - D_u) / tau. The row's dQ is private to its
program; dK is scattered with fp32 atomics (windows of different rows overlap).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import window_cells, window_config
from ._stream import LOG2E, check_features, device_guard, finalize_grad, row_norms
from .topk import row_argmax


@triton.jit
def _window_geometry(ctr_ptr, row, H, W, radius):
    """Clipped window of one row: (x0, y0, wx, wy, ok); ok is False for centre -1."""
    c = tl.load(ctr_ptr + row)
    ok = c >= 0
    c = tl.where(ok, c, 0).to(tl.int32)
    cx = c % W
    cy = c // W
    x0 = tl.maximum(cx - radius, 0)
    x1 = tl.minimum(cx + radius, W - 1)
    y0 = tl.maximum(cy - radius, 0)
    y1 = tl.minimum(cy + radius, H - 1)
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1, ok


@triton.jit
def _window_scores(q_ptr, k_ptr, kn_ptr, ru, x0, y0, wx, wy, j0, W, C,
                   NORMALIZE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Similarities of one row with window cells j0 .. j0+BLOCK_W-1 (row-major inside the window).

    Returns (s, cell index v, in-window mask, x, y) for the BLOCK_W cells.
    """
    j = j0 + tl.arange(0, BLOCK_W)
    jm = j < wx * wy
    vx = x0 + j % wx
    vy = y0 + j // wx
    v = tl.where(jm, vy * W + vx, 0)
    s = tl.zeros((BLOCK_W,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc < C
        qc = tl.load(q_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)
        kc = tl.load(k_ptr + v[:, None] * C + cc[None, :], mask=jm[:, None] & c_ok[None, :], other=0.0)
        s += tl.sum(kc.to(tl.float32) * qc[None, :], axis=1)
    if NORMALIZE:
        rv = 1.0 / tl.maximum(tl.load(kn_ptr + v, mask=jm, other=1.0), 1e-12)
        s = s * ru * rv
    return s, v, jm, vx, vy


@triton.jit
def _window_fwd_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, ctr_ptr, out_ptr, lse_ptr,
                       M, N, C, H, W, radius, wmax, scale2,
                       ZERO: tl.constexpr, NORMALIZE: tl.constexpr,
                       BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    u = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b * M + u
    q_ptr += row * C
    k_ptr += b * N * C
    kn_ptr += b * N
    x0, y0, wx, wy, ok = _window_geometry(ctr_ptr, row, H, W, radius)
    ru = 1.0
    if NORMALIZE:
        ru = 1.0 / tl.maximum(tl.load(qn_ptr + row), 1e-12)

    m_i = float("-inf")
    l_i = 0.0
    ax = 0.0
    ay = 0.0
    n_nan = 0
    for j0 in range(0, wmax, BLOCK_W):
        s, v, jm, vx, vy = _window_scores(q_ptr, k_ptr, kn_ptr, ru, x0, y0, wx, wy, j0, W, C,
                                          NORMALIZE, BLOCK_W, BLOCK_C)
        z = s * scale2
        n_nan += tl.sum((jm & (z != z)).to(tl.int32), axis=0)
        z = tl.where(jm & (z == z), z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, axis=0))
        # A chunk past the window (all -inf) must not turn -inf - (-inf) into NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(z - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        ax = ax * alpha + tl.sum(p * vx.to(tl.float32), axis=0)
        ay = ay * alpha + tl.sum(p * vy.to(tl.float32), axis=0)
        m_i = m_new

    w = wx * wy
    if ZERO:
        # Outside cells: logit 0 (base 2 as well). m = max(max_W z, 0), or max_W z if w = N.
        m0 = tl.where(w < N, tl.maximum(m_i, 0.0), m_i)
        f = tl.exp2(m_i - m0)
        e0 = tl.exp2(-m0)
        n_out = (N - w).to(tl.float32)
        # G_tot - sum_W g, exactly in int64: sum over the grid minus sum over the clipped window.
        # (row * 0 + H): an int64 tensor even when H/W arrive as the constexpr 1 (Triton
        # specialises integer arguments equal to 1).
        Hl = row * 0 + H
        Wl = row * 0 + W
        gtx = Hl * Wl * (Wl - 1) // 2 - wy.to(tl.int64) * (wx.to(tl.int64) * (2 * x0 + wx - 1).to(tl.int64)) // 2
        gty = Wl * Hl * (Hl - 1) // 2 - wx.to(tl.int64) * (wy.to(tl.int64) * (2 * y0 + wy - 1).to(tl.int64)) // 2
        Z = l_i * f + n_out * e0
        ox = (ax * f + e0 * gtx.to(tl.float32)) / Z
        oy = (ay * f + e0 * gty.to(tl.float32)) / Z
        lse = (m0 + tl.log2(Z)) * 0.6931471805599453
    else:
        ox = ax / l_i
        oy = ay / l_i
        lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    bad = (n_nan > 0) | (ok.to(tl.int32) == 0)
    tl.store(out_ptr + row * 2, tl.where(bad, float("nan"), ox))
    tl.store(out_ptr + row * 2 + 1, tl.where(bad, float("nan"), oy))
    tl.store(lse_ptr + row, tl.where(bad, float("nan"), lse))


@triton.jit
def _window_bwd_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, ctr_ptr, go_ptr, out_ptr, lse_ptr,
                       dq_ptr, dk_ptr, qdot_ptr, kdot_ptr,
                       M, N, C, H, W, radius, wmax, scale2, inv_tau,
                       NORMALIZE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    u = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    row = b * M + u
    q_ptr += row * C
    dq_ptr += row * C
    k_ptr += b * N * C
    dk_ptr += b * N * C
    kn_ptr += b * N
    kdot_ptr += b * N
    x0, y0, wx, wy, ok = _window_geometry(ctr_ptr, row, H, W, radius)
    ru = 1.0
    if NORMALIZE:
        ru = 1.0 / tl.maximum(tl.load(qn_ptr + row), 1e-12)
    lse2 = tl.load(lse_ptr + row) * 1.4426950408889634
    gox = tl.load(go_ptr + row * 2)
    goy = tl.load(go_ptr + row * 2 + 1)
    d_row = gox * tl.load(out_ptr + row * 2) + goy * tl.load(out_ptr + row * 2 + 1)
    qdot = 0.0
    for j0 in range(0, wmax, BLOCK_W):
        s, v, jm, vx, vy = _window_scores(q_ptr, k_ptr, kn_ptr, ru, x0, y0, wx, wy, j0, W, C,
                                          NORMALIZE, BLOCK_W, BLOCK_C)
        jm = jm & ok
        p = tl.exp2(s * scale2 - lse2)
        ds = p * (gox * vx.to(tl.float32) + goy * vy.to(tl.float32) - d_row) * inv_tau
        ds = tl.where(jm, ds, 0.0)
        if NORMALIZE:
            dss = ds * s
            qdot += tl.sum(dss, axis=0)
            tl.atomic_add(kdot_ptr + v, dss, mask=jm, sem="relaxed")
            rv = 1.0 / tl.maximum(tl.load(kn_ptr + v, mask=jm, other=1.0), 1e-12)
            ds_q = ds * rv
            ds_k = ds * ru
        else:
            ds_q = ds
            ds_k = ds
        for c0 in range(0, C, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            c_ok = cc < C
            msk = jm[:, None] & c_ok[None, :]
            kc = tl.load(k_ptr + v[:, None] * C + cc[None, :], mask=msk, other=0.0).to(tl.float32)
            qc = tl.load(q_ptr + cc, mask=c_ok, other=0.0).to(tl.float32)
            # The row's dQ belongs to this program alone; atomics only because several window
            # chunks add into it (no read-back within the kernel).
            tl.atomic_add(dq_ptr + cc, tl.sum(ds_q[:, None] * kc, axis=0), mask=c_ok, sem="relaxed")
            tl.atomic_add(dk_ptr + v[:, None] * C + cc[None, :], ds_k[:, None] * qc[None, :], mask=msk,
                          sem="relaxed")
    if NORMALIZE:
        tl.store(qdot_ptr + row, qdot)


def _window_args(src, tgt, H, W, radius):
    B, Ns, Nt, C = check_features(src, tgt, "window_soft_argmax")
    radius = int(radius)
    if radius < 0:
        raise ValueError(f"window_soft_argmax: radius must be >= 0, got {radius}")
    # A radius past the grid selects the same cells as max(H, W); clamping keeps int32 math exact.
    radius = min(radius, max(H, W))
    return B, Ns, Nt, C, radius, window_cells(H, W, radius)


def window_soft_argmax_fwd(src: torch.Tensor, tgt: torch.Tensor, tau: float, H: int, W: int, radius: int,
                           zero_outside: bool, normalize: bool = True):
    """(out (B,Ns,2) fp32, lse (B,Ns) fp32, center (B,Ns) int64); see the module docstring."""
    B, Ns, Nt, C, radius, wmax = _window_args(src, tgt, H, W, radius)
    dev = src.device
    out = torch.empty((B, Ns, 2), device=dev, dtype=torch.float32)
    lse = torch.empty((B, Ns), device=dev, dtype=torch.float32)
    if B == 0 or Ns == 0:
        return out, lse, torch.empty((B, Ns), device=dev, dtype=torch.int64)
    norms = (row_norms(src), row_norms(tgt)) if normalize else (lse, lse)
    _, center, _ = row_argmax(src, tgt, normalize, norms=norms)
    cfg = window_config(C, wmax)
    with device_guard(src):
        _window_fwd_kernel[(Ns, B)](src, tgt, norms[0], norms[1], center, out, lse,
                                    Ns, Nt, C, H, W, radius, wmax, LOG2E / float(tau),
                                    ZERO=bool(zero_outside), NORMALIZE=bool(normalize), **cfg.meta(),
                                    **cfg.launch())
    return out, lse, center


def window_soft_argmax_bwd(grad_out: torch.Tensor, src: torch.Tensor, tgt: torch.Tensor, out: torch.Tensor,
                           lse: torch.Tensor, center: torch.Tensor, tau: float, H: int, W: int, radius: int,
                           zero_outside: bool, normalize: bool = True):
    """(dsrc, dtgt) in the dtypes of src/tgt. ``zero_outside`` needs no special case: it only
    changes lse, and p = e^(z - lse) on the window cells covers both modes."""
    B, Ns, Nt, C, radius, wmax = _window_args(src, tgt, H, W, radius)
    dev = src.device
    dq = torch.zeros((B, Ns, C), device=dev, dtype=torch.float32)
    dk = torch.zeros((B, Nt, C), device=dev, dtype=torch.float32)
    if B == 0 or Ns == 0 or C == 0:
        return dq.to(src.dtype), dk.to(tgt.dtype)
    grad_out = grad_out.to(torch.float32).contiguous()
    out = out.to(torch.float32).contiguous()
    lse = lse.to(torch.float32).contiguous()
    center = center.to(torch.int64).contiguous()
    qn = row_norms(src) if normalize else None
    kn = row_norms(tgt) if normalize else None
    qdot = torch.zeros((B, Ns), device=dev, dtype=torch.float32)
    kdot = torch.zeros((B, Nt), device=dev, dtype=torch.float32)
    cfg = window_config(C, wmax, backward=True)
    with device_guard(src):
        _window_bwd_kernel[(Ns, B)](src, tgt, qn if normalize else qdot, kn if normalize else kdot, center,
                                    grad_out, out, lse, dq, dk, qdot, kdot,
                                    Ns, Nt, C, H, W, radius, wmax, LOG2E / float(tau), 1.0 / float(tau),
                                    NORMALIZE=bool(normalize), **cfg.meta(), **cfg.launch())
    return finalize_grad(dq, src, qn, qdot, normalize), finalize_grad(dk, tgt, kn, kdot, normalize)
