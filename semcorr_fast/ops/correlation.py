"""The correlation family of ``semcorr_fast.ops`` (contract: ``../shared/docs/ops-contract.md``).

Every public function validates its arguments, resolves the backend (``backend=`` or
``SEMCORR_BACKEND``), and calls either the reference (``backend="reference"``) or one
``torch.library`` custom op (``semcorr_fast::<name>``) whose implementation forwards to the chosen
backend's kernels. The custom ops carry fake (meta) implementations, so ``torch.compile`` and
tracing see through them, and an autograd formula whose backward is itself a custom op that
recomputes tiles from saved per-row statistics.

Shapes: ``src (B, Ns, C)`` query rows, ``tgt (B, Nt, C)`` a whole target map with ``Nt = H·W``
(row-major, cell ``v = y·W + x``); coordinates are ``(x, y)`` in target grid cells.
"""
from __future__ import annotations

import importlib

import torch

from .. import _backend
from .. import reference as ref
from . import _native
from . import _validate as V

Tensor = torch.Tensor

__all__ = [
    "flatten_map", "ncc", "softmax_t", "match_topk", "mutual_nn", "soft_argmax", "window_soft_argmax",
    "instance_matching_distance", "topk_retrieval",
]


def _impl(backend: str):
    if backend in ("cpu", "cuda"):
        return _native
    if backend == "triton":
        return importlib.import_module("semcorr_fast.kernels")
    raise RuntimeError(f"no kernel module for backend {backend!r}")


