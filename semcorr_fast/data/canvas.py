"""Canvases: the declared frame every image, keypoint and bbox of an evaluation is brought to.

A canvas maps an original image of size (H, W) to the evaluation frame by an axis-aligned scale and
offset, ``x' = sx·x + ox``, ``y' = sy·y + oy`` (pixel coordinates, x to the right, y down, the
convention of the datasets' annotation files). Keypoints, bboxes and thresholds go through the same
map, so every metric is computed in one frame.

======================  =================================================================  ==========
kind                    what                                                               used by
======================  =================================================================  ==========
``pad_square(S)``       aspect-preserving resize, long side → S, centred, zero-padded       GeoAware-SC, Jamais Vu
                        to S×S (S = 840 for DINOv2, 960 for SD)
``resize(H, W)``        squash to H×W, aspect ratio not kept                                Demystifying backbones
``max_side(S)``         aspect-preserving resize so that the long side is S, no padding     Demystifying eval (S = 300)
``identity()``          the original image                                                  —
======================  =================================================================  ==========
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

_RESAMPLE = {"lanczos": Image.LANCZOS, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
             "nearest": Image.NEAREST}


@dataclass(frozen=True)
class CanvasTransform:
    """The map of one image onto its canvas: ``p' = scale·p + offset`` with per-axis (x, y) values."""

    sx: float
    sy: float
    ox: float
    oy: float
    in_size: tuple[int, int]    # (H, W) of the original image
    out_size: tuple[int, int]   # (H, W) of the canvas

    def points(self, xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) original (x, y) → canvas (x, y)."""
        s = xy.new_tensor([self.sx, self.sy])
        o = xy.new_tensor([self.ox, self.oy])
        return xy * s + o

    def inverse_points(self, xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) canvas (x, y) → original (x, y)."""
        s = xy.new_tensor([self.sx, self.sy])
        o = xy.new_tensor([self.ox, self.oy])
        return (xy - o) / s

    def box(self, xyxy: torch.Tensor) -> torch.Tensor:
        """(..., 4) original (x0, y0, x1, y1) → canvas."""
        return self.points(xyxy.reshape(*xyxy.shape[:-1], 2, 2)).reshape(xyxy.shape)

    @property
    def content_box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the image content on the canvas (excludes the padding)."""
        h, w = self.in_size
        return (self.ox, self.oy, self.ox + self.sx * w, self.oy + self.sy * h)


@dataclass(frozen=True)
class Canvas:
    """A declared evaluation frame; see the module docstring for the kinds."""

    kind: str = "identity"
    size: tuple[int, int] | int | None = None
    resample: str = "bilinear"

    def __post_init__(self):
        if self.kind not in ("pad_square", "resize", "max_side", "identity"):
            raise ValueError(f"Canvas: kind must be one of pad_square/resize/max_side/identity, got {self.kind!r}")
        if self.kind == "resize" and not (isinstance(self.size, tuple) and len(self.size) == 2):
            raise ValueError(f"Canvas('resize'): size must be (H, W), got {self.size!r}")
        if self.kind in ("pad_square", "max_side") and not isinstance(self.size, int):
            raise ValueError(f"Canvas({self.kind!r}): size must be an int (the long side), got {self.size!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"Canvas: resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")

    @staticmethod
    def pad_square(size: int = 840, resample: str = "lanczos") -> "Canvas":
        return Canvas("pad_square", int(size), resample)

    @staticmethod
    def resized(h: int, w: int | None = None, resample: str = "bilinear") -> "Canvas":
        return Canvas("resize", (int(h), int(h if w is None else w)), resample)

    @staticmethod
    def max_side(size: int = 300, resample: str = "bilinear") -> "Canvas":
        return Canvas("max_side", int(size), resample)

    @staticmethod
    def identity() -> "Canvas":
        return Canvas("identity")

    def transform_for(self, h: int, w: int) -> CanvasTransform:
        """The map of an original (h, w) image onto this canvas."""
        if self.kind == "identity":
            return CanvasTransform(1.0, 1.0, 0.0, 0.0, (h, w), (h, w))
        if self.kind == "resize":
            H, W = self.size
            return CanvasTransform(W / w, H / h, 0.0, 0.0, (h, w), (H, W))
        S = self.size
        r = S / max(h, w)
        nh, nw = max(1, round(h * r)), max(1, round(w * r))
        # one scale r = S / max(h, w) for both axes, as the anchors scale keypoints and thresholds
        if self.kind == "max_side":
            return CanvasTransform(r, r, 0.0, 0.0, (h, w), (nh, nw))
        # pad_square: centred; the offset is the padding before the image
        return CanvasTransform(r, r, float((S - nw) // 2), float((S - nh) // 2), (h, w), (S, S))

    def apply(self, image: Image.Image) -> tuple[torch.Tensor, CanvasTransform]:
        """PIL image → ((3, H', W') float32 in [0, 1] on the canvas, its transform)."""
        image = image.convert("RGB")
        w, h = image.size
        tf = self.transform_for(h, w)
        H, W = tf.out_size
        if self.kind == "identity":
            return to_tensor(image), tf
        nw, nh = (W, H) if self.kind == "resize" else (max(1, round(tf.sx * w)), max(1, round(tf.sy * h)))
        if self.kind == "max_side":
            nh, nw = H, W
        resized = image.resize((nw, nh), _RESAMPLE[self.resample])
        if self.kind != "pad_square":
            return to_tensor(resized), tf
        out = torch.zeros(3, H, W)
        ox, oy = int(tf.ox), int(tf.oy)
        out[:, oy:oy + nh, ox:ox + nw] = to_tensor(resized)
        return out, tf


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (3, H, W) float32 in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
