"""Selection ops on the streamed similarity: match_topk, mutual_nn, instance_matching_distance.

Shapes: src (B, Ns, C), tgt (B, Nt, C); masks (B, Nt) / (B, Ns) bool, False = never chosen.

Conventions (all three): similarities s_uv are scored in fp32; ties go to the lowest index; NaN
similarities, masked targets and padding are never selected; a row with no selectable target gets
index -1 (value -inf).

Kernels (one streaming tile loop each, the epilogue differs):
* ``_argmax_kernel``: running row argmax in registers (k = 1, mutual_nn's s2t, the window centre,
  the instance distance's nearest neighbour). With ``WITH_COLS`` it also reduces every tile over its
  rows and folds the column maxima into a (B, Nt) int64 buffer with ``atomic_max`` on a packed key
  (monotone int32 image of the fp32 value << 32 | (2^31 - 1 - row)), so the column argmax (ties to
  the lowest row) comes out of the same single pass. With ``DIST`` the score is 2 s_uv - ||y_v||^2,
  whose argmax is the argmin of ||x_u - y_v||^2 (||x_u||^2 is constant along the row).
* ``_topk_kernel`` (2 <= k <= 64): a running, unsorted list of k (value, index) pairs per row in
  registers. For each tile, the best remaining tile candidate of every row replaces the row's worst
  list entry while it beats it (strictly: earlier tiles have lower indices, so ties keep the old
  entry); the while loop stops as soon as no row of the block improves, so later tiles cost about
  one reduction. The k entries are sorted (value desc, index asc) at the end on the (B, Ns, k)
  output. k > 64 falls back to ``_topk_torch_chunked``: torch matmul on column chunks of the target
  and a stable sort merge, memory O(Ns * (k + chunk)).
* ``_pair_dist_kernel``: exact ||x_hat_u - y_hat_v|| for the selected neighbour, recomputed from the
  features (the GEMM form ||x||^2 + ||y||^2 - 2<x,y> loses all digits when x ~ y).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import TOPK_MAX_K, dot_precision, row_blocks, row_launch, tile_config, topk_config, topk_kp
from ._stream import batch_offsets, check_features, cosine_tile, device_guard, emulate_bf16, first_max, row_norms

_KEY_EMPTY = -(2 ** 63)


@triton.jit
def _ordered_key(val, idx):
    """int64 key, monotone in (val, -idx): the int32 image of the fp32 bits, then 2^31-1-idx.

    -0.0 is folded onto +0.0 first, so that equal values compare equal (and the lower index wins).
    """
    val = tl.where(val == 0.0, 0.0, val)
    bits = val.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (2147483647 - idx).to(tl.int64)


@triton.jit
def _select_score(s, kn_ptr, tmask_ptr, offs_m, offs_n, M, N,
                  HAS_TMASK: tl.constexpr, DIST: tl.constexpr, NORMALIZE: tl.constexpr):
    """Score tile to maximise and its validity mask (-inf where invalid)."""
    n_ok = offs_n < N
    if DIST:
        kn = tl.load(kn_ptr + offs_n, mask=n_ok, other=0.0)
        if NORMALIZE:
            kn = kn / tl.maximum(kn, 1e-12)
        s = 2.0 * s - (kn * kn)[None, :]
    if HAS_TMASK:
        n_ok = n_ok & (tl.load(tmask_ptr + offs_n, mask=n_ok, other=0) != 0)
    valid = (offs_m < M)[:, None] & n_ok[None, :] & (s == s)
    return tl.where(valid, s, float("-inf")), valid


@triton.jit
def _argmax_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, tmask_ptr, val_ptr, idx_ptr, colkey_ptr,
                   M, N, C,
                   HAS_TMASK: tl.constexpr, WITH_COLS: tl.constexpr, DIST: tl.constexpr,
                   NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_C: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_ptr, k_ptr, qn_ptr, kn_ptr = batch_offsets(q_ptr, k_ptr, qn_ptr, kn_ptr, b, M, N, C)
    tmask_ptr += b * N
    colkey_ptr += b * N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    best_v = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_i = tl.full((BLOCK_M,), 2147483647, dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = cosine_tile(q_ptr, k_ptr, qn_ptr, kn_ptr, offs_m, offs_n, M, N, C,
                        NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
        sc, valid = _select_score(s, kn_ptr, tmask_ptr, offs_m, offs_n, M, N, HAS_TMASK, DIST, NORMALIZE)
        t_v, t_i = first_max(sc, valid, offs_n, 1)
        # Earlier tiles hold lower indices: a tie keeps the running entry.
        upd = (t_i != 2147483647) & ((t_v > best_v) | (best_i == 2147483647))
        best_v = tl.where(upd, t_v, best_v)
        best_i = tl.where(upd, t_i, best_i)
        if WITH_COLS:
            c_v, c_i = first_max(sc, valid, offs_m, 0)
            tl.atomic_max(colkey_ptr + offs_n, _ordered_key(c_v, c_i), mask=c_i != 2147483647, sem="relaxed")
    m_ok = offs_m < M
    found = best_i != 2147483647
    tl.store(val_ptr + b * M + offs_m, best_v, mask=m_ok)
    tl.store(idx_ptr + b * M + offs_m, tl.where(found, best_i, -1).to(tl.int64), mask=m_ok)


@triton.jit
def _topk_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, tmask_ptr, val_ptr, idx_ptr,
                 M, N, C, K,
                 HAS_TMASK: tl.constexpr, NORMALIZE: tl.constexpr, KP: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                 PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_ptr, k_ptr, qn_ptr, kn_ptr = batch_offsets(q_ptr, k_ptr, qn_ptr, kn_ptr, b, M, N, C)
    tmask_ptr += b * N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.arange(0, KP)
    slot_ok = (slot < K)[None, :]
    # Unsorted running list; slots >= K are parked at +inf so they are never the worst entry.
    lv = tl.where(slot_ok, float("-inf"), float("inf")) + tl.zeros((BLOCK_M, KP), dtype=tl.float32)
    li = tl.full((BLOCK_M, KP), -1, dtype=tl.int32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = cosine_tile(q_ptr, k_ptr, qn_ptr, kn_ptr, offs_m, offs_n, M, N, C,
                        NORMALIZE, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
        sc, avail = _select_score(s, kn_ptr, tmask_ptr, offs_m, offs_n, M, N, HAS_TMASK, False, NORMALIZE)
        worst_v = tl.min(lv, axis=1)
        t_v, t_i = first_max(sc, avail, offs_n, 1)
        better = (t_i != 2147483647) & (t_v > worst_v)
        go = tl.max(better.to(tl.int32), axis=0) > 0
        while go:
            # Worst entry: lowest value, then highest index (the later of two equal entries),
            # then the lowest slot (several empty slots share value -inf and index -1).
            is_w = lv == worst_v[:, None]
            w_idx = tl.max(tl.where(is_w, li, -2), axis=1)
            w_slot = tl.min(tl.where(is_w & (li == w_idx[:, None]), slot[None, :], KP), axis=1)
            put = better[:, None] & (slot[None, :] == w_slot[:, None])
            lv = tl.where(put, t_v[:, None], lv)
            li = tl.where(put, t_i[:, None], li)
            sc = tl.where(offs_n[None, :] == t_i[:, None], float("-inf"), sc)
            avail = avail & (offs_n[None, :] != t_i[:, None])
            worst_v = tl.min(lv, axis=1)
            t_v, t_i = first_max(sc, avail, offs_n, 1)
            better = (t_i != 2147483647) & (t_v > worst_v)
            go = tl.max(better.to(tl.int32), axis=0) > 0
    m_ok = (offs_m < M)[:, None]
    o = (b * M + offs_m)[:, None] * K + slot[None, :]
    keep = m_ok & slot_ok
    tl.store(val_ptr + o, tl.where(li >= 0, lv, float("-inf")), mask=keep)
    tl.store(idx_ptr + o, li.to(tl.int64), mask=keep)


@triton.jit
def _pair_dist_kernel(q_ptr, k_ptr, qn_ptr, kn_ptr, idx_ptr, out_ptr, M, N, C,
                      NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[b, u] = ||x_hat_u - y_hat_idx[u]||_2 (NaN where idx = -1)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    q_ptr += b * M * C
    k_ptr += b * N * C
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < M
    j = tl.load(idx_ptr + b * M + rows, mask=r_ok, other=-1)
    found = j >= 0
    jj = tl.where(found, j, 0).to(tl.int32)
    if NORMALIZE:
        ra = 1.0 / tl.maximum(tl.load(qn_ptr + b * M + rows, mask=r_ok, other=1.0), 1e-12)
        rb = 1.0 / tl.maximum(tl.load(kn_ptr + b * N + jj, mask=r_ok & found, other=1.0), 1e-12)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        c_ok = cc[None, :] < C
        x = tl.load(q_ptr + rows[:, None] * C + cc[None, :], mask=r_ok[:, None] & c_ok, other=0.0).to(tl.float32)
        y = tl.load(k_ptr + jj[:, None] * C + cc[None, :], mask=(r_ok & found)[:, None] & c_ok,
                    other=0.0).to(tl.float32)
        if NORMALIZE:
            d = x * ra[:, None] - y * rb[:, None]
        else:
            d = x - y
        acc += tl.sum(d * d, axis=1)
    tl.store(out_ptr + b * M + rows, tl.where(found, tl.sqrt(acc), float("nan")), mask=r_ok)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _mask_arg(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return like  # never read (HAS_TMASK=False)
    if mask.dtype != torch.bool:
        mask = mask != 0
    return mask.contiguous().view(torch.uint8)


def row_argmax(src: torch.Tensor, tgt: torch.Tensor, normalize: bool, tgt_mask: torch.Tensor | None = None,
               with_cols: bool = False, dist: bool = False, norms=None):
    """Row argmax of the similarity (or of 2s - ||y||^2 with ``dist``), one streaming pass.

    Returns (values (B,Ns) fp32, indices (B,Ns) int64 with -1 where nothing is selectable,
    column keys (B,Nt) int64 or None).
    """
    B, Ns, Nt, C = check_features(src, tgt, "row_argmax")
    dev = src.device
    val = torch.empty((B, Ns), device=dev, dtype=torch.float32)
    idx = torch.empty((B, Ns), device=dev, dtype=torch.int64)
    colkey = torch.full((B, Nt), _KEY_EMPTY, device=dev, dtype=torch.int64) if with_cols else idx
    if B == 0 or Ns == 0:
        return val, idx, (colkey if with_cols else None)
    if Nt == 0:
        return val.fill_(float("-inf")), idx.fill_(-1), (colkey if with_cols else None)
    if norms is None:
        norms = (row_norms(src), row_norms(tgt)) if (normalize or dist) else (val, val)
    qn, kn = norms
    cfg = tile_config("score", src.dtype, C)
    grid = (triton.cdiv(Ns, cfg.BLOCK_M), B)
    with device_guard(src):
        _argmax_kernel[grid](src, tgt, qn, kn, _mask_arg(tgt_mask, idx), val, idx, colkey, Ns, Nt, C,
                             HAS_TMASK=tgt_mask is not None, WITH_COLS=bool(with_cols), DIST=bool(dist),
                             NORMALIZE=bool(normalize), PREC=dot_precision(src.dtype),
                             EMU_BF16=emulate_bf16(src.dtype), **cfg.meta(), **cfg.launch())
    return val, idx, (colkey if with_cols else None)


def _decode_colkey(key: torch.Tensor) -> torch.Tensor:
    low = key & 0xFFFFFFFF
    return torch.where(key == _KEY_EMPTY, torch.full_like(key, -1), 2147483647 - low)


def _sort_topk(val: torch.Tensor, idx: torch.Tensor):
    """Sort each row by (value desc, index asc); empty slots (-1, -inf) go last."""
    big = torch.iinfo(torch.int64).max
    key_idx = torch.where(idx < 0, torch.full_like(idx, big), idx)
    order = torch.argsort(key_idx, dim=-1, stable=True)
    val, idx = val.gather(-1, order), idx.gather(-1, order)
    order = torch.argsort(val, dim=-1, descending=True, stable=True)
    return val.gather(-1, order), idx.gather(-1, order)


def _topk_torch_chunked(src, tgt, k, tgt_mask, normalize, chunk: int = 4096):
    """k > 64: stream the target in column chunks with torch matmul and merge with a stable sort.

    Memory O(Ns * (k + chunk)) per batch item; cosine scaling is applied to each similarity chunk
    (no normalised copy). Ties resolve to the lowest index because the running list precedes the
    (higher-index) chunk and the descending sort is stable.
    """
    B, Ns, C = src.shape
    Nt = tgt.shape[1]
    a = src.float()
    if normalize:
        ra = 1.0 / row_norms(src).clamp_min(1e-12)
        rb = 1.0 / row_norms(tgt).clamp_min(1e-12)
    vals = torch.full((B, Ns, k), float("-inf"), device=src.device)
    idxs = torch.full((B, Ns, k), -1, device=src.device, dtype=torch.int64)
    for n0 in range(0, Nt, chunk):
        n1 = min(Nt, n0 + chunk)
        s = a @ tgt[:, n0:n1].float().transpose(1, 2)
        if normalize:
            s = s * ra[:, :, None] * rb[:, None, n0:n1]
        ok = ~torch.isnan(s)
        if tgt_mask is not None:
            ok = ok & (tgt_mask[:, None, n0:n1] != 0)
        s = torch.where(ok, s, torch.full_like(s, float("-inf")))
        ci = torch.arange(n0, n1, device=src.device).expand(B, Ns, n1 - n0)
        ci = torch.where(ok, ci, torch.full_like(ci, -1))
        cv = torch.cat([vals, s], -1)
        cidx = torch.cat([idxs, ci], -1)
        order = torch.argsort(cv, dim=-1, descending=True, stable=True)[..., :k]
        vals, idxs = cv.gather(-1, order), cidx.gather(-1, order)
    idxs = torch.where(torch.isneginf(vals), torch.full_like(idxs, -1), idxs)
    return _sort_topk(vals, idxs)


def match_topk(src: torch.Tensor, tgt: torch.Tensor, k: int = 1, tgt_mask: torch.Tensor | None = None,
               normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(values (B, Ns, k) fp32 sorted descending, indices (B, Ns, k) int64; -1/-inf when empty)."""
    B, Ns, Nt, C = check_features(src, tgt, "match_topk")
    k = int(k)
    if k < 1:
        raise ValueError(f"match_topk: k must be >= 1, got {k}")
    dev = src.device
    if k == 1:
        val, idx, _ = row_argmax(src, tgt, normalize, tgt_mask)
        return val.unsqueeze(-1), idx.unsqueeze(-1)
    if k > TOPK_MAX_K:
        return _topk_torch_chunked(src, tgt, k, tgt_mask, normalize)
    val = torch.empty((B, Ns, k), device=dev, dtype=torch.float32)
    idx = torch.empty((B, Ns, k), device=dev, dtype=torch.int64)
    if B == 0 or Ns == 0:
        return val, idx
    if Nt == 0:
        return val.fill_(float("-inf")), idx.fill_(-1)
    qn, kn = (row_norms(src), row_norms(tgt)) if normalize else (val, val)
    cfg = topk_config(src.dtype, C, k)
    grid = (triton.cdiv(Ns, cfg.BLOCK_M), B)
    with device_guard(src):
        _topk_kernel[grid](src, tgt, qn, kn, _mask_arg(tgt_mask, idx), val, idx, Ns, Nt, C, k,
                           HAS_TMASK=tgt_mask is not None, NORMALIZE=bool(normalize), KP=topk_kp(k),
                           PREC=dot_precision(src.dtype), EMU_BF16=emulate_bf16(src.dtype),
                           **cfg.meta(), **cfg.launch())
    return _sort_topk(val, idx)


