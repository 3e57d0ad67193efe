"""Every projection of "Demystifying Unsupervised Semantic Correspondence Estimation" (Aygün & Mac
Aodha, ECCV 2022) on a frozen backbone Ψ, with a learned or fitted 1×1 convolution ρ (D → 256, bias).

Source: ``/work/shared/notes/seed_demystifying.md`` ([paper] main text, [supp] appendix, [code] the
released repository). Registered names:

==============  ============================================================================  ==========
name            what                                                                          loss op
==============  ============================================================================  ==========
``none``        raw Ψ features (no ρ)                                                         —
``random``      ρ at PyTorch's default random init                                            —
``pca``         ρ = first k PCA components of Ψ (fitted on training images)                   —
``nmf``         ρ = k NMF components of Ψ                                                     —
``supervised``  ρ trained on GT keypoint pairs (upper bound): Σ_m Σ_v p(v|s_m) d(v, t_m)      expected_cost / ncc (K rows)
``eq``          dense equivariance (Eq. 1): E_p[‖g u − v‖^p] between an image and its warp    expected_cost
``dve``         descriptor vector exchange: the query is rebuilt from an auxiliary image      softmax_aggregate + expected_cost
``cl``          CL: Eq. 1 on an image with itself, g = identity                               expected_cost
``lead``        LEAD (Eq. 3): CE between teacher softmax(Ψ) and student softmax(ρΨ)           rowsoftmax_distill("ce")
``asym``        ASYM (Eq. 4, the paper's method): Σ_v (a − b)², τ1 = 0.2 teacher, τ2 = 0.4     rowsoftmax_distill("mse")
==============  ============================================================================  ==========

Every loss goes through the fused ops of :mod:`semcorr_fast.ops` (no Ns×Nt matrix; the supervised
``"l1"`` distance builds only the K×N keypoint rows); ``loss_backend`` (``"auto"``, ``"cpu"``,
``"reference"``, ``"triton"``, ``"cuda"``) is passed to them unchanged.

Temperatures (``temperature=``)
-------------------------------
The ops take τ on the cosine (logits = cos/τ). The released code applies a logit scale ``t``
either to *each* ℓ2-normalised vector (logits = t²·cos, τ = 1/t²: EQ, DVE, ASYM, supervised) or once
to the cosine (τ = 1/t: CL, LEAD) [notes §9.1, :func:`semcorr_fast.ops.tau_from_logit_scale`].

============  ==============  ========================  ==========================  ====================
method        ``"paper"``     code convention           ``"code"`` (t = 1/τ_paper)  ``"code_cli"``
============  ==============  ========================  ==========================  ====================
eq            0.05            per vector (×20 fixed)    1/400                       1/400
dve           0.05            per vector (t = t1)       1/400                       t1 = 10: 1/100
cl            0.14            once (t = t1)             0.14                        t1 = 10: 0.1
lead          0.05            once (t = t1)             0.05                        t1 = 10: 0.1
asym          0.2 / 0.4       per vector (t1, t2)       0.04 / 0.16                 10, 5: 1/100, 1/25
supervised    — (none given)  per vector (×5 fixed)     1/25                        1/25
============  ==============  ========================  ==========================  ====================

``"paper"`` (the default) is the paper's Eq. 2; ``"code"`` is what the released code computes when run
with the paper's τ as its logit scale t = 1/τ (EQ's hard-coded ×20 is exactly 1/0.05); ``"code_cli"``
uses the code's command-line defaults (``--t1 10 --t2 5``). The paper gives no τ for the supervised
projection, so every convention uses the code's fixed ×5 per vector (τ = 1/25). Which of these
produced Table 2 is not recorded; ``tau=`` (on the cosine) or ``logit_scale=`` (t, applied with the
method's code convention) set any other value.

Other paper/code differences (defaults in bold)
-----------------------------------------------
* EQ/DVE/CL distance ``‖·‖^p``: paper p = 1, code **p = 0.5** (hard-coded in the code that produced
  the paper's numbers). Distances in **canvas pixels** (code: input-pixel units) or grid cells
  (``distance_unit``).
* Normalisation: the code's **mean over rows** (1/(B·H·W)), not the paper's 1/|Ω|²; ASYM's squared
  difference ×**100** (code) — ``loss_scale``.
* Grid: features bilinearly upsampled to **64×64** before ρ (paper, code); EQ/DVE **32×32** (code).
* EQ/DVE pairing: ``pairing="correct"`` (**default**: each image with its own warp) or ``"code"``,
  the released code's batching, which pairs different images at batch > 1 (notes §9.4; see
  :func:`pairing_indices`). DVE's auxiliary image is pair (k + P/2) mod P as in the code.
* LEAD's ``+1e-8`` inside the log is dropped (the op computes log-softmax exactly).
* Supervised: code **L1** distance (``distance="l1"``) vs the paper's ‖·‖ (``"l2"``); source rows are
  the cells containing the source keypoints, targets the continuous cell coordinates of the target
  keypoints (the code truncates both to integer cells).

Descriptors for evaluation: ``descriptor(images) = ρ(Ψ(images))`` on the backbone's own grid. The code
upsamples Ψ to 128² *before* ρ; since ρ is a 1×1 convolution and bilinear weights sum to 1, the
``demystifying`` matcher's 128² upsampling of ρ(Ψ) gives the same descriptors.
"""
from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops, warps
from . import nets  # noqa: F401  (registers the "smallcnn" backbone)
from . import register_method
from .base import Method
from .projections import NEGATIVE_MODES, fit_nmf, fit_pca

__all__ = [
    "DemystifyingMethod", "NoneProjection", "RandomProjection", "PCAProjection", "NMFProjection",
    "SupervisedProjection", "EQ", "DVE", "CL", "LEAD", "ASYM", "TEMPERATURES", "CONVENTIONS",
    "demystifying_tau", "pairing_indices", "dve_aux_indices", "cell_coordinates", "warp_cell_targets",
]

_BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
CONVENTIONS = ("paper", "code", "code_cli")
PAIRINGS = ("correct", "code")

#: per method: (paper τ on the cosine (None: the paper gives none), code applies t per vector?,
#: the code's fixed / CLI-default logit scales)
TEMPERATURES: dict[str, tuple[tuple, bool, tuple]] = {
    "eq": ((0.05,), True, (20.0,)),
    "dve": ((0.05,), True, (10.0,)),
    "cl": ((0.14,), False, (10.0,)),
    "lead": ((0.05,), False, (10.0,)),
    "asym": ((0.2, 0.4), True, (10.0, 5.0)),
    "supervised": ((None,), True, (5.0,)),
}


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------

def _choice(v, name: str, options, fn: str):
    if v not in options:
        raise ValueError(f"{fn}: {name} must be one of {tuple(options)}, got {v!r}")
    return v


def _pos(v, name: str, fn: str) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)) or float(v) <= 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {v!r}")
    return float(v)


def _pos_int(v, name: str, fn: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{fn}: {name} must be an int >= 1, got {v!r}")
    return int(v)


def _flag(v, name: str, fn: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{fn}: {name} must be a bool, got {v!r}")
    return v


def _as_tuple(v, n: int, name: str, fn: str) -> tuple[float, ...]:
    vals = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if len(vals) != n:
        raise ValueError(f"{fn}: {name} must be {'one number' if n == 1 else f'{n} numbers (teacher, student)'}, "
                         f"got {v!r}")
    return tuple(_pos(x, name, fn) for x in vals)


def demystifying_tau(method: str, temperature: str = "paper", *, tau=None, logit_scale=None) -> tuple[float, ...]:
    """The softmax temperature(s) on the cosine (logits = cos/τ) a method uses; see the module table.

    Args:
        method: one of ``TEMPERATURES`` (``"eq"``, ``"dve"``, ``"cl"``, ``"lead"``, ``"asym"``,
            ``"supervised"``).
        temperature: ``"paper"``, ``"code"`` or ``"code_cli"``.
        tau: explicit τ on the cosine (ASYM: ``(τ_teacher, τ_student)``); overrides ``temperature``.
        logit_scale: explicit code-style scale t (ASYM: ``(t1, t2)``), applied with the method's code
            convention (τ = 1/t² per vector, 1/t once); overrides ``temperature``.
    Returns:
        ``(τ,)``, or ``(τ_teacher, τ_student)`` for ASYM.

    >>> demystifying_tau("eq", "code")
    (0.0025,)
    >>> [round(t, 6) for t in demystifying_tau("asym", "code")]
    [0.04, 0.16]
    """
    fn = "demystifying_tau"
    _choice(method, "method", TEMPERATURES, fn)
    paper, per_vector, cli = TEMPERATURES[method]
    n = len(paper)
    if tau is not None and logit_scale is not None:
        raise ValueError(f"{fn}: give tau or logit_scale, not both (got tau={tau!r}, logit_scale={logit_scale!r})")
    if tau is not None:
        return _as_tuple(tau, n, "tau", fn)
    if logit_scale is not None:
        ts = _as_tuple(logit_scale, n, "logit_scale", fn)
        return tuple(ops.tau_from_logit_scale(t, per_vector=per_vector) for t in ts)
    _choice(temperature, "temperature", CONVENTIONS, fn)
    if method == "supervised" or temperature == "code_cli" or (method == "eq" and temperature == "code"):
        return tuple(ops.tau_from_logit_scale(t, per_vector=per_vector) for t in cli)
    if temperature == "paper":
        return tuple(float(t) for t in paper)
    return tuple(ops.tau_from_logit_scale(1.0 / t, per_vector=per_vector) for t in paper)


# --------------------------------------------------------------------------------------------------
# index maps and coordinates
# --------------------------------------------------------------------------------------------------

def pairing_indices(B: int, pairing: str = "correct", device=None) -> tuple[Tensor, Tensor]:
    """Which features EQ/DVE compare, for a batch of ``B`` items (``P = 2B`` images: the ``src`` items
    are images ``0..B-1``, the ``trg`` items ``B..2B-1``; image ``j`` has warp ``j``).

    The feature stack is ``[query views of images 0..P-1, target views of images 0..P-1]``: index
    ``j`` is the warped view x′ of image j (the one the warp's sampling grid is indexed by), ``P + j``
    its unwarped view x. Pair ``k`` compares ``stack[q[k]]`` (queries) with ``stack[t[k]]``
    (targets) under warp ``k``.

    * ``"correct"``: ``q = [0..P-1]``, ``t = [P..2P-1]``: each image with its own warp.
    * ``"code"``: the released code concatenates ``[src view1, src view2, trg view1, trg view2]``
      (four blocks of B) and pairs entries ``0::2`` with ``1::2`` under ``[src grids, trg grids]``. At
      B = 1 that is correct; at B > 1 pair k compares *different* images (e.g. pair 0: view 1 of
      src 0 vs view 1 of src 1 under src 0's warp), notes §9.4.

    Returns ``(q, t)``: two ``(P,)`` int64 tensors of indices into the ``2P`` stack.

    >>> pairing_indices(2, "code")
    (tensor([0, 4, 2, 6]), tensor([1, 5, 3, 7]))
    """
    fn = "pairing_indices"
    B = _pos_int(B, "B", fn)
    _choice(pairing, "pairing", PAIRINGS, fn)
    P = 2 * B
    if pairing == "correct":
        q = torch.arange(P)
        t = P + torch.arange(P)
    else:
        j = torch.arange(B)
        stack = torch.cat([j, P + j, B + j, P + B + j])  # [src view1, src view2, trg view1, trg view2]
        q, t = stack[0::2].clone(), stack[1::2].clone()
    return q.to(device), t.to(device)


def dve_aux_indices(P: int, device=None) -> Tensor:
    """DVE's auxiliary pair for each of ``P`` pairs: ``(k + P // 2) mod P`` (the code's choice; with
    ``pairing="correct"`` the auxiliary of src item b is trg item b, a different random image)."""
    P = _pos_int(P, "P", "dve_aux_indices")
    return ((torch.arange(P) + P // 2) % P).to(device)


def cell_coordinates(hw, device=None, dtype=torch.float32) -> Tensor:
    """``(h·w, 2)`` cell coordinates (x, y) of an ``(h, w)`` grid in row-major order (cell centres at
    the integers), the ops' convention."""
    h, w = hw
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype),
                            indexing="ij")
    return torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)


def warp_cell_targets(warp: warps.Warp, hw) -> tuple[Tensor, Tensor]:
    """Where each cell of the warped image's ``(h, w)`` feature grid comes from in the source grid.

    ``warp`` is a :class:`semcorr_fast.warps.Warp` (a backward map: warped pixel → source pixel).
    Cell centres are mapped in the resolution-free normalised frame, so the result does not depend on
    the image size. Returns ``target_xy (B, h·w, 2)`` source-grid cell coordinates (x, y) and
    ``inside (B, h·w)`` bool (the source location lies on the source grid, ``[-0.5, w-0.5] ×
    [-0.5, h-0.5]``).
    """
    if not isinstance(warp, warps.Warp):
        raise TypeError(f"warp_cell_targets: warp must be a semcorr_fast.warps.Warp, got {type(warp).__name__}")
    h, w = hw
    cells = cell_coordinates((h, w), warp.device, warp.dtype)
    q = warps.pixel_to_norm(cells, h, w).unsqueeze(0).expand(warp.B, -1, -1)
    txy = warps.norm_to_pixel(warp.map_norm(q), h, w).float()
    inside = (txy[..., 0] >= -0.5) & (txy[..., 0] <= w - 0.5) & (txy[..., 1] >= -0.5) & (txy[..., 1] <= h - 0.5)
    return txy, inside


# --------------------------------------------------------------------------------------------------
# shared base
# --------------------------------------------------------------------------------------------------

def _make_rho(D: int, k: int, seed, device) -> nn.Conv2d:
    """1×1 Conv2d(D → k, bias), PyTorch's default init (weight and bias ~ U(±1/√D)), seeded if ``seed``."""
    conv = nn.Conv2d(D, k, 1, bias=True)
    if seed is not None:
        g = torch.Generator().manual_seed(int(seed))
        bound = 1.0 / math.sqrt(D)
        with torch.no_grad():
            conv.weight.uniform_(-bound, bound, generator=g)
            conv.bias.uniform_(-bound, bound, generator=g)
    return conv.to(device)


def _backbone_device(backbone) -> torch.device:
    for t in backbone.parameters():
        return t.device
    for t in backbone.buffers():
        return t.device
    return torch.device("cpu")


class DemystifyingMethod(Method):
    """Shared machinery: Ψ on a training grid, the projection ρ, temperatures, batch checks.

    Args (common to every subclass; each subclass lists its own defaults):
        backbone: a :mod:`semcorr_fast.backbones` model (``dim`` D, ``stride``, ``canvas``).
        proj_dim: output channels of ρ (256 in the paper).
        grid: training grid side (Ψ bilinearly upsampled to ``grid×grid``, ``align_corners=False``).
        temperature / tau / logit_scale: see :func:`demystifying_tau`.
        loss_backend: ``backend=`` of the loss ops.
        train_backbone: unfreeze the backbone and train it end to end (the ``smallcnn`` demos).
        init_seed: seed of ρ's random init (None: the global RNG).
    """

    kind: str = ""          # key into TEMPERATURES (losses) or "" (fixed projections)
    has_rho: bool = True

    def _setup(self, *, proj_dim=256, grid=64, temperature="paper", tau=None, logit_scale=None,
               loss_backend="auto", train_backbone=False, init_seed=0, trainable_rho=True):
        fn = type(self).__name__
        self.train_backbone = _flag(train_backbone, "train_backbone", fn)
        if self.train_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(True)
            self.backbone.train()
        self.loss_backend = _choice(loss_backend, "loss_backend", _BACKENDS, fn)
        self.train_side = _pos_int(grid, "grid", fn)
        self.temperature = _choice(temperature, "temperature", CONVENTIONS, fn)
        self.taus = demystifying_tau(self.kind, temperature, tau=tau, logit_scale=logit_scale) if self.kind else ()
        if init_seed is not None and (isinstance(init_seed, bool) or not isinstance(init_seed, int)):
            raise TypeError(f"{fn}: init_seed must be an int or None, got {init_seed!r}")
        D = int(self.backbone.dim)
        if self.has_rho:
            self.proj_dim = _pos_int(proj_dim, "proj_dim", fn)
            self.rho = _make_rho(D, self.proj_dim, init_seed, _backbone_device(self.backbone))
            self.rho.requires_grad_(bool(trainable_rho))
            self.dim = self.proj_dim
        else:
            self.proj_dim = D
            self.rho = None
            self.dim = D

    # ------------------------------------------------------------------ features
    @property
    def tau(self) -> float:
        """The (student's) temperature on the cosine."""
        return self.taus[-1]

    def grid_features(self, images: Tensor) -> Tensor:
        """Ψ on the training grid: ``(B, 3, H, W)`` in [0, 1] → ``(B, D, g, g)`` float32, bilinear
        (``align_corners=False``) from the backbone's grid. No gradient unless ``train_backbone``."""
        if self.train_backbone:
            f = self.backbone(images)
        else:
            with torch.no_grad():
                f = self.backbone(images)
        g = self.train_side
        if tuple(f.shape[-2:]) != (g, g):
            f = F.interpolate(f, size=(g, g), mode="bilinear", align_corners=False)
        return f

    def project(self, feats: Tensor) -> Tensor:
        """ρ: ``(B, D, h, w)`` → ``(B, proj_dim, h, w)`` (identity for ``none``)."""
        return feats if self.rho is None else self.rho(feats)

    def descriptor(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` in [0, 1] on :attr:`canvas` → ``(B, dim, h, w)`` = ρ(Ψ(images)) on the
        backbone's grid (see the module docstring for why this equals the code's upsample-then-ρ)."""
        return self.project(self.backbone(images))

    # ------------------------------------------------------------------ batch helpers
    def _image(self, batch: dict, key: str) -> Tensor:
        fn = f"{type(self).__name__}.training_step"
        if not isinstance(batch, dict) or key not in batch:
            raise KeyError(f"{fn}: batch must be a dict with {key!r} (B, 3, H, W) float images in [0, 1]")
        x = batch[key]
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or not x.dtype.is_floating_point:
            raise ValueError(f"{fn}: batch[{key!r}] must be a floating tensor of shape (B, 3, H, W), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
                             f"{'' if not isinstance(x, torch.Tensor) else ' ' + str(x.dtype)}")
        return x

    def _pair(self, batch: dict) -> tuple[Tensor, Tensor]:
        src, trg = self._image(batch, "src"), self._image(batch, "trg")
        if src.shape != trg.shape:
            raise ValueError(f"{type(self).__name__}.training_step: batch['src'] and batch['trg'] must have the "
                             f"same shape, got {tuple(src.shape)} and {tuple(trg.shape)}")
        return src, trg

    @staticmethod
    def _generator(batch: dict, step: int) -> torch.Generator:
        """``batch["generator"]`` (the trainer's), else a CPU generator seeded with ``step``."""
        g = batch.get("generator")
        if g is None:
            return torch.Generator().manual_seed(int(step))
        if not isinstance(g, torch.Generator):
            raise TypeError(f"training_step: batch['generator'] must be a torch.Generator, got {type(g).__name__}")
        return g

    def _rows(self, feats: Tensor) -> tuple[Tensor, tuple[int, int]]:
        return ops.flatten_map(feats)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, grid={self.train_side}, taus={self.taus}, "
                f"loss_backend={self.loss_backend!r}")


# --------------------------------------------------------------------------------------------------
# fixed projections (§5.1)
# --------------------------------------------------------------------------------------------------

class _FixedProjection(DemystifyingMethod):
    """A projection that is not trained by gradient descent: ``training_step`` returns a zero loss
    without a graph (nothing to optimise; :meth:`trainable_parameters` is empty)."""

    def _zero(self, device) -> dict[str, Tensor]:
        return {"loss": torch.zeros((), device=device)}

    def training_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        """Nothing to learn: ``{"loss": 0}`` (no gradient)."""
        src, _ = self._pair(batch)
        return self._zero(src.device)


@register_method("none")
class NoneProjection(_FixedProjection):
    """No projection: match raw Ψ features by cosine (Table 2 "None")."""

    has_rho = False

    def __init__(self, backbone):
        super().__init__(backbone)
        self._setup()


@register_method("random")
class RandomProjection(_FixedProjection):
    """ρ = a randomly initialised 1×1 conv D → ``proj_dim`` (PyTorch's default init, seeded by
    ``init_seed``), never trained (Table 2 "Random")."""

    def __init__(self, backbone, *, proj_dim: int = 256, init_seed: int | None = 0):
        super().__init__(backbone)
        self._setup(proj_dim=proj_dim, init_seed=init_seed, trainable_rho=False)


class _FittedProjection(_FixedProjection):
    """ρ fitted on Ψ rows of the first ``fit_images`` training images seen by :meth:`training_step`
    (``rows_per_image`` random cells of each, at the training grid), or by an explicit :meth:`fit`.

    ``bias``: ``"random"`` (the code: ρ's bias keeps its random init, no mean is subtracted),
    ``"zero"``, or ``"center"`` (bias = −ρ.weight · μ, i.e. projecting the centred features).
    """

    def _fit_setup(self, proj_dim, grid, fit_images, rows_per_image, bias, init_seed):
        fn = type(self).__name__
        D = int(self.backbone.dim)
        if isinstance(proj_dim, int) and not isinstance(proj_dim, bool) and proj_dim > D:
            raise ValueError(f"{fn}: proj_dim = {proj_dim} components requested but the backbone has only "
                             f"{D} channels")
        self._setup(proj_dim=proj_dim, grid=grid, init_seed=init_seed, trainable_rho=False)
        self.fit_images = _pos_int(fit_images, "fit_images", fn)
        self.rows_per_image = _pos_int(rows_per_image, "rows_per_image", fn)
        self.bias_mode = _choice(bias, "bias", ("random", "zero", "center"), fn)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self._buffer: list[Tensor] = []
        self._seen = 0

    def _sample_rows(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        feats = self.grid_features(images).detach()
        rows, _ = self._rows(feats)                         # (B, N, D)
        B, N, D = rows.shape
        r = min(self.rows_per_image, N)
        gdev = generator.device if generator is not None else torch.device("cpu")
        idx = torch.argsort(torch.rand(B, N, generator=generator, device=gdev), dim=1)[:, :r].to(rows.device)
        return rows.gather(1, idx[..., None].expand(B, r, D)).reshape(B * r, D).float()

    def _decompose(self, x: Tensor, generator) -> tuple[Tensor, dict]:
        raise NotImplementedError

    def _finish(self, generator=None) -> dict:
        x = torch.cat(self._buffer)
        self._buffer = []
        comps, info = self._decompose(x, generator)
        with torch.no_grad():
            self.rho.weight.copy_(comps.reshape(self.proj_dim, -1, 1, 1).to(self.rho.weight))
            if self.bias_mode == "zero":
                self.rho.bias.zero_()
            elif self.bias_mode == "center":
                self.rho.bias.copy_(-(comps.to(x) @ x.mean(0)).to(self.rho.bias))
            self.fitted.fill_(True)
        return info

    def fit(self, images, generator: torch.Generator | None = None) -> dict:
        """Fit ρ on ``images``: a ``(B, 3, H, W)`` tensor in [0, 1] or an iterable of such tensors
        (all of them are used, whatever ``fit_images`` is). Returns the fit's diagnostics."""
        fn = f"{type(self).__name__}.fit"
        chunks = [images] if isinstance(images, torch.Tensor) else list(images)
        if not chunks:
            raise ValueError(f"{fn}: images is empty")
        self._buffer = []
        for c in chunks:
            if not isinstance(c, torch.Tensor) or c.dim() != 4 or c.shape[1] != 3:
                raise ValueError(f"{fn}: images must be (B, 3, H, W) tensors, got "
                                 f"{tuple(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
            self._buffer.append(self._sample_rows(c, generator))
        self._seen = sum(c.shape[0] for c in chunks)
        return self._finish(generator)

    def training_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        """Collect Ψ rows of ``src`` and ``trg`` until ``fit_images`` images are seen, then fit ρ.
        Returns ``{"loss": 0 (no gradient), "fitted": 0/1, "fit_images_seen": n}``."""
        src, trg = self._pair(batch)
        if not bool(self.fitted):
            gen = self._generator(batch, step)
            need = self.fit_images - self._seen
            imgs = torch.cat([src, trg])[:need]
            self._buffer.append(self._sample_rows(imgs, gen))
            self._seen += imgs.shape[0]
            if self._seen >= self.fit_images:
                self._finish(gen)
        out = self._zero(src.device)
        out["fitted"] = self.fitted.float().to(src.device)
        out["fit_images_seen"] = torch.tensor(float(self._seen), device=src.device)
        return out

    def descriptor(self, images: Tensor) -> Tensor:
        if not bool(self.fitted):
            raise RuntimeError(f"{type(self).__name__}: the projection is not fitted yet; run training_step on "
                               f"{self.fit_images} training images (seen: {self._seen}) or call fit(images)")
        return super().descriptor(images)


@register_method("pca")
class PCAProjection(_FittedProjection):
    """ρ.weight = the first ``proj_dim`` principal components of Ψ (Table 2 "PCA"); see
    :func:`semcorr_fast.methods.projections.fit_pca`. The code subtracts no mean and keeps ρ's random
    bias (``bias="random"``, the default)."""

    def __init__(self, backbone, *, proj_dim: int = 256, grid: int = 64, fit_images: int = 200,
                 rows_per_image: int = 128, bias: str = "random", init_seed: int | None = 0):
        super().__init__(backbone)
        self._fit_setup(proj_dim, grid, fit_images, rows_per_image, bias, init_seed)

    def _decompose(self, x, generator):
        r = fit_pca(x, self.proj_dim)
        self.explained_variance_ratio = r.explained_variance_ratio
        return r.components, {"explained_variance_ratio": float(r.explained_variance_ratio.sum())}


@register_method("nmf")
class NMFProjection(_FittedProjection):
    """ρ.weight = ``proj_dim`` NMF components of Ψ (Table 2 "NMF"), by multiplicative updates
    (:func:`semcorr_fast.methods.projections.fit_nmf`, ``nmf_iters`` iterations). Negative features
    (ViT keys) are handled by ``nmf_negative`` (``"shift"`` by default; a no-op for ReLU features)."""

    def __init__(self, backbone, *, proj_dim: int = 256, grid: int = 64, fit_images: int = 200,
                 rows_per_image: int = 128, bias: str = "random", nmf_iters: int = 200,
                 nmf_negative: str = "shift", init_seed: int | None = 0):
        super().__init__(backbone)
        self._fit_setup(proj_dim, grid, fit_images, rows_per_image, bias, init_seed)
        self.nmf_iters = _pos_int(nmf_iters, "nmf_iters", type(self).__name__)
        self.nmf_negative = _choice(nmf_negative, "nmf_negative", NEGATIVE_MODES, type(self).__name__)

    def _decompose(self, x, generator):
        g = generator if generator is not None and generator.device.type == "cpu" else None
        r = fit_nmf(x, self.proj_dim, iters=self.nmf_iters, negative=self.nmf_negative, generator=g)
        self.nmf_errors = r.errors
        return r.components, {"nmf_error": r.errors[-1], "nmf_shift": r.shift}


# --------------------------------------------------------------------------------------------------
# supervised upper bound (§5.1)
# --------------------------------------------------------------------------------------------------

@register_method("supervised")
class SupervisedProjection(DemystifyingMethod):
    """ρ trained on ground-truth keypoint pairs (the upper bound of Table 2):

    L = (1/|Ω|) Σ_b Σ_{m valid} Σ_v p(v | s_m) · d(v, t_m), p = softmax over the target grid of
    cos(ρΨ_{s_m}(x_s), ρΨ_v(x_t))/τ, τ = 1/25 (the code's ×5 per vector; the paper gives none).

    Batch: ``src``, ``trg`` (B, 3, H, W); ``src_kps``, ``trg_kps`` (B, K, 2) canvas pixels (x, y);
    ``valid`` (B, K) bool (annotated in both images). Keypoints outside the canvas count as invalid.
    Distances in grid cells. ``distance="l1"`` (code: |dx| + |dy|; the K×N keypoint-row similarities
    come from :func:`semcorr_fast.ops.ncc`) or ``"l2"`` (paper: ‖·‖₂ through
    :func:`semcorr_fast.ops.expected_cost`, fused).
    """

    kind = "supervised"

    def __init__(self, backbone, *, proj_dim: int = 256, grid: int = 64, temperature: str = "paper",
                 tau: float | None = None, logit_scale: float | None = None, distance: str = "l1",
                 loss_backend: str = "auto", train_backbone: bool = False, init_seed: int | None = 0):
        super().__init__(backbone, freeze_backbone=not train_backbone)
        self._setup(proj_dim=proj_dim, grid=grid, temperature=temperature, tau=tau, logit_scale=logit_scale,
                    loss_backend=loss_backend, train_backbone=train_backbone, init_seed=init_seed)
        self.distance = _choice(distance, "distance", ("l1", "l2"), type(self).__name__)

    def _keypoints(self, batch, B, H, W):
        fn = f"{type(self).__name__}.training_step"
        for key in ("src_kps", "trg_kps", "valid"):
            if key not in batch:
                raise KeyError(f"{fn}: the supervised projection needs keypoint batches with 'src_kps', 'trg_kps' "
                               f"(B, K, 2) canvas pixels and 'valid' (B, K) bool; {key!r} is missing")
        sk, tk, valid = batch["src_kps"], batch["trg_kps"], batch["valid"]
        for key, t in (("src_kps", sk), ("trg_kps", tk)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != B or t.shape[2] != 2 \
                    or not t.dtype.is_floating_point:
                raise ValueError(f"{fn}: batch[{key!r}] must be a floating tensor of shape (B={B}, K, 2), got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        K = sk.shape[1]
        if tk.shape[1] != K:
            raise ValueError(f"{fn}: src_kps and trg_kps must have the same K, got {sk.shape[1]} and {tk.shape[1]}")
        if not isinstance(valid, torch.Tensor) or tuple(valid.shape) != (B, K) or valid.dtype != torch.bool:
            raise ValueError(f"{fn}: batch['valid'] must be a bool tensor of shape (B={B}, K={K}), got "
                             f"{tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__}"
                             f"{'' if not isinstance(valid, torch.Tensor) else ' ' + str(valid.dtype)}")

        def inside(k):
            return (torch.isfinite(k).all(-1) & (k[..., 0] >= -0.5) & (k[..., 0] <= W - 0.5)
                    & (k[..., 1] >= -0.5) & (k[..., 1] <= H - 0.5))
        return sk, tk, valid & inside(sk) & inside(tk)

    def training_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        src, trg = self._pair(batch)
        B, _, H, W = src.shape
        sk, tk, valid = self._keypoints(batch, B, H, W)
        dev = src.device
        sk, tk, valid = sk.to(dev), tk.to(dev), valid.to(dev)
        feats = self.project(self.grid_features(torch.cat([src, trg])))
        rows, hw = self._rows(feats)
        s_rows, t_rows = rows[:B], rows[B:]
        g_h, g_w = hw
        scale = sk.new_tensor([g_w / W, g_h / H])
        zero = torch.zeros_like(sk)
        sk = torch.where(valid[..., None], sk, zero)
        tk = torch.where(valid[..., None], tk, zero)
        cell = torch.floor((sk + 0.5) * scale)
        cx = cell[..., 0].clamp(0, g_w - 1).long()
        cy = cell[..., 1].clamp(0, g_h - 1).long()
        idx = cy * g_w + cx                                              # (B, K)
        q = s_rows.gather(1, idx[..., None].expand(-1, -1, s_rows.shape[-1]))   # (B, K, C)
        txy = ((tk + 0.5) * scale - 0.5).float()                          # continuous target cells
        if self.distance == "l2":
            L = ops.expected_cost(q, t_rows, self.tau, txy, hw, p=1.0, backend=self.loss_backend)
        else:
            sim = ops.ncc(q, t_rows, backend=self.loss_backend).float()   # (B, K, N): keypoint rows only
            prob = torch.softmax(sim / self.tau, dim=-1)
            cells = cell_coordinates(hw, dev)
            d = (cells[None, None] - txy[:, :, None, :]).abs().sum(-1)    # (B, K, N)
            L = (prob * d).sum(-1)
        L = torch.where(valid, L, torch.zeros_like(L))
        loss = L.sum() / (g_h * g_w)
        return {"loss": loss, "n_keypoints": valid.sum().float()}


# --------------------------------------------------------------------------------------------------
# EQ, DVE, CL: expected distance under the soft match
# --------------------------------------------------------------------------------------------------

class _DistanceLoss(DemystifyingMethod):
    """EQ/DVE/CL options: ``p`` (distance exponent), ``distance_unit`` (``"pixel"``: canvas pixels per
    cell, the code; ``"cell"``)."""

    def _dist_setup(self, p, distance_unit):
        fn = type(self).__name__
        self.p = _pos(p, "p", fn)
        self.distance_unit = _choice(distance_unit, "distance_unit", ("pixel", "cell"), fn)

    def _unit(self, H: int, W: int, hw) -> float:
        """Canvas pixels per grid cell (mean of the two axes), raised to p; 1 for ``"cell"``."""
        if self.distance_unit == "cell":
            return 1.0
        return (0.5 * (H / hw[0] + W / hw[1])) ** self.p


class _WarpLoss(_DistanceLoss):
    """EQ/DVE: each training image x (the ``src`` and ``trg`` items, 2B images as the code does) gets
    DVE's two-stage warp (:func:`semcorr_fast.warps.random_warp_pair`, preset ``warp_preset``):
    x₁ = first(x), x₂ = second(x₁); the loss compares x₂ (queries u) with x₁ (targets v), whose known
    correspondence is the second warp's sampling grid, g(u) = second⁻¹ map of u's cell centre.
    ``mask_outside``: leave out query cells whose g(u) falls outside the image (the code keeps them).
    """

    def _warp_setup(self, pairing, warp_preset, warp_kind, mask_outside):
        fn = type(self).__name__
        self.pairing = _choice(pairing, "pairing", PAIRINGS, fn)
        warps.get_preset(warp_preset)
        self.warp_preset = warp_preset
        self.warp_kind = _choice(warp_kind, "warp_kind", ("tps", "affine", "tps+affine"), fn)
        self.mask_outside = _flag(mask_outside, "mask_outside", fn)

    def warped_pairs(self, batch: dict, step: int):
        """The EQ/DVE inputs of a batch.

        Returns ``(Q, T, target_xy, inside, hw, (H, W))``: ``Q``, ``T`` (P, N, C) projected query and
        target rows of the P = 2B pairs (paired per ``pairing``), ``target_xy`` (P, N, 2) the known
        match of each query cell in target cells (pair k uses warp k), ``inside`` (P, N) bool.
        """
        src, trg = self._pair(batch)
        X = torch.cat([src, trg])
        P, _, H, W = X.shape
        gen = self._generator(batch, step)
        first, second = warps.random_warp_pair(P, H, W, self.warp_kind, preset=self.warp_preset, generator=gen,
                                               device=X.device, dtype=torch.float32)
        x1 = first.apply(X.float()).clamp(0, 1)
        x2 = second.apply(x1).clamp(0, 1)
        feats = self.project(self.grid_features(torch.cat([x2, x1]).to(X.dtype)))
        rows, hw = self._rows(feats)
        q, t = pairing_indices(P // 2, self.pairing, device=rows.device)
        txy, inside = warp_cell_targets(second, hw)
        return rows[q], rows[t], txy.to(rows.device), inside.to(rows.device), hw, (H, W)

    def _reduce(self, L: Tensor, inside: Tensor, unit: float) -> Tensor:
        L = L * unit
        if self.mask_outside:
            m = inside.to(L.dtype)
            return (L * m).sum() / m.sum().clamp_min(1.0)
        return L.mean()


@register_method("eq")
class EQ(_WarpLoss):
    """Dense equivariance (Thewlis et al. 2017; Demystifying Eq. 1) on a linear ρ:
    L = mean_u Σ_v softmax_v(cos(ρΨ_u(x₂), ρΨ_v(x₁))/τ) · ‖g(u) − v‖^p, τ = 0.05 (paper).
    Defaults: 32² grid and p = 0.5 (code), correct pairing. See the module docstring."""

    kind = "eq"

    def __init__(self, backbone, *, proj_dim: int = 256, grid: int = 32, temperature: str = "paper",
                 tau: float | None = None, logit_scale: float | None = None, p: float = 0.5,
                 distance_unit: str = "pixel", pairing: str = "correct", warp_preset: str = "demystifying",
                 warp_kind: str = "tps+affine", mask_outside: bool = False, loss_backend: str = "auto",
                 train_backbone: bool = False, init_seed: int | None = 0):
        super().__init__(backbone, freeze_backbone=not train_backbone)
        self._setup(proj_dim=proj_dim, grid=grid, temperature=temperature, tau=tau, logit_scale=logit_scale,
                    loss_backend=loss_backend, train_backbone=train_backbone, init_seed=init_seed)
        self._dist_setup(p, distance_unit)
        self._warp_setup(pairing, warp_preset, warp_kind, mask_outside)

    def training_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        Q, T, txy, inside, hw, (H, W) = self.warped_pairs(batch, step)
        L = ops.expected_cost(Q, T, self.tau, txy, hw, p=self.p, backend=self.loss_backend)
        return {"loss": self._reduce(L, inside, self._unit(H, W, hw))}


@register_method("dve")
class DVE(_WarpLoss):
    """Descriptor Vector Exchange (Thewlis et al. 2019) on a linear ρ:
    φ̂_u = Σ_w softmax_w(cos(φ_u(x₂), φ_w(x^α))/τ) · φ̂_w(x^α) (unit vectors of the auxiliary image,
    :func:`semcorr_fast.ops.softmax_aggregate`), then EQ's loss with φ̂ as the query against x₁:
    softmax_v(⟨φ̂_u, unit φ_v(x₁)⟩/τ). φ̂ is not re-normalised (code; ``renormalize=True`` re-normalises).
    The auxiliary is pair (k + P/2) mod P's query image (:func:`dve_aux_indices`)."""

    kind = "dve"

    def __init__(self, backbone, *, proj_dim: int = 256, grid: int = 32, temperature: str = "paper",
                 tau: float | None = None, logit_scale: float | None = None, p: float = 0.5,
                 distance_unit: str = "pixel", pairing: str = "correct", renormalize: bool = False,
                 warp_preset: str = "demystifying", warp_kind: str = "tps+affine", mask_outside: bool = False,
                 loss_backend: str = "auto", train_backbone: bool = False, init_seed: int | None = 0):
        super().__init__(backbone, freeze_backbone=not train_backbone)
        self._setup(proj_dim=proj_dim, grid=grid, temperature=temperature, tau=tau, logit_scale=logit_scale,
                    loss_backend=loss_backend, train_backbone=train_backbone, init_seed=init_seed)
        self._dist_setup(p, distance_unit)
        self._warp_setup(pairing, warp_preset, warp_kind, mask_outside)
        self.renormalize = _flag(renormalize, "renormalize", type(self).__name__)

    def training_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        Q, T, txy, inside, hw, (H, W) = self.warped_pairs(batch, step)
        A = Q[dve_aux_indices(Q.shape[0], device=Q.device)]
        lb = self.loss_backend
        fhat = ops.softmax_aggregate(Q, A, F.normalize(A, dim=-1, eps=1e-12), self.tau, backend=lb)
        tgt = T if self.renormalize else F.normalize(T, dim=-1, eps=1e-12)
        L = ops.expected_cost(fhat.to(T.dtype), tgt, self.tau, txy, hw, p=self.p, normalize=self.renormalize,
                              backend=lb)
        return {"loss": self._reduce(L, inside, self._unit(H, W, hw))}


@register_method("cl")
class CL(_DistanceLoss):
    """CL (Cheng et al. 2021) as Demystifying uses it: Eq. 1 of an image with itself (g = identity),
    L = mean_u Σ_v softmax_v(cos(φ_u, φ_v)/τ) ‖u − v‖^p over every ``src`` and ``trg`` image,
    τ = 0.14, 64² grid, p = 0.5 (code)."""

    kind = "cl"

    def __init__(self, backbone, *, proj_dim: int = 256, grid: int = 64, temperature: str = "paper",
                 tau: float | None = None, logit_scale: float | None = None, p: float = 0.5,
                 distance_unit: str = "pixel", loss_backend: str = "auto", train_backbone: bool = False,
                 init_seed: int | None = 0):
        super().__init__(backbone, freeze_backbone=not train_backbone)
        self._setup(proj_dim=proj_dim, grid=grid, temperature=temperature, tau=tau, logit_scale=logit_scale,
                    loss_backend=loss_backend, train_backbone=train_backbone, init_seed=init_seed)
        self._dist_setup(p, distance_unit)

    def training_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        src, trg = self._pair(batch)
        X = torch.cat([src, trg])
        H, W = X.shape[-2:]
        rows, hw = self._rows(self.project(self.grid_features(X)))
        txy = cell_coordinates(hw, rows.device).unsqueeze(0).expand(rows.shape[0], -1, -1).contiguous()
        L = ops.expected_cost(rows, rows, self.tau, txy, hw, p=self.p, backend=self.loss_backend)
        return {"loss": L.mean() * self._unit(H, W, hw)}


# --------------------------------------------------------------------------------------------------
# LEAD and ASYM: distillation of the frozen features' match distribution
# --------------------------------------------------------------------------------------------------

class _DistillLoss(DemystifyingMethod):
    """Teacher a = softmax(cos(Ψ_u(x), Ψ_v(x^α))/τ_t) (frozen, upsampled Ψ), student
    b = softmax(cos(ρΨ_u(x), ρΨ_v(x^α))/τ_s); x = ``src``, x^α = ``trg`` (two random training images),
    one direction (x → x^α), :func:`semcorr_fast.ops.rowsoftmax_distill`. Loss = ``loss_scale`` × mean
    over rows of the per-row loss (the code's 1/(B·H·W))."""

    def _distill_setup(self, loss, loss_scale, report_kl=False):
        fn = type(self).__name__
        self.loss_kind = _choice(loss, "loss", ("ce", "mse", "l1"), fn)
        if loss_scale is None:
            loss_scale = 100.0 if self.loss_kind == "mse" else 1.0
        self.loss_scale = _pos(loss_scale, "loss_scale", fn)
        if not isinstance(report_kl, bool):
            raise TypeError(f"{fn}: report_kl must be a bool, got {type(report_kl).__name__}")
        if report_kl and self.loss_kind != "ce":
            raise ValueError(f"{fn}: report_kl=True needs loss='ce' (KL = CE - H(teacher)), got loss={self.loss_kind!r}")
        self.report_kl = report_kl

    def _taus(self) -> tuple[float, float]:
        return (self.taus[0], self.taus[-1])

    def training_step(self, batch: dict, step: int) -> dict[str, Tensor]:
        src, trg = self._pair(batch)
        B = src.shape[0]
        psi = self.grid_features(torch.cat([src, trg]))
        phi = self.project(psi)
        t_rows, _ = self._rows(psi.detach())
        s_rows, _ = self._rows(phi)
        tt, ts = self._taus()
        L = ops.rowsoftmax_distill(t_rows[:B], t_rows[B:], s_rows[:B], s_rows[B:], tt, ts, loss=self.loss_kind,
                                   backend=self.loss_backend)
        out = {"loss": self.loss_scale * L.mean()}
        if self.report_kl:
            # CE(a, b) = H(a) + KL(a || b): H(a) is fixed by the frozen teacher, so the part ρ can lower is
            # the KL. H(a) = CE(a, a): the same fused op with the teacher as student (one more forward).
            with torch.no_grad():
                Ha = ops.rowsoftmax_distill(t_rows[:B], t_rows[B:], t_rows[:B], t_rows[B:], tt, tt, loss="ce",
                                            backend=self.loss_backend)
            out["teacher_entropy"] = self.loss_scale * Ha.mean()
            out["kl"] = out["loss"].detach() - out["teacher_entropy"]
        return out


@register_method("lead")
class LEAD(_DistillLoss):
    """LEAD (Karmali et al. 2022) on a linear ρ (Eq. 3): row cross-entropy −Σ_v a log b with one τ
    (0.05) for teacher and student. ``loss="mse"`` is the code's ``lead_mse`` (×100, Table A2).
    ``report_kl=True`` also logs ``teacher_entropy`` H(a) and ``kl`` = loss − H(a), the part of the CE
    that ρ can lower (one extra no-grad forward of the fused op per step)."""

    kind = "lead"

    def __init__(self, backbone, *, proj_dim: int = 256, grid: int = 64, temperature: str = "paper",
                 tau: float | None = None, logit_scale: float | None = None, loss: str = "ce",
                 loss_scale: float | None = None, loss_backend: str = "auto", train_backbone: bool = False,
                 init_seed: int | None = 0, report_kl: bool = False):
        super().__init__(backbone, freeze_backbone=not train_backbone)
        self._setup(proj_dim=proj_dim, grid=grid, temperature=temperature, tau=tau, logit_scale=logit_scale,
                    loss_backend=loss_backend, train_backbone=train_backbone, init_seed=init_seed)
        self._distill_setup(loss, loss_scale, report_kl)


@register_method("asym")
class ASYM(_DistillLoss):
    """ASYM, the paper's method (Eq. 4): Σ_v (a − b)² with a sharper teacher τ1 = 0.2 (frozen Ψ) and a
    softer student τ2 = 0.4 (ρΨ), ×100 and averaged over rows (code ``asym_loss``). ``loss="ce"`` is
    ``asym_ce`` and ``"l1"`` the |·| reading of Eq. 4 (Table A2). ``tau``/``logit_scale`` take
    ``(teacher, student)`` pairs."""

    kind = "asym"

    def __init__(self, backbone, *, proj_dim: int = 256, grid: int = 64, temperature: str = "paper",
                 tau: tuple | list | None = None, logit_scale: tuple | list | None = None, loss: str = "mse",
                 loss_scale: float | None = None, loss_backend: str = "auto", train_backbone: bool = False,
                 init_seed: int | None = 0):
        super().__init__(backbone, freeze_backbone=not train_backbone)
        self._setup(proj_dim=proj_dim, grid=grid, temperature=temperature, tau=tau, logit_scale=logit_scale,
                    loss_backend=loss_backend, train_backbone=train_backbone, init_seed=init_seed)
        self._distill_setup(loss, loss_scale)
