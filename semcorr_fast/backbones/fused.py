"""GeoAware-SC's fused SD + DINOv2 descriptor (``sd_dino``).

Per location [C: GeoAware ``preprocess_map.py`` and ``pck_train.py::normalize_feats`` with
``DUMMY_NET``]: the SD-1.5 decoder part ``F_sd`` = ``[s3, up(s4), up(s5)]`` (3200 ch, see
:mod:`.sd`) computed on the 960 canvas, and the DINOv2 ViT-B/14 block-11 token ``F_dino`` (768 ch, see
:mod:`.vit`) computed on the 840 canvas, both on a 60×60 grid, concatenated in the order
``[s3, s4, s5, dino]`` → **3968 channels**.

``mode``:

* ``"zero_shot"`` (default; GeoAware's zero-shot descriptor, its published zero-shot numbers):
  ``x_sd / (‖x_sd‖ + ε)`` and ``x_dino / (‖x_dino‖ + ε)`` concatenated, then the whole vector divided by
  ``(‖·‖ + ε)`` (ε = 1e-10), i.e. ``[F̂_sd, F̂_dino] / √2``: unit vectors, and the cosine of two of them
  is ``(cos_sd + cos_dino) / 2``. See :func:`normalize_sd_dino`.
* ``"raw"``: the unnormalised 3968-channel concatenation, the input of GeoAware's supervised
  post-processor (``AggregationNetwork``).

Canvas: one ``pad_square(960)`` image feeds both parts. GeoAware resizes the original image separately
to 840 (LANCZOS) for DINOv2; here the DINOv2 input is the 960 canvas resized to ``grid × 14`` = 840 px
(bicubic, antialiased), which agrees with GeoAware's up to resampling and ≤1 px of padding rounding.
``forward(images, dino_images=...)`` accepts GeoAware's own 840 canvas images instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import Backbone
from ._registry import register_backbone
from .sd import build_sd15
from .vit import dinov2_vitb14

MODES = ("zero_shot", "raw")


def normalize_sd_dino(feats: torch.Tensor, sd_dim: int, eps: float = 1e-10, dim: int = 1) -> torch.Tensor:
    """GeoAware's per-half normalisation of a fused descriptor along ``dim``.

    Args:
        feats: ``(..., sd_dim + dino_dim, ...)`` floating tensor, the raw concatenation ``[sd, dino]``.
        sd_dim: channels of the SD part (3200 for SD-1.5).
        eps: added to each norm (GeoAware: 1e-10).
    Returns:
        Same shape and dtype: ``cat(sd/(‖sd‖+eps), dino/(‖dino‖+eps)) / (‖·‖ + eps)``.
    """
    if not feats.is_floating_point():
        raise TypeError(f"normalize_sd_dino: feats must be floating, got {feats.dtype}")
    C = feats.shape[dim]
    if not 0 < sd_dim < C:
        raise ValueError(f"normalize_sd_dino: sd_dim must be in (0, {C}) for {C} channels, got {sd_dim}")
    sd, dino = feats.split([sd_dim, C - sd_dim], dim=dim)
    sd = sd / (torch.linalg.vector_norm(sd, dim=dim, keepdim=True) + eps)
    dino = dino / (torch.linalg.vector_norm(dino, dim=dim, keepdim=True) + eps)
    out = torch.cat([sd, dino], dim=dim)
    return out / (torch.linalg.vector_norm(out, dim=dim, keepdim=True) + eps)


class SDDinoBackbone(Backbone):
    """``[SD decoder (3200) | DINOv2 token (768)]`` on the SD grid; see the module docstring."""

    def __init__(self, name: str, sd: Backbone, dino: Backbone, *, mode: str = "zero_shot", eps: float = 1e-10):
        if mode not in MODES:
            raise ValueError(f"{name}: mode must be one of {MODES}, got {mode!r}")
        super().__init__(name, sd.dim + dino.dim, sd.stride, sd.canvas)
        self.sd, self.dino = sd, dino
        self.sd_dim, self.mode, self.eps = sd.dim, mode, float(eps)

    def min_input_size(self) -> int:
        return self.sd.min_input_size()

    def grid(self, H: int, W: int) -> tuple[int, int]:
        return self.sd.grid(H, W)

    def check_images(self, images, arg: str = "images") -> None:
        self.sd.check_images(images, arg)

    def dino_input(self, images: torch.Tensor) -> torch.Tensor:
        """The DINOv2 input: ``images`` resized to ``grid × patch`` so both grids coincide (840 for 960)."""
        h, w = self.sd.grid(*images.shape[-2:])
        size = (h * self.dino.stride, w * self.dino.stride)
        if tuple(images.shape[-2:]) == size:
            return images
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False, antialias=True)
        return x.clamp_(0.0, 1.0)

    def forward(self, images: torch.Tensor, dino_images: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` on the SD canvas → ``(B, 3968, H/16, W/16)`` float32.

        ``dino_images``: optional ``(B, 3, H', W')`` images for the DINOv2 part (e.g. GeoAware's own 840
        canvas); by default ``images`` resized (see :meth:`dino_input`). DINO maps of another grid are
        bilinearly resized to the SD grid.
        """
        self.check_images(images)
        images = images.to(self.device)
        f_sd = self.sd._features(images).float()
        if dino_images is None:
            dino_images = self.dino_input(images)
        else:
            self.dino.check_images(dino_images, "dino_images")
            if dino_images.shape[0] != images.shape[0]:
                raise ValueError(f"{self.name}: dino_images must have batch {images.shape[0]}, "
                                 f"got {dino_images.shape[0]}")
            dino_images = dino_images.to(self.device)
        f_dino = self.dino._features(dino_images).float()
        if f_dino.shape[-2:] != f_sd.shape[-2:]:
            f_dino = F.interpolate(f_dino, size=f_sd.shape[-2:], mode="bilinear", align_corners=False)
        out = torch.cat([f_sd, f_dino], dim=1)
        if self.mode == "zero_shot":
            out = normalize_sd_dino(out, self.sd_dim, self.eps)
        return out


