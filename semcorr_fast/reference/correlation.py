"""Reference (oracle) implementations of the correlation family, from the definitions.

Conventions shared with every backend (``docs/ARCHITECTURE.md``):

* cosine similarity: each vector divided by ``max(‖x‖₂, 1e-12)`` (``F.normalize``);
* computation in fp32 for fp16/bf16 inputs, fp64 for fp64; coordinate/loss outputs fp32 (fp64);
* cell ``v`` of an ``(H, W)`` grid has coordinate ``(v mod W, v div W)``;
* argmax / top-k: ties go to the lowest index; NaN similarities (and masked targets) are never
  chosen; empty slots hold index −1 and value −inf;
* soft-argmax rows whose similarities contain NaN give NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _acc(x: Tensor) -> Tensor:
    return x.double() if x.dtype == torch.float64 else x.float()


def similarity(src: Tensor, tgt: Tensor, normalize: bool) -> Tensor:
    a, b = _acc(src), _acc(tgt)
    if normalize:
        a, b = F.normalize(a, dim=-1, eps=1e-12), F.normalize(b, dim=-1, eps=1e-12)
    return a @ b.transpose(-1, -2)


def coordinate_grid(H: int, W: int, dtype=torch.float32, device=None) -> Tensor:
    """(H·W, 2) cell coordinates (x, y) in row-major order."""
    ys, xs = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1).to(dtype)


def ncc(src: Tensor, tgt: Tensor, normalize: bool = True) -> Tensor:
    return similarity(src, tgt, normalize).to(src.dtype)


def softmax_t(sim: Tensor, tau: float, dim: int = -1) -> Tensor:
    return torch.softmax(_acc(sim) / tau, dim=dim).to(sim.dtype)


def soft_argmax(src: Tensor, tgt: Tensor, tau: float, hw, normalize: bool = True) -> Tensor:
    H, W = hw
    s = similarity(src, tgt, normalize)
    p = torch.softmax(s / tau, dim=-1)
    return p @ coordinate_grid(H, W, s.dtype, s.device)


def _argmax_lowest(s: Tensor, dim: int = -1) -> Tensor:
    """Argmax with ties → lowest index, NaN never chosen, −1 where the slice has no number."""
    has = (~torch.isnan(s)).any(dim=dim)
    idx = torch.argmax(s.nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf), dim=dim)  # first maximum
    return torch.where(has, idx, torch.full_like(idx, -1))


def window_soft_argmax(src: Tensor, tgt: Tensor, tau: float, hw, radius: int = 7, outside: str = "exclude",
                       normalize: bool = True) -> Tensor:
    H, W = hw
    s = similarity(src, tgt, normalize)
    c = _argmax_lowest(s)
    g = coordinate_grid(H, W, s.dtype, s.device)  # (Nt, 2)
    cc = c.clamp(min=0)
    cx, cy = (cc % W).to(s.dtype), (cc // W).to(s.dtype)
    inside = ((g[:, 0] - cx[..., None]).abs() <= radius) & ((g[:, 1] - cy[..., None]).abs() <= radius)
    if outside == "exclude":
        z = torch.where(inside, s / tau, torch.full_like(s, -torch.inf))
    elif outside == "zero":  # GeoAware-SC: similarity 0 outside the window, softmax over everything
        z = torch.where(inside, s, torch.zeros_like(s)) / tau
    else:
        raise ValueError(f"outside must be 'exclude' or 'zero', got {outside!r}")
    out = torch.softmax(z, dim=-1) @ g
    return torch.where((c >= 0)[..., None], out, torch.full_like(out, torch.nan))


def _sorted_topk(s: Tensor, k: int):
    """Top-k along the last dim, descending, ties → lowest index; −inf entries become empty slots."""
    vals, idx = torch.sort(s, dim=-1, descending=True, stable=True)
    vals, idx = vals[..., :k], idx[..., :k]
    empty = vals == -torch.inf
    idx = torch.where(empty, torch.full_like(idx, -1), idx)
    if vals.shape[-1] < k:  # fewer candidates than k
        pad = k - vals.shape[-1]
        vals = torch.cat([vals, vals.new_full((*vals.shape[:-1], pad), -torch.inf)], -1)
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], pad), -1)], -1)
    return vals, idx


def match_topk(src: Tensor, tgt: Tensor, k: int = 1, tgt_mask: Tensor | None = None, normalize: bool = True):
    s = similarity(src, tgt, normalize).nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    if tgt_mask is not None:
        s = s.masked_fill(~tgt_mask[:, None, :], -torch.inf)
    return _sorted_topk(s, k)


def mutual_nn(src: Tensor, tgt: Tensor, normalize: bool = True):
    s = similarity(src, tgt, normalize)
    s2t = _argmax_lowest(s, dim=-1)
    t2s = _argmax_lowest(s, dim=-2)
    back = torch.gather(t2s, 1, s2t.clamp(min=0))
    mutual = (s2t >= 0) & (back == torch.arange(s.shape[1], device=s.device))
    return s2t, t2s, mutual


def instance_matching_distance(src: Tensor, tgt: Tensor, src_mask: Tensor | None = None,
                               tgt_mask: Tensor | None = None, normalize: bool = False) -> Tensor:
    a, b = _acc(src), _acc(tgt)
    if normalize:
        a, b = F.normalize(a, dim=-1, eps=1e-12), F.normalize(b, dim=-1, eps=1e-12)
    d = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")  # exact differences
    if tgt_mask is not None:
        d = torch.where(tgt_mask[:, None, :], d, torch.full_like(d, torch.inf))
    rowmin = d.min(dim=-1).values if d.shape[-1] else d.new_full(d.shape[:2], torch.inf)
    rowmin = torch.where(torch.isinf(rowmin), torch.full_like(rowmin, torch.nan), rowmin)
    valid = torch.ones_like(rowmin, dtype=torch.bool) if src_mask is None else src_mask
    count = valid.sum(-1)
    total = torch.where(valid, rowmin, torch.zeros_like(rowmin)).sum(-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, torch.nan))


def topk_retrieval(queries: Tensor, database: Tensor, k: int, normalize: bool = True, exclude_self: bool = False):
    s = similarity(queries[None], database[None], normalize)[0].nan_to_num(nan=-torch.inf, posinf=torch.inf, neginf=-torch.inf)
    if exclude_self:
        n = min(s.shape[0], s.shape[1])
        i = torch.arange(n, device=s.device)
        s[i, i] = -torch.inf
    return _sorted_topk(s, k)
