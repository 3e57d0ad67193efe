"""The streaming engine shared by every correlation-family kernel (flash-attention style).

A program owns ``BLOCK_M`` query rows of ``src (B, M, C)`` and streams the target ``tgt (B, N, C)``
in tiles of ``BLOCK_N`` columns. Each score tile ``S = Q K^T`` is accumulated in fp32 over chunks of
``BLOCK_C`` channels (``score_tile``), so C up to 4096 costs registers for one ``BLOCK_M x BLOCK_N``
tile and one ``BLOCK_C`` chunk of each operand only. Cosine similarity is fused: per-row L2 norms
are computed once (``row_norms``, an O(N*C) pass) and applied as ``S * r_u * r_v`` on the GEMM output
(r = 1 / max(||x||, 1e-12)); no normalised copy of the features exists. The ops differ only in the
epilogue applied to each tile (online softmax, running argmax / top-k, row-min, store).

Also here: the normalisation backward epilogue (``finalize_grad``), which turns the fp32 gradient
accumulated w.r.t. the normalised vectors into the gradient w.r.t. the raw features, and small
launch utilities.

Interpreter note: Triton 3.8's CPU interpreter gets two bf16 operations wrong: ``tl.dot`` multiplies
bf16 operands as their raw uint16 bit patterns (``np.matmul`` on the storage), and fp32 -> bf16
casts truncate instead of rounding to nearest-even (the GPU default). Kernels therefore take an
``EMU_BF16`` flag, set by the launchers only under the interpreter with bf16 data: ``mma`` then
upcasts the operands to fp32 (products of bf16 values are exact, like the bf16 MMA with fp32
accumulation), and ``to_dtype`` rounds to bf16 with integer arithmetic. Compiled kernels always get
``EMU_BF16=False``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._config import SUPPORTED_DTYPES, TileConfig, interpreting, is_16bit, row_blocks, row_launch, tile_config

# Inside the kernels the constants appear as literals (Triton reads module globals only when they
# are tl.constexpr): eps = 1e-12, log2(e) = 1.4426950408889634, ln(2) = 0.6931471805599453, and
# 2147483647 (int32 max) as the "no candidate" index of the argmin-over-indices reductions.
LOG2E = 1.4426950408889634  # host side: z2 = s * LOG2E / tau


# --------------------------------------------------------------------------------------------
# jit building blocks
# --------------------------------------------------------------------------------------------
@triton.jit
def to_dtype(x, DST: tl.constexpr, EMU_BF16: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in DST; EMU_BF16 (DST must be bf16) does it by hand."""
    if EMU_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DST)


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    """acc + a @ b on tensor cores (fp32 accumulate); see the interpreter note above for EMU_BF16."""
    if EMU_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def score_tile(q_ptr, k_ptr, offs_m, offs_n, M, N, C,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
               PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    """fp32 tile S[i, j] = <q[offs_m[i]], k[offs_n[j]]>, streamed over C in BLOCK_C chunks.

    ``q_ptr``/``k_ptr`` point at the current batch item (row-major ``(M, C)``/``(N, C)``).
    Out-of-range rows/columns/channels load as 0, so they score 0: the epilogue masks them.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_c = tl.arange(0, BLOCK_C)
    m_ok = offs_m < M
    n_ok = offs_n < N
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        c_ok = cc < C
        q = tl.load(q_ptr + offs_m[:, None] * C + cc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        kt = tl.load(k_ptr + offs_n[None, :] * C + cc[:, None], mask=n_ok[None, :] & c_ok[:, None], other=0.0)
        acc = mma(q, kt, acc, PREC, EMU_BF16)
    return acc


@triton.jit
def inv_norm(n_ptr, offs, N):
    """r = 1 / max(||x||, eps) for the rows ``offs`` (1 for out-of-range rows)."""
    n = tl.load(n_ptr + offs, mask=offs < N, other=1.0)
    return 1.0 / tl.maximum(n, 1e-12)


@triton.jit
def batch_offsets(q_ptr, k_ptr, qn_ptr, kn_ptr, b, M, N, C):
    """Pointers into batch item ``b``: of (B, M, C) source and (B, N, C) target rows, and of their
    per-row (B, M) / (B, N) arrays (norms, gradient dot products)."""
    return q_ptr + b * M * C, k_ptr + b * N * C, qn_ptr + b * M, kn_ptr + b * N


@triton.jit
def tile_offsets(pid_m, pid_n, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row and column indices of tile (pid_m, pid_n) and their in-bounds masks."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m, offs_n, offs_m < M, offs_n < N


@triton.jit
def cosine_tile(q_ptr, k_ptr, qn_ptr, kn_ptr, offs_m, offs_n, M, N, C,
                NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_C: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    """Similarity tile: the raw dot products, scaled by r_u * r_v when NORMALIZE."""
    s = score_tile(q_ptr, k_ptr, offs_m, offs_n, M, N, C, BLOCK_M, BLOCK_N, BLOCK_C, PREC, EMU_BF16)
    if NORMALIZE:
        ru = inv_norm(qn_ptr, offs_m, M)
        rv = inv_norm(kn_ptr, offs_n, N)
        s = s * ru[:, None] * rv[None, :]
    return s


@triton.jit
def online_softmax_step(s, offs_n, N, scale2, m_i, n_nan):
    """One target tile of the streaming softmax in base 2 (z = s·scale2, scale2 = log2(e)/τ): returns
    p = 2^(z − m_new), alpha = 2^(m_i − m_new) (rescales the running sums), m_new and the running count
    of NaN scores (a row with any gets NaN); NaN scores and columns past N are left out of p."""
    z = s * scale2
    col_ok = (offs_n < N)[None, :]
    n_nan += tl.sum((col_ok & (z != z)).to(tl.int32), axis=1)
    z = tl.where(col_ok & (z == z), z, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(z, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(z - m_new[:, None])
    return p, alpha, m_new, n_nan


@triton.jit
def grid_xy(offs_n, W):
    """Coordinates (x, y) = (v mod W, v // W) of the target cells ``offs_n``, in fp32."""
    return (offs_n % W).to(tl.float32), (offs_n // W).to(tl.float32)


@triton.jit
def first_max(sc, valid, offs, AXIS: tl.constexpr):
    """Max of ``sc`` along AXIS over ``valid`` entries and the lowest ``offs`` reaching it.

    ``sc`` must already hold -inf at invalid entries. Returns (value, index); index is
    2147483647 where a line has no valid entry.
    """
    mx = tl.max(sc, axis=AXIS)
    if AXIS == 1:
        hit = valid & (sc == mx[:, None])
        idx = tl.min(tl.where(hit, offs[None, :], 2147483647), axis=1)
    else:
        hit = valid & (sc == mx[None, :])
        idx = tl.min(tl.where(hit, offs[:, None], 2147483647), axis=0)
    return mx, idx


@triton.jit
def feature_grads_from_ds(ds, s, q_ptr, k_ptr, qn_ptr, kn_ptr, dq_ptr, dk_ptr, qdot_ptr, kdot_ptr,
                          offs_m, offs_n, M, N, C,
                          NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_C: tl.constexpr, PREC: tl.constexpr, EMU_BF16: tl.constexpr):
    """Backward tile GEMMs shared by soft_argmax and the loss kernels: from a ``(BLOCK_M, BLOCK_N)`` fp32 tile
    ``ds = dL/ds`` (0 at out-of-range entries) and its similarity tile ``s``, add with fp32 atomics

      dq[offs_m] += ds @ y_hat[offs_n]   and   dk[offs_n] += ds^T @ x_hat[offs_m]

    over BLOCK_C channel chunks (x_hat = x * r when NORMALIZE, the raw rows otherwise), and, when
    NORMALIZE, qdot[offs_m] += sum_v ds*s and kdot[offs_n] += sum_u ds*s for ``finalize_grad``.
    All pointers point at the current batch item. ds is rounded once to the feature dtype for the
    tensor-core GEMMs. The 1/||.|| factors go onto the operand chunks (unit-norm x_hat, y_hat are safe
    in fp16) rather than into ds: a zero feature row has r = 1e12 and ds * r would overflow fp16
    (inf * 0 = NaN); |ds| itself must stay below 65504. The dots <x_hat_u, d x_hat_u> use the very
    rounded ds the GEMMs consume, so the projection in ``finalize_grad`` removes the component along
    x_hat_u consistently (C = 1 cosines, whose true gradient is 0, stay 0 in 16-bit).
    """
    m_ok = offs_m < M
    n_ok = offs_n < N
    ds16 = to_dtype(ds, q_ptr.dtype.element_ty, EMU_BF16)
    ds16_t = tl.trans(ds16)
    if NORMALIZE:
        rv = 1.0 / tl.maximum(tl.load(kn_ptr + offs_n, mask=n_ok, other=1.0), 1e-12)
        ru = 1.0 / tl.maximum(tl.load(qn_ptr + offs_m, mask=m_ok, other=1.0), 1e-12)
        dss = ds16.to(tl.float32) * s
        tl.atomic_add(qdot_ptr + offs_m, tl.sum(dss, axis=1), mask=m_ok, sem="relaxed")
        tl.atomic_add(kdot_ptr + offs_n, tl.sum(dss, axis=0), mask=n_ok, sem="relaxed")
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        c_ok = cc < C
        kc = tl.load(k_ptr + offs_n[:, None] * C + cc[None, :], mask=n_ok[:, None] & c_ok[None, :], other=0.0)
        qc = tl.load(q_ptr + offs_m[:, None] * C + cc[None, :], mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        if NORMALIZE:
            kc = to_dtype(kc.to(tl.float32) * rv[:, None], q_ptr.dtype.element_ty, EMU_BF16)
            qc = to_dtype(qc.to(tl.float32) * ru[:, None], q_ptr.dtype.element_ty, EMU_BF16)
        dq_c = mma(ds16, kc, tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32), PREC, EMU_BF16)
        tl.atomic_add(dq_ptr + offs_m[:, None] * C + cc[None, :], dq_c,
                      mask=m_ok[:, None] & c_ok[None, :], sem="relaxed")
        dk_c = mma(ds16_t, qc, tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32), PREC, EMU_BF16)
        tl.atomic_add(dk_ptr + offs_n[:, None] * C + cc[None, :], dk_c,
                      mask=n_ok[:, None] & c_ok[None, :], sem="relaxed")


# --------------------------------------------------------------------------------------------
# row norms and the normalisation backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_norm_kernel(x_ptr, n_ptr, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """n[r] = ||x[r]||_2 in fp32 for the rows of a row-major (R, C) matrix."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    base = rows.to(tl.int64) * C
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        x = tl.load(x_ptr + base[:, None] + cc[None, :], mask=r_ok[:, None] & (cc[None, :] < C), other=0.0)
        x = x.to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(n_ptr + rows, tl.sqrt(acc), mask=r_ok)


@triton.jit
def _finalize_grad_kernel(acc_ptr, x_ptr, n_ptr, dot_ptr, out_ptr, R, C,
                          NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          EMU_BF16: tl.constexpr):
    """Gradient w.r.t. raw features from the fp32 gradient ``acc`` w.r.t. the normalised ones.

    With r = 1/max(||x||, eps) and dot = <x_hat, d x_hat> (accumulated by the op kernels as
    sum_v ds_uv * s_uv): dx = r * acc - r^2 * dot * x where ||x|| > eps, dx = r * acc elsewhere.
    Without NORMALIZE dx = acc. Each element is read and written by the same thread, so ``out``
    may alias ``acc``.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    base = rows.to(tl.int64) * C
    if NORMALIZE:
        n = tl.load(n_ptr + rows, mask=r_ok, other=1.0)
        r = 1.0 / tl.maximum(n, 1e-12)
        d = tl.load(dot_ptr + rows, mask=r_ok, other=0.0)
        corr = tl.where(n > 1e-12, r * r * d, 0.0)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        msk = r_ok[:, None] & (cc[None, :] < C)
        a = tl.load(acc_ptr + base[:, None] + cc[None, :], mask=msk, other=0.0)
        if NORMALIZE:
            x = tl.load(x_ptr + base[:, None] + cc[None, :], mask=msk, other=0.0).to(tl.float32)
            a = r[:, None] * a - corr[:, None] * x
        tl.store(out_ptr + base[:, None] + cc[None, :], to_dtype(a, out_ptr.dtype.element_ty, EMU_BF16), mask=msk)


# --------------------------------------------------------------------------------------------
# Python-side helpers
# --------------------------------------------------------------------------------------------
def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current one for the launch (Triton launches on the current device)."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def check_features(src: torch.Tensor, tgt: torch.Tensor, op: str) -> tuple[int, int, int, int]:
    """(B, Ns, Nt, C) after the checks the kernels rely on (the ops layer validates the rest)."""
    if src.dtype == torch.float64 or tgt.dtype == torch.float64:
        raise NotImplementedError(f"{op}: the Triton backend has no fp64 kernels (use backend='cpu' or 'reference')")
    if src.dtype not in SUPPORTED_DTYPES or tgt.dtype != src.dtype:
        raise TypeError(f"{op}: expected src/tgt of one dtype among fp32/fp16/bf16, got {src.dtype}, {tgt.dtype}")
    if src.dim() != 3 or tgt.dim() != 3 or src.shape[0] != tgt.shape[0] or src.shape[2] != tgt.shape[2]:
        raise ValueError(f"{op}: expected src (B,Ns,C) and tgt (B,Nt,C), got {tuple(src.shape)}, {tuple(tgt.shape)}")
    if not (src.is_contiguous() and tgt.is_contiguous()):
        raise ValueError(f"{op}: src and tgt must be contiguous")
    B, Ns, C = src.shape
    Nt = tgt.shape[1]
    # In-batch offsets are int32 inside the kernels (batch offsets are int64).
    if max(Ns, Nt) * C >= 2 ** 31:
        raise ValueError(f"{op}: N*C = {max(Ns, Nt) * C} exceeds the kernels' int32 in-batch indexing")
    return B, Ns, Nt, C


# Interpreter tile of the training-loss kernels (expected_cost, softmax_aggregate, rowsoftmax_distill).
# Larger than _config's interpreter tile: the interpreter's cost is per program and per tile, not per
# element, and the loss tests' shapes (up to Ns = 150, Nt = 323, C = 33) still cross several row
# tiles, target tiles and 16-channel chunks with it.
INTERP_LOSS_TILE = TileConfig(64, 64, 16, 4, 1)


@dataclass(frozen=True)
class LossTile(TileConfig):
    """A tile of a loss kernel's own table (those that ``_config``'s families do not fit), with an
    optional register cap: left alone, ptxas caps some fp32 FMA-dot kernels at 128 registers for
    occupancy and spills; an explicit ``maxnreg`` lets them allocate what they need."""
    maxnreg: int | None = None

    def launch(self) -> dict:
        opts = super().launch()
        if opts and self.maxnreg:
            opts["maxnreg"] = self.maxnreg
        return opts

    def label(self) -> str:
        return super().label() + (f"-r{self.maxnreg}" if self.maxnreg else "")


def loss_tile_config(family: str, dtype: torch.dtype, C: int) -> TileConfig:
    """``_config.tile_config`` of a family on GPUs; ``INTERP_LOSS_TILE`` under the interpreter."""
    return INTERP_LOSS_TILE if interpreting() else tile_config(family, dtype, C)


def table_tile(entry: tuple, dtype: torch.dtype) -> TileConfig:
    """The tile of a loss table ``entry = (16-bit tile args, fp32 tile args)`` for ``dtype``
    (``INTERP_LOSS_TILE`` under the interpreter)."""
    if interpreting():
        return INTERP_LOSS_TILE
    return LossTile(*entry[0 if is_16bit(dtype) else 1])


def table_tiles(entry: tuple) -> list[tuple[str, TileConfig]]:
    """Every (dtype-name, tile) of a loss table entry, for ``aot.py``."""
    return [(dname, LossTile(*entry[idx])) for dname, idx in (("fp16", 0), ("bf16", 0), ("fp32", 1))]


def emulate_bf16(dtype: torch.dtype) -> bool:
    """EMU_BF16 for kernels on ``dtype`` data: bf16 under the interpreter (see module docstring)."""
    return interpreting() and dtype == torch.bfloat16


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """fp32 L2 norms of the last dim of a contiguous (..., C) tensor; shape ``x.shape[:-1]``."""
    C = x.shape[-1]
    R = x.numel() // max(C, 1)
    out = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float32)
    if R == 0:
        return out
    br, bc = row_blocks()
    with device_guard(x):
        _row_norm_kernel[(triton.cdiv(R, br),)](x, out, R, C, BLOCK_R=br, BLOCK_C=bc, **row_launch())
    return out


class FeatureGrads:
    """fp32 accumulators of one (src, tgt) feature pair for ``feature_grads_from_ds`` kernels.

    ``dq (B, Ns, C)``, ``dk (B, Nt, C)``, ``qdot (B, Ns)``, ``kdot (B, Nt)`` start at zero; ``qn``/``kn``
    are the fp32 row norms when ``normalize`` (else the dot buffers stand in as unused pointers, so
    ``features()`` always yields 4 valid tensors). ``finish()`` applies the normalisation backward and
    returns ``(dsrc, dtgt)`` in the dtypes of src/tgt.
    """

    def __init__(self, src: torch.Tensor, tgt: torch.Tensor, normalize: bool):
        dev = src.device
        self.src, self.tgt, self.normalize = src, tgt, bool(normalize)
        B, Ns, C = src.shape
        Nt = tgt.shape[1]
        self.dq = torch.zeros((B, Ns, C), device=dev, dtype=torch.float32)
        self.dk = torch.zeros((B, Nt, C), device=dev, dtype=torch.float32)
        self.qdot = torch.zeros((B, Ns), device=dev, dtype=torch.float32)
        self.kdot = torch.zeros((B, Nt), device=dev, dtype=torch.float32)
        empty = src.numel() == 0 or tgt.numel() == 0
        self.qn = row_norms(src) if (self.normalize and not empty) else None
        self.kn = row_norms(tgt) if (self.normalize and not empty) else None

    def features(self) -> tuple:
        """(q, k, qn, kn): the feature and norm pointers of ``feature_grads_from_ds``."""
        qn = self.qn if self.qn is not None else self.qdot
        kn = self.kn if self.kn is not None else self.kdot
        return (self.src, self.tgt, qn, kn)

    def accumulators(self) -> tuple:
        """(dq, dk, qdot, kdot): the fp32 outputs of ``feature_grads_from_ds``."""
        return (self.dq, self.dk, self.qdot, self.kdot)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.src.numel() == 0 or self.tgt.numel() == 0:
            return self.dq.to(self.src.dtype), self.dk.to(self.tgt.dtype)
        return (finalize_grad(self.dq, self.src, self.qn, self.qdot, self.normalize),
                finalize_grad(self.dk, self.tgt, self.kn, self.kdot, self.normalize))


def finalize_grad(acc: torch.Tensor, x: torch.Tensor, norms: torch.Tensor | None, dot: torch.Tensor | None,
                  normalize: bool) -> torch.Tensor:
    """dx (dtype of ``x``) from the fp32 accumulator ``acc`` (same shape as ``x``)."""
    C = x.shape[-1]
    R = x.numel() // max(C, 1)
    out = acc if x.dtype == torch.float32 else torch.empty_like(x)
    if R == 0 or C == 0:
        return out.to(x.dtype)
    br, bc = row_blocks()
    n_arg = norms if normalize else acc
    d_arg = dot if normalize else acc
    with device_guard(x):
        _finalize_grad_kernel[(triton.cdiv(R, br),)](acc, x, n_arg, d_arg, out, R, C,
                                                     NORMALIZE=normalize, BLOCK_R=br, BLOCK_C=bc,
                                                     EMU_BF16=emulate_bf16(x.dtype),
                                                     **row_launch())
    return out
