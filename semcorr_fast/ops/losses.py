"""The training-loss family of ``semcorr_fast.ops``: losses whose gradients stream too.

Every loss streams similarity tiles through the same engine as the correlation family; the backward
recomputes tiles from per-row statistics, so no Ns×Nt matrix exists in forward or backward.

Temperature conventions (``../shared/notes/``). Every op here takes ``tau`` on the cosine
(logits = cos/τ). Codebases that instead multiply *each* unit vector by a logit scale ``t`` have
logits = t²·cos, i.e. ``tau = 1/t²`` (:func:`tau_from_logit_scale`); codebases that multiply the
cosine once by ``t`` (CLIP-style ``logit_scale.exp()``) have ``tau = 1/t``.

==========================  ==========================  =====================================
method                      paper                       released code
==========================  ==========================  =====================================
Demystifying EQ, DVE        τ = 0.05                    ×20 per vector: 400·cos, τ = 1/400
Demystifying CL             τ = 0.14                    (same per-vector convention)
Demystifying LEAD           τ = 0.05 (both)             cos·t1 once
Demystifying ASYM           τ1 = 0.2 (teacher),         CLI t1 = 10, t2 = 5 per vector:
                            τ2 = 0.4 (student)          τ = 1/100 and 1/25
Demystifying supervised     —                           ×5 per vector: 25·cos, τ = 1/25
Universal correspondences   τ_d = 0.1 (contrastive),    —
                            τ_H = 0.05 (matcher)
GeoAware-SC dense loss      β = 0.02                    β = 0.02 (SFNet form, max subtracted)
Jamais Vu dense loss        β = 0.02                    β = 0.02
==========================  ==========================  =====================================
"""
from __future__ import annotations

import torch

from .. import reference as ref
from . import _validate as V
from .correlation import _impl, _out_dtype, _resolve

_TRITON_HAS: dict = {}


def _backends(fn: str) -> tuple[str, ...]:
    """reference and cpu always; triton once ``semcorr_fast.kernels`` provides ``fn``."""
    if fn not in _TRITON_HAS:
        try:
            import semcorr_fast.kernels as k  # noqa: PLC0415

            _TRITON_HAS[fn] = hasattr(k, fn)
        except Exception:  # triton or the kernels missing: the backend check reports why
            _TRITON_HAS[fn] = True
    return ("reference", "cpu", "triton") if _TRITON_HAS[fn] else ("reference", "cpu")

Tensor = torch.Tensor

__all__ = ["expected_cost", "softmax_aggregate", "rowsoftmax_distill", "tau_from_logit_scale"]

_LOSSES = ("ce", "mse", "l1")


def tau_from_logit_scale(t: float, *, per_vector: bool = True) -> float:
    """τ equivalent to a logit scale ``t``: ``1/t²`` when each unit vector is multiplied by ``t``
    (Demystifying's code), ``1/t`` when the cosine is multiplied once (CLIP-style).

    >>> tau_from_logit_scale(20.0)     # Demystifying's EQ: ×20 per vector
    0.0025
    """
    t = V.tau(t, "tau_from_logit_scale", name="t")
    return 1.0 / (t * t) if per_vector else 1.0 / t


# ----------------------------------------------------------------------------- expected_cost
@torch.library.custom_op("semcorr_fast::expected_cost", mutates_args=())
def _ec_op(src: Tensor, tgt: Tensor, target_xy: Tensor, tau: float, H: int, W: int, p: float, normalize: bool,
           backend: str) -> tuple[Tensor, Tensor]:
    loss, lse = _impl(backend).expected_cost_fwd(src, tgt, target_xy, tau, H, W, p, normalize)
    return loss, lse


@_ec_op.register_fake
def _(src, tgt, target_xy, tau, H, W, p, normalize, backend):
    dt = _out_dtype(src.dtype)
    return src.new_empty(src.shape[:2], dtype=dt), src.new_empty(src.shape[:2], dtype=dt)


