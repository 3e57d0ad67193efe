"""Stable Diffusion 1.5 UNet decoder features (GeoAware-SC / sd-dino's ODISE extractor), via diffusers.

What GeoAware-SC computes [C: ``preprocess_map.py``, ODISE ``LdmExtractor`` with ``decoder_only=True``,
``FeatureExtractorBackbone.slide_forward``], and what this module reproduces:

* Input: the 960×960 ``pad_square`` canvas, RGB in [0, 1] → ``2x − 1``.
* VAE encoder → posterior **mean** (not a sample) × ``scaling_factor`` (0.18215).
* Noise: ODISE's *shared* noise, ``torch.randn(1, 4, 64, 64, generator=manual_seed(42))``, bicubically
  resized (``align_corners=False``) when the latent is not 64×64; the same noise for every image.
  ``x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε`` with the SD schedule (``scaled_linear``, β from 0.00085 to 0.012,
  1000 steps) at **t = 50** (``num_timesteps=50`` in GeoAware; sd-dino uses 100).
* UNet features at ODISE ``block_indices`` (2, 5, 8) with ``decoder_only=True``: the feature of output
  block ``k`` is the hidden state *entering* it before the skip concatenation, i.e. the output of output
  block ``k − 1`` (CompVis numbering; the middle block for ``k = 0``). In diffusers terms block ``k``
  reads ``up_blocks[(k−1)//3]`` layer ``(k−1) % 3`` (its attention output, or its upsampler's output
  for the last layer of an up block). SD-1.5 at 960: ``s5`` = 1280 ch at 15×15 (k=2), ``s4`` = 1280 ch
  at 30×30 (k=5), ``s3`` = 640 ch at 60×60 (k=8).
* **Sliding window** (``slide=512``, default): ODISE's backbone runs *square crops* of side
  ``min(512, H, W)`` at stride = crop side (offsets clamped to the border, so 960 gives crops at 0 and
  448 in each axis, 4 crops), places each crop's maps at ``offset // map_stride`` and averages the
  overlaps. ``slide=None`` runs the whole image in one pass (DIFT-style).
* Output: ``[s3, up(s4), up(s5)]`` (bilinear, ``align_corners=False``, to the finest map) =
  640 + 1280 + 1280 = **3200 channels at 60×60**, stride 16, float32, not normalised.
  :meth:`SD15Decoder.extract_maps` returns the maps at their native sizes.

Text conditioning. GeoAware/ODISE condition the UNet with an *implicit caption*: the empty-prompt
CLIP text embedding plus a learned projection of a CLIP image embedding (ODISE's trained captioner,
also added to the time embedding). That captioner is not part of SD and is not reproduced here. This
module conditions on ``prompt_embeds`` (``(77, 768)`` or ``(1, 77, 768)``), by default the
**empty-prompt embedding** (the captioner's base term, and DIFT's default), found in order:
``prompt_embeds=`` (a tensor or a file), ``$SEMCORR_SD15_PROMPT_EMBEDS``,
``<sd_dir>/empty_prompt_embeds.safetensors``, or computed from ``<sd_dir>/text_encoder`` when the
``transformers`` package is installed. :func:`write_empty_prompt_embeds` (or
``python -m semcorr_fast.backbones.sd SD_DIR``) writes that file on a machine with ``transformers``.
With ``pretrained=False`` the embedding is zeros.

Inputs must have sides that are multiples of 64 (VAE ×8, three UNet downsamplings).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.canvas import Canvas
from . import _weights as W
from ._base import Backbone, check_tiny
from ._registry import register_backbone

#: GeoAware-SC's names of the ODISE decoder blocks.
ODISE_NAMES = {2: "s5", 5: "s4", 8: "s3", 11: "s2"}
PROMPT_ENV = "SEMCORR_SD15_PROMPT_EMBEDS"
PROMPT_FILE = "empty_prompt_embeds.safetensors"
SD15_HF_REPOS = ("stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5")

SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215)
TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8)
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    sample_size=64, scaling_factor=0.18215)


class _StopUNet(Exception):
    """Raised by the last feature hook: the rest of the UNet is not needed."""


class SD15Decoder(Backbone):
    """SD UNet decoder features; see the module docstring for the exact recipe and options."""

    def __init__(self, name: str, unet: nn.Module, vae_encoder: nn.Module, quant_conv: nn.Module | None, *,
                 scaling_factor: float, vae_factor: int, prompt_embeds: torch.Tensor, canvas: Canvas,
                 timestep: int = 50, block_indices=(2, 5, 8), slide: int | None = 512, noise_seed: int = 42,
                 noise_size: int = 64, ensemble_size: int = 1, beta_start: float = 0.00085,
                 beta_end: float = 0.012, num_train_timesteps: int = 1000):
        n_down = sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))
        per = len(unet.up_blocks[0].resnets)
        n_layers = per * len(unet.up_blocks)
        idx = tuple(int(k) for k in block_indices)
        if not idx or len(set(idx)) != len(idx) or not all(0 <= k <= n_layers - 1 for k in idx):
            raise ValueError(f"{name}: block_indices must be distinct ODISE output-block indices in "
                             f"[0, {n_layers - 1}], got {tuple(block_indices)!r}")
        if not (isinstance(timestep, int) and 0 <= timestep < num_train_timesteps):
            raise ValueError(f"{name}: timestep must be an int in [0, {num_train_timesteps - 1}], got {timestep!r}")
        if not (isinstance(ensemble_size, int) and ensemble_size >= 1):
            raise ValueError(f"{name}: ensemble_size must be an int >= 1, got {ensemble_size!r}")
        unit = vae_factor * 2 ** n_down
        if slide is not None and (not isinstance(slide, int) or slide <= 0 or slide % unit):
            raise ValueError(f"{name}: slide must be None or a positive multiple of {unit} (the input unit), "
                             f"got {slide!r}")
        sites, chans, strides = {}, {}, {}
        for k in idx:
            mod, ch, lat_stride = self._site(unet, k, n_down, per)
            sites[k], chans[k], strides[k] = mod, ch, vae_factor * lat_stride
        order = sorted(idx, key=lambda k: (strides[k], -k))      # finest first: s3, s4, s5
        super().__init__(name, sum(chans[k] for k in idx), strides[order[0]], canvas)
        self.unet, self.vae_encoder, self.quant_conv = unet, vae_encoder, quant_conv
        self.scaling_factor, self.vae_factor, self.unit = float(scaling_factor), int(vae_factor), unit
        self.block_indices, self.order = idx, tuple(order)
        self.channels, self.map_strides = chans, strides
        self._sites = sites
        self.timestep, self.slide, self.ensemble_size = timestep, slide, ensemble_size
        self.noise_seed, self.noise_size = int(noise_seed), int(noise_size)
        if prompt_embeds.ndim == 2:
            prompt_embeds = prompt_embeds[None]
        cross = unet.config.cross_attention_dim
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != 1 or prompt_embeds.shape[-1] != cross:
            raise ValueError(f"{name}: prompt_embeds must have shape (L, {cross}) or (1, L, {cross}), "
                             f"got {tuple(prompt_embeds.shape)}")
        self.register_buffer("prompt_embeds", prompt_embeds.float().clone(), False)
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
        ac = torch.cumprod(1.0 - betas, 0)[timestep]
        self.sqrt_ac, self.sqrt_one_minus_ac = float(ac.sqrt()), float((1.0 - ac).sqrt())

    # ------------------------------------------------------------------ structure
    @staticmethod
    def _site(unet, k: int, n_down: int, per: int):
        """(module whose output is ODISE block k's feature, channels, latent stride)."""
        if k == 0:
            return unet.mid_block, unet.mid_block.resnets[-1].out_channels, 2 ** n_down
        i, j = divmod(k - 1, per)
        blk = unet.up_blocks[i]
        ups_before = sum(1 for b in list(unet.up_blocks)[:i] if getattr(b, "upsamplers", None))
        lat = 2 ** (n_down - ups_before)
        ch = blk.resnets[j].out_channels
        if j == len(blk.resnets) - 1 and getattr(blk, "upsamplers", None):
            return blk.upsamplers[0], ch, lat // 2
        attns = getattr(blk, "attentions", None)
        return (attns[j] if attns is not None else blk.resnets[j]), ch, lat

    def min_input_size(self) -> int:
        return self.unit

    def grid(self, H: int, W: int) -> tuple[int, int]:
        """``(H // stride, W // stride)`` with ``stride`` the finest selected map's (16 for SD-1.5)."""
        return int(H) // self.stride, int(W) // self.stride

    def check_images(self, images, arg: str = "images") -> None:
        super().check_images(images, arg)
        H, W = images.shape[-2:]
        if H % self.unit or W % self.unit:
            raise ValueError(f"{self.name}: {arg} sides must be multiples of {self.unit} (VAE and UNet "
                             f"downsampling), got {H}x{W}; use the canvas {self.canvas}")

    # ------------------------------------------------------------------ pieces
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] → scaled posterior-mean latents ``(N, 4, H/8, W/8)``."""
        x = (images.float() * 2.0 - 1.0).to(self.dtype)
        h = self.vae_encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean = h[:, : h.shape[1] // 2]
        return mean * self.scaling_factor

    def noise(self, size: tuple[int, int], member: int = 0) -> torch.Tensor:
        """ODISE's shared noise ``(1, 4, h, w)`` (float32, CPU): seed ``noise_seed + member``."""
        g = torch.Generator().manual_seed(self.noise_seed + member)
        n = torch.randn(1, 4, self.noise_size, self.noise_size, generator=g)
        if tuple(size) != (self.noise_size, self.noise_size):
            n = F.interpolate(n, size=tuple(size), mode="bicubic", align_corners=False)
        return n

    def unet_maps(self, latents: torch.Tensor) -> dict[int, torch.Tensor]:
        """Noised latents → ``{block index: (N, C_k, h_k, w_k)}``; stops the UNet after the last one."""
        captured: dict[int, torch.Tensor] = {}

        def make(k):
            def hook(_mod, _inp, out):
                t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
                captured[k] = t
                if len(captured) == len(self._sites):
                    raise _StopUNet
            return hook
        handles = [m.register_forward_hook(make(k)) for k, m in self._sites.items()]
        n = latents.shape[0]
        cond = self.prompt_embeds.to(device=latents.device, dtype=latents.dtype).expand(n, -1, -1)
        t = torch.full((n,), self.timestep, dtype=torch.long, device=latents.device)
        try:
            self.unet(latents, t, encoder_hidden_states=cond)
        except _StopUNet:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [k for k in self._sites if k not in captured]
        if missing:  # pragma: no cover - every site lies on the UNet's forward path
            raise RuntimeError(f"{self.name}: UNet forward did not reach blocks {missing}")
        return captured

    def _maps_single(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        z = self.encode(images)
        acc = None
        for e in range(self.ensemble_size):
            eps = self.noise(z.shape[-2:], e).to(device=z.device, dtype=z.dtype)
            zt = self.sqrt_ac * z + self.sqrt_one_minus_ac * eps
            maps = {k: v.float() for k, v in self.unet_maps(zt).items()}
            acc = maps if acc is None else {k: acc[k] + maps[k] for k in acc}
        return {k: v / self.ensemble_size for k, v in acc.items()}

    @staticmethod
    def crop_offsets(n: int, crop: int) -> list[int]:
        """ODISE's window offsets along a side of ``n`` px for square crops of ``crop`` px."""
        grids = max(n - crop + crop - 1, 0) // crop + 1
        out = []
        for i in range(grids):
            y2 = min(i * crop + crop, n)
            out.append(max(y2 - crop, 0))
        return out

    def extract_maps(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` in [0, 1] → ``{name: (B, C_k, H/s_k, W/s_k)}`` float32 at native sizes.

        Names are GeoAware's (``s5``/``s4``/``s3``/``s2`` for blocks 2/5/8/11, else ``b<k>``).
        With ``slide`` the maps are stitched from the crops (overlaps averaged).
        """
        self.check_images(images)
        images = images.to(self.device)
        B, _, H, W = images.shape
        crop = None if self.slide is None else min(self.slide, H, W)
        if crop is None or (crop == H and crop == W):
            maps = self._maps_single(images)
        else:
            ys, xs = self.crop_offsets(H, crop), self.crop_offsets(W, crop)
            boxes = [(y, x) for y in ys for x in xs]
            crops = torch.cat([images[:, :, y:y + crop, x:x + crop] for y, x in boxes], 0)   # (nb·B, 3, c, c)
            cmaps = self._maps_single(crops)
            maps = {}
            for k, v in cmaps.items():
                s = self.map_strides[k]
                out = v.new_zeros(B, v.shape[1], H // s, W // s)
                cnt = v.new_zeros(1, 1, H // s, W // s)
                for b, (y, x) in enumerate(boxes):
                    part = v[b * B:(b + 1) * B]
                    out[:, :, y // s:y // s + part.shape[-2], x // s:x // s + part.shape[-1]] += part
                    cnt[:, :, y // s:y // s + part.shape[-2], x // s:x // s + part.shape[-1]] += 1
                maps[k] = out / cnt
        return {ODISE_NAMES.get(k, f"b{k}"): maps[k] for k in self.order}

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        maps = list(self.extract_maps(images).values())
        size = maps[0].shape[-2:]
        return torch.cat([maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                                      for m in maps[1:]], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → ``(B, dim, H/16, W/16)`` float32: ``[s3, up(s4), up(s5)]``."""
        return self._features(images).float()


# ---------------------------------------------------------------------- weights and prompt
def find_sd_dir(name: str, weights) -> Path:
    """The diffusers-layout SD-1.5 directory (``unet/`` and ``vae/``), or a FileNotFoundError naming where."""
    if weights is not None:
        p = Path(weights).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"{name}: weights must be a diffusers-layout directory with unet/ and vae/ "
                                    f"subfolders (e.g. a snapshot of {SD15_HF_REPOS[0]}), got {p}")
        _check_sd_dir(name, p)
        return p
    env = os.environ.get(W.env_var_for(name))
    if env:
        p = Path(env).expanduser()
        _check_sd_dir(name, p)
        return p
    cands = [W.HFFile(r, "unet/config.json") for r in SD15_HF_REPOS]
    for c in cands:
        f = c.find()
        if f is not None and (f.parent.parent / "vae" / "config.json").is_file():
            return f.parent.parent
    lines = [f"{name}: no Stable Diffusion 1.5 weights found (nothing is downloaded). Expected a diffusers-layout "
             f"directory with unet/ (config.json + diffusion_pytorch_model.safetensors) and vae/ "
             f"(config.json + diffusion_pytorch_model.safetensors), at one of:"]
    lines += [f"  - {W.hf_hub_cache() / ('models--' + r.replace('/', '--'))}/snapshots/<revision>/   "
              f"(Hugging Face repo {r!r})" for r in SD15_HF_REPOS]
    lines.append(f"or pass create_backbone({name!r}, weights=DIR), or set {W.env_var_for(name)}=DIR; "
                 f"use pretrained=False for random initialisation.")
    raise FileNotFoundError("\n".join(lines))


def _check_sd_dir(name: str, p: Path) -> None:
    for sub in ("unet", "vae"):
        if not (p / sub / "config.json").is_file():
            raise FileNotFoundError(f"{name}: {p} is not a diffusers-layout SD directory: missing "
                                    f"{p / sub / 'config.json'}")


def _variant(folder: Path) -> str | None:
    if any((folder / f).is_file() for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")):
        return None
    if (folder / "diffusion_pytorch_model.fp16.safetensors").is_file():
        return "fp16"
    raise FileNotFoundError(f"no weights in {folder} (expected diffusion_pytorch_model.safetensors)")


def _read_tensor_file(path: Path, what: str) -> torch.Tensor:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        d = load_file(str(path))
    else:
        d = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(d, torch.Tensor):
        return d
    if isinstance(d, dict):
        if "prompt_embeds" in d:
            return d["prompt_embeds"]
        if len(d) == 1:
            return next(iter(d.values()))
    raise ValueError(f"{what}: {path} must hold one tensor (key 'prompt_embeds'), got keys "
                     f"{list(d) if isinstance(d, dict) else type(d).__name__}")


def compute_empty_prompt_embeds(sd_dir: str | os.PathLike, prompt: str = "") -> torch.Tensor:
    """CLIP text embedding ``(1, 77, 768)`` of ``prompt`` from ``<sd_dir>/tokenizer`` + ``text_encoder``.

    Needs the ``transformers`` package (``ImportError`` otherwise). SD-1.x conditions on the text
    encoder's ``last_hidden_state`` (after the final LayerNorm) of the prompt padded to 77 tokens.
    """
    try:
        from transformers import CLIPTextModel, CLIPTokenizer
    except ImportError as e:
        raise ImportError("computing the prompt embedding needs the 'transformers' package; run "
                          "write_empty_prompt_embeds on a machine that has it, or pass prompt_embeds=") from e
    sd_dir = Path(sd_dir)
    tok = CLIPTokenizer.from_pretrained(str(sd_dir / "tokenizer"), local_files_only=True)
    enc = CLIPTextModel.from_pretrained(str(sd_dir / "text_encoder"), local_files_only=True).eval()
    ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids
    with torch.no_grad():
        return enc(ids)[0].float()


def write_empty_prompt_embeds(sd_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write the empty-prompt embedding to ``out`` (default ``<sd_dir>/empty_prompt_embeds.safetensors``)."""
    from safetensors.torch import save_file
    out = Path(out) if out is not None else Path(sd_dir) / PROMPT_FILE
    save_file({"prompt_embeds": compute_empty_prompt_embeds(sd_dir).contiguous()}, str(out))
    return out


def resolve_prompt_embeds(name: str, prompt_embeds, sd_dir: Path | None) -> torch.Tensor:
    """The conditioning tensor: ``prompt_embeds`` (tensor or file), ``$SEMCORR_SD15_PROMPT_EMBEDS``,
    ``<sd_dir>/empty_prompt_embeds.safetensors``, or computed with ``transformers``."""
    if isinstance(prompt_embeds, torch.Tensor):
        return prompt_embeds.detach().float().cpu()
    if prompt_embeds is not None:
        return _read_tensor_file(Path(prompt_embeds).expanduser(), f"{name}: prompt_embeds")
    if os.environ.get(PROMPT_ENV):
        return _read_tensor_file(Path(os.environ[PROMPT_ENV]).expanduser(), f"{name}: ${PROMPT_ENV}")
    if sd_dir is not None:
        f = sd_dir / PROMPT_FILE
        if f.is_file():
            return _read_tensor_file(f, f"{name}: prompt embedding")
        if (sd_dir / "text_encoder").is_dir() and (sd_dir / "tokenizer").is_dir():
            try:
                return compute_empty_prompt_embeds(sd_dir)
            except ImportError:
                pass
    where = sd_dir / PROMPT_FILE if sd_dir is not None else Path("<sd_dir>") / PROMPT_FILE
    raise FileNotFoundError(
        f"{name}: no text-conditioning embedding found. Expected the empty-prompt CLIP embedding, a tensor of "
        f"shape (1, 77, 768) under key 'prompt_embeds', at {where} (write it with "
        f"`python -m semcorr_fast.backbones.sd {sd_dir or 'SD_DIR'}` on a machine with 'transformers'), or pass "
        f"prompt_embeds=TENSOR_OR_FILE, or set {PROMPT_ENV}=FILE.")


def build_sd15(name: str, *, weights, pretrained: bool, tiny: bool, prompt_embeds, size, slide, **opts) -> SD15Decoder:
    """Build the UNet + VAE encoder (from a diffusers directory, or random init) and wrap them."""
    check_tiny(name, tiny, pretrained, weights)
    sd_dir = find_sd_dir(name, weights) if (weights is not None or pretrained) else None
    from diffusers import AutoencoderKL, UNet2DConditionModel
    if sd_dir is not None:
        import importlib.util
        low_mem = importlib.util.find_spec("accelerate") is not None
        unet = UNet2DConditionModel.from_pretrained(str(sd_dir), subfolder="unet", local_files_only=True,
                                                    variant=_variant(sd_dir / "unet"), low_cpu_mem_usage=low_mem)
        vae = AutoencoderKL.from_pretrained(str(sd_dir), subfolder="vae", local_files_only=True,
                                            variant=_variant(sd_dir / "vae"), low_cpu_mem_usage=low_mem)
        pe = resolve_prompt_embeds(name, prompt_embeds, sd_dir)
    else:
        unet = UNet2DConditionModel(**(TINY_UNET_CONFIG if tiny else SD15_UNET_CONFIG))
        vae = AutoencoderKL(**(TINY_VAE_CONFIG if tiny else SD15_VAE_CONFIG))
        pe = (resolve_prompt_embeds(name, prompt_embeds, None) if prompt_embeds is not None
              else torch.zeros(1, 77, unet.config.cross_attention_dim))
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    quant = vae.quant_conv if getattr(vae.config, "use_quant_conv", True) else None
    if size is None:
        size = 192 if tiny else 960
    if slide == "default":
        slide = 128 if tiny else 512
    return SD15Decoder(name, unet, vae.encoder, quant, scaling_factor=vae.config.scaling_factor,
                       vae_factor=vae_factor, prompt_embeds=pe, canvas=Canvas.pad_square(int(size)),
                       slide=slide, **opts)


@register_backbone("sd15_decoder")
def sd15_decoder(*, weights=None, pretrained: bool = True, tiny: bool = False, timestep: int = 50,
                 block_indices=(2, 5, 8), slide="default", prompt_embeds=None, size: int | None = None,
                 noise_seed: int = 42, ensemble_size: int = 1) -> SD15Decoder:
    """SD-1.5 UNet decoder features ``[s3, up(s4), up(s5)]``, 3200-d at stride 16 (GeoAware-SC).

    Options: ``timestep`` (50; sd-dino: 100), ``block_indices`` (ODISE output blocks, (2, 5, 8)),
    ``slide`` (ODISE crop side, 512; ``None`` = one pass; tiny default 128), ``prompt_embeds``
    (tensor or file; default the empty-prompt embedding), ``size`` (``pad_square`` side, 960; tiny
    192), ``noise_seed`` (42, ODISE's), ``ensemble_size`` (1; >1 averages over noise seeds), ``tiny``.
    ``weights``: a diffusers-layout directory (``unet/``, ``vae/``).
    """
    return build_sd15("sd15_decoder", weights=weights, pretrained=pretrained, tiny=tiny,
                      prompt_embeds=prompt_embeds, size=size, slide=slide, timestep=timestep,
                      block_indices=block_indices, noise_seed=noise_seed, ensemble_size=ensemble_size)


if __name__ == "__main__":  # pragma: no cover - needs transformers and SD weights
    import argparse
    ap = argparse.ArgumentParser(description="Write SD-1.5's empty-prompt CLIP embedding next to the weights.")
    ap.add_argument("sd_dir", help="diffusers-layout SD-1.5 directory (with tokenizer/ and text_encoder/)")
    ap.add_argument("--out", default=None, help=f"output file (default SD_DIR/{PROMPT_FILE})")
    a = ap.parse_args()
    print(write_empty_prompt_embeds(a.sd_dir, a.out))
