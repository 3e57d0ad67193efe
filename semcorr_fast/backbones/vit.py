"""DINO ViT-S/8 and DINOv2 ViT-B/14 with per-block facet extraction (timm modules).

Facets follow the dino-vit-features convention (Amir et al.) that Demystifying, Universal, sd-dino
and GeoAware-SC all use [C]:

* ``token``: the output of block ``layer`` (0-based), *before* the final LayerNorm.
* ``key`` / ``query`` / ``value``: block ``layer``'s ``attn.qkv`` applied to ``norm1`` of the block
  input, i.e. the per-head projections, heads concatenated. ``channel_layout`` orders the channels:
  ``"dino_vit_features"`` (default) is that extractor's layout, channel ``d·heads + h`` (``d`` the
  index within a head, ``h`` the head), which a projection trained on its features expects;
  ``"head_major"`` is ``h·head_dim + d`` (timm's ``qkv`` row order). Cosine similarities, and so every
  published number that matches raw features, are the same for both.

The class token (and any register token) is dropped; the map is ``(B, C, h, w)`` in row-major token
order. Only blocks ``0..layer`` run.

Position embeddings at a grid other than the checkpoint's are interpolated with ``pos_interp``:
``"dino"`` (default; DINO/DINOv2 hub code and dino-vit-features: bicubic with
``scale_factor = (n + 0.1) / M``, no antialias, ``recompute_scale_factor=False``) or ``"timm"``
(bicubic with antialias to the exact size, timm's ``resample_abs_pos_embed``).

Registered names (defaults from the notes):

==================  ============================================  ===========================
``dino_vits8``      DINO ViT-S/8, block 9, ``key``, 384-d          Demystifying [C], Universal
                    ``Canvas.resized(224)`` → 28×28, stride 8      (``layers=[2,5,9,11]``)
``dinov2_vitb14``   DINOv2 ViT-B/14, block 11, ``token``, 768-d    GeoAware-SC, sd-dino, Jamais Vu
                    ``Canvas.pad_square(840)`` → 60×60, stride 14
==================  ============================================  ===========================

Weights: timm's Hugging Face files (``timm/vit_small_patch8_224.dino``,
``timm/vit_base_patch14_dinov2.lvd142m``, ``model.safetensors``) or the original releases in the
torch hub folder (``dino_deitsmall8_pretrain.pth``, ``dinov2_vitb14_pretrain.pth``); both use the
same parameter names. ``tiny=True`` builds a 3-block, 48-wide model of the same code path for tests.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.canvas import Canvas
from . import _weights as W
from ._base import IMAGENET_MEAN, IMAGENET_STD, Backbone, check_tiny
from ._registry import register_backbone

FACETS = ("key", "query", "value", "token")
CHANNEL_LAYOUTS = ("dino_vit_features", "head_major")
POS_INTERP = ("dino", "timm")


class ViTBackbone(Backbone):
    """A timm ``VisionTransformer`` read at one block and facet; see the module docstring."""

    def __init__(self, name: str, vit: nn.Module, *, layer: int, facet: str, canvas: Canvas,
                 channel_layout: str = "dino_vit_features", pos_interp: str = "dino"):
        depth = len(vit.blocks)
        if not (isinstance(layer, int) and 0 <= layer < depth):
            raise ValueError(f"{name}: layer must be a block index in [0, {depth - 1}], got {layer!r}")
        if facet not in FACETS:
            raise ValueError(f"{name}: facet must be one of {FACETS}, got {facet!r}")
        if channel_layout not in CHANNEL_LAYOUTS:
            raise ValueError(f"{name}: channel_layout must be one of {CHANNEL_LAYOUTS}, got {channel_layout!r}")
        if pos_interp not in POS_INTERP:
            raise ValueError(f"{name}: pos_interp must be one of {POS_INTERP}, got {pos_interp!r}")
        proj = vit.patch_embed.proj
        super().__init__(name, vit.embed_dim, proj.stride[0], canvas, IMAGENET_MEAN, IMAGENET_STD)
        self.patch = int(proj.kernel_size[0])
        self.layer, self.facet = layer, facet
        self.channel_layout, self.pos_interp = channel_layout, pos_interp
        # blocks after `layer`, the final norm and the head never run: drop them
        vit.blocks = nn.Sequential(*list(vit.blocks)[: layer + 1])
        vit.norm = nn.Identity()
        vit.head = nn.Identity()
        self.vit = vit

    def min_input_size(self) -> int:
        return self.patch

    def grid(self, H: int, W: int) -> tuple[int, int]:
        """``(1 + (H - patch) // stride, 1 + (W - patch) // stride)``."""
        s, p = self.stride, self.patch
        return (1 + (int(H) - p) // s, 1 + (int(W) - p) // s)

    def pos_embed_for(self, h: int, w: int) -> torch.Tensor:
        """Position embeddings ``(1, n_prefix + h·w, D)`` for an ``h×w`` token grid."""
        vit = self.vit
        pe = vit.pos_embed
        n_pre = 0 if getattr(vit, "no_embed_class", False) else vit.num_prefix_tokens
        pre, patch = pe[:, :n_pre], pe[:, n_pre:]
        M = math.isqrt(patch.shape[1])
        if M * M != patch.shape[1]:
            raise ValueError(f"{self.name}: pos_embed holds {patch.shape[1]} patch positions, not a square grid")
        if (h, w) == (M, M):
            return pe
        D = patch.shape[-1]
        grid = patch.reshape(1, M, M, D).permute(0, 3, 1, 2).float()
        if self.pos_interp == "dino":
            out = F.interpolate(grid, scale_factor=((h + 0.1) / M, (w + 0.1) / M), mode="bicubic",
                                align_corners=False, recompute_scale_factor=False)
        else:
            out = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        if out.shape[-2:] != (h, w):  # pragma: no cover - guarded by the +0.1 offset
            raise RuntimeError(f"{self.name}: position-embedding interpolation gave {tuple(out.shape[-2:])}, "
                               f"expected {(h, w)}")
        out = out.to(pe.dtype).permute(0, 2, 3, 1).reshape(1, h * w, D)
        return torch.cat([pre, out], dim=1)

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Normalised images ``(B, 3, H, W)`` → tokens ``(B, n_prefix + h·w, D)`` with positions, and ``(h, w)``."""
        vit = self.vit
        t = vit.patch_embed.proj(x)
        h, w = t.shape[-2:]
        t = vit.patch_embed.norm(t.flatten(2).transpose(1, 2))
        prefix = [vit.cls_token.expand(t.shape[0], -1, -1)] if vit.cls_token is not None else []
        reg = getattr(vit, "reg_token", None)
        if reg is not None:
            prefix.append(reg.expand(t.shape[0], -1, -1))
        pe = self.pos_embed_for(h, w)
        if getattr(vit, "no_embed_class", False):
            t = torch.cat(prefix + [t + pe], dim=1)
        else:
            t = torch.cat(prefix + [t], dim=1) + pe
        return vit.norm_pre(t), h, w

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images).to(self.dtype)
        tokens, h, w = self.embed(x)
        blocks = self.vit.blocks
        for i in range(self.layer):
            tokens = blocks[i](tokens)
        blk = blocks[self.layer]
        B, N, D = tokens.shape
        if self.facet == "token":
            out = blk(tokens)
        else:
            heads = blk.attn.num_heads
            qkv = blk.attn.qkv(blk.norm1(tokens)).reshape(B, N, 3, heads, D // heads)
            f = qkv[:, :, ("query", "key", "value").index(self.facet)]          # (B, N, heads, hd)
            if self.channel_layout == "dino_vit_features":
                f = f.transpose(-1, -2)                                          # channel d·heads + h
            out = f.reshape(B, N, D)
        out = out[:, self.vit.num_prefix_tokens:]
        return out.transpose(1, 2).reshape(B, D, h, w)


def _build_vit(*, patch: int, dim: int, depth: int, heads: int, img_size: int, init_values=None) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=img_size, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                             mlp_ratio=4.0, qkv_bias=True, init_values=init_values, num_classes=0)


def _resolve(name: str, weights, pretrained: bool, candidates: list, what: str):
    """The weights file to load (checked before any model is built), or None for random init."""
    if weights is None and not pretrained:
        return None
    path = weights if weights is not None else W.find_weights(name, candidates)
    if path is None:
        raise W.missing_weights_error(name, candidates, what)
    return path


def _load_vit(vit: nn.Module, name: str, path) -> None:
    sd = W.load_state_dict(path, name)
    pe = sd.get("pos_embed")
    if pe is not None and pe.shape != vit.pos_embed.shape and pe.ndim == 3 and pe.shape[-1] == vit.embed_dim:
        # a checkpoint trained at another resolution: keep its grid, it is interpolated at run time
        vit.pos_embed = nn.Parameter(torch.zeros_like(pe))
    W.load_into(vit, sd, name, str(path), ignore=("head.", "head_dist.", "mask_token", "fc_norm."))


def _make(name: str, *, tiny: bool, weights, pretrained: bool, arch: dict, tiny_arch: dict, cands: list,
          what: str, layer, default_layer: tuple[int, int], canvas_fn, size, default_size: tuple[int, int],
          **opts) -> ViTBackbone:
    check_tiny(name, tiny, pretrained, weights)
    path = _resolve(name, weights, pretrained, cands, what)
    vit = _build_vit(**(tiny_arch if tiny else arch))
    if path is not None:
        _load_vit(vit, name, path)
    layer = default_layer[bool(tiny)] if layer is None else layer
    size = default_size[bool(tiny)] if size is None else int(size)
    return ViTBackbone(name, vit, layer=layer, canvas=canvas_fn(size), **opts)


@register_backbone("dino_vits8")
def dino_vits8(*, weights=None, pretrained: bool = True, tiny: bool = False, layer: int | None = None,
               facet: str = "key", size: int | None = None, channel_layout: str = "dino_vit_features",
               pos_interp: str = "dino") -> ViTBackbone:
    """DINO ViT-S/8 (384-d, 6 heads), block 9 ``key`` facet at 224×224 (Demystifying / Universal).

    Options: ``layer`` (default 9; tiny: 1), ``facet`` (key/query/value/token), ``size`` (the square
    ``Canvas.resized`` side; default 224, tiny 64), ``channel_layout``, ``pos_interp``, ``tiny``
    (3 blocks, 48-d, 3 heads, 4×4 position grid).
    """
    return _make("dino_vits8", tiny=tiny, weights=weights, pretrained=pretrained,
                 arch=dict(patch=8, dim=384, depth=12, heads=6, img_size=224),
                 tiny_arch=dict(patch=8, dim=48, depth=3, heads=3, img_size=32),
                 cands=[W.HFFile("timm/vit_small_patch8_224.dino", "model.safetensors"),
                        W.TorchHubFile("dino_deitsmall8_pretrain.pth")],
                 what="DINO ViT-S/8 weights (timm safetensors or the DINO release .pth)",
                 layer=layer, default_layer=(9, 1), canvas_fn=Canvas.resized, size=size, default_size=(224, 64),
                 facet=facet, channel_layout=channel_layout, pos_interp=pos_interp)


@register_backbone("dinov2_vitb14")
def dinov2_vitb14(*, weights=None, pretrained: bool = True, tiny: bool = False, layer: int | None = None,
                  facet: str = "token", size: int | None = None, channel_layout: str = "dino_vit_features",
                  pos_interp: str = "dino") -> ViTBackbone:
    """DINOv2 ViT-B/14 (768-d, LayerScale), block 11 ``token`` facet at 840 → 60×60 (GeoAware-SC).

    Options: ``layer`` (default 11; tiny: 2), ``facet``, ``size`` (the ``Canvas.pad_square`` side;
    default 840, tiny 112), ``channel_layout``, ``pos_interp``, ``tiny`` (3 blocks, 48-d, 4×4
    position grid). The checkpoint's 37×37 position grid (518 px) is interpolated to the input's grid.
    """
    return _make("dinov2_vitb14", tiny=tiny, weights=weights, pretrained=pretrained,
                 arch=dict(patch=14, dim=768, depth=12, heads=12, img_size=518, init_values=1e-5),
                 tiny_arch=dict(patch=14, dim=48, depth=3, heads=3, img_size=56, init_values=1e-5),
                 cands=[W.HFFile("timm/vit_base_patch14_dinov2.lvd142m", "model.safetensors"),
                        W.TorchHubFile("dinov2_vitb14_pretrain.pth")],
                 what="DINOv2 ViT-B/14 weights (timm safetensors or the DINOv2 release .pth)",
                 layer=layer, default_layer=(11, 2), canvas_fn=Canvas.pad_square, size=size,
                 default_size=(840, 112), facet=facet, channel_layout=channel_layout, pos_interp=pos_interp)
