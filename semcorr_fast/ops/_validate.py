"""Argument checks shared by every op: clear errors that name the argument and what was expected.

Nothing is broadcast silently: shapes must match exactly.
"""
from __future__ import annotations

import math
from numbers import Integral, Real

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(x, name: str, op: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def features(x, name: str, op: str, *, rank: int = 3, shape_doc: str = "(B, N, C)", min_rows: int = 0) -> torch.Tensor:
    """A floating feature tensor of the given rank with C ≥ 1 channels."""
    tensor(x, name, op)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a float16, bfloat16, float32 or float64 tensor of shape "
                        f"{shape_doc}, got dtype {x.dtype}")
    if x.dim() != rank:
        raise ValueError(f"{op}: {name} must have shape {shape_doc} ({rank} dims), got {tuple(x.shape)}")
    if x.shape[-1] < 1:
        raise ValueError(f"{op}: {name} must have at least one channel, got shape {tuple(x.shape)}")
    if x.shape[-2] < min_rows:
        raise ValueError(f"{op}: {name} must have at least {min_rows} row(s) (N ≥ {min_rows}), got shape {tuple(x.shape)}")
    return x


def pair(src: torch.Tensor, tgt: torch.Tensor, op: str, names=("src", "tgt")) -> None:
    """src (B, Ns, C) and tgt (B, Nt, C): same B, C, dtype and device."""
    a, b = names
    features(src, a, op, shape_doc="(B, Ns, C)")
    features(tgt, b, op, shape_doc="(B, Nt, C)", min_rows=1)
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(f"{op}: {a} and {b} must have the same batch size B, got {a} {tuple(src.shape)} and "
                         f"{b} {tuple(tgt.shape)}")
    if src.shape[2] != tgt.shape[2]:
        raise ValueError(f"{op}: {a} and {b} must have the same channel count C, got {a} {tuple(src.shape)} and "
                         f"{b} {tuple(tgt.shape)}")
    if src.dtype != tgt.dtype:
        raise TypeError(f"{op}: {a} and {b} must have the same dtype, got {src.dtype} and {tgt.dtype}")
    if src.device != tgt.device:
        raise ValueError(f"{op}: {a} and {b} must be on the same device, got {src.device} and {tgt.device}")


def tau(value, op: str, name: str = "tau") -> float:
    """A positive finite temperature: a Python number or a 0-dim tensor."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{op}: {name} must be a float or a 0-dim tensor, got a tensor of shape {tuple(value.shape)}")
        if not value.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating value, got a tensor of dtype {value.dtype}")
        value = float(value.detach().cpu())
    elif isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{op}: {name} must be a float > 0, got {type(value).__name__}")
    value = float(value)
    if not (value > 0) or not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be a finite float > 0, got {value}")
    return value


def integer(value, name: str, op: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return int(value)


def hw(value, nt: int, op: str) -> tuple[int, int]:
    """(H, W) of the target grid with H·W == Nt."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{op}: hw must be a pair (H, W) of ints, got {value!r}")
    H = integer(value[0], "hw[0] (H)", op, minimum=1)
    W = integer(value[1], "hw[1] (W)", op, minimum=1)
    if H * W != nt:
        raise ValueError(f"{op}: hw = ({H}, {W}) gives H·W = {H * W}, but tgt has Nt = {nt} rows")
    return H, W


def mask(m, name: str, shape: tuple[int, ...], device: torch.device, op: str):
    """An optional bool mask of exactly ``shape`` on ``device``."""
    if m is None:
        return None
    tensor(m, name, op)
    if m.dtype != torch.bool:
        raise TypeError(f"{op}: {name} must be a bool tensor of shape {shape}, got dtype {m.dtype}")
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(m.shape)}")
    if m.device != device:
        raise ValueError(f"{op}: {name} must be on {device}, got {m.device}")
    return m.contiguous()


def choice(value, name: str, options: tuple[str, ...], op: str) -> str:
    if value not in options:
        raise ValueError(f"{op}: {name} must be one of {options}, got {value!r}")
    return value


def flag(value, name: str, op: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value
