"""Backbone registry: dense feature extractors on a declared canvas, and an on-disk feature cache.

``create_backbone(name, *, weights=None, pretrained=True, device="cpu", dtype=torch.float32, **cfg)``
returns a frozen :class:`Backbone` (an ``nn.Module`` with ``name``, ``dim``, ``stride``, ``canvas``,
``grid(H, W)`` and ``forward(images) -> feats``); ``list_backbones()`` names them;
``register_backbone(name)`` adds one.

=================  =====  ======  ===========================  ==========================================
name               dim    stride  canvas                       what
=================  =====  ======  ===========================  ==========================================
``dino_vits8``     384    8       ``resized(224)`` → 28×28     DINO ViT-S/8 block-9 key (Demystifying,
                                                               Universal)
``dinov2_vitb14``  768    14      ``pad_square(840)`` → 60×60  DINOv2 ViT-B/14 block-11 token (GeoAware)
``resnet50_conv3`` 1024   16      ``resized(384)`` → 24×24     torchvision ResNet-50 ``layer3``
                                                               (Demystifying's CNN)
``sd15_decoder``   3200   16      ``pad_square(960)`` → 60×60  SD-1.5 UNet decoder s3 + up(s4) + up(s5)
                                                               at t = 50 (GeoAware / ODISE)
``sd_dino``        3968   16      ``pad_square(960)`` → 60×60  GeoAware's fused SD + DINOv2 descriptor
                                                               (per-half L2 normalised by default)
``daisy``          200    8       ``resized(256)`` → 32×32     scikit-image DAISY; needs no download
=================  =====  ======  ===========================  ==========================================

Features are float32 and not L2-normalised, except ``sd_dino`` in its default ``mode="zero_shot"``
(unit vectors by definition). :class:`FeatureCache` stores per-image feature maps as safetensors files
and extracts only what is missing.
"""
from ._base import Backbone, freeze  # noqa: F401
from ._registry import create_backbone, list_backbones, register_backbone  # noqa: F401
from . import vit, resnet, sd, fused, daisy  # noqa: F401,E402  (registration side effects)
from .cache import FeatureCache, flip_key, items_from  # noqa: F401,E402

__all__ = ["Backbone", "FeatureCache", "create_backbone", "flip_key", "items_from", "list_backbones", "register_backbone"]
