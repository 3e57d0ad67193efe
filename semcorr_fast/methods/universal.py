"""Universal semantic correspondences (Shtedritski, Vedaldi, Rupprecht, ICCV-W 2023), registered "universal".

A frozen DINO ViT-S/8 (block-9 key facet, 224² → 28×28, D = 384) gives a local descriptor map Φ(I) and
a global token cls(I). A small cross-attention **adapter** A_θ turns the source descriptor f_u of a
point u into a query f̂_u that knows about the target image (through cls(J) only, the paper's "LGa"
bottleneck). The match v̂(u; I, J) is the soft-argmax of cos(f̂_u, Φ(J))/τ_H over the whole target grid
(τ_H = 0.05; the arg-max at test time). Training (notes ``seed_universal.md`` §1) combines

* **contrastive distillation** L_d (Eq. 2, τ_d = 0.1): the raw feature g = Φ(J)[v̂] must be more
  similar to the raw f_u than to every other feature of Φ(I) ∪ Φ(J) ("unique-to-both");
* **cycle + synthetic-warp consistency** L_c = a + β·(b + c) with β = stopgrad(a / (b + c)) (Eq. 4),
  where G is a random TPS (jittered 10×10 grid) + rescaled crop + colour jitter of I
  (:mod:`semcorr_fast.warps` preset ``"universal"``): b = ‖G(u) − v̂(u; I, G(I))‖²,
  c = ‖u − v̂(G(u); G(I), I)‖², and a the cycle term (see ``cycle`` below);
* total ``L = L_d + λ·L_c``, λ = 5, averaged over 200 points sampled inside a saliency mask of I.

Coordinates: points are in **unit coordinates** u ∈ [0, 1]² (x to the right, y down, the image
borders at 0 and 1; a pixel centre (x_px, y_px) of a W-wide image is u = (x_px + 0.5)/W), the paper's
frame, so the squared errors a, b, c are in normalised units. Feature cell j of a w-wide grid has its
centre at u = (j + 0.5)/w (grid_sample with ``align_corners=False``); descriptors at off-grid points
are bilinear samples (border padding).

Every dense similarity-softmax goes through the fused ops (no Q×N matrix is built):

* matcher soft-argmax (4–5 hops per pair): :func:`semcorr_fast.ops.soft_argmax`;
* contrastive log-sum-exp over Φ(I) ∪ Φ(J): :func:`row_logsumexp`, i.e.
  :func:`semcorr_fast.ops.rowsoftmax_distill` with a uniform teacher (see there);
* test-time arg-max: :func:`semcorr_fast.ops.match_topk` (k = 1).

Explicit matrices that remain, all small and gradient-free or per pair: the adapter's attention
(Q = 200 queries × |Ω| + 2 = 786 tokens per pair and head, through
``torch.nn.functional.scaled_dot_product_attention``; the brief allows it: it is the adapter's own
attention, not a descriptor similarity), the cls-attention saliency (1 × |Ω| per head), and the optional
TokenCut mask (|Ω| × |Ω| = 784² per image, no gradient: the eigen-decomposition needs the matrix).

Choices where the paper is silent or inconsistent (options name both; defaults marked):

* Eq. 1's printed minus sign is a typo: s = exp(cos/τ) everywhere (the notes §1.3).
* ``cycle`` (term a, printed dimensionally inconsistent): ``"i_j_gi"`` (default; the notes' C1:
  I → J → G(I), compared with G(u)), ``"i_j_i"`` (B: I → J → I vs u), ``"gi_j_i"`` (C2, WarpC's
  W-bipath: G(I) → J → I vs u), ``"literal"`` (I → J → I vs G(u), as printed).
* ``balance``: β computed from the batch means (``"batch"``, default, WarpC's automatic weighting)
  or per point (``"point"``). Either way β carries no gradient.
* ``positive_in_denominator``: log-sum-exp over [s(f_u, g), Φ(I), Φ(J)] (default, the notes' §1.13
  reconstruction; the loss is ≥ 0) or over Φ(I) ∪ Φ(J) only (Eq. 2 literally).
* ``negatives``: ``"both"`` (default, Eq. 2), ``"source"`` (L_dS) or ``"target"`` (L_dT).
* ``arch``: ``"lga"`` (default: KV = [Φ(I); cls(I); cls(J)]), ``"la"`` (KV = Φ(I)), ``"lla"``
  (KV = [Φ(I); Φ(J)], target tokens marked by a learnable vector added to them; no cls).
* Adapter I/O (not given in the paper): token = [descriptor ‖ 2-D sinusoidal embedding of its position
  (``pos_dim`` = 64 channels)], cls tokens = [cls ‖ learnable ``pos_dim`` vector (source / target)];
  width D + pos_dim; pre-LayerNorm cross-attention + GELU FFN blocks with residuals (Perceiver IO's
  decoder), a final LayerNorm and a linear map to D; ``output_residual=True`` adds the query
  descriptor back (f̂ = f_u + A(...)) so the adapter starts near the DINO baseline.
* ``cls_source``: the global token. ``"facet"`` (default for ViTs): the class token's row of the
  backbone's facet at its block (DINO block-9 key, 384-d, the same space as the local keys; the
  final-layer class token would need blocks 10–11, which the backbone does not run); ``"token"``: the
  class token output of that block; ``"mean"``: the spatial mean of the map (any backbone).
* ``mask_source``: where the 200 points are sampled (the paper: TokenCut masks). ``"auto"`` (default):
  ``"cls_attention"`` for ViT backbones, else ``"uniform"``; ``"cls_attention"``: the attention of the
  class query over the patches at the backbone's block (mean over heads), thresholded to the smallest
  set of cells holding ``saliency_mass`` (0.6) of it (DINO's attention-map convention);
  ``"tokencut"``: normalised cut on the descriptor map (:func:`tokencut_mask`); ``"uniform"``: the
  whole image; or any callable ``mask_fn(images (B,3,H,W), outputs: BackboneOutputs) -> (B, Hm, Wm)``
  (bool or non-negative weights at any resolution). An image whose mask is empty falls back to uniform.
* Training hyper-parameters (optimiser, lr, batch, iterations) and warp magnitudes are in the paper's
  unavailable supplementary: see ``configs/universal/`` and :mod:`semcorr_fast.warps`.
* Pairs: the method trains on whatever (I, J) the batch holds. The paper's auto-curated pairs (J among
  the k nearest class-token neighbours of I, k = 5 → 100 → 500) come from the data side:
  :class:`semcorr_fast.curation.CuratedBatchStream`; the stock ``BatchStream`` draws random pairs (the
  paper's "random pairs" ablation). ``pair_schedule`` is stored on the method for that data side.

Evaluation. The adapted query depends on the pair, so :meth:`UniversalCorrespondence.descriptor`
(one image) returns the raw backbone map (the targets g_v are raw DINO features): evaluating the method
through the per-image ``semcorr_fast.evaluate`` path measures the **ViT-DINO baseline**. The method's
own predictions come from :meth:`UniversalCorrespondence.match_points` (arg-max, τ_H → 0) or
:meth:`UniversalCorrespondence.adapted_descriptor` (dense adapted source map for a given target).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, warps
from . import register_method
from .base import Method

__all__ = [
    "BackboneOutputs", "backbone_outputs", "sinusoidal_embedding", "CrossAttentionLayer", "UniversalAdapter",
    "sample_features", "sample_points", "cls_attention_mask", "tokencut_mask", "uniform_mask", "MASK_SOURCES",
    "row_logsumexp", "contrastive_loss", "warp_consistency_loss", "UniversalCorrespondence",
    "DEFAULT_PAIR_SCHEDULE", "CYCLES", "ARCHS",
]

CYCLES = ("i_j_gi", "i_j_i", "gi_j_i", "literal")
ARCHS = ("lga", "la", "lla")
NEGATIVES = ("both", "source", "target")
BALANCES = ("batch", "point")
CLS_SOURCES = ("auto", "facet", "token", "mean")
MASK_SOURCES = ("auto", "cls_attention", "tokencut", "uniform")
#: the paper's pair curriculum: (first step, k nearest neighbours) — read by the data side
#: (:func:`semcorr_fast.curation.neighbours_at`).
DEFAULT_PAIR_SCHEDULE = ((0, 5), (10000, 100), (30000, 500))


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------

def _pos_int(v, name: str, fn: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or v < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def _pos_float(v, name: str, fn: str, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{fn}: {name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return float(v)


def _choice(v, name: str, choices, fn: str) -> str:
    if v not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}, got {v!r}")
    return v


def _float_tensor(x, name: str, shape_doc: str, fn: str, rank: int) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape {shape_doc}, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating tensor of shape {shape_doc}, got dtype {x.dtype}")
    if x.dim() != rank:
        raise ValueError(f"{fn}: {name} must have shape {shape_doc}, got {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------------
# backbone: local map, global token, class attention
# --------------------------------------------------------------------------------------------------

@dataclass
class BackboneOutputs:
    """What the method reads from the frozen backbone for a batch of images.

    ``map`` (B, D, h, w) float32: the local descriptors (exactly ``backbone(images)``);
    ``cls`` (B, D) float32: the global token (see ``cls_source``);
    ``cls_attn`` (B, h, w) float32 or None: the class query's attention over the patches at the
    backbone's block, mean over heads (each map sums to ≤ 1; None for non-ViT backbones).
    """

    map: Tensor
    cls: Tensor
    cls_attn: Optional[Tensor] = None

    def __getitem__(self, sl) -> "BackboneOutputs":
        """Batch slice."""
        return BackboneOutputs(self.map[sl], self.cls[sl], None if self.cls_attn is None else self.cls_attn[sl])


def _is_vit(backbone) -> bool:
    return hasattr(backbone, "vit") and hasattr(backbone, "embed") and hasattr(backbone, "facet")


def backbone_outputs(backbone: nn.Module, images: Tensor, *, cls_source: str = "auto") -> BackboneOutputs:
    """Local map, global token and class attention of ``images`` in one backbone pass.

    Args:
        backbone: a :mod:`semcorr_fast.backbones` model. For the ViT backbones (``dino_vits8``, ...)
            the same blocks run as in ``backbone(images)`` and the class token's row is kept; any
            other backbone gives ``cls`` = the spatial mean of its map and no attention.
        images: ``(B, 3, H, W)`` float in [0, 1] on the backbone canvas.
        cls_source: ``"auto"`` (``"facet"`` for ViTs, ``"mean"`` otherwise), ``"facet"`` (the class
            token's row of the backbone's facet at its block), ``"token"`` (the class token output of
            that block, pre-norm), ``"mean"``.
    Returns:
        :class:`BackboneOutputs`, float32 on the backbone's device. Differentiable only if the
        backbone's parameters require grad and autograd is on (the method calls it under no_grad).
    """
    fn = "backbone_outputs"
    _choice(cls_source, "cls_source", CLS_SOURCES, fn)
    if not _is_vit(backbone):
        if cls_source in ("facet", "token"):
            raise ValueError(f"{fn}: cls_source={cls_source!r} needs a ViT backbone with a class token; "
                             f"{type(backbone).__name__} has none (use 'mean' or 'auto')")
        fmap = backbone(images).float()
        return BackboneOutputs(fmap, fmap.mean((2, 3)), None)
    backbone.check_images(images)
    vit = backbone.vit
    x = backbone.normalize(images.to(backbone.device)).to(backbone.dtype)
    tokens, h, w = backbone.embed(x)
    blocks = vit.blocks
    layer = backbone.layer
    for i in range(layer):
        tokens = blocks[i](tokens)
    blk = blocks[layer]
    B, N, D = tokens.shape
    attn = blk.attn
    heads = attn.num_heads
    hd = D // heads
    npre = vit.num_prefix_tokens
    qkv = attn.qkv(blk.norm1(tokens)).reshape(B, N, 3, heads, hd)
    out_tokens = None
    if backbone.facet == "token":
        out_tokens = blk(tokens)
        facet_all = out_tokens
    else:
        f = qkv[:, :, ("query", "key", "value").index(backbone.facet)]
        if backbone.channel_layout == "dino_vit_features":
            f = f.transpose(-1, -2)
        facet_all = f.reshape(B, N, D)
    fmap = facet_all[:, npre:].transpose(1, 2).reshape(B, D, h, w).float()
    # class attention at this block (timm applies q_norm / k_norm per head before the scores)
    q = qkv[:, :, 0].transpose(1, 2)  # (B, heads, N, hd)
    k = qkv[:, :, 1].transpose(1, 2)
    q = getattr(attn, "q_norm", nn.Identity())(q)
    k = getattr(attn, "k_norm", nn.Identity())(k)
    scores = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * (hd ** -0.5)  # (B, heads, 1, N)
    cls_attn = scores.softmax(-1)[:, :, 0, npre:].mean(1).reshape(B, h, w)
    src = "facet" if cls_source == "auto" else cls_source
    if src == "facet":
        cls = facet_all[:, 0]
    elif src == "token":
        cls = (out_tokens if out_tokens is not None else blk(tokens))[:, 0]
    else:
        cls = fmap.mean((2, 3))
    return BackboneOutputs(fmap, cls.float(), cls_attn)


# --------------------------------------------------------------------------------------------------
# adapter
# --------------------------------------------------------------------------------------------------

def sinusoidal_embedding(xy: Tensor, dim: int, max_freq: float = 16.0) -> Tensor:
    """2-D sinusoidal embedding of unit-coordinate points, differentiable in ``xy``.

    Args:
        xy: ``(..., 2)`` floating (x, y) in unit coordinates ([0, 1] is the image).
        dim: output channels, a multiple of 4: ``n = dim/4`` frequencies f_k = max_freq^(k/(n−1))
            cycles per image (1 … max_freq, log-spaced), channels [sin 2πf x, cos 2πf x, sin 2πf y, cos 2πf y].
        max_freq: the highest frequency (cycles per image side).
    Returns:
        ``(..., dim)`` in ``xy``'s dtype.
    """
    fn = "sinusoidal_embedding"
    if not isinstance(xy, torch.Tensor) or not xy.dtype.is_floating_point or xy.shape[-1:] != (2,):
        raise ValueError(f"{fn}: xy must be a floating tensor of shape (..., 2), got "
                         f"{getattr(xy, 'shape', type(xy).__name__)}")
    dim = _pos_int(dim, "dim", fn, 4)
    if dim % 4:
        raise ValueError(f"{fn}: dim must be a multiple of 4, got {dim}")
    max_freq = _pos_float(max_freq, "max_freq", fn)
    n = dim // 4
    e = torch.arange(n, device=xy.device, dtype=xy.dtype) / max(n - 1, 1)
    freqs = 2 * math.pi * max_freq ** e                                     # (n,)
    ang = xy.unsqueeze(-1) * freqs                                          # (..., 2, n)
    emb = torch.stack((ang.sin(), ang.cos()), -1)                           # (..., 2, n, 2)
    return emb.transpose(-1, -2).reshape(*xy.shape[:-1], dim)               # x: [sin.., cos..], y: ...


def _grid_centres(h: int, w: int, device, dtype) -> Tensor:
    """(h·w, 2) unit coordinates of the cell centres, row-major."""
    ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), -1)


class CrossAttentionLayer(nn.Module):
    """One Perceiver-IO decoder block: queries attend to a fixed token sequence, then an FFN.

    ``x ← x + W_o·MHA(LN_q(x), LN_kv(kv))``; ``x ← x + FFN(LN(x))`` with ``FFN = Linear(d, ffn) · GELU ·
    Linear(ffn, d)``. Queries never attend to each other (each row of ``x`` is processed independently).
    Attention through ``F.scaled_dot_product_attention``.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        fn = "CrossAttentionLayer"
        dim, heads, ffn_dim = _pos_int(dim, "dim", fn), _pos_int(heads, "heads", fn), _pos_int(ffn_dim, "ffn_dim", fn)
        if dim % heads:
            raise ValueError(f"{fn}: the token width ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dropout = _pos_float(dropout, "dropout", fn, allow_zero=True)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))

    def forward(self, x: Tensor, kv: Tensor) -> Tensor:
        """x ``(B, Q, d)`` queries, kv ``(B, N, d)`` tokens → ``(B, Q, d)``."""
        B, Q, d = x.shape
        N = kv.shape[1]
        H = self.heads
        q = self.q(self.norm_q(x)).reshape(B, Q, H, d // H).transpose(1, 2)
        k, v = self.kv(self.norm_kv(kv)).reshape(B, N, 2, H, d // H).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        x = x + self.proj(a.transpose(1, 2).reshape(B, Q, d))
        return x + self.ff(self.norm_ff(x))


class UniversalAdapter(nn.Module):
    """The paper's adapter A_θ: a cross-attention transformer decoder over frozen backbone tokens.

    Args:
        dim: descriptor channels D (384 for DINO ViT-S/8 keys); the output has D channels.
        layers, heads, ffn_dim: 4, 8, 1024 in the paper.
        pos_dim: channels of the sinusoidal position embedding concatenated to every local token and
            to the query, and of the learnable embeddings concatenated to the class tokens (a multiple
            of 4; the token width D + pos_dim must be divisible by ``heads``).
        arch: ``"lga"`` (KV = [Φ(I); cls(I); cls(J)], the paper's method), ``"la"`` (Φ(I)),
            ``"lla"`` (Φ(I); Φ(J)).
        output_residual: f̂ = f + out(...) (default) or f̂ = out(...).
        pe_max_freq: highest embedding frequency (cycles per image side).
        dropout: attention dropout (0 in the paper's absence of a value).

    ``forward(query, query_xy, src_tokens, src_hw, cls_src=None, cls_trg=None, trg_tokens=None,
    trg_hw=None)``: query ``(B, Q, D)`` descriptors at query_xy ``(B, Q, 2)`` (unit coordinates);
    src_tokens ``(B, h·w, D)`` row-major on a ``src_hw = (h, w)`` grid; cls_src / cls_trg ``(B, D)``
    (``"lga"``); trg_tokens ``(B, h'·w', D)`` on ``trg_hw`` (``"lla"``). Returns ``(B, Q, D)``.
    """

    def __init__(self, dim: int, *, layers: int = 4, heads: int = 8, ffn_dim: int = 1024, pos_dim: int = 64,
                 arch: str = "lga", output_residual: bool = True, pe_max_freq: float = 16.0, dropout: float = 0.0):
        super().__init__()
        fn = "UniversalAdapter"
        self.dim = _pos_int(dim, "dim", fn)
        layers = _pos_int(layers, "layers", fn)
        heads = _pos_int(heads, "heads", fn)
        self.pos_dim = _pos_int(pos_dim, "pos_dim", fn, 4)
        if self.pos_dim % 4:
            raise ValueError(f"{fn}: pos_dim must be a multiple of 4, got {pos_dim}")
        width = self.dim + self.pos_dim
        if width % heads:
            raise ValueError(f"{fn}: the token width dim + pos_dim = {width} must be divisible by heads = {heads}")
        self.arch = _choice(arch, "arch", ARCHS, fn)
        if not isinstance(output_residual, bool):
            raise TypeError(f"{fn}: output_residual must be a bool, got {output_residual!r}")
        self.output_residual = output_residual
        self.pe_max_freq = _pos_float(pe_max_freq, "pe_max_freq", fn)
        self.width = width
        # learnable embeddings, only where the arch uses them (every parameter gets a gradient)
        if self.arch == "lga":
            self.cls_embed = nn.Parameter(torch.randn(2, self.pos_dim) * 0.02)  # source / target class token
        if self.arch == "lla":
            self.trg_local_embed = nn.Parameter(torch.randn(width) * 0.02)      # marks the Φ(J) tokens
        self.blocks = nn.ModuleList(CrossAttentionLayer(width, heads, ffn_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, self.dim)

    def _pe(self, xy: Tensor) -> Tensor:
        return sinusoidal_embedding(xy, self.pos_dim, self.pe_max_freq)

    def _local(self, tokens: Tensor, hw, name: str) -> Tensor:
        fn = "UniversalAdapter"
        _float_tensor(tokens, name, "(B, h*w, D)", fn, 3)
        h, w = hw
        if tokens.shape[1] != h * w or tokens.shape[2] != self.dim:
            raise ValueError(f"{fn}: {name} must have shape (B, {h}*{w}, {self.dim}), got {tuple(tokens.shape)}")
        pe = self._pe(_grid_centres(h, w, tokens.device, tokens.dtype))
        return torch.cat((tokens, pe.expand(tokens.shape[0], -1, -1)), -1)

    def _cls(self, cls: Optional[Tensor], which: int, B: int, name: str) -> Tensor:
        if cls is None:
            raise ValueError(f"UniversalAdapter: arch={self.arch!r} needs {name} (B, {self.dim})")
        _float_tensor(cls, name, f"(B, {self.dim})", "UniversalAdapter", 2)
        if tuple(cls.shape) != (B, self.dim):
            raise ValueError(f"UniversalAdapter: {name} must have shape ({B}, {self.dim}), got {tuple(cls.shape)}")
        return torch.cat((cls, self.cls_embed[which].to(cls.dtype).expand(B, -1)), -1).unsqueeze(1)

    def forward(self, query: Tensor, query_xy: Tensor, src_tokens: Tensor, src_hw, cls_src: Optional[Tensor] = None,
                cls_trg: Optional[Tensor] = None, trg_tokens: Optional[Tensor] = None, trg_hw=None) -> Tensor:
        fn = "UniversalAdapter"
        _float_tensor(query, "query", "(B, Q, D)", fn, 3)
        _float_tensor(query_xy, "query_xy", "(B, Q, 2)", fn, 3)
        B, Q, D = query.shape
        if D != self.dim:
            raise ValueError(f"{fn}: query must have D = {self.dim} channels, got {tuple(query.shape)}")
        if tuple(query_xy.shape) != (B, Q, 2):
            raise ValueError(f"{fn}: query_xy must have shape ({B}, {Q}, 2), got {tuple(query_xy.shape)}")
        if src_tokens.shape[0] != B:
            raise ValueError(f"{fn}: src_tokens must have batch {B}, got {tuple(src_tokens.shape)}")
        kv = [self._local(src_tokens, src_hw, "src_tokens")]
        if self.arch == "lga":
            kv += [self._cls(cls_src, 0, B, "cls_src"), self._cls(cls_trg, 1, B, "cls_trg")]
        elif self.arch == "lla":
            if trg_tokens is None or trg_hw is None:
                raise ValueError(f"{fn}: arch='lla' needs trg_tokens (B, h*w, {self.dim}) and trg_hw")
            kv.append(self._local(trg_tokens, trg_hw, "trg_tokens") + self.trg_local_embed)
        kv = torch.cat(kv, 1)
        x = torch.cat((query, self._pe(query_xy.to(query.dtype))), -1)
        for blk in self.blocks:
            x = blk(x, kv)
        out = self.out(self.norm(x))
        return query + out if self.output_residual else out


# --------------------------------------------------------------------------------------------------
# points, features, saliency
# --------------------------------------------------------------------------------------------------

def sample_features(fmap: Tensor, xy: Tensor) -> Tensor:
    """Bilinear descriptors of a map at unit-coordinate points (border padding), differentiable in both.

    Args:
        fmap ``(B, D, h, w)`` floating; xy ``(B, Q, 2)`` unit coordinates (cell j's centre at (j + 0.5)/w).
    Returns:
        ``(B, Q, D)`` in fmap's dtype.
    """
    fn = "sample_features"
    _float_tensor(fmap, "fmap", "(B, D, h, w)", fn, 4)
    _float_tensor(xy, "xy", "(B, Q, 2)", fn, 3)
    if xy.shape[0] != fmap.shape[0] or xy.shape[2] != 2:
        raise ValueError(f"{fn}: xy must have shape ({fmap.shape[0]}, Q, 2), got {tuple(xy.shape)}")
    grid = (xy.to(fmap.dtype) * 2 - 1).unsqueeze(2)                      # (B, Q, 1, 2)
    out = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[..., 0].transpose(1, 2)


def _gen_device(generator) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def sample_points(mask: Tensor, n: int, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """``n`` random points per image inside a mask, in unit coordinates.

    A cell of the ``(Hm, Wm)`` mask is drawn with probability ∝ its weight (with replacement), then a
    point uniformly inside that cell: every returned point lies in a cell of positive weight. An image
    whose mask is all zero samples uniformly over the whole image.

    Args:
        mask: ``(B, Hm, Wm)`` bool or non-negative floating weights (any resolution).
        n: points per image.
        generator: a torch.Generator (the draws happen on its device, CPU by default).
    Returns:
        ``(B, n, 2)`` float32 (x, y) in [0, 1), on ``mask``'s device.
    """
    fn = "sample_points"
    if not isinstance(mask, torch.Tensor) or mask.dim() != 3:
        raise ValueError(f"{fn}: mask must be a (B, Hm, Wm) bool or float tensor, got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"{fn}: mask must be bool or floating, got dtype {mask.dtype}")
    n = _pos_int(n, "n", fn)
    B, Hm, Wm = mask.shape
    if Hm < 1 or Wm < 1 or B < 1:
        raise ValueError(f"{fn}: mask must have B, Hm, Wm >= 1, got {tuple(mask.shape)}")
    wts = mask.detach().reshape(B, -1).to(device=_gen_device(generator), dtype=torch.float64)
    if not bool(torch.isfinite(wts).all()) or bool((wts < 0).any()):
        raise ValueError(f"{fn}: mask weights must be finite and >= 0")
    empty = wts.sum(1) <= 0
    wts = torch.where(empty[:, None], torch.ones_like(wts), wts)
    cells = torch.multinomial(wts, n, replacement=True, generator=generator)       # (B, n)
    jitter = torch.rand(B, n, 2, generator=generator, device=wts.device, dtype=torch.float64)
    x = (cells % Wm).double() + jitter[..., 0]
    y = torch.div(cells, Wm, rounding_mode="floor").double() + jitter[..., 1]
    xy = torch.stack((x / Wm, y / Hm), -1).clamp_(0.0, 1.0 - 1e-7)
    return xy.to(device=mask.device, dtype=torch.float32)


def uniform_mask(images: Tensor, outputs: BackboneOutputs) -> Tensor:
    """The whole image: ``(B, h, w)`` all True on the feature grid."""
    B, _, h, w = outputs.map.shape
    return torch.ones(B, h, w, dtype=torch.bool, device=outputs.map.device)


def cls_attention_mask(images: Tensor, outputs: BackboneOutputs, *, mass: float = 0.6) -> Tensor:
    """Saliency from the class token's attention: the smallest set of cells holding ``mass`` of it.

    Args:
        images: unused (the mask-source signature).
        outputs: :class:`BackboneOutputs` with ``cls_attn`` (B, h, w) (ViT backbones).
        mass: fraction of the (patch-normalised) attention the kept cells hold, in (0, 1].
    Returns:
        ``(B, h, w)`` bool (at least one cell per image).
    """
    fn = "cls_attention_mask"
    mass = _pos_float(mass, "mass", fn)
    if mass > 1:
        raise ValueError(f"{fn}: mass must be in (0, 1], got {mass}")
    a = outputs.cls_attn
    if a is None:
        raise ValueError(f"{fn}: the backbone outputs have no class attention (not a ViT); use mask_source='uniform' "
                         f"or 'tokencut'")
    B, h, w = a.shape
    flat = a.reshape(B, -1).float()
    flat = flat / flat.sum(1, keepdim=True).clamp_min(1e-30)
    val, idx = flat.sort(1, descending=True)
    before = val.cumsum(1) - val                      # mass of the cells ranked above
    keep_sorted = before < mass                        # keeps the first cell always
    keep = torch.zeros_like(keep_sorted).scatter(1, idx, keep_sorted)
    return keep.reshape(B, h, w)


def _largest_component_with(seed_mask: Tensor, fg: Tensor) -> Tensor:
    """4-connected component of ``fg`` (B, h, w) bool containing the True cell of ``seed_mask``."""
    comp = seed_mask & fg
    while True:
        grow = comp.clone()
        grow[:, 1:] |= comp[:, :-1]
        grow[:, :-1] |= comp[:, 1:]
        grow[:, :, 1:] |= comp[:, :, :-1]
        grow[:, :, :-1] |= comp[:, :, 1:]
        grow &= fg
        if torch.equal(grow, comp):
            return comp
        comp = grow


def tokencut_mask(images: Tensor, outputs: BackboneOutputs, *, tau: float = 0.2, eps: float = 1e-5) -> Tensor:
    """TokenCut (Wang et al., CVPR 2022) foreground on the backbone's descriptor map.

    Affinity A = 1 where cos(F_p, F_q) > τ, else ε; the second-smallest generalised eigenvector of
    (D − A)x = λDx (through the symmetric normalised Laplacian); bipartition at its mean; the side
    holding the cell of largest |x| is foreground, restricted to that cell's 4-connected component
    (TokenCut's public defaults). Deviation: TokenCut runs its own ViT-S/16 last-layer keys; here the
    method's descriptor map is used (no second network). Builds the |Ω|×|Ω| affinity per image (784²
    at 28×28): fine without gradient.

    Returns:
        ``(B, h, w)`` bool.
    """
    fn = "tokencut_mask"
    tau = float(tau)
    eps = _pos_float(eps, "eps", fn)
    fmap = outputs.map.detach().float()
    B, D, h, w = fmap.shape
    f = F.normalize(fmap.reshape(B, D, h * w).transpose(1, 2), dim=-1)
    A = f @ f.transpose(1, 2)
    A = torch.where(A > tau, torch.ones_like(A), torch.full_like(A, eps)).double()
    d = A.sum(-1)
    r = d.rsqrt()
    L = torch.eye(h * w, dtype=A.dtype, device=A.device) - r[:, :, None] * A * r[:, None, :]
    _, vecs = torch.linalg.eigh(L)
    x = (vecs[:, :, 1] * r)                                                    # generalised eigenvector
    part = x > x.mean(1, keepdim=True)
    seed = x.abs().argmax(1)
    flip = ~part.gather(1, seed[:, None])[:, 0]
    part = torch.where(flip[:, None], ~part, part)
    seed_mask = torch.zeros_like(part).scatter(1, seed[:, None], True)
    return _largest_component_with(seed_mask.reshape(B, h, w), part.reshape(B, h, w))


# --------------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------------

def row_logsumexp(rows: Tensor, cols: Tensor, tau: float, *, backend: str = "auto") -> Tensor:
    """Streamed ``log Σ_v exp(cos(rows_q, cols_v)/τ)`` per row, differentiable w.r.t. rows and cols.

    No op returns the log-sum-exp directly; :func:`semcorr_fast.ops.rowsoftmax_distill` with a
    *uniform* teacher (all-zero teacher features: cos = 0) gives the cross-entropy
    CE = −(1/N) Σ_v s_v/τ + lse, and the mean term is exact in O(N·C):
    (1/N) Σ_v cos(r, c_v) = r̂ · mean_v ĉ_v. So ``lse = CE + r̂·c̄/τ`` with no Q×N matrix, forward or
    backward (the op's backward recomputes tiles).

    Args:
        rows ``(B, Q, C)``, cols ``(B, N, C)`` floating, same dtype; tau > 0.
    Returns:
        ``(B, Q)`` fp32 (fp64 for fp64).
    """
    fn = "row_logsumexp"
    _float_tensor(rows, "rows", "(B, Q, C)", fn, 3)
    _float_tensor(cols, "cols", "(B, N, C)", fn, 3)
    tau = _pos_float(tau, "tau", fn)
    B, Q, _ = rows.shape
    N = cols.shape[1]
    zq = rows.new_zeros(B, Q, 1)
    zn = cols.new_zeros(B, N, 1)
    ce = ops.rowsoftmax_distill(zq, zn, rows, cols, 1.0, tau, loss="ce", backend=backend)
    mean_c = F.normalize(cols, dim=-1, eps=1e-12).mean(1, keepdim=True)      # (B, 1, C)
    mean_s = (F.normalize(rows, dim=-1, eps=1e-12) * mean_c).sum(-1) / tau
    return ce + mean_s.to(ce.dtype)


def contrastive_loss(f_u: Tensor, g: Tensor, src_tokens: Tensor, trg_tokens: Tensor, tau: float = 0.1, *,
                     negatives: str = "both", positive_in_denominator: bool = True,
                     backend: str = "auto") -> Tensor:
    """The paper's contrastive distillation L_d (Eq. 2) per point.

    ``L = −s⁺ + log(exp(s⁺) + Σ_{h∈H} exp(cos(h, g)/τ))`` (``positive_in_denominator``, default) or
    ``L = −s⁺ + log Σ_{h∈H} exp(cos(h, g)/τ)`` (Eq. 2 literally), s⁺ = cos(f_u, g)/τ, H = Φ(I) ∪ Φ(J)
    (``"both"``), Φ(I) (``"source"``, L_dS) or Φ(J) (``"target"``, L_dT). The sum over H is
    :func:`row_logsumexp` (streamed).

    Args:
        f_u ``(B, Q, C)``: raw source descriptors (teacher); g ``(B, Q, C)``: raw target descriptors at
        the predicted matches; src_tokens ``(B, Ns, C)`` = Φ(I); trg_tokens ``(B, Nt, C)`` = Φ(J).
    Returns:
        ``(B, Q)`` float32 (fp64 for fp64). Differentiable w.r.t. every input.
    """
    fn = "contrastive_loss"
    for name, t in (("f_u", f_u), ("g", g), ("src_tokens", src_tokens), ("trg_tokens", trg_tokens)):
        _float_tensor(t, name, "(B, N, C)", fn, 3)
    if f_u.shape != g.shape:
        raise ValueError(f"{fn}: f_u and g must have the same shape (B, Q, C), got {tuple(f_u.shape)} and "
                         f"{tuple(g.shape)}")
    _choice(negatives, "negatives", NEGATIVES, fn)
    tau = _pos_float(tau, "tau", fn)
    cols = {"both": lambda: torch.cat((src_tokens, trg_tokens), 1), "source": lambda: src_tokens,
            "target": lambda: trg_tokens}[negatives]()
    lse = row_logsumexp(g, cols, tau, backend=backend)
    pos = (F.cosine_similarity(f_u, g, dim=-1, eps=1e-12) / tau).to(lse.dtype)
    if positive_in_denominator:
        lse = torch.logaddexp(lse, pos)
    return lse - pos


def _masked_mean(x: Tensor, m: Tensor) -> Tensor:
    m = m.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


def warp_consistency_loss(a: Tensor, b: Tensor, c: Tensor, *, mask_a: Optional[Tensor] = None,
                          mask_bc: Optional[Tensor] = None, balance: str = "batch",
                          eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """L_c = a + β·(b + c), β = stopgrad(a / (b + c)) (Eq. 4), over masked points.

    Args:
        a, b, c: ``(B, Q)`` per-point squared errors (cycle; I→G(I); G(I)→I).
        mask_a, mask_bc: ``(B, Q)`` bool: points where a (resp. b and c) is defined (default all).
        balance: ``"batch"``: β = sg(ā / (b̄ + c̄)) from the masked means, L_c = ā + β(b̄ + c̄);
            ``"point"``: β_u = sg(a_u / (b_u + c_u + eps)), L_c = mean over points valid for both masks
            of a_u + β_u(b_u + c_u).
    Returns:
        ``(L_c 0-dim, β 0-dim)`` (per-point mode reports the mean β). β never carries a gradient.
    """
    fn = "warp_consistency_loss"
    _choice(balance, "balance", BALANCES, fn)
    for name, t in (("a", a), ("b", b), ("c", c)):
        _float_tensor(t, name, "(B, Q)", fn, 2)
    if not (a.shape == b.shape == c.shape):
        raise ValueError(f"{fn}: a, b, c must have the same (B, Q) shape, got {tuple(a.shape)}, {tuple(b.shape)}, "
                         f"{tuple(c.shape)}")
    ones = torch.ones_like(a, dtype=torch.bool)
    ma = ones if mask_a is None else mask_a
    mbc = ones if mask_bc is None else mask_bc
    for name, m in (("mask_a", ma), ("mask_bc", mbc)):
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != a.shape:
            raise ValueError(f"{fn}: {name} must be a bool tensor of shape {tuple(a.shape)}")
    if balance == "batch":
        A = _masked_mean(a, ma)
        BC = _masked_mean(b, mbc) + _masked_mean(c, mbc)
        beta = (A / (BC + eps)).detach()
        return A + beta * BC, beta
    m = ma & mbc
    beta_u = (a / (b + c + eps)).detach()
    return _masked_mean(a + beta_u * (b + c), m), _masked_mean(beta_u, m).detach()


# --------------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------------

@register_method("universal")
class UniversalCorrespondence(Method):
    """Shtedritski et al.'s adapter + contrastive/cycle/warp losses on a frozen backbone (see the module doc).

    Args (``method_args``; defaults are the paper's values where it gives them):
        tau_d: contrastive temperature (0.1). tau_h: matcher temperature in training (0.05).
        lam: weight λ of L_c (5). contrastive: include L_d (False = the "L_c only" ablation).
        n_points: source points per image (200).
        layers, heads, ffn_dim, pos_dim, arch, output_residual, pe_max_freq, dropout: the adapter
            (:class:`UniversalAdapter`; 4, 8, 1024, 64, "lga").
        cycle: term a's path, one of :data:`CYCLES` (default ``"i_j_gi"``).
        negatives, positive_in_denominator: :func:`contrastive_loss`.
        balance: :func:`warp_consistency_loss` (``"batch"``).
        mask_source: ``"auto"``, ``"cls_attention"``, ``"tokencut"``, ``"uniform"`` or a callable
            ``(images, BackboneOutputs) -> (B, Hm, Wm)``. saliency_mass: for ``"cls_attention"`` (0.6).
        cls_source: :func:`backbone_outputs`.
        warp_preset, warp_scale, color: the synthetic transformation G (:mod:`semcorr_fast.warps`
            preset ``"universal"``: jittered 10×10 TPS + rescaled crop; colour jitter when ``color``).
        pair_schedule: the pair curriculum ((first step, k), ...) for the data side
            (:mod:`semcorr_fast.curation`); stored as :attr:`pair_schedule`, logged as ``pair_k``.
        test_grid: arg-max grid at test time: None = the feature grid (the paper), or S to upsample the
            target map bilinearly to S×S first (Demystifying's protocol uses 128).
        backend: the ops backend (``"auto"``; ``"reference"`` = the materialising oracle).
    """

    def __init__(self, backbone, *, tau_d: float = 0.1, tau_h: float = 0.05, lam: float = 5.0,
                 contrastive: bool = True, n_points: int = 200, layers: int = 4, heads: int = 8,
                 ffn_dim: int = 1024, pos_dim: int = 64, arch: str = "lga", output_residual: bool = True,
                 pe_max_freq: float = 16.0, dropout: float = 0.0, cycle: str = "i_j_gi", negatives: str = "both",
                 positive_in_denominator: bool = True, balance: str = "batch", mask_source="auto",
                 saliency_mass: float = 0.6, cls_source: str = "auto", warp_preset="universal",
                 warp_scale: float = 1.0, color: bool = True, pair_schedule=DEFAULT_PAIR_SCHEDULE,
                 test_grid: Optional[int] = None, backend: str = "auto"):
        super().__init__(backbone)
        fn = "universal"
        self.tau_d = _pos_float(tau_d, "tau_d", fn)
        self.tau_h = _pos_float(tau_h, "tau_h", fn)
        self.lam = _pos_float(lam, "lam", fn, allow_zero=True)
        for name, v in (("contrastive", contrastive), ("positive_in_denominator", positive_in_denominator),
                        ("color", color)):
            if not isinstance(v, bool):
                raise TypeError(f"{fn}: {name} must be a bool, got {v!r}")
        if not contrastive and self.lam == 0:
            raise ValueError(f"{fn}: contrastive=False with lam=0 leaves no loss")
        self.contrastive = contrastive
        self.positive_in_denominator = positive_in_denominator
        self.color = color
        self.n_points = _pos_int(n_points, "n_points", fn)
        self.cycle = _choice(cycle, "cycle", CYCLES, fn)
        self.negatives = _choice(negatives, "negatives", NEGATIVES, fn)
        self.balance = _choice(balance, "balance", BALANCES, fn)
        self.cls_source = _choice(cls_source, "cls_source", CLS_SOURCES, fn)
        if callable(mask_source):
            self.mask_fn: Callable = mask_source
            self.mask_source = getattr(mask_source, "__name__", "callable")
        else:
            self.mask_source = _choice(mask_source, "mask_source", MASK_SOURCES, fn)
            self.mask_fn = None
        self.saliency_mass = _pos_float(saliency_mass, "saliency_mass", fn)
        if self.saliency_mass > 1:
            raise ValueError(f"{fn}: saliency_mass must be in (0, 1], got {saliency_mass}")
        if self.mask_source == "cls_attention" and not _is_vit(backbone):
            raise ValueError(f"{fn}: mask_source='cls_attention' needs a ViT backbone; use 'auto', 'uniform' or "
                             f"'tokencut'")
        self.warp_preset = warps.get_preset(warp_preset)
        self.warp_scale = _pos_float(warp_scale, "warp_scale", fn, allow_zero=True)
        from ..curation import check_schedule  # noqa: PLC0415  (curation imports this module lazily)
        self.pair_schedule = check_schedule(pair_schedule, f"{fn}: pair_schedule")
        self.test_grid = None if test_grid is None else _pos_int(test_grid, "test_grid", fn)
        if not isinstance(backend, str):
            raise TypeError(f"{fn}: backend must be a str, got {backend!r}")
        self.backend = backend
        self.adapter = UniversalAdapter(self.dim, layers=layers, heads=heads, ffn_dim=ffn_dim, pos_dim=pos_dim,
                                        arch=arch, output_residual=output_residual, pe_max_freq=pe_max_freq,
                                        dropout=dropout)
        self.arch = self.adapter.arch

    # ------------------------------------------------------------------ features
    def outputs(self, images: Tensor) -> BackboneOutputs:
        """:func:`backbone_outputs` of the frozen backbone (no gradient when it is frozen)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return backbone_outputs(self.backbone, images, cls_source=self.cls_source)

    def descriptor(self, images: Tensor) -> Tensor:
        """The raw backbone map ``(B, D, h, w)`` (the targets g_v of the matcher). The adapted query
        needs the pair: see :meth:`adapted_descriptor` and :meth:`match_points`."""
        return self.backbone(images)

    def saliency(self, images: Tensor, out: BackboneOutputs) -> Tensor:
        """The point-sampling mask of ``images``: ``(B, Hm, Wm)`` bool or weights (see ``mask_source``)."""
        if self.mask_fn is not None:
            m = self.mask_fn(images, out)
            if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.shape[0] != images.shape[0]:
                raise ValueError(f"universal: mask_source callable must return a (B={images.shape[0]}, Hm, Wm) "
                                 f"tensor, got {getattr(m, 'shape', type(m).__name__)}")
            return m
        src = self.mask_source
        if src == "auto":
            src = "cls_attention" if out.cls_attn is not None else "uniform"
        if src == "cls_attention":
            return cls_attention_mask(images, out, mass=self.saliency_mass)
        if src == "tokencut":
            return tokencut_mask(images, out)
        return uniform_mask(images, out)

    # ------------------------------------------------------------------ matching
    def adapt(self, src: BackboneOutputs, trg: BackboneOutputs, query_xy: Tensor,
              query: Optional[Tensor] = None) -> Tensor:
        """Adapted queries f̂ ``(B, Q, D)`` of source points ``query_xy`` (B, Q, 2) (unit coordinates)
        for the pair (src, trg); ``query`` defaults to the bilinear source descriptors at the points."""
        if query is None:
            query = sample_features(src.map, query_xy)
        s_tok, s_hw = ops.flatten_map(src.map)
        t_tok, t_hw = (ops.flatten_map(trg.map) if self.arch == "lla" else (None, None))
        return self.adapter(query, query_xy, s_tok, s_hw, src.cls, trg.cls, t_tok, t_hw)

    def transfer(self, src: BackboneOutputs, trg: BackboneOutputs, query_xy: Tensor,
                 query: Optional[Tensor] = None) -> Tensor:
        """v̂(u; I, J): soft-argmax (τ_H) of the adapted queries over the target grid → ``(B, Q, 2)`` unit
        coordinates. Differentiable w.r.t. the adapter, ``query_xy`` and ``query``."""
        fq = self.adapt(src, trg, query_xy, query)
        t_tok, (h, w) = ops.flatten_map(trg.map)
        cells = ops.soft_argmax(fq, t_tok.to(fq.dtype), self.tau_h, (h, w), backend=self.backend)
        return (cells + 0.5) / cells.new_tensor([w, h])

    def _transfer_many(self, hops):
        """Several independent hops of equal Q in one adapter + soft-argmax call (batch-concatenated)."""
        src = BackboneOutputs(torch.cat([h[0].map for h in hops]), torch.cat([h[0].cls for h in hops]))
        trg = BackboneOutputs(torch.cat([h[1].map for h in hops]), torch.cat([h[1].cls for h in hops]))
        xy = torch.cat([h[2] for h in hops])
        q = torch.cat([h[3] if h[3] is not None else sample_features(h[0].map, h[2]) for h in hops])
        return self.transfer(src, trg, xy, q).chunk(len(hops))

    @torch.no_grad()
    def match_points(self, src_images: Tensor, trg_images: Tensor, src_xy: Tensor) -> Tensor:
        """Test-time matches (arg-max, τ_H → 0) of source pixels: ``src_xy (B, K, 2)`` (x, y) pixels of
        ``src_images (B, 3, H, W)`` → ``(B, K, 2)`` pixels of ``trg_images``; NaN rows stay NaN.
        With ``test_grid = S`` the target map is bilinearly upsampled to S×S before the arg-max."""
        fn = "universal.match_points"
        _float_tensor(src_xy, "src_xy", "(B, K, 2)", fn, 3)
        if src_xy.shape[0] != src_images.shape[0] or src_xy.shape[2] != 2:
            raise ValueError(f"{fn}: src_xy must have shape ({src_images.shape[0]}, K, 2), got {tuple(src_xy.shape)}")
        H, W = src_images.shape[-2:]
        Ht, Wt = trg_images.shape[-2:]
        s, t = self.outputs(src_images), self.outputs(trg_images)
        xy = src_xy.to(s.map.device, torch.float32)
        bad = ~torch.isfinite(xy).all(-1)
        u = ((torch.nan_to_num(xy, nan=0.0) + 0.5) / xy.new_tensor([W, H])).clamp(0, 1)
        fq = self.adapt(s, t, u)
        tmap = t.map
        if self.test_grid is not None:
            tmap = F.interpolate(tmap, size=(self.test_grid, self.test_grid), mode="bilinear", align_corners=False)
        t_tok, (h, w) = ops.flatten_map(tmap)
        _, idx = ops.match_topk(fq, t_tok, 1, backend=self.backend)
        idx = idx[..., 0]
        cell = torch.stack(((idx % w).float(), torch.div(idx, w, rounding_mode="floor").float()), -1)
        px = (cell + 0.5) / cell.new_tensor([w, h]) * cell.new_tensor([Wt, Ht]) - 0.5
        return px.masked_fill(bad.unsqueeze(-1), float("nan")).to(src_xy.device)

    @torch.no_grad()
    def adapted_descriptor(self, src_images: Tensor, trg_images: Tensor) -> Tensor:
        """Dense adapted source map for a target: every source cell centre as a query → ``(B, D, h, w)``."""
        s, t = self.outputs(src_images), self.outputs(trg_images)
        B, D, h, w = s.map.shape
        xy = _grid_centres(h, w, s.map.device, s.map.dtype).expand(B, -1, -1)
        tok, _ = ops.flatten_map(s.map)
        return self.adapt(s, t, xy, tok).transpose(1, 2).reshape(B, D, h, w)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        """One step of L = L_d + λ·L_c on ``batch["src"]`` (I), ``batch["trg"]`` (J) and G(I).

        G is drawn from ``batch["generator"]``; so are the 200 points per image (inside the saliency
        mask of I). Logged: ``loss_d``, ``loss_c``, ``a``, ``b``, ``c``, ``beta``, ``warp_valid``
        (fraction of points with G(u) inside G(I)) and ``pair_k`` (the curriculum's k at ``step``).
        """
        fn = "universal.training_step"
        if not isinstance(batch, dict) or "src" not in batch or "trg" not in batch:
            raise KeyError(f"{fn}: batch must be a dict with 'src' and 'trg' (B, 3, H, W) images")
        I, J = batch["src"], batch["trg"]
        if not isinstance(I, torch.Tensor) or not isinstance(J, torch.Tensor) or I.dim() != 4 or I.shape != J.shape:
            raise ValueError(f"{fn}: batch['src'] and batch['trg'] must be (B, 3, H, W) tensors of one shape, got "
                             f"{getattr(I, 'shape', None)} and {getattr(J, 'shape', None)}")
        gen = batch.get("generator")
        B, _, H, W = I.shape
        dev = I.device
        Q = self.n_points
        # --- G(I)
        warp = warps.random_warp(B, H, W, kind="tps+affine", preset=self.warp_preset, scale=self.warp_scale,
                                 generator=gen, device=dev)
        GI = warp.apply(I)
        if self.color:
            GI = warps.color_jitter(GI, preset=self.warp_preset, generator=gen)
        GI = GI.clamp(0, 1)
        # --- frozen features of I, J, G(I) in one pass
        outs = self.outputs(torch.cat((I, J, GI)))
        oI, oJ, oG = outs[:B], outs[B:2 * B], outs[2 * B:]
        fdev = oI.map.device
        # --- points u in the saliency of I, and G(u)
        u = sample_points(self.saliency(I, oI), Q, generator=gen).to(fdev)
        size = u.new_tensor([W, H])
        gp, ok = warp.points((u * size - 0.5).to(dev), return_ok=True)
        Gu = ((gp.to(fdev) + 0.5) / size)
        ok = ok.to(fdev) & torch.isfinite(Gu).all(-1) & (Gu >= 0).all(-1) & (Gu <= 1).all(-1)
        Gu = torch.where(ok.unsqueeze(-1), Gu, torch.full_like(Gu, 0.5)).clamp(0, 1)
        # --- first hops: I→J, I→G(I), G(I)→I (and G(I)→J for the W-bipath cycle)
        hops = [(oI, oJ, u, None), (oI, oG, u, None), (oG, oI, Gu, None)]
        if self.cycle == "gi_j_i":
            hops.append((oG, oJ, Gu, None))
        res = self._transfer_many(hops)
        v1, vb, vc = res[:3]
        logs: dict[str, Tensor] = {}
        loss = v1.new_zeros(())
        if self.contrastive:
            g = sample_features(oJ.map, v1)
            f_u = sample_features(oI.map, u)
            ld = contrastive_loss(f_u, g, ops.flatten_map(oI.map)[0], ops.flatten_map(oJ.map)[0], self.tau_d,
                                  negatives=self.negatives, positive_in_denominator=self.positive_in_denominator,
                                  backend=self.backend).mean()
            loss = loss + ld
            logs["loss_d"] = ld.detach()
        if self.lam > 0:
            if self.cycle == "gi_j_i":
                v2 = self.transfer(oJ, oI, res[3])
                a, mask_a = ((u - v2) ** 2).sum(-1), ok
            else:
                end = oG if self.cycle == "i_j_gi" else oI
                v2 = self.transfer(oJ, end, v1)
                goal, mask_a = (Gu, ok) if self.cycle in ("i_j_gi", "literal") else (u, torch.ones_like(ok))
                a = ((goal - v2) ** 2).sum(-1)
            b = ((Gu - vb) ** 2).sum(-1)
            c = ((u - vc) ** 2).sum(-1)
            lc, beta = warp_consistency_loss(a, b, c, mask_a=mask_a, mask_bc=ok, balance=self.balance)
            loss = loss + self.lam * lc
            logs.update(loss_c=lc.detach(), a=_masked_mean(a, mask_a).detach(), b=_masked_mean(b, ok).detach(),
                        c=_masked_mean(c, ok).detach(), beta=beta)
        logs["warp_valid"] = ok.float().mean()
        from ..curation import neighbours_at  # noqa: PLC0415  (curation imports this module)
        logs["pair_k"] = torch.tensor(float(neighbours_at(int(step), self.pair_schedule)))
        return {"loss": loss, **logs}

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", arch={self.arch!r}, cycle={self.cycle!r}, tau_d={self.tau_d}, "
                f"tau_h={self.tau_h}, lam={self.lam}, n_points={self.n_points}, mask_source={self.mask_source!r}")
