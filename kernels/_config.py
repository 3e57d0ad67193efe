"""Static block-size dispatcher for the Triton kernels (one table, read by the launchers and by AOT).

Why a table and not ``triton.autotune``: every choice below is a pure function of
``(kernel family, dtype, k, window size)``, so ``kernels/aot.py`` can enumerate *exactly* the
configurations a launch can pick and compile each one for sm_80 and sm_90 ahead of time (shared
memory, registers, spills, tensor-core use are then checked in CI without a GPU). Autotuning would
make the launched configuration depend on timings taken on the user's machine.

Shared-memory budget (per CTA, what Triton's pipeliner allocates for the tile GEMM operands):
``num_stages * (BLOCK_M + BLOCK_N) * BLOCK_C * itemsize``. The largest entry below,
16-bit (128 + 64) * 64 * 2 B * 3 stages = 72 KiB, sits well inside sm_80's 163 KiB and sm_90's
227 KiB; ``aot.py`` checks the real figure reported by the compiler.

Under ``TRITON_INTERPRET=1`` (CPU tests) every family gets one small configuration so that tiny
test shapes still walk through several row tiles, column tiles, C chunks and window chunks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, asdict

import torch

# Dtypes the tile kernels accept (fp64 is routed elsewhere by the lead's dispatcher).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Shared memory available to one CTA (bytes), per target.
SMEM_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


def interpreting() -> bool:
    """True when Triton runs its CPU interpreter (``TRITON_INTERPRET=1`` at import time)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(x: int) -> int:
    x = max(1, int(x))
    return 1 << (x - 1).bit_length()


@dataclass(frozen=True)
class TileConfig:
    """Block sizes and launch options of one streaming-tile kernel launch."""
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_C: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N, "BLOCK_C": self.BLOCK_C}

    def launch(self) -> dict:
        if interpreting():
            return {}
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def label(self) -> str:
        return (f"M{self.BLOCK_M}-N{self.BLOCK_N}-C{self.BLOCK_C}"
                f"-w{self.num_warps}-s{self.num_stages}")

    def asdict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class WindowConfig:
    """Block sizes of the gather kernels of the window pass (one program per query row).

    ``maxnreg`` caps registers per thread explicitly: left alone, ptxas trades registers for
    occupancy on these kernels and introduces small spills (4-16 B) on sm_90; with an explicit
    cap of 128 (4 CTAs of 4 warps per SM) it allocates without spilling.
    """
    BLOCK_W: int
    BLOCK_C: int
    num_warps: int
    maxnreg: int = 128

    def meta(self) -> dict:
        return {"BLOCK_W": self.BLOCK_W, "BLOCK_C": self.BLOCK_C}

    def launch(self) -> dict:
        if interpreting():
            return {}
        return {"num_warps": self.num_warps, "num_stages": 1, "maxnreg": self.maxnreg}

    def label(self) -> str:
        return f"W{self.BLOCK_W}-C{self.BLOCK_C}-w{self.num_warps}-r{self.maxnreg}"