@torch.library.custom_op("semcorr_fast::expected_cost_backward", mutates_args=())
def _ec_bwd_op(grad: Tensor, src: Tensor, tgt: Tensor, target_xy: Tensor, loss: Tensor, lse: Tensor, tau: float,
               H: int, W: int, p: float, normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    ds, dt = _impl(backend).expected_cost_bwd(grad, src, tgt, target_xy, loss, lse, tau, H, W, p, normalize)
    return ds, dt


@_ec_bwd_op.register_fake
def _(grad, src, tgt, target_xy, loss, lse, tau, H, W, p, normalize, backend):
    return torch.empty_like(src), torch.empty_like(tgt)


def _ec_setup(ctx, inputs, output):
    src, tgt, target_xy, tau, H, W, p, normalize, backend = inputs
    loss, lse = output
    ctx.save_for_backward(src, tgt, target_xy, loss, lse)
    ctx.args = (tau, H, W, p, normalize, backend)
    ctx.mark_non_differentiable(lse)


def _ec_backward(ctx, grad, grad_lse):
    src, tgt, target_xy, loss, lse = ctx.saved_tensors
    ds, dt = _ec_bwd_op(grad.contiguous(), src, tgt, target_xy, loss, lse, *ctx.args)
    return ds, dt, None, None, None, None, None, None, None


_ec_op.register_autograd(_ec_backward, setup_context=_ec_setup)


def expected_cost(src: Tensor, tgt: Tensor, tau, target_xy: Tensor, hw, *, p: float = 1.0, normalize: bool = True,
                  backend: str = "auto") -> Tensor:
    """Expected distance to a target location under the soft match: Σ_v softmax(s_u/τ)_v ‖t_u − g_v‖₂^p.

    Serves Demystifying's EQ (``target_xy`` = the warp g(u) of each source cell), CL (self-matching,
    ``target_xy`` = u) and the supervised projection (``target_xy`` = the GT keypoint). The paper uses
    p = 1; the released code p = 0.5. d = 0 where ``target_xy`` hits a cell centre, for every p > 0, and
    no derivative of d is ever needed. ``target_xy`` gets no gradient.

    Args:
        src ``(B, Ns, C)``, tgt ``(B, Nt, C)``, tau > 0, target_xy ``(B, Ns, 2)`` (x, y) in target cells,
        hw ``(H, W)``, p > 0.
    Returns:
        ``(B, Ns)`` per-row expected cost, fp32 (fp64 for fp64). Differentiable w.r.t. src and tgt.

    >>> f = torch.eye(4)[None]
    >>> t = torch.tensor([[[0., 0.], [1., 0.], [0., 1.], [1., 1.]]])
    >>> expected_cost(f, f, 1e-3, t, (2, 2)).abs().max() < 1e-6   # each cell matches itself
    tensor(True)
    """
    op = "expected_cost"
    V.pair(src, tgt, op)
    t = V.tau(tau, op)
    H, W = V.hw(hw, tgt.shape[1], op)
    V.tensor(target_xy, "target_xy", op)
    if not target_xy.dtype.is_floating_point:
        raise TypeError(f"{op}: target_xy must be a floating tensor of shape (B, Ns, 2), got dtype {target_xy.dtype}")
    if tuple(target_xy.shape) != (src.shape[0], src.shape[1], 2):
        raise ValueError(f"{op}: target_xy must have shape {(src.shape[0], src.shape[1], 2)}, got {tuple(target_xy.shape)}")
    if target_xy.device != src.device:
        raise ValueError(f"{op}: target_xy must be on {src.device}, got {target_xy.device}")
    pw = V.tau(p, op, name="p")
    V.flag(normalize, "normalize", op)
    b = _resolve(backend, [src, tgt, target_xy], op, supported=_backends("expected_cost_fwd"))
    if b == "reference":
        return ref.expected_cost(src, tgt, t, target_xy, (H, W), pw, normalize)
    if src.shape[1] == 0:
        return torch.zeros(src.shape[:2], dtype=_out_dtype(src.dtype), device=src.device) + src.sum() * 0
    loss, _ = _ec_op(src.contiguous(), tgt.contiguous(), target_xy.detach().contiguous(), t, H, W, pw, normalize, b)
    return loss


# ----------------------------------------------------------------------------- softmax_aggregate
@torch.library.custom_op("semcorr_fast::softmax_aggregate", mutates_args=())
def _agg_op(src: Tensor, tgt: Tensor, values: Tensor, tau: float, normalize: bool,
            backend: str) -> tuple[Tensor, Tensor]:
    out, lse = _impl(backend).softmax_aggregate_fwd(src, tgt, values, tau, normalize)
    return out, lse


@_agg_op.register_fake
def _(src, tgt, values, tau, normalize, backend):
    dt = _out_dtype(src.dtype)
    B, Ns = src.shape[:2]
    return src.new_empty((B, Ns, values.shape[2]), dtype=dt), src.new_empty((B, Ns), dtype=dt)


@torch.library.custom_op("semcorr_fast::softmax_aggregate_backward", mutates_args=())
def _agg_bwd_op(grad: Tensor, src: Tensor, tgt: Tensor, values: Tensor, out: Tensor, lse: Tensor, tau: float,
                normalize: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    ds, dt, dv = _impl(backend).softmax_aggregate_bwd(grad, src, tgt, values, out, lse, tau, normalize)
    return ds, dt, dv


@_agg_bwd_op.register_fake
def _(grad, src, tgt, values, out, lse, tau, normalize, backend):
    return torch.empty_like(src), torch.empty_like(tgt), torch.empty_like(values)


def _agg_setup(ctx, inputs, output):
    src, tgt, values, tau, normalize, backend = inputs
    out, lse = output
    ctx.save_for_backward(src, tgt, values, out, lse)
    ctx.args = (tau, normalize, backend)
    ctx.mark_non_differentiable(lse)


def _agg_backward(ctx, grad, grad_lse):
    src, tgt, values, out, lse = ctx.saved_tensors
    ds, dt, dv = _agg_bwd_op(grad.contiguous(), src, tgt, values, out, lse, *ctx.args)
    return ds, dt, dv, None, None, None


_agg_op.register_autograd(_agg_backward, setup_context=_agg_setup)


def softmax_aggregate(src: Tensor, tgt: Tensor, values: Tensor, tau, *, normalize: bool = True,
                      backend: str = "auto") -> Tensor:
    """Attention with cosine logits: O_u = Σ_v softmax(s_u/τ)_v · values_v (DVE's exchange step).

    Args:
        src ``(B, Ns, C)``, tgt ``(B, Nt, C)``, values ``(B, Nt, Cv)`` (DVE: the auxiliary image's
        features, usually ``tgt`` itself), tau > 0.
    Returns:
        ``(B, Ns, Cv)`` fp32 (fp64 for fp64). Differentiable w.r.t. src, tgt and values.

    >>> f = torch.eye(3)[None]
    >>> softmax_aggregate(f, f, f * 2, 1e-3).round()[0, 1].tolist()
    [0.0, 2.0, 0.0]
    """
    op = "softmax_aggregate"
    V.pair(src, tgt, op)
    V.features(values, "values", op, shape_doc="(B, Nt, Cv)")
    if values.shape[:2] != tgt.shape[:2]:
        raise ValueError(f"{op}: values must have shape (B, Nt, Cv) = ({tgt.shape[0]}, {tgt.shape[1]}, Cv), "
                         f"got {tuple(values.shape)}")
    if values.device != src.device:
        raise ValueError(f"{op}: values must be on {src.device}, got {values.device}")
    t = V.tau(tau, op)
    V.flag(normalize, "normalize", op)
    b = _resolve(backend, [src, tgt, values], op, supported=_backends("softmax_aggregate_fwd"))
    if b == "reference":
        return ref.softmax_aggregate(src, tgt, values, t, normalize)
    if src.shape[1] == 0:
        return torch.zeros((src.shape[0], 0, values.shape[2]), dtype=_out_dtype(src.dtype), device=src.device)
    out, _ = _agg_op(src.contiguous(), tgt.contiguous(), values.contiguous(), t, normalize, b)
    return out


# ----------------------------------------------------------------------------- rowsoftmax_distill
@torch.library.custom_op("semcorr_fast::rowsoftmax_distill", mutates_args=())
def _distill_op(t_src: Tensor, t_tgt: Tensor, s_src: Tensor, s_tgt: Tensor, tau_t: float, tau_s: float, loss: int,
                normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    out, stats = _impl(backend).rowsoftmax_distill_fwd(t_src, t_tgt, s_src, s_tgt, tau_t, tau_s, loss, normalize)
    return out, stats


@_distill_op.register_fake
def _(t_src, t_tgt, s_src, s_tgt, tau_t, tau_s, loss, normalize, backend):
    dt = _out_dtype(s_src.dtype)
    B, Ns = s_src.shape[:2]
    return s_src.new_empty((B, Ns), dtype=dt), s_src.new_empty((B, Ns, 3), dtype=dt)


@torch.library.custom_op("semcorr_fast::rowsoftmax_distill_backward", mutates_args=())
def _distill_bwd_op(grad: Tensor, t_src: Tensor, t_tgt: Tensor, s_src: Tensor, s_tgt: Tensor, stats: Tensor,
                    tau_t: float, tau_s: float, loss: int, normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    ds, dt = _impl(backend).rowsoftmax_distill_bwd(grad, t_src, t_tgt, s_src, s_tgt, stats, tau_t, tau_s, loss,
                                                   normalize)
    return ds, dt


@_distill_bwd_op.register_fake
def _(grad, t_src, t_tgt, s_src, s_tgt, stats, tau_t, tau_s, loss, normalize, backend):
    return torch.empty_like(s_src), torch.empty_like(s_tgt)


def _distill_setup(ctx, inputs, output):
    t_src, t_tgt, s_src, s_tgt, tau_t, tau_s, loss, normalize, backend = inputs
    _, stats = output
    ctx.save_for_backward(t_src, t_tgt, s_src, s_tgt, stats)
    ctx.args = (tau_t, tau_s, loss, normalize, backend)
    ctx.mark_non_differentiable(stats)


def _distill_backward(ctx, grad, grad_stats):
    t_src, t_tgt, s_src, s_tgt, stats = ctx.saved_tensors
    ds, dt = _distill_bwd_op(grad.contiguous(), t_src, t_tgt, s_src, s_tgt, stats, *ctx.args)
    return None, None, ds, dt, None, None, None, None, None


_distill_op.register_autograd(_distill_backward, setup_context=_distill_setup)


def rowsoftmax_distill(t_src: Tensor, t_tgt: Tensor, s_src: Tensor, s_tgt: Tensor, tau_teacher, tau_student, *,
                       loss: str = "ce", normalize: bool = True, backend: str = "auto") -> Tensor:
    """Per-row loss between the teacher's and the student's row softmaxes, streamed in two passes.

    a = softmax(s^T/τ_t) (teacher, no gradient), b = softmax(s^S/τ_s) (student):
    ``"ce"`` −Σ_v a log b (LEAD), ``"mse"`` Σ_v (a − b)² (ASYM, the paper's method: τ_t = 0.2,
    τ_s = 0.4), ``"l1"`` Σ_v |a − b| (ASYM's ablation). Pass 1 computes both row log-sum-exps, pass 2
    the loss and its row statistic; the backward recomputes both softmaxes tile by tile.

    Args:
        t_src ``(B, Ns, Ct)``, t_tgt ``(B, Nt, Ct)``: teacher features (e.g. Ct = 1024);
        s_src ``(B, Ns, Cs)``, s_tgt ``(B, Nt, Cs)``: student features (e.g. Cs = 256), same dtype.
    Returns:
        ``(B, Ns)`` fp32 (fp64 for fp64); gradients flow into the student only.

    >>> f = torch.eye(3)[None]
    >>> float(rowsoftmax_distill(f, f, f, f, 0.5, 0.5, loss="mse").abs().max()) < 1e-12
    True
    """
    op = "rowsoftmax_distill"
    V.pair(t_src, t_tgt, op, names=("t_src", "t_tgt"))
    V.pair(s_src, s_tgt, op, names=("s_src", "s_tgt"))
    if t_src.shape[:2] != s_src.shape[:2] or t_tgt.shape[1] != s_tgt.shape[1]:
        raise ValueError(f"{op}: teacher and student must have the same B, Ns and Nt, got t_src "
                         f"{tuple(t_src.shape)}, t_tgt {tuple(t_tgt.shape)}, s_src {tuple(s_src.shape)}, "
                         f"s_tgt {tuple(s_tgt.shape)}")
    if t_src.dtype != s_src.dtype:
        raise TypeError(f"{op}: teacher and student must have the same dtype, got {t_src.dtype} and {s_src.dtype}")
    if t_src.device != s_src.device:
        raise ValueError(f"{op}: teacher and student must be on one device, got {t_src.device} and {s_src.device}")
    tt = V.tau(tau_teacher, op, name="tau_teacher")
    ts = V.tau(tau_student, op, name="tau_student")
    V.choice(loss, "loss", _LOSSES, op)
    V.flag(normalize, "normalize", op)
    b = _resolve(backend, [t_src, t_tgt, s_src, s_tgt], op, supported=_backends("rowsoftmax_distill_fwd"))
    if b == "reference":
        return ref.rowsoftmax_distill(t_src, t_tgt, s_src, s_tgt, tt, ts, loss, normalize)
    if s_src.shape[1] == 0:
        return torch.zeros(s_src.shape[:2], dtype=_out_dtype(s_src.dtype), device=s_src.device) + s_src.sum() * 0
    out, _ = _distill_op(t_src.detach().contiguous(), t_tgt.detach().contiguous(), s_src.contiguous(),
                         s_tgt.contiguous(), tt, ts, _LOSSES.index(loss), normalize, b)
    return out
