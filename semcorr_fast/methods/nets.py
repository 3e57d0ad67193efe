"""A small trainable CNN descriptor net for the "trained from scratch" demonstrations.

EQ (Thewlis et al. 2017) and DVE originally trained a small CNN end to end; Demystifying replaced it
by a frozen backbone + linear ρ. ``smallcnn`` lets the EQ / CL losses train a network from random
initialisation on a CPU in minutes (``configs/demystifying/eq_smallcnn.toml``,
``cl_smallcnn.toml``, with ``method_args.train_backbone = true``). It is registered as a backbone:

===============  =====  ======  ====================  ==================================================
name             dim    stride  canvas                layers
===============  =====  ======  ====================  ==================================================
``smallcnn``     64     4       ``resized(128)``      conv3×3(3→w) · conv3×3/2(w→w) · conv3×3(w→2w) ·
                                → 32×32               conv3×3/2(2w→2w) · conv3×3(2w→2w) · conv1×1(2w→dim),
                                                      ReLU between, w = 32; ImageNet mean/std input
===============  =====  ======  ====================  ==================================================

It has no published weights: build it with ``create_backbone("smallcnn", pretrained=False)`` (or
``weights=PATH`` to a state dict of this architecture). ``create_backbone`` returns every backbone
frozen; a method built with ``train_backbone=True`` unfreezes it.

Registration happens when this module is imported (``semcorr_fast.methods.demystifying`` imports it).
"""
from __future__ import annotations

import torch
from torch import nn

from ..backbones import _weights as W
from ..backbones._base import IMAGENET_MEAN, IMAGENET_STD, Backbone
from ..backbones._registry import _REGISTRY, register_backbone
from ..data.canvas import Canvas

__all__ = ["SmallCNN", "smallcnn"]


def _half(n: int) -> int:
    """Output side of a 3×3, stride-2, padding-1 convolution."""
    return (int(n) - 1) // 2 + 1


class SmallCNN(Backbone):
    """Six convolutions, stride 4, ``dim``-d output (see the module docstring).

    ``forward(images (B, 3, H, W) in [0, 1]) -> (B, dim, ⌈H/4⌉, ⌈W/4⌉)`` float32 (exactly
    ``grid(H, W)``). Random init: PyTorch's default (Kaiming-uniform) for every convolution.
    """

    def __init__(self, name: str = "smallcnn", *, dim: int = 64, width: int = 32, size: int = 128):
        for arg, v in (("dim", dim), ("width", width), ("size", size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")
        super().__init__(name, dim, 4, Canvas.resized(int(size)), IMAGENET_MEAN, IMAGENET_STD)
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, dim, 1),
        )

    def grid(self, H: int, W: int) -> tuple[int, int]:
        """``(⌈H/4⌉, ⌈W/4⌉)``: two stride-2 convolutions with padding 1."""
        return _half(_half(H)), _half(_half(W))

    def min_input_size(self) -> int:
        return 1

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(images).to(self.dtype))


def smallcnn(*, weights=None, pretrained: bool = True, dim: int = 64, width: int = 32, size: int = 128,
             tiny: bool = False) -> SmallCNN:
    """The from-scratch descriptor net (64-d, stride 4, ``Canvas.resized(size)``, default 128).

    Options: ``dim`` (output channels), ``width`` (first-layer channels; later layers 2×),
    ``size`` (square canvas side), ``tiny`` (width 8, canvas 32: a test configuration).
    ``pretrained=True`` without ``weights`` is an error: there are no published weights.
    """
    name = "smallcnn"
    if weights is None and pretrained:
        raise ValueError(f"{name}: there are no published weights for this from-scratch net; pass "
                         f"pretrained=False (random init) or weights=PATH (a state dict of SmallCNN)")
    if tiny:
        width, size = 8, 32
    net = SmallCNN(name, dim=dim, width=width, size=size)
    if weights is not None:
        sd = W.load_state_dict(weights, name)
        W.load_into(net, sd, name, str(weights))
    return net


if "smallcnn" not in _REGISTRY:  # re-importing (e.g. importlib.reload) must not register twice
    register_backbone("smallcnn")(smallcnn)
