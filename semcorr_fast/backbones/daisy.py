"""DAISY (Tola et al., PAMI 2010) dense descriptors via ``skimage.feature.daisy``: the no-download default.

Not one of the papers' backbones: a classical, weight-free dense descriptor so that every pipeline
(cache, matching, PCK) runs anywhere. It is meaningful for near-duplicate and mildly deformed images,
not for semantic correspondence across instances.

Grid: one descriptor per ``step × step`` cell (``step = 8`` → 1/8 of the image, like DINO ViT-S/8):
the output is ``(B, C, H // step, W // step)`` and descriptor ``(i, j)`` is centred on pixel
``(x, y) = (step·j + step//2, step·i + step//2)``. skimage only samples centres at least ``radius``
pixels from the border, so the grey image is first padded (``pad_mode``, default ``"reflect"``) by
``radius − step//2`` before and ``radius + step`` after, then the grid is cropped to ``H // step``.

Descriptor: gradient-orientation histograms (``orientations`` bins) at the centre and on ``rings``
rings of ``histograms`` points up to ``radius`` px, so ``C = (rings·histograms + 1)·orientations``;
defaults ``radius=15, rings=3, histograms=8, orientations=8`` → **200-d**, ``normalization="daisy"``
(each histogram L2-normalised, the original paper's choice; skimage adds 1e-10 first, so flat regions
stay finite). Input: RGB in [0, 1] → grey (``skimage.color.rgb2gray`` weights), float64. Canvas:
``Canvas.resized(256)`` → 32×32 cells. Runs on the CPU with NumPy (one image at a time); the output is
moved to the input's device.
"""
from __future__ import annotations

import numpy as np
import torch

from ..data.canvas import Canvas
from ._base import Backbone
from ._registry import register_backbone

_GREY = (0.2125, 0.7154, 0.0721)   # skimage.color.rgb2gray weights
NORMALIZATIONS = ("daisy", "l1", "l2", "off")


class DaisyBackbone(Backbone):
    """Dense DAISY on a ``step``-pixel grid; see the module docstring."""

    def __init__(self, name: str = "daisy", *, step: int = 8, radius: int = 15, rings: int = 3,
                 histograms: int = 8, orientations: int = 8, normalization: str = "daisy",
                 pad_mode: str = "reflect", canvas: Canvas | None = None):
        for arg, v in (("step", step), ("radius", radius), ("rings", rings), ("histograms", histograms),
                       ("orientations", orientations)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")
        if radius < step // 2:
            raise ValueError(f"{name}: radius must be >= step // 2 = {step // 2}, got {radius}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"{name}: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
        if pad_mode not in ("reflect", "symmetric", "edge", "constant"):
            raise ValueError(f"{name}: pad_mode must be reflect/symmetric/edge/constant, got {pad_mode!r}")
        dim = (rings * histograms + 1) * orientations
        super().__init__(name, dim, step, canvas if canvas is not None else Canvas.resized(256))
        self.step, self.radius, self.rings, self.histograms = step, radius, rings, histograms
        self.orientations, self.normalization, self.pad_mode = orientations, normalization, pad_mode

    def grid(self, H: int, W: int) -> tuple[int, int]:
        """``(H // step, W // step)``."""
        return int(H) // self.step, int(W) // self.step

    def describe(self, grey: np.ndarray) -> np.ndarray:
        """One ``(H, W)`` float grey image → ``(C, H // step, W // step)`` float32 descriptors."""
        from skimage.feature import daisy
        H, W = grey.shape
        s, r = self.step, self.radius
        before, after = r - s // 2, r + s
        padded = np.pad(grey, ((before, after), (before, after)), mode=self.pad_mode)
        d = daisy(padded, step=s, radius=r, rings=self.rings, histograms=self.histograms,
                  orientations=self.orientations, normalization=self.normalization)
        h, w = self.grid(H, W)
        if d.shape[0] < h or d.shape[1] < w:  # pragma: no cover - guaranteed by the padding
            raise RuntimeError(f"{self.name}: DAISY grid {d.shape[:2]} smaller than {(h, w)}")
        return np.ascontiguousarray(d[:h, :w].transpose(2, 0, 1), dtype=np.float32)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        w = images.new_tensor(_GREY, dtype=torch.float64).view(1, 3, 1, 1)
        grey = (images.double() * w).sum(1).cpu().numpy()
        out = np.stack([self.describe(g) for g in grey], 0)
        return torch.from_numpy(out).to(images.device)


@register_backbone("daisy")
def daisy_backbone(*, weights=None, pretrained: bool = True, step: int = 8, radius: int = 15, rings: int = 3,
                   histograms: int = 8, orientations: int = 8, normalization: str = "daisy",
                   pad_mode: str = "reflect", size: int = 256, tiny: bool = False) -> DaisyBackbone:
    """scikit-image DAISY, 200-d on an 8-px grid at ``Canvas.resized(size)`` (256); no weights.

    ``pretrained`` is accepted and ignored (nothing to load); ``weights`` must be None. ``tiny`` only
    shrinks the default canvas to 64 px (for tests), the descriptor is unchanged.
    """
    if weights is not None:
        raise ValueError(f"daisy: has no weights to load, got weights={weights!r}")
    return DaisyBackbone("daisy", step=step, radius=radius, rings=rings, histograms=histograms,
                         orientations=orientations, normalization=normalization, pad_mode=pad_mode,
                         canvas=Canvas.resized(64 if tiny and size == 256 else int(size)))
