"""Reference (oracle) implementations of the training-loss family: dense, materialising torch code."""
from __future__ import annotations

import torch

from .correlation import coordinate_grid, similarity

Tensor = torch.Tensor


def expected_cost(src: Tensor, tgt: Tensor, tau: float, target_xy: Tensor, hw, p: float = 1.0,
                  normalize: bool = True) -> Tensor:
    """L_u = Σ_v softmax(s_u / τ)_v · ‖target_u − g_v‖₂^p."""
    H, W = hw
    s = similarity(src, tgt, normalize)
    prob = torch.softmax(s / tau, dim=-1)
    g = coordinate_grid(H, W, s.dtype, s.device)
    diff = target_xy.to(s.dtype)[:, :, None, :] - g[None, None]
    r2 = (diff * diff).sum(-1)
    d = torch.where(r2 > 0, r2.clamp_min(torch.finfo(s.dtype).tiny) ** (p / 2), torch.zeros_like(r2))
    return (prob * d).sum(-1)


def softmax_aggregate(src: Tensor, tgt: Tensor, values: Tensor, tau: float, normalize: bool = True) -> Tensor:
    """O_u = Σ_v softmax(s_u / τ)_v · values_v."""
    s = similarity(src, tgt, normalize)
    return torch.softmax(s / tau, dim=-1) @ values.to(s.dtype)


def rowsoftmax_distill(t_src: Tensor, t_tgt: Tensor, s_src: Tensor, s_tgt: Tensor, tau_teacher: float,
                       tau_student: float, loss: str = "ce", normalize: bool = True) -> Tensor:
    """Per-row loss between a = softmax(teacher/τ_t) (no gradient) and b = softmax(student/τ_s)."""
    with torch.no_grad():
        a = torch.softmax(similarity(t_src, t_tgt, normalize) / tau_teacher, dim=-1)
    zs = similarity(s_src, s_tgt, normalize) / tau_student
    a = a.to(zs.dtype)
    if loss == "ce":
        return -(a * torch.log_softmax(zs, dim=-1)).sum(-1)
    b = torch.softmax(zs, dim=-1)
    if loss == "mse":
        return ((a - b) ** 2).sum(-1)
    if loss == "l1":
        return (a - b).abs().sum(-1)
    raise ValueError(f"loss must be 'ce', 'mse' or 'l1', got {loss!r}")