@register_backbone("sd_dino")
def sd_dino(*, weights=None, pretrained: bool = True, tiny: bool = False, mode: str = "zero_shot",
            sd_cfg: dict | None = None, dino_cfg: dict | None = None, size: int | None = None) -> SDDinoBackbone:
    """GeoAware-SC's fused SD-1.5 + DINOv2 descriptor, 3968-d at stride 16 on ``pad_square(960)``.

    Options: ``mode`` ("zero_shot" per-half normalised, default; "raw"), ``size`` (canvas side, 960;
    tiny 192), ``sd_cfg`` / ``dino_cfg`` (options forwarded to ``sd15_decoder`` / ``dinov2_vitb14``),
    ``tiny``. ``weights``: None, or a dict ``{"sd15_decoder": SD_DIR, "dinov2_vitb14": FILE}``
    (each part otherwise searched as its own backbone, env vars included).
    """
    if weights is not None and not isinstance(weights, dict):
        raise TypeError("sd_dino: weights must be None or a dict {'sd15_decoder': SD_DIR, 'dinov2_vitb14': FILE}, "
                        f"got {type(weights).__name__}")
    weights = dict(weights or {})
    bad = set(weights) - {"sd15_decoder", "dinov2_vitb14"}
    if bad:
        raise ValueError(f"sd_dino: unknown weights keys {sorted(bad)}; expected 'sd15_decoder', 'dinov2_vitb14'")
    sd_cfg, dino_cfg = dict(sd_cfg or {}), dict(dino_cfg or {})
    sd_cfg.setdefault("slide", "default")
    sd_cfg.setdefault("prompt_embeds", None)
    sd = build_sd15("sd15_decoder", weights=weights.get("sd15_decoder"), pretrained=pretrained, tiny=tiny,
                    size=size, **sd_cfg)
    dino = dinov2_vitb14(weights=weights.get("dinov2_vitb14"), pretrained=pretrained, tiny=tiny, **dino_cfg)
    return SDDinoBackbone("sd_dino", sd, dino, mode=mode)
