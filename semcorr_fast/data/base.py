"""The record every evaluation dataset yields, the dataset base class, its registry and its errors.

A dataset is a sequence of :class:`Pair` s, each already on the dataset's declared
:class:`~semcorr_fast.data.canvas.Canvas`. Keypoints are indexed by the category's keypoint
vocabulary (``K`` = that vocabulary's size, or the dataset's fixed count), so ``src_kps[k]`` and
``trg_kps[k]`` are the same semantic part; ``valid[k]`` is true only where the keypoint is annotated
and visible in *both* images (the only keypoints any metric counts).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from PIL import Image

from .canvas import Canvas, CanvasTransform


class DatasetFormatError(ValueError):
    """An annotation file exists but does not hold what its format says; the message names the file."""


def require_file(path: str, what: str) -> str:
    """Return ``path`` if it is a file, else raise FileNotFoundError naming it and what was expected."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (expected {what})")
    return path


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: directory not found (expected {what})")
    return path


def load_image(path: str) -> Image.Image:
    """Open an image as RGB; a missing or unreadable file is an error naming it."""
    require_file(path, "an image")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except Exception as exc:  # PIL raises several types for corrupt files
        raise DatasetFormatError(f"{path}: not a readable image ({exc})") from exc


@dataclass
class Pair:
    """One evaluation pair on its canvas.

    Shapes: images (3, H, W) float32 in [0, 1]; ``src_kps``/``trg_kps`` (K, 2) float32 canvas pixels
    (x, y), NaN where the keypoint is not annotated/visible in that image; ``valid`` (K,) bool; bboxes (4,) (x0, y0, x1, y1) on the canvas or None.
    ``thr`` is the PCK threshold base on the canvas (max side of the target bbox, or of the target
    image, by the dataset's protocol). ``flip_perm`` (K,) long maps keypoint k to its mirror-image
    counterpart (the left/right permutation used by pose-aware matching), or None if the dataset has
    none. ``flags`` holds per-pair annotations (SPair's difficulty flags, split, ...).
    """

    src_image: torch.Tensor
    trg_image: torch.Tensor
    src_kps: torch.Tensor
    trg_kps: torch.Tensor
    valid: torch.Tensor
    thr: float
    category: str
    pair_id: str
    src_name: str
    trg_name: str
    src_bbox: torch.Tensor | None = None
    trg_bbox: torch.Tensor | None = None
    src_tf: CanvasTransform | None = None
    trg_tf: CanvasTransform | None = None
    flip_perm: torch.Tensor | None = None
    kp_names: list[str] | None = None
    flags: dict = field(default_factory=dict)

    def __post_init__(self):
        K = self.src_kps.shape[0]
        for name, t, shape in (("src_kps", self.src_kps, (K, 2)), ("trg_kps", self.trg_kps, (K, 2)),
                               ("valid", self.valid, (K,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"Pair {self.pair_id}: {name} must have shape {shape}, got {tuple(t.shape)}")
        if self.valid.dtype != torch.bool:
            raise ValueError(f"Pair {self.pair_id}: valid must be bool, got {self.valid.dtype}")


class PairDataset(torch.utils.data.Dataset):
    """Base of every evaluation dataset: ``len(ds)``, ``ds[i] -> Pair``, ``ds.categories``.

    Subclasses set ``name`` and ``default_canvas``/``default_thr`` and implement ``__len__`` and
    ``__getitem__``. ``canvas=None`` means the dataset's protocol default.
    """

    name: str = "?"
    default_thr: str = "bbox"  # "bbox" | "image"

    def __init__(self, canvas: Canvas | None = None):
        self.canvas = canvas if canvas is not None else self.default_canvas()
        self.categories: list[str] = []

    @classmethod
    def default_canvas(cls) -> Canvas:
        return Canvas.pad_square(840)

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __getitem__(self, i: int) -> Pair:  # pragma: no cover - abstract
        raise NotImplementedError


_REGISTRY: dict[str, Callable[..., PairDataset]] = {}


def register_dataset(name: str):
    """Class decorator: make a dataset reachable as ``build_dataset(name, ...)``."""
    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} registered twice")
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


def build_dataset(name: str, **kwargs) -> PairDataset:
    """Build a registered dataset by name, e.g. ``build_dataset("spair", root=..., split="test")``."""
    from . import _load_all  # noqa: F401  (registers every loader)
    if name not in _REGISTRY:
        raise ValueError(f"dataset: unknown name {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**kwargs)


def list_datasets() -> list[str]:
    from . import _load_all  # noqa: F401
    return sorted(_REGISTRY)