def mutual_nn(src: torch.Tensor, tgt: torch.Tensor, normalize: bool = True):
    """(s2t (B,Ns) int64, t2s (B,Nt) int64, mutual (B,Ns) bool) from one streaming pass.

    s2t/t2s are -1 for a row/column whose similarities are all NaN; such rows are never mutual.
    """
    B, Ns, Nt, C = check_features(src, tgt, "mutual_nn")
    _, s2t, colkey = row_argmax(src, tgt, normalize, with_cols=True)
    t2s = _decode_colkey(colkey)
    if Nt == 0 or Ns == 0:
        return s2t, t2s, torch.zeros((B, Ns), device=src.device, dtype=torch.bool)
    back = t2s.gather(1, s2t.clamp(min=0))
    mutual = (s2t >= 0) & (back == torch.arange(Ns, device=src.device)[None, :])
    return s2t, t2s, mutual


def instance_matching_distance(src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                               tgt_mask: torch.Tensor | None = None, normalize: bool = False) -> torch.Tensor:
    """(B,) fp32: mean over valid src rows of min over valid tgt rows of ||a - b||_2.

    NaN for a batch item without a valid src row or without a valid tgt row.
    """
    B, Ns, Nt, C = check_features(src, tgt, "instance_matching_distance")
    dev = src.device
    if B == 0:
        return torch.empty((0,), device=dev, dtype=torch.float32)
    if Ns == 0 or Nt == 0:
        return torch.full((B,), float("nan"), device=dev)
    qn, kn = row_norms(src), row_norms(tgt)
    _, nn, _ = row_argmax(src, tgt, normalize, tgt_mask, dist=True, norms=(qn, kn))
    d = torch.empty((B, Ns), device=dev, dtype=torch.float32)
    br, bc = row_blocks()
    with device_guard(src):
        _pair_dist_kernel[(triton.cdiv(Ns, br), B)](src, tgt, qn, kn, nn, d, Ns, Nt, C,
                                                     NORMALIZE=bool(normalize), BLOCK_R=br, BLOCK_C=bc,
                                                     **row_launch())
    valid = torch.ones((B, Ns), device=dev, dtype=torch.bool) if src_mask is None else src_mask.bool()
    cnt = valid.sum(1)
    total = torch.where(valid, d, torch.zeros_like(d)).sum(1)
    res = total / cnt.clamp(min=1)
    return torch.where(cnt > 0, res, torch.full_like(res, float("nan")))