def _resolve(backend, tensors, op, supported=("reference", "cpu", "triton", "cuda"), cuda_name=None):
    cuda_ops = (op,) if _native.has_cuda_kernel(cuda_name or op) else ()
    return _backend.resolve(backend, tensors, op=op, supported=supported, cuda_ops=cuda_ops)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def flatten_map(x: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """Turn a ``(B, C, H, W)`` feature map into the ops' ``(B, H·W, C)`` rows and its ``(H, W)``.

    Row ``n = y·W + x`` holds the feature of cell ``(x, y)``.

    >>> rows, hw = flatten_map(torch.zeros(2, 8, 3, 5))
    >>> tuple(rows.shape), hw
    ((2, 15, 8), (3, 5))
    """
    V.features(x, "x", "flatten_map", rank=4, shape_doc="(B, C, H, W)")
    B, C, H, W = x.shape
    return x.flatten(2).transpose(1, 2).contiguous(), (H, W)


# ----------------------------------------------------------------------------- ncc / softmax_t
def _norm_backward(x: Tensor, r: Tensor, dxh: Tensor) -> Tensor:
    """dL/dx from dL/dx̂ through x̂ = x·r, r = 1/max(‖x‖, 1e-12) (math.md)."""
    xh = x * r[..., None]
    clamped = (r >= 1e12)[..., None]
    dot = (xh * dxh).sum(-1, keepdim=True)
    return r[..., None] * (dxh - torch.where(clamped, torch.zeros_like(xh), xh * dot))


@torch.library.custom_op("semcorr_fast::ncc", mutates_args=())
def _ncc_op(src: Tensor, tgt: Tensor, normalize: bool, backend: str) -> Tensor:
    return _impl(backend).ncc(src, tgt, normalize)


@_ncc_op.register_fake
def _(src, tgt, normalize, backend):
    return src.new_empty((src.shape[0], src.shape[1], tgt.shape[1]))


@torch.library.custom_op("semcorr_fast::ncc_backward", mutates_args=())
def _ncc_bwd_op(grad: Tensor, src: Tensor, tgt: Tensor, normalize: bool) -> tuple[Tensor, Tensor]:
    acc = _out_dtype(src.dtype)
    g, a, b = grad.to(acc), src.to(acc), tgt.to(acc)
    if not normalize:
        return (g @ b).to(src.dtype), (g.transpose(1, 2) @ a).to(tgt.dtype)
    ra, rb = _native._inv_norm(a, True), _native._inv_norm(b, True)
    dah = (g * rb[:, None, :]) @ b
    dbh = (g * ra[:, :, None]).transpose(1, 2) @ a
    return _norm_backward(a, ra, dah).to(src.dtype), _norm_backward(b, rb, dbh).to(tgt.dtype)


@_ncc_bwd_op.register_fake
def _(grad, src, tgt, normalize):
    return torch.empty_like(src), torch.empty_like(tgt)


def _ncc_setup(ctx, inputs, output):
    src, tgt, normalize, _ = inputs
    ctx.save_for_backward(src, tgt)
    ctx.normalize = normalize


def _ncc_backward(ctx, grad):
    src, tgt = ctx.saved_tensors
    ds, dt = _ncc_bwd_op(grad.contiguous(), src, tgt, ctx.normalize)
    return ds, dt, None, None


_ncc_op.register_autograd(_ncc_backward, setup_context=_ncc_setup)


def ncc(src: Tensor, tgt: Tensor, *, normalize: bool = True, backend: str = "auto") -> Tensor:
    """Dense similarity matrix ``(B, Ns, Nt)``: cosine (``normalize=True``) or raw dot products.

    The one op of the family that materialises Ns×Nt; differentiable w.r.t. both inputs. Output in
    the input dtype (fp32 accumulation).

    Args:
        src: ``(B, Ns, C)``. tgt: ``(B, Nt, C)``.

    >>> s = ncc(torch.ones(1, 2, 3), torch.ones(1, 4, 3))
    >>> tuple(s.shape), round(float(s[0, 0, 0]), 6)
    ((1, 2, 4), 1.0)
    """
    op = "ncc"
    V.pair(src, tgt, op)
    V.flag(normalize, "normalize", op)
    b = _resolve(backend, [src, tgt], op, supported=("reference", "cpu", "triton"))
    if b == "reference":
        return ref.ncc(src, tgt, normalize)
    return _ncc_op(src.contiguous(), tgt.contiguous(), normalize, b)


@torch.library.custom_op("semcorr_fast::softmax_t", mutates_args=())
def _softmax_t_op(sim: Tensor, tau: float, dim: int, backend: str) -> Tensor:
    return _impl(backend).softmax_t(sim, tau, dim)


@_softmax_t_op.register_fake
def _(sim, tau, dim, backend):
    return torch.empty_like(sim)


@torch.library.custom_op("semcorr_fast::softmax_t_backward", mutates_args=())
def _softmax_t_bwd_op(grad: Tensor, y: Tensor, tau: float, dim: int) -> Tensor:
    acc = _out_dtype(y.dtype)
    g, p = grad.to(acc), y.to(acc)
    return (p * (g - (g * p).sum(dim, keepdim=True)) / tau).to(y.dtype)


@_softmax_t_bwd_op.register_fake
def _(grad, y, tau, dim):
    return torch.empty_like(y)


def _softmax_t_setup(ctx, inputs, output):
    _, tau, dim, _ = inputs
    ctx.save_for_backward(output)
    ctx.tau, ctx.dim = tau, dim


def _softmax_t_backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return _softmax_t_bwd_op(grad.contiguous(), y, ctx.tau, ctx.dim), None, None, None


_softmax_t_op.register_autograd(_softmax_t_backward, setup_context=_softmax_t_setup)


def softmax_t(sim: Tensor, tau, *, dim: int = -1, backend: str = "auto") -> Tensor:
    """Softmax of ``sim / tau`` along ``dim`` on a materialised matrix; differentiable.

    Computed in fp32 (fp64 for fp64), returned in the input dtype.

    >>> p = softmax_t(torch.zeros(1, 2, 4), 0.1)
    >>> float(p.sum(-1).min())
    1.0
    """
    op = "softmax_t"
    V.tensor(sim, "sim", op)
    if sim.dtype not in V.FLOAT_DTYPES:
        raise TypeError(f"{op}: sim must be a floating tensor, got dtype {sim.dtype}")
    if sim.dim() < 1:
        raise ValueError(f"{op}: sim must have at least one dimension, got a 0-dim tensor")
    t = V.tau(tau, op)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -sim.dim() <= dim < sim.dim():
        raise ValueError(f"{op}: dim must be an int in [{-sim.dim()}, {sim.dim() - 1}], got {dim!r}")
    b = _resolve(backend, [sim], op, supported=("reference", "cpu", "triton"))
    if b == "reference":
        return ref.softmax_t(sim, t, dim)
    return _softmax_t_op(sim.contiguous(), t, dim % sim.dim(), b)


# ----------------------------------------------------------------------------- soft_argmax
@torch.library.custom_op("semcorr_fast::soft_argmax", mutates_args=())
def _soft_argmax_op(src: Tensor, tgt: Tensor, tau: float, H: int, W: int, normalize: bool,
                    backend: str) -> tuple[Tensor, Tensor]:
    out, lse = _impl(backend).soft_argmax_fwd(src, tgt, tau, H, W, normalize)
    return out, lse


@_soft_argmax_op.register_fake
def _(src, tgt, tau, H, W, normalize, backend):
    dt = _out_dtype(src.dtype)
    B, Ns = src.shape[0], src.shape[1]
    return src.new_empty((B, Ns, 2), dtype=dt), src.new_empty((B, Ns), dtype=dt)


@torch.library.custom_op("semcorr_fast::soft_argmax_backward", mutates_args=())
def _soft_argmax_bwd_op(grad: Tensor, src: Tensor, tgt: Tensor, out: Tensor, lse: Tensor, tau: float, H: int,
                        W: int, normalize: bool, backend: str) -> tuple[Tensor, Tensor]:
    ds, dt = _impl(backend).soft_argmax_bwd(grad, src, tgt, out, lse, tau, H, W, normalize)
    return ds, dt


@_soft_argmax_bwd_op.register_fake
def _(grad, src, tgt, out, lse, tau, H, W, normalize, backend):
    return torch.empty_like(src), torch.empty_like(tgt)


def _soft_argmax_setup(ctx, inputs, output):
    src, tgt, tau, H, W, normalize, backend = inputs
    out, lse = output
    ctx.save_for_backward(src, tgt, out, lse)
    ctx.args = (tau, H, W, normalize, backend)
    ctx.mark_non_differentiable(lse)


def _soft_argmax_backward(ctx, grad_out, grad_lse):
    src, tgt, out, lse = ctx.saved_tensors
    ds, dt = _soft_argmax_bwd_op(grad_out.contiguous(), src, tgt, out, lse, *ctx.args)
    return ds, dt, None, None, None, None, None


_soft_argmax_op.register_autograd(_soft_argmax_backward, setup_context=_soft_argmax_setup)


def _empty_rows(src: Tensor, width: int) -> Tensor:
    return torch.zeros((src.shape[0], 0, width), dtype=_out_dtype(src.dtype), device=src.device) + src.sum() * 0


def soft_argmax(src: Tensor, tgt: Tensor, tau, hw, *, normalize: bool = True, backend: str = "auto") -> Tensor:
    """Expected target coordinate of each query row under ``softmax(sim / tau)`` over the whole target.

    ``out[b, u] = Σ_v softmax(s[b, u, :] / tau)_v · (x_v, y_v)``. Streams target tiles with an online
    softmax: memory O((Ns + Nt)·C), no Ns×Nt matrix forward or backward (the backward recomputes tiles
    from the saved per-row log-sum-exp). Differentiable w.r.t. ``src`` and ``tgt``.

    Args:
        src: ``(B, Ns, C)`` query rows (a whole map, or gathered keypoint features).
        tgt: ``(B, Nt, C)`` target map, ``Nt = H·W``.
        tau: temperature > 0 (a "logit scale" t of other codebases is ``tau = 1/t²``).
        hw: ``(H, W)`` of the target grid.
    Returns:
        ``(B, Ns, 2)`` coordinates (x, y) in target cells, fp32 (fp64 for fp64 input). Rows whose
        similarities contain NaN give NaN.

    >>> f = torch.eye(4)[None]                     # 4 cells, one-hot features
    >>> soft_argmax(f, f, 1e-3, (2, 2)).round()    # each cell finds itself
    tensor([[[0., 0.],
             [1., 0.],
             [0., 1.],
             [1., 1.]]])
    """
    op = "soft_argmax"
    V.pair(src, tgt, op)
    t = V.tau(tau, op)
    H, W = V.hw(hw, tgt.shape[1], op)
    V.flag(normalize, "normalize", op)
    b = _resolve(backend, [src, tgt], op, supported=("reference", "cpu", "triton"))
    if b == "reference":
        return ref.soft_argmax(src, tgt, t, (H, W), normalize)
    if src.shape[1] == 0:
        return _empty_rows(src, 2)
    out, _ = _soft_argmax_op(src.contiguous(), tgt.contiguous(), t, H, W, normalize, b)
    return out


# ----------------------------------------------------------------------------- window_soft_argmax
@torch.library.custom_op("semcorr_fast::window_soft_argmax", mutates_args=())
def _window_op(src: Tensor, tgt: Tensor, tau: float, H: int, W: int, radius: int, zero_outside: bool,
               normalize: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    out, lse, center = _impl(backend).window_soft_argmax_fwd(src, tgt, tau, H, W, radius, zero_outside, normalize)
    return out, lse, center


@_window_op.register_fake
def _(src, tgt, tau, H, W, radius, zero_outside, normalize, backend):
    dt = _out_dtype(src.dtype)
    B, Ns = src.shape[0], src.shape[1]
    return (src.new_empty((B, Ns, 2), dtype=dt), src.new_empty((B, Ns), dtype=dt),
            src.new_empty((B, Ns), dtype=torch.int64))


@torch.library.custom_op("semcorr_fast::window_soft_argmax_backward", mutates_args=())
def _window_bwd_op(grad: Tensor, src: Tensor, tgt: Tensor, out: Tensor, lse: Tensor, center: Tensor, tau: float,
                   H: int, W: int, radius: int, zero_outside: bool, normalize: bool,
                   backend: str) -> tuple[Tensor, Tensor]:
    ds, dt = _impl(backend).window_soft_argmax_bwd(grad, src, tgt, out, lse, center, tau, H, W, radius,
                                                   zero_outside, normalize)
    return ds, dt


@_window_bwd_op.register_fake
def _(grad, src, tgt, out, lse, center, tau, H, W, radius, zero_outside, normalize, backend):
    return torch.empty_like(src), torch.empty_like(tgt)


def _window_setup(ctx, inputs, output):
    src, tgt, tau, H, W, radius, zero_outside, normalize, backend = inputs
    out, lse, center = output
    ctx.save_for_backward(src, tgt, out, lse, center)
    ctx.args = (tau, H, W, radius, zero_outside, normalize, backend)
    ctx.mark_non_differentiable(lse, center)


def _window_backward(ctx, grad_out, grad_lse, grad_center):
    src, tgt, out, lse, center = ctx.saved_tensors
    ds, dt = _window_bwd_op(grad_out.contiguous(), src, tgt, out, lse, center, *ctx.args)
    return ds, dt, None, None, None, None, None, None, None


_window_op.register_autograd(_window_backward, setup_context=_window_setup)


def window_soft_argmax(src: Tensor, tgt: Tensor, tau, hw, radius: int = 7, *, outside: str = "exclude",
                       normalize: bool = True, backend: str = "auto") -> Tensor:
    """Soft-argmax restricted to a window around each row's argmax.

    Centre ``c_u = argmax_v s_uv`` over the whole target (ties → lowest index, NaN never chosen);
    window = the cells within ``radius`` of the centre in x and in y, clipped at the border
    (≤ (2r+1)² cells). Pass 1 streams the argmax; pass 2 visits only the window cells.

    * ``outside="exclude"``: softmax over the window only.
    * ``outside="zero"``: GeoAware-SC's convention: similarities outside the window are set to 0 and
      still take part in a softmax over the whole map (their mass is added in closed form). With
      its τ = 0.02 this matters only when the best cosine is near 0.

    Differentiable w.r.t. ``src`` and ``tgt`` (the argmax itself is piecewise constant).

    Args:
        src ``(B, Ns, C)``, tgt ``(B, Nt, C)``, tau > 0, hw ``(H, W)``, radius ≥ 0 (GeoAware-SC: 7 at
        evaluation, 5 in its zero-shot config).
    Returns:
        ``(B, Ns, 2)`` coordinates (x, y); NaN for rows whose similarities are all NaN.

    >>> f = torch.eye(9)[None]
    >>> window_soft_argmax(f, f, 1e-3, (3, 3), radius=1)[0, 4].round()
    tensor([1., 1.])
    """
    op = "window_soft_argmax"
    V.pair(src, tgt, op)
    t = V.tau(tau, op)
    H, W = V.hw(hw, tgt.shape[1], op)
    r = V.integer(radius, "radius", op, minimum=0)
    V.choice(outside, "outside", ("exclude", "zero"), op)
    V.flag(normalize, "normalize", op)
    b = _resolve(backend, [src, tgt], op)
    if b == "reference":
        return ref.window_soft_argmax(src, tgt, t, (H, W), r, outside, normalize)
    if src.shape[1] == 0:
        return _empty_rows(src, 2)
    out, _, _ = _window_op(src.contiguous(), tgt.contiguous(), t, H, W, r, outside == "zero", normalize, b)
    return out


# ----------------------------------------------------------------------------- matching
@torch.library.custom_op("semcorr_fast::match_topk", mutates_args=())
def _match_topk_op(src: Tensor, tgt: Tensor, k: int, tgt_mask: Tensor | None, normalize: bool,
                   backend: str) -> tuple[Tensor, Tensor]:
    v, i = _impl(backend).match_topk(src, tgt, k, tgt_mask, normalize)
    return v, i


@_match_topk_op.register_fake
def _(src, tgt, k, tgt_mask, normalize, backend):
    B, Ns = src.shape[0], src.shape[1]
    return (src.new_empty((B, Ns, k), dtype=_out_dtype(src.dtype)), src.new_empty((B, Ns, k), dtype=torch.int64))


def match_topk(src: Tensor, tgt: Tensor, k: int = 1, *, tgt_mask: Tensor | None = None, normalize: bool = True,
               backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The k most similar target rows of every query row, streamed (no Ns×Nt matrix).

    Args:
        src ``(B, Ns, C)``, tgt ``(B, Nt, C)``, k ≥ 1,
        tgt_mask: optional ``(B, Nt)`` bool; False targets are never chosen.
    Returns:
        ``values (B, Ns, k)`` fp32 (fp64 for fp64) sorted descending and ``indices (B, Ns, k)`` int64;
        ties go to the lowest index; NaN similarities are never chosen; slots that no valid target
        fills hold index −1 and value −inf. No gradient.

    >>> v, i = match_topk(torch.eye(3)[None], torch.eye(3)[None], k=2)
    >>> i[0].tolist()
    [[0, 1], [1, 0], [2, 0]]
    """
    op = "match_topk"
    V.pair(src, tgt, op)
    k = V.integer(k, "k", op, minimum=1)
    m = V.mask(tgt_mask, "tgt_mask", (tgt.shape[0], tgt.shape[1]), tgt.device, op)
    V.flag(normalize, "normalize", op)
    b = _resolve(backend, [src, tgt, m], op)
    if b == "reference":
        return ref.match_topk(src, tgt, k, m, normalize)
    with torch.no_grad():
        return _match_topk_op(src.contiguous(), tgt.contiguous(), k, m, normalize, b)


@torch.library.custom_op("semcorr_fast::mutual_nn", mutates_args=())
def _mutual_nn_op(src: Tensor, tgt: Tensor, normalize: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    s2t, t2s, mutual = _impl(backend).mutual_nn(src, tgt, normalize)
    return s2t, t2s, mutual


@_mutual_nn_op.register_fake
def _(src, tgt, normalize, backend):
    B, Ns, Nt = src.shape[0], src.shape[1], tgt.shape[1]
    return (src.new_empty((B, Ns), dtype=torch.int64), src.new_empty((B, Nt), dtype=torch.int64),
            src.new_empty((B, Ns), dtype=torch.bool))


def mutual_nn(src: Tensor, tgt: Tensor, *, normalize: bool = True, backend: str = "auto"):
    """Row and column argmax in one streaming pass, and which pairs are mutual nearest neighbours.

    Returns:
        ``s2t (B, Ns)`` int64 (best target of each source row), ``t2s (B, Nt)`` int64 (best source row
        of each target), ``mutual (B, Ns)`` bool (``t2s[s2t[u]] == u``). Ties → lowest index; NaN
        never chosen; −1 where a row/column has no number.

    >>> s2t, t2s, mu = mutual_nn(torch.eye(3)[None], torch.eye(3)[None])
    >>> mu.tolist()
    [[True, True, True]]
    """
    op = "mutual_nn"
    V.pair(src, tgt, op)
    V.features(src, "src", op, shape_doc="(B, Ns, C)", min_rows=1)
    V.flag(normalize, "normalize", op)
    b = _resolve(backend, [src, tgt], op, supported=("reference", "cpu", "triton"))
    if b == "reference":
        return ref.mutual_nn(src, tgt, normalize)
    with torch.no_grad():
        return _mutual_nn_op(src.contiguous(), tgt.contiguous(), normalize, b)


@torch.library.custom_op("semcorr_fast::instance_matching_distance", mutates_args=())
def _imd_op(src: Tensor, tgt: Tensor, src_mask: Tensor | None, tgt_mask: Tensor | None, normalize: bool,
            backend: str) -> Tensor:
    return _impl(backend).instance_matching_distance(src, tgt, src_mask, tgt_mask, normalize)


@_imd_op.register_fake
def _(src, tgt, src_mask, tgt_mask, normalize, backend):
    return src.new_empty((src.shape[0],), dtype=_out_dtype(src.dtype))


def instance_matching_distance(src: Tensor, tgt: Tensor, *, src_mask: Tensor | None = None,
                               tgt_mask: Tensor | None = None, normalize: bool = False,
                               backend: str = "auto") -> Tensor:
    """Mean over valid source rows of the minimum L2 distance to the valid target rows.

    GeoAware-SC's test-time pose selection (raw features by default: ``normalize=False``). The row
    minimum is found by streaming ``‖b‖² − 2⟨a, b⟩`` tiles; the distance to the chosen target is then
    recomputed exactly (no cancellation error).

    Args:
        src ``(B, Ns, C)``, tgt ``(B, Nt, C)``, src_mask ``(B, Ns)`` bool, tgt_mask ``(B, Nt)`` bool.
    Returns:
        ``(B,)`` fp32 (fp64 for fp64). NaN for a batch item with no valid source row, no valid target
        row, or NaN features in a valid pair.

    >>> float(instance_matching_distance(torch.zeros(1, 2, 3), torch.ones(1, 4, 3)) ** 2)
    3.0
    """
    op = "instance_matching_distance"
    V.pair(src, tgt, op)
    sm = V.mask(src_mask, "src_mask", (src.shape[0], src.shape[1]), src.device, op)
    tm = V.mask(tgt_mask, "tgt_mask", (tgt.shape[0], tgt.shape[1]), tgt.device, op)
    V.flag(normalize, "normalize", op)
    b = _resolve(backend, [src, tgt, sm, tm], op, supported=("reference", "cpu", "triton"))
    if b == "reference":
        return ref.instance_matching_distance(src, tgt, sm, tm, normalize)
    with torch.no_grad():
        return _imd_op(src.contiguous(), tgt.contiguous(), sm, tm, normalize, b)


def topk_retrieval(queries: Tensor, database: Tensor, k: int, *, normalize: bool = True,
                   exclude_self: bool = False, chunk_size: int = 65536,
                   backend: str = "auto") -> tuple[Tensor, Tensor]:
    """The k nearest database rows of every query (automatic pair curation), streamed in chunks.

    The database is read ``chunk_size`` rows at a time and moved to the queries' device, so it may
    hold 10⁷ rows in CPU memory while the compute device is a GPU. Memory O(chunk·C + Q·k).

    Args:
        queries ``(Q, C)``, database ``(D, C)`` (same dtype, any device), k ≥ 1,
        exclude_self: query i is database row i (self-retrieval); that pair is never returned.
    Returns:
        ``values (Q, k)`` fp32 (fp64) descending, ``indices (Q, k)`` int64 (ties → lowest index;
        −1/−inf where fewer than k rows qualify).

    >>> v, i = topk_retrieval(torch.eye(3), torch.eye(3), 1, exclude_self=True)
    >>> i[:, 0].tolist(), v[:, 0].tolist()
    ([1, 0, 0], [0.0, 0.0, 0.0])
    """
    op = "topk_retrieval"
    V.features(queries, "queries", op, rank=2, shape_doc="(Q, C)")
    V.features(database, "database", op, rank=2, shape_doc="(D, C)", min_rows=1)
    if queries.shape[1] != database.shape[1]:
        raise ValueError(f"{op}: queries and database must have the same C, got {tuple(queries.shape)} and "
                         f"{tuple(database.shape)}")
    if queries.dtype != database.dtype:
        raise TypeError(f"{op}: queries and database must have the same dtype, got {queries.dtype} and {database.dtype}")
    k = V.integer(k, "k", op, minimum=1)
    chunk_size = V.integer(chunk_size, "chunk_size", op, minimum=1)
    V.flag(normalize, "normalize", op)
    V.flag(exclude_self, "exclude_self", op)
    b = _resolve(backend, [queries], op, cuda_name="match_topk")
    dev = queries.device
    if b == "reference":
        return ref.topk_retrieval(queries, database.to(dev), k, normalize, exclude_self)
    Q = queries.shape[0]
    vals = torch.full((Q, k), -torch.inf, dtype=_out_dtype(queries.dtype), device=dev)
    idx = torch.full((Q, k), -1, dtype=torch.int64, device=dev)
    q = queries.contiguous()[None]
    kk = k + 1 if exclude_self else k
    rows = torch.arange(Q, device=dev)[:, None]
    with torch.no_grad():
        for start in range(0, database.shape[0], chunk_size):
            chunk = database[start:start + chunk_size].to(dev, non_blocking=True).contiguous()[None]
            v, i = _impl(b).match_topk(q, chunk, min(kk, chunk.shape[1]), None, normalize)
            v, i = v[0], i[0]
            i = torch.where(i >= 0, i + start, i)
            if exclude_self:
                self_hit = i == rows
                v = v.masked_fill(self_hit, -torch.inf)
                i = i.masked_fill(self_hit, -1)
            if start == 0 and not exclude_self and v.shape[1] == k:  # first chunk: sorted, nothing to merge
                vals, idx = v.contiguous(), i.contiguous()
                continue
            # Running results hold lower indices than this chunk: a stable sort keeps them first on ties.
            v, order = torch.sort(torch.cat([vals, v], 1), dim=1, descending=True, stable=True)
            i = torch.gather(torch.cat([idx, i], 1), 1, order)
            vals, idx = v[:, :k].contiguous(), i[:, :k].contiguous()
    idx = idx.masked_fill(vals == -torch.inf, -1)
    return vals, idx
