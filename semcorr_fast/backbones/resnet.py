"""ResNet-50 ``conv3`` (torchvision ``layer3``) features, Demystifying's CNN backbone.

Demystifying [P, C]: input squashed to 384×384 (``Canvas.resized(384)``), ImageNet mean/std,
features of ``layer3`` = "conv3": 1024-d at stride 16 → 24×24. Supervised weights: torchvision's
ImageNet ResNet-50 (V1); the paper's unsupervised variant uses MoCo v3 weights, which load through
``weights=`` (prefixes ``module.``/``base_encoder.``/``backbone.`` are stripped; ``fc``/``head`` keys
and the unused ``layer4`` are ignored).

``layer`` selects another stage (Table A3's ablation): ``layer1`` 256-d s4, ``layer2`` 512-d s8,
``layer3`` 1024-d s16 (default), ``layer4`` 2048-d s32.
"""
from __future__ import annotations

from torch import nn

from ..data.canvas import Canvas
from . import _weights as W
from ._base import IMAGENET_MEAN, IMAGENET_STD, Backbone, check_tiny
from ._registry import register_backbone

_STAGES = {"layer1": (256, 4), "layer2": (512, 8), "layer3": (1024, 16), "layer4": (2048, 32)}


class ResNetBackbone(Backbone):
    """torchvision ResNet (Bottleneck) trunk up to ``layer``."""

    def __init__(self, name: str, net: nn.Module, *, layer: str, canvas: Canvas):
        if layer not in _STAGES:
            raise ValueError(f"{name}: layer must be one of {sorted(_STAGES)}, got {layer!r}")
        dim, stride = _STAGES[layer]
        super().__init__(name, dim, stride, canvas, IMAGENET_MEAN, IMAGENET_STD)
        n = int(layer[-1])
        self.layer = layer
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.Sequential(*[getattr(net, f"layer{i}") for i in range(1, n + 1)])

    def grid(self, H: int, W: int) -> tuple[int, int]:
        """Each stride-2 step (conv1, maxpool, layer2..4) maps a side ``n`` to ``(n - 1) // 2 + 1``."""
        steps = 2 + max(0, int(self.layer[-1]) - 1)

        def f(n: int) -> int:
            for _ in range(steps):
                n = (n - 1) // 2 + 1
            return n
        return f(int(H)), f(int(W))

    def min_input_size(self) -> int:
        return 1

    def _features(self, images):
        x = self.normalize(images).to(self.dtype)
        return self.stages(self.stem(x))


@register_backbone("resnet50_conv3")
def resnet50_conv3(*, weights=None, pretrained: bool = True, tiny: bool = False, layer: str = "layer3",
                   size: int | None = None) -> ResNetBackbone:
    """torchvision ResNet-50 ``layer3`` (1024-d, stride 16) at ``Canvas.resized(384)`` (Demystifying).

    Options: ``layer`` (layer1..layer4), ``size`` (square canvas side; default 384, tiny 64),
    ``tiny`` (one Bottleneck per stage, same widths and code path, random init).
    Weights: torchvision's ``resnet50-0676ba61.pth`` / ``resnet50-19c8e357.pth`` (V1) in the torch
    hub folder, or ``timm/resnet50.tv_in1k`` (same parameter names) in the Hugging Face cache.
    """
    from torchvision.models.resnet import Bottleneck, ResNet
    name = "resnet50_conv3"
    check_tiny(name, tiny, pretrained, weights)
    path = None
    if weights is not None or pretrained:
        cands = [W.TorchHubFile("resnet50-0676ba61.pth"), W.TorchHubFile("resnet50-19c8e357.pth"),
                 W.HFFile("timm/resnet50.tv_in1k", "model.safetensors")]
        path = weights if weights is not None else W.find_weights(name, cands)
        if path is None:
            raise W.missing_weights_error(name, cands, "torchvision's ImageNet ResNet-50 (V1) state dict")
    net = ResNet(Bottleneck, [1, 1, 1, 1] if tiny else [3, 4, 6, 3])
    size = (64 if tiny else 384) if size is None else int(size)
    if path is not None:
        sd = W.load_state_dict(path, name)
        sd = {k[len("base_encoder."):] if k.startswith("base_encoder.") else k: v for k, v in sd.items()
              if not k.startswith("momentum_encoder.") and not k.startswith("predictor.")}
        W.load_into(net, sd, name, str(path), ignore=("fc.", "head."))
    return ResNetBackbone(name, net, layer=layer, canvas=Canvas.resized(size))
