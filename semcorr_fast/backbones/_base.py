"""The :class:`Backbone` base class shared by every registered feature extractor."""
from __future__ import annotations

import torch
from torch import nn

from ..data.canvas import Canvas

#: ImageNet mean/std (RGB), used by DINO, DINOv2 and torchvision ResNets.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Images are validated to lie in [0, 1] up to this slack (resampling filters overshoot slightly).
_RANGE_SLACK = 0.01


class Backbone(nn.Module):
    """A frozen dense feature extractor.

    Attributes:
        name: the registry name (``create_backbone(name)``).
        dim: channels ``C`` of the output map.
        stride: input pixels per output cell (nominal; see :meth:`grid` for the exact grid).
        canvas: the :class:`~semcorr_fast.data.canvas.Canvas` whose images the backbone expects.

    ``forward(images)``: ``images`` is a ``(B, 3, H, W)`` floating tensor with RGB values in ``[0, 1]``
    on :attr:`canvas`; the backbone applies its own mean/std normalisation, runs in its parameter
    dtype on its device (the input is moved there), and returns ``(B, C, h, w)`` float32 features with
    ``(h, w) == self.grid(H, W)``.

    Subclasses implement ``_features(images) -> (B, C, h, w)`` and ``grid(H, W)``.
    """

    def __init__(self, name: str, dim: int, stride: int, canvas: Canvas,
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None):
        super().__init__()
        self.name = str(name)
        self.dim = int(dim)
        self.stride = int(stride)
        if not isinstance(canvas, Canvas):
            raise TypeError(f"{name}: canvas must be a semcorr_fast.data.canvas.Canvas, got {type(canvas).__name__}")
        self.canvas = canvas
        if mean is not None:
            self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), False)
            self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), False)
        else:
            self.pixel_mean = None
            self.pixel_std = None

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU for parameter-free backbones)."""
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype the network runs in (float32 for parameter-free backbones)."""
        for t in self.parameters():
            if t.is_floating_point():
                return t.dtype
        return torch.float32

    def grid(self, H: int, W: int) -> tuple[int, int]:
        """Output grid ``(h, w)`` for an ``H×W`` input."""
        raise NotImplementedError

    def min_input_size(self) -> int:
        """Smallest accepted input side, in pixels."""
        return self.stride

    def check_images(self, images: torch.Tensor, arg: str = "images") -> None:
        """Raise a clear error unless ``images`` is a ``(B, 3, H, W)`` float tensor in ``[0, 1]``."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"{self.name}: {arg} must be a torch.Tensor of shape (B, 3, H, W), "
                            f"got {type(images).__name__}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name}: {arg} must have shape (B, 3, H, W) (RGB), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"{self.name}: {arg} must be a floating tensor with values in [0, 1], "
                            f"got dtype {images.dtype} (convert uint8 images with x.float() / 255)")
        H, W = images.shape[-2:]
        m = self.min_input_size()
        if H < m or W < m:
            raise ValueError(f"{self.name}: {arg} must be at least {m}x{m} pixels, got {H}x{W}")
        if images.numel():
            lo, hi = float(images.amin()), float(images.amax())
            if lo != lo or hi != hi:
                raise ValueError(f"{self.name}: {arg} contains NaN")
            if lo < -_RANGE_SLACK or hi > 1.0 + _RANGE_SLACK:
                raise ValueError(f"{self.name}: {arg} must hold RGB values in [0, 1] (the backbone applies its "
                                 f"own mean/std normalisation), got range [{lo:.3g}, {hi:.3g}]")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - mean) / std`` in float32 (identity for backbones without a mean/std)."""
        x = images.float()
        if self.pixel_mean is not None:
            x = (x - self.pixel_mean.to(x.device)) / self.pixel_std.to(x.device)
        return x

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float in ``[0, 1]`` → ``(B, dim, *grid(H, W))`` float32 features."""
        self.check_images(images)
        images = images.to(self.device)
        feats = self._features(images)
        return feats.float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, stride={self.stride}, canvas={self.canvas}"


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode with every parameter's ``requires_grad`` off; returns it."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def check_tiny(name: str, tiny: bool, pretrained: bool, weights) -> None:
    """``tiny=True`` configurations have no published weights: refuse ``pretrained=True`` without ``weights``."""
    if tiny and pretrained and weights is None:
        raise ValueError(f"{name}: tiny=True is a random-init test configuration with no pretrained weights; "
                         f"pass pretrained=False (or weights=PATH to a checkpoint of the tiny model)")