def is_16bit(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


# --- tile families -----------------------------------------------------------------------------
# "score": forward streaming kernels whose epilogue is light (online softmax, running argmax, ncc).
# "topk":  running top-k epilogue; the (BLOCK_M, KP) value/index list lives in registers.
# "bwd":   soft-argmax backward: score tile, ds tile and two partial GEMM outputs live at once.
_TABLE = {
    # family: (16-bit (BM, BN, BLOCK_C, warps, stages), fp32 (...))
    "score": ((128, 64, 64, 8, 3), (64, 64, 32, 8, 3)),
    "bwd": ((64, 64, 32, 8, 2), (64, 64, 16, 8, 2)),
}
# top-k: the running list has KP slots (k rounded up to a bucket, so few variants get compiled);
# rows per program shrink as KP grows so the list stays in registers.
_TOPK_TABLE = {
    # KP: (16-bit, fp32)
    8: ((64, 64, 64, 8, 3), (64, 64, 16, 8, 3)),
    16: ((64, 64, 64, 8, 3), (64, 64, 16, 8, 3)),
    64: ((32, 64, 64, 8, 3), (32, 64, 16, 8, 3)),
}
# BLOCK_C is fixed per family and dtype (64 for 16-bit, 32 for fp32 forward tiles, i.e. 128-byte
# rows; half that for the backward, which also rescales each operand chunk in registers, and for the
# fp32 top-k, whose FMA-path dot otherwise spills beside the running list). A C smaller than the
# chunk is masked, which only costs on C < 64, shapes too small to matter, and keeps the set of
# compiled configurations (and the AOT run) small.
TOPK_MAX_K = max(_TOPK_TABLE)
WINDOW_BLOCK_W_CAP = 256

_INTERP_TILE = TileConfig(16, 32, 32, 4, 1)
_INTERP_TOPK = TileConfig(16, 32, 32, 4, 1)


def tile_config(family: str, dtype: torch.dtype, C: int) -> TileConfig:
    """Tile of a streaming family for ``dtype``. C only sets the number of BLOCK_C chunks: one chunk
    width per dtype serves every C from 1 to 4096 (see the BLOCK_C note above)."""
    if interpreting():
        return _INTERP_TILE
    return TileConfig(*_TABLE[family][0 if is_16bit(dtype) else 1])


def topk_kp(k: int) -> int:
    """Slots of the running top-k list: the smallest bucket of _TOPK_TABLE holding k."""
    for kp in sorted(_TOPK_TABLE):
        if k <= kp:
            return kp
    raise ValueError(f"k={k} exceeds the top-k kernel's {max(_TOPK_TABLE)} slots")


def topk_config(dtype: torch.dtype, C: int, k: int) -> TileConfig:
    if interpreting():
        return _INTERP_TOPK
    return TileConfig(*_TOPK_TABLE[topk_kp(k)][0 if is_16bit(dtype) else 1])


def window_cells(H: int, W: int, radius: int) -> int:
    """Largest window (cells) a row can get: (2r+1)^2 clipped to the grid."""
    return min(2 * radius + 1, W) * min(2 * radius + 1, H)


def window_config(C: int, wmax: int, backward: bool = False) -> WindowConfig:
    if interpreting():
        return WindowConfig(32, 32, 4)
    bw = window_block_w(wmax)
    return WindowConfig(bw, _window_block_c(bw, backward), 4)


def window_block_w(wmax: int) -> int:
    return min(WINDOW_BLOCK_W_CAP, max(16, next_pow2(wmax)))


def _window_block_c(bw: int, backward: bool) -> int:
    # Forward: a BLOCK_W x BLOCK_C fp32 gather tile of 4K elements, 32 per thread over 4 warps.
    # Backward also holds the tile's 64-bit scatter addresses for the dK atomics and the product
    # tile: 2K elements.
    return max(8, min((2048 if backward else 4096) // bw, 128))


# Row-wise helper kernels (norms, normalisation backward, distance recompute, softmax_t).
ROW_BLOCK_R = 16
ROW_BLOCK_C = 128
SOFTMAX_BLOCK = 1024


ROW_NUM_WARPS = 4
ROW_NUM_STAGES = 3


def row_launch() -> dict:
    """Launch options of the row-wise helper kernels and softmax_t (what aot.py compiles)."""
    return {} if interpreting() else {"num_warps": ROW_NUM_WARPS, "num_stages": ROW_NUM_STAGES}


def row_blocks() -> tuple[int, int]:
    if interpreting():
        return 8, 32
    return ROW_BLOCK_R, ROW_BLOCK_C


def softmax_block(L: int) -> int:
    """One block size on GPUs (rows are Nt long, thousands of cells; shorter rows are masked)."""
    if interpreting():
        return 64
    return SOFTMAX_BLOCK


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: tf32 for fp32 inputs only when the user allows it."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 and not interpreting():
        return "tf32"
    return "ieee"


def all_tile_configs(family: str) -> list[tuple[str, TileConfig, int | None]]:
    """Every (dtype-name, config, KP bound) the dispatcher can return for a tile family (for AOT)."""
    out = []
    for dname, idx in (("fp16", 0), ("bf16", 0), ("fp32", 1)):
        if family == "topk":
            for bound in sorted(_TOPK_TABLE):
                out.append((dname, TileConfig(*_TOPK_TABLE[bound][idx]), bound))
        else:
            out.append((dname, TileConfig(*_TABLE[family][idx]), None))
    return out


def all_window_configs(backward: bool) -> list[WindowConfig]:
    out = []
    bw = 16
    while bw <= WINDOW_BLOCK_W_CAP:
        out.append(WindowConfig(bw, _window_block_c(bw, backward), 4))
        bw *= 2
    return out
