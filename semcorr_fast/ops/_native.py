"""The C++ backends ("cpu", and "cuda" for ops that have CUDA C++ kernels).

Both go through the torch dispatcher (``torch.ops.semcorr_ext.*``), which picks the CPU or CUDA
kernel by device. This module gives them the same function interface as the Triton backend
(``semcorr_fast.kernels``), so ``semcorr_fast.ops`` can treat every backend alike.
"""
from __future__ import annotations

import torch

from .. import _ext


def _cuda_kernels() -> frozenset:
    """Names of the ``semcorr_ext`` ops that have a CUDA C++ kernel in this build (read at import)."""
    if not _ext.has_cuda_kernels():
        return frozenset()
    names = set()
    for name in ("soft_argmax_fwd", "window_soft_argmax_fwd", "match_topk", "mutual_nn",
                 "instance_matching_distance", "kabsch_fwd"):
        try:
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"semcorr_ext::{name}", "CUDA"):
                names.add(name.removesuffix("_fwd"))
        except RuntimeError:
            pass
    return frozenset(names)


_CUDA_KERNELS = _cuda_kernels()


def has_cuda_kernel(name: str) -> bool:
    """Whether op ``name`` has a CUDA C++ kernel in this build."""
    return name in _CUDA_KERNELS


def soft_argmax_fwd(src, tgt, tau, H, W, normalize):
    return _ext.ops().soft_argmax_fwd(src, tgt, tau, H, W, normalize)


def soft_argmax_bwd(grad, src, tgt, out, lse, tau, H, W, normalize):
    return _ext.ops().soft_argmax_bwd(grad, src, tgt, out, lse, tau, H, W, normalize)


def window_soft_argmax_fwd(src, tgt, tau, H, W, radius, zero_outside, normalize):
    return _ext.ops().window_soft_argmax_fwd(src, tgt, tau, H, W, radius, zero_outside, normalize)


def window_soft_argmax_bwd(grad, src, tgt, out, lse, center, tau, H, W, radius, zero_outside, normalize):
    return _ext.ops().window_soft_argmax_bwd(grad, src, tgt, out, lse, center, tau, H, W, radius,
                                             zero_outside, normalize)


def match_topk(src, tgt, k, tgt_mask, normalize):
    return _ext.ops().match_topk(src, tgt, k, tgt_mask, normalize)


def mutual_nn(src, tgt, normalize):
    return _ext.ops().mutual_nn(src, tgt, normalize)


def instance_matching_distance(src, tgt, src_mask, tgt_mask, normalize):
    return _ext.ops().instance_matching_distance(src, tgt, src_mask, tgt_mask, normalize)


def _inv_norm(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if not normalize:
        return torch.ones(x.shape[:-1], dtype=acc, device=x.device)
    return 1.0 / torch.linalg.vector_norm(x.to(acc), dim=-1).clamp_min(1e-12)


def ncc(src, tgt, normalize):
    """The one materialising op: one batched GEMM in the input dtype (fp32 accumulation), then the
    normalisation applied as a row and column scale of its output (no normalised copy)."""
    sim = torch.bmm(src, tgt.transpose(1, 2))
    if normalize:
        sim = (sim.to(torch.float64 if src.dtype == torch.float64 else torch.float32)
               * _inv_norm(src, True)[:, :, None] * _inv_norm(tgt, True)[:, None, :]).to(src.dtype)
    return sim


def softmax_t(sim, tau, dim):
    acc = torch.float64 if sim.dtype == torch.float64 else torch.float32
    return torch.softmax(sim.to(acc) / tau, dim=dim).to(sim.dtype)


def expected_cost_fwd(src, tgt, target_xy, tau, H, W, p, normalize):
    return _ext.ops().expected_cost_fwd(src, tgt, target_xy, tau, H, W, p, normalize)


def expected_cost_bwd(grad, src, tgt, target_xy, loss, lse, tau, H, W, p, normalize):
    return _ext.ops().expected_cost_bwd(grad, src, tgt, target_xy, loss, lse, tau, H, W, p, normalize)


def softmax_aggregate_fwd(src, tgt, values, tau, normalize):
    return _ext.ops().softmax_aggregate_fwd(src, tgt, values, tau, normalize)


def softmax_aggregate_bwd(grad, src, tgt, values, out, lse, tau, normalize):
    return _ext.ops().softmax_aggregate_bwd(grad, src, tgt, values, out, lse, tau, normalize)


def rowsoftmax_distill_fwd(t_src, t_tgt, s_src, s_tgt, tau_t, tau_s, loss, normalize):
    return _ext.ops().rowsoftmax_distill_fwd(t_src, t_tgt, s_src, s_tgt, tau_t, tau_s, loss, normalize)


def rowsoftmax_distill_bwd(grad, t_src, t_tgt, s_src, s_tgt, stats, tau_t, tau_s, loss, normalize):
    return _ext.ops().rowsoftmax_distill_bwd(grad, t_src, t_tgt, s_src, s_tgt, stats, tau_t, tau_s, loss, normalize)
