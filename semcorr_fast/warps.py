"""Synthetic warps with exact dense ground truth: thin-plate splines, affine maps, crops, colour jitter.

Used by the ``warps`` evaluation dataset (:mod:`semcorr_fast.data.warps`) and by the training losses
that need a known correspondence (Demystifying's EQ / DVE / CL, Universal's warp-consistency terms).

Coordinates
-----------
* **Pixels**: ``(x, y)``, x to the right, y down, the centre of pixel ``(row i, column j)`` at
  ``(x, y) = (j, i)``. An ``H×W`` image covers ``[-0.5, W-0.5] × [-0.5, H-0.5]``.
* **Normalised** (the frame of ``F.grid_sample(..., align_corners=False)``): ``u = (2x + 1)/W - 1``,
  ``v = (2y + 1)/H - 1``, so ``±1`` are the image *borders* (not the outermost pixel centres).
  :func:`pixel_to_norm` / :func:`norm_to_pixel` convert. Every warp is defined in this frame, so one
  set of parameters means the same geometric warp at any resolution.

A :class:`Warp` is a *backward* map ``g⁻¹``: for every pixel ``p`` of the warped (output) image,
``warp.grid`` holds the source location ``g⁻¹(p)`` that ``F.grid_sample`` reads, so
``warped = warp.apply(source)`` is ``source ∘ g⁻¹``. It is a chain of stages applied to the output
coordinate in order (``stages[0]`` first): affine maps (``(B, 2, 3)`` tensors, as ``F.affine_grid``'s
``theta``) and thin-plate splines (:class:`TPS`). The forward map of points ``g`` (source pixel →
warped pixel), :meth:`Warp.points`, inverts each stage: affine stages in closed form, TPS stages by
damped Newton iterations in float64. A returned point ``q`` satisfies ``‖g⁻¹(q) − x‖ ≤ tol`` (``tol``
in *source pixels*, default ``1e-4``) where ``ok`` is true, and is NaN otherwise (it is never silently
approximate). With positive Jacobian determinant everywhere (see :meth:`Warp.folds`) the preimage is locally
unique; started from the nearest node of a coarse lattice of the map, Newton reaches ~1e-10 px in a
handful of iterations for the presets below. ``grid`` is computed in the warp's dtype (float32
rounds it by up to ~1e-3 px); ``points`` always solves in float64.

Presets (the papers' values)
----------------------------
``"demystifying"`` — Aygün & Mac Aodha (ECCV 2022), whose code reuses DVE's ``tps.Warper`` [code]:

* TPS in *weight space*: ``T(q) = a₀ + A q + Σᵢ wᵢ U(‖q − cᵢ‖)``, ``U(r) = r² log r²``, centres
  ``cᵢ`` a 10×10 grid over ``[-1, 1]²``. Every weight coordinate ~ N(0, 0.001²); a random half of
  them (each coordinate independently with p = 0.5) ~ N(0, 0.01²) instead.
* Affine part of the same TPS: rotation ~ N(0, 5°), scale ``1 + N(0, 0.1)``, translation ~ N(0, 0.1)
  per axis (normalised units). ``A = s·[[cos θ, sin θ], [−sin θ, cos θ]]`` as the code builds it.
* Two-stage pairs (:func:`random_warp_pair`): the first image is warped with TPS strength ×0.5 and
  full affine, the second is a full-strength warp of the first; the loss uses the second warp.
* No colour jitter on this path (the code's optional albumentations augmentation is not reproduced).
* These warps are strong: at 256 px the mean displacement is ≈ 30 px (max ≈ 200), about one warp in
  eight folds somewhere inside the image, and since the weights are unconstrained a few percent of
  source points have no preimage at all (they leave the picture; :meth:`Warp.points` gives NaN,
  ``ok = False``).
* Deviations from the code: DVE evaluates its TPS at ``linspace(-1, 1, W)`` (``align_corners=True``
  positions) and adds 1e-5 inside the log; here the TPS is evaluated at the ``align_corners=False``
  positions of the pixel centres (so grid and points agree exactly) and ``U`` is exact. The same
  weights give maps that differ by at most half a pixel, at the border.

``"universal"`` — the Universal-correspondence paper's G: a **TPS on a randomly jittered 10×10
control grid**, then a **random rescaled crop**, then **colour jitter** [P]. The paper does not
publish the magnitudes (they are in its unavailable supplementary), so the values here are *this
project's choice*: control-point jitter ~ N(0, 0.03²) normalised units clipped to ±0.075, a third of
the grid spacing 2/9 ≈ 0.22 (at 224 px: mean displacement ≈ 3 px, Jacobian determinant within
≈ [0.35, 1.9], no folds in our samples; σ = 0.04 already folds one warp in sixteen); crop area
fraction ~ U[0.5, 1], aspect ratio log-uniform in [3/4, 4/3], placed uniformly inside the image;
colour jitter brightness/contrast/saturation 0.4, hue 0.1 (torchvision's customary strengths). No
flips or extra rotations (the paper lists only TPS + crop + colour in its implementation section).

Custom magnitudes: pass a :class:`WarpPreset` (e.g. ``dataclasses.replace(PRESETS["universal"],
tps_jitter_sd=0.06)``) wherever a preset name is accepted; ``scale`` multiplies every random
magnitude (``scale=0`` is the identity).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "WarpPreset", "PRESETS", "get_preset", "TPS", "Warp", "pixel_to_norm", "norm_to_pixel", "tps_kernel",
    "tps_fit", "tps_warp_params", "affine_params", "crop_params", "random_warp", "random_warp_pair",
    "color_jitter",
]

_KINDS = ("tps", "affine", "tps+affine")


# --------------------------------------------------------------------------------------------------
# presets
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WarpPreset:
    """Random-warp magnitudes. See the module docstring for the papers' values and their sources.

    ``tps_param``: ``"weights"`` (DVE/Demystifying: random TPS weights on a fixed centre grid) or
    ``"jitter"`` (Universal: a TPS fitted to a randomly jittered control grid).
    ``affine``: ``"similarity"`` (rotation/scale/translation, normalised units, rotation in degrees)
    or ``"crop"`` (random rescaled crop: area fraction range, aspect-ratio range).
    ``first_tps_multiplier`` / ``first_affine_multiplier``: the first warp of a two-stage pair.
    ``color``: colour-jitter strengths ``(brightness, contrast, saturation, hue)`` or None for none.
    """

    name: str
    tps_param: str = "weights"
    grid: int = 10
    tps_sd_all: float = 0.0
    tps_sd_subset: float = 0.0
    tps_subset_p: float = 0.5
    tps_jitter_sd: float = 0.0
    tps_jitter_max: float = 0.0
    affine: str = "similarity"
    rot_sd_deg: float = 0.0
    scale_sd: float = 0.0
    trans_sd: float = 0.0
    crop_area: tuple[float, float] = (1.0, 1.0)
    crop_ratio: tuple[float, float] = (1.0, 1.0)
    first_tps_multiplier: float = 1.0
    first_affine_multiplier: float = 1.0
    color: tuple[float, float, float, float] | None = None

    def __post_init__(self):
        if self.tps_param not in ("weights", "jitter"):
            raise ValueError(f"WarpPreset: tps_param must be 'weights' or 'jitter', got {self.tps_param!r}")
        if self.affine not in ("similarity", "crop"):
            raise ValueError(f"WarpPreset: affine must be 'similarity' or 'crop', got {self.affine!r}")
        if not (isinstance(self.grid, Integral) and self.grid >= 2):
            raise ValueError(f"WarpPreset: grid must be an int >= 2, got {self.grid!r}")
        lo, hi = self.crop_area
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"WarpPreset: crop_area must satisfy 0 < lo <= hi <= 1, got {self.crop_area}")
        lo, hi = self.crop_ratio
        if not (0 < lo <= hi):
            raise ValueError(f"WarpPreset: crop_ratio must satisfy 0 < lo <= hi, got {self.crop_ratio}")


PRESETS: dict[str, WarpPreset] = {
    # [code] DVE tps.Warper defaults, reused by Demystifying (projection/tps.py)
    "demystifying": WarpPreset(
        name="demystifying", tps_param="weights", grid=10, tps_sd_all=0.001, tps_sd_subset=0.01,
        tps_subset_p=0.5, affine="similarity", rot_sd_deg=5.0, scale_sd=0.1, trans_sd=0.1,
        first_tps_multiplier=0.5, first_affine_multiplier=1.0, color=None),
    # [P] structure (10x10 jittered TPS, rescaled crop, colour jitter); magnitudes: this project's choice
    "universal": WarpPreset(
        name="universal", tps_param="jitter", grid=10, tps_jitter_sd=0.03, tps_jitter_max=0.075,
        affine="crop", crop_area=(0.5, 1.0), crop_ratio=(3 / 4, 4 / 3), color=(0.4, 0.4, 0.4, 0.1)),
}


def get_preset(preset: str | WarpPreset) -> WarpPreset:
    """A :class:`WarpPreset` from its name (``"demystifying"``, ``"universal"``) or itself."""
    if isinstance(preset, WarpPreset):
        return preset
    if isinstance(preset, str) and preset in PRESETS:
        return PRESETS[preset]
    raise ValueError(f"warps: preset must be one of {sorted(PRESETS)} or a WarpPreset, got {preset!r}")


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------

def _pos_int(v, name: str, fn: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, Integral) or v < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def _nonneg(v, name: str, fn: str) -> float:
    if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{fn}: {name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _float_dtype(dtype, fn: str) -> torch.dtype:
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def _gen_device(generator: torch.Generator | None) -> torch.device:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"warps: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator.device if generator is not None else torch.device("cpu")


def _randn(shape, generator, dtype=torch.float64):
    return torch.randn(shape, generator=generator, device=_gen_device(generator), dtype=dtype)


def _rand(shape, generator, dtype=torch.float64):
    return torch.rand(shape, generator=generator, device=_gen_device(generator), dtype=dtype)


def _points_arg(xy, B: int, name: str, fn: str) -> torch.Tensor:
    if not isinstance(xy, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of shape (B, N, 2) or (N, 2), got {type(xy).__name__}")
    if not xy.dtype.is_floating_point:
        raise TypeError(f"{fn}: {name} must be a floating tensor of shape (B, N, 2) or (N, 2), got dtype {xy.dtype}")
    if xy.dim() == 2 and xy.shape[-1] == 2:
        xy = xy.unsqueeze(0).expand(B, -1, -1)
    if xy.dim() != 3 or xy.shape[-1] != 2 or xy.shape[0] != B:
        raise ValueError(f"{fn}: {name} must have shape (B={B}, N, 2) or (N, 2), got {tuple(xy.shape)}")
    return xy


# --------------------------------------------------------------------------------------------------
# coordinates
# --------------------------------------------------------------------------------------------------

def pixel_to_norm(xy: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(..., 2) pixel (x, y) → grid_sample(align_corners=False) coordinates: ``u = (2x + 1)/W − 1``."""
    s = xy.new_tensor([2.0 / W, 2.0 / H])
    return (xy + 0.5) * s - 1.0


def norm_to_pixel(uv: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """(..., 2) normalised (u, v) → pixel (x, y): ``x = ((u + 1)·W − 1)/2``."""
    s = uv.new_tensor([W / 2.0, H / 2.0])
    return (uv + 1.0) * s - 0.5


def _base_grid(H: int, W: int, device, dtype) -> torch.Tensor:
    """(H·W, 2) normalised coordinates of the pixel centres, row-major (n = y·W + x)."""
    xs = (torch.arange(W, device=device, dtype=dtype) * 2 + 1) / W - 1
    ys = (torch.arange(H, device=device, dtype=dtype) * 2 + 1) / H - 1
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=-1)


def _ctrl_grid(n: int, device, dtype) -> torch.Tensor:
    """(n·n, 2) control points: an n×n grid over [-1, 1]², row-major."""
    t = torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=-1)


# --------------------------------------------------------------------------------------------------
# thin-plate splines
# --------------------------------------------------------------------------------------------------

_LOG_FLOOR = 1e-30  # d² is clamped here inside the log only, so U(0) = 0 and ∇U(0) = 0 exactly


def tps_kernel(d2: torch.Tensor) -> torch.Tensor:
    """TPS radial basis on squared distances: ``U = r² log r²`` (= 2·r² log r), ``U(0) = 0``."""
    if d2.requires_grad:  # finite gradient at d2 = 0 (xlogy's is not)
        return d2 * torch.log(d2.clamp_min(_LOG_FLOOR))
    return torch.xlogy(d2, d2)


def _sqdist(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """q (..., P, 2), c (..., N, 2) → (..., P, N) squared distances (explicit differences: exact at 0)."""
    dx = q[..., :, 0:1] - c[..., 0].unsqueeze(-2)
    dy = q[..., :, 1:2] - c[..., 1].unsqueeze(-2)
    return dx * dx + dy * dy


@dataclass
class TPS:
    """A batch of 2-D thin-plate splines in normalised coordinates.

    ``T(q) = [1, qx, qy] · affine + Σᵢ U(‖q − ctrl_i‖²) · weights_i`` with ``U`` = :func:`tps_kernel`.

    Shapes: ``ctrl`` (B, N, 2) centres, ``weights`` (B, N, 2), ``affine`` (B, 3, 2) (row 0 the
    translation, rows 1–2 the transposed linear part). Build one with :func:`tps_fit` (interpolating
    control points) or :func:`tps_warp_params` (random, per preset).
    """

    ctrl: torch.Tensor
    weights: torch.Tensor
    affine: torch.Tensor

    def __post_init__(self):
        for name, t in (("ctrl", self.ctrl), ("weights", self.weights), ("affine", self.affine)):
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                raise TypeError(f"TPS: {name} must be a floating torch.Tensor")
        if self.weights.dim() != 3 or self.weights.shape[-1] != 2:
            raise ValueError(f"TPS: weights must have shape (B, N, 2), got {tuple(self.weights.shape)}")
        B, N = self.weights.shape[:2]
        if tuple(self.ctrl.shape) != (B, N, 2):
            raise ValueError(f"TPS: ctrl must have shape (B={B}, N={N}, 2), got {tuple(self.ctrl.shape)}")
        if tuple(self.affine.shape) != (B, 3, 2):
            raise ValueError(f"TPS: affine must have shape (B={B}, 3, 2), got {tuple(self.affine.shape)}")

    @property
    def batch(self) -> int:
        return self.weights.shape[0]

    def to(self, device=None, dtype=None) -> "TPS":
        return TPS(self.ctrl.to(device=device, dtype=dtype), self.weights.to(device=device, dtype=dtype),
                   self.affine.to(device=device, dtype=dtype))

    def shared_ctrl(self) -> bool:
        """True when every batch item has the same centres (then kernel matrices are computed once)."""
        c = self.ctrl
        return c.shape[0] == 1 or c.stride(0) == 0 or bool(torch.equal(c, c[:1].expand_as(c)))

    def __call__(self, q: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """q (B, P, 2) normalised → T(q) (B, P, 2).

        When q and the centres are the same for every batch item (a dense grid), the (P, N) kernel
        matrix is computed once and shared; otherwise the (B, P, N) matrix is built in chunks of P.
        """
        B, P, _ = q.shape
        N = self.ctrl.shape[1]
        lin = self.affine[:, 0:1, :] + q @ self.affine[:, 1:3, :]
        shared = (B == 1 or q.stride(0) == 0) and self.shared_ctrl()
        b = 1 if shared else B
        if chunk is None:
            chunk = max(1024, (1 << 22) // max(1, b * N))
        qs, cs = (q[:1], self.ctrl[:1]) if shared else (q, self.ctrl)
        parts = [tps_kernel(_sqdist(qs[:, s:s + chunk], cs)) for s in range(0, P, chunk)]
        U = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (b, P, N)
        return lin + (U[0] @ self.weights if shared else U @ self.weights)

    def eval_lattice(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """T on the lattice ``{(xs[j], ys[i])}``: xs (b, W), ys (b, H) with b = 1 or B → (B, H·W, 2), row-major.

        Squared distances separate, ``d² = (x − cx)² + (y − cy)²``, so they cost one addition per
        (pixel, centre); the (H·W, N) kernel matrix is shared over the batch when b = 1 and the centres
        are shared. Same values as ``self(q)`` on the lattice's points.
        """
        B, N = self.batch, self.ctrl.shape[1]
        b, Wd, Hd = xs.shape[0], xs.shape[1], ys.shape[1]
        shared = b == 1 and self.shared_ctrl()
        c = self.ctrl[:1] if shared else self.ctrl
        if not shared and b == 1:
            xs, ys = xs.expand(B, Wd), ys.expand(B, Hd)
        DX = xs.unsqueeze(-1) - c[:, None, :, 0]
        DY = ys.unsqueeze(-1) - c[:, None, :, 1]
        DX, DY = DX * DX, DY * DY                                       # (b', W, N), (b', H, N)
        rows = max(1, ((1 << 22) // max(1, DX.shape[0] * Wd * N)))
        parts = []
        for r0 in range(0, Hd, rows):
            U = tps_kernel(DY[:, r0:r0 + rows, None, :] + DX[:, None, :, :]).flatten(1, 2)  # (b', rh·W, N)
            parts.append(U[0] @ self.weights if shared else U @ self.weights)
        nonlin = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        a = self.affine
        lin = (a[:, None, None, 0] + xs.expand(B, Wd)[:, None, :, None] * a[:, None, None, 1]
               + ys.expand(B, Hd)[:, :, None, None] * a[:, None, None, 2])          # (B, H, W, 2)
        return lin.flatten(1, 2) + nonlin

    def jacobian(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, P, 2) → ∂T/∂q (B, P, 2, 2), ``J[..., i, j] = ∂T_i/∂q_j``."""
        d = q.unsqueeze(2) - self.ctrl.unsqueeze(1)                    # (B, P, N, 2)
        d2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]
        g = (2.0 * (torch.log(d2.clamp_min(_LOG_FLOOR)) + 1.0)).unsqueeze(-1) * d  # ∇U, (B, P, N, 2)
        J = torch.einsum("bni,bpnj->bpij", self.weights, g)
        return J + self.affine[:, 1:3, :].transpose(1, 2).unsqueeze(1)

    # -- per-point evaluation (each point m carries its batch index b[m]) ---------------------------
    def _eval_pts(self, q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """q (M, 2), b (M,) long → T_b(q) (M, 2)."""
        a = self.affine[b]                                            # (M, 3, 2)
        d2 = _sqdist(q.unsqueeze(1), self.ctrl[b]).squeeze(1)        # (M, N)
        lin = a[:, 0] + (q.unsqueeze(1) @ a[:, 1:3]).squeeze(1)
        return lin + (tps_kernel(d2).unsqueeze(1) @ self.weights[b]).squeeze(1)

    def _jac_pts(self, q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """q (M, 2), b (M,) → (M, 2, 2) Jacobians."""
        d = q.unsqueeze(1) - self.ctrl[b]                            # (M, N, 2)
        d2 = d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]
        g = (2.0 * (torch.log(d2.clamp_min(_LOG_FLOOR)) + 1.0)).unsqueeze(-1) * d
        return self.weights[b].transpose(1, 2) @ g + self.affine[b, 1:3, :].transpose(1, 2)

    def _newton(self, q, p, b, tol: float, max_iter: int):
        """Damped Newton on the points (M, 2) from start q; returns (q, residual (M,))."""
        r = self._eval_pts(q, b) - p
        rn = r.norm(dim=-1)
        rn = torch.where(torch.isfinite(rn), rn, torch.full_like(rn, math.inf))
        alpha = torch.ones_like(rn)
        for _ in range(max_iter):
            act = ((rn > tol) & (alpha > 1e-8)).nonzero().squeeze(1)  # a step shrunk below 1e-8: a local minimum
            if act.numel() == 0:
                break
            qa, ra, ba, al = q[act], r[act], b[act], alpha[act]
            J = self._jac_pts(qa, ba)
            a_, b_, c_, d_ = J[:, 0, 0], J[:, 0, 1], J[:, 1, 0], J[:, 1, 1]
            det = a_ * d_ - b_ * c_
            step = torch.stack((d_ * ra[:, 0] - b_ * ra[:, 1], -c_ * ra[:, 0] + a_ * ra[:, 1]), -1) / det.unsqueeze(-1)
            q_try = qa - al.unsqueeze(-1) * step
            r_try = self._eval_pts(q_try, ba) - p[act]
            rn_try = r_try.norm(dim=-1)
            acc = torch.isfinite(rn_try) & (rn_try < rn[act])
            q[act] = torch.where(acc.unsqueeze(-1), q_try, qa)
            r[act] = torch.where(acc.unsqueeze(-1), r_try, ra)
            rn[act] = torch.where(acc, rn_try, rn[act])
            alpha[act] = torch.where(acc, (al * 2).clamp(max=1.0), al * 0.25)
        return q, rn

    def _affine_init(self, p: torch.Tensor) -> torch.Tensor:
        """p (B, P, 2) → the preimage under the affine part alone (p itself where that is singular)."""
        A = self.affine[:, 1:3, :].transpose(1, 2)  # (B, 2, 2): T_lin(q) = A q + t
        det = A[:, 0, 0] * A[:, 1, 1] - A[:, 0, 1] * A[:, 1, 0]
        ok = det.abs() > 1e-12
        Ainv = torch.stack((torch.stack((A[:, 1, 1], -A[:, 0, 1]), -1),
                            torch.stack((-A[:, 1, 0], A[:, 0, 0]), -1)), 1) / torch.where(ok, det, 1.0)[:, None, None]
        q0 = (p - self.affine[:, 0:1, :]) @ Ainv.transpose(1, 2)
        return torch.where(ok[:, None, None], q0, p)

    def inverse(self, p: torch.Tensor, tol: float = 1e-10, max_iter: int = 100,
                lattice: int = 41, extent: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve ``T(q) = p`` for q by damped Newton. p (B, P, 2) normalised.

        Returns ``(q, residual)``: q (B, P, 2), residual ``‖T(q) − p‖`` (B, P) in normalised units.
        Starts from the node of a ``lattice×lattice`` grid over ``[-extent, extent]²`` whose image is
        nearest to p (a start near the true preimage); points still above ``tol`` are retried from the
        preimage under the affine part alone. A step that does not reduce the residual is quartered; a
        point whose step shrinks below 1e-8 is at a local minimum of ``‖T(q) − p‖`` and stops there
        (with unconstrained TPS weights some points have no preimage at all: the map does not reach
        them).
        Computes in the parameters' dtype (use a float64 copy for tight tolerances); no gradient
        (see :meth:`Warp.points` for the implicit-function gradient).
        """
        with torch.no_grad():
            B, P, _ = p.shape
            b = torch.arange(B, device=p.device).repeat_interleave(P)
            pf = p.reshape(B * P, 2)
            nodes = _ctrl_grid(lattice, p.device, p.dtype) * extent
            img = self(nodes.unsqueeze(0).expand(B, -1, -1))             # (B, L², 2)
            nearest = torch.cdist(p, img).argmin(-1)                      # (B, P)
            q, rn = self._newton(nodes[nearest].reshape(B * P, 2).clone(), pf, b, tol, max_iter)
            bad = (rn > tol).nonzero().squeeze(1)
            if bad.numel():
                start = self._affine_init(p).reshape(B * P, 2)[bad].clone()
                q2, rn2 = self._newton(start, pf[bad], b[bad], tol, max_iter)
                better = rn2 < rn[bad]
                q[bad] = torch.where(better.unsqueeze(-1), q2, q[bad])
                rn[bad] = torch.where(better, rn2, rn[bad])
            return q.reshape(B, P, 2), rn.reshape(B, P)


def tps_fit(ctrl: torch.Tensor, values: torch.Tensor, reg: float = 0.0) -> TPS:
    """The TPS that maps control points ``ctrl`` to ``values`` (exactly when ``reg == 0``).

    ctrl: (N, 2) or (B, N, 2) normalised centres; values: (B, N, 2). Solves the (N+3)×(N+3) system
    ``[[K + reg·I, P], [Pᵀ, 0]] [w; a] = [values; 0]`` with ``K_ij = U(‖c_i − c_j‖²)``, ``P = [1, c]``,
    in float64 (one factorisation when ``ctrl`` is shared). Differentiable in ``values``.
    Returns a :class:`TPS` in ``values``' dtype.
    """
    fn = "tps_fit"
    if not isinstance(values, torch.Tensor) or values.dim() != 3 or values.shape[-1] != 2 or \
            not values.dtype.is_floating_point:
        raise ValueError(f"{fn}: values must be a floating tensor of shape (B, N, 2), got "
                         f"{getattr(values, 'shape', type(values).__name__)}")
    B, N, _ = values.shape
    if not isinstance(ctrl, torch.Tensor) or not ctrl.dtype.is_floating_point or ctrl.shape[-1:] != (2,) or \
            ctrl.dim() not in (2, 3) or ctrl.shape[-2] != N or (ctrl.dim() == 3 and ctrl.shape[0] != B):
        raise ValueError(f"{fn}: ctrl must be a floating tensor of shape (N={N}, 2) or (B={B}, N={N}, 2), got "
                         f"{getattr(ctrl, 'shape', type(ctrl).__name__)}")
    if N < 3:
        raise ValueError(f"{fn}: need at least 3 control points, got N={N}")
    reg = _nonneg(reg, "reg", fn)
    c64 = ctrl.to(device=values.device, dtype=torch.float64)
    shared = c64.dim() == 2
    cb = c64.unsqueeze(0) if shared else c64
    K = tps_kernel(_sqdist(cb, cb)) + reg * torch.eye(N, device=values.device, dtype=torch.float64)
    P = torch.cat((torch.ones_like(cb[..., :1]), cb), -1)  # (b, N, 3)
    top = torch.cat((K, P), -1)
    bot = torch.cat((P.transpose(1, 2), torch.zeros(cb.shape[0], 3, 3, device=values.device, dtype=torch.float64)), -1)
    M = torch.cat((top, bot), 1)  # (b, N+3, N+3)
    rhs = torch.cat((values.to(torch.float64), values.new_zeros(B, 3, 2, dtype=torch.float64)), 1)  # (B, N+3, 2)
    if shared:
        sol = torch.linalg.solve(M[0], rhs.permute(1, 0, 2).reshape(N + 3, 2 * B)).reshape(N + 3, B, 2).permute(1, 0, 2)
    else:
        sol = torch.linalg.solve(M, rhs)
    dt = values.dtype
    return TPS(cb.expand(B, N, 2).to(dt), sol[:, :N].to(dt), sol[:, N:].to(dt))


# --------------------------------------------------------------------------------------------------
# the Warp object
# --------------------------------------------------------------------------------------------------

def _affine_apply(theta: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return q @ theta[:, :, :2].transpose(1, 2) + theta[:, :, 2].unsqueeze(1)


def _affine_inverse(theta: torch.Tensor) -> torch.Tensor:
    A = theta[:, :, :2]
    Ai = torch.linalg.inv(A)
    return torch.cat((Ai, -(Ai @ theta[:, :, 2:])), -1)


class Warp:
    """A batch of backward warps on ``H×W`` images with exact dense and sparse ground truth.

    ``stages``: a list of ``(B, 2, 3)`` affine tensors (normalised frame, ``F.affine_grid``'s theta)
    and :class:`TPS` objects; the output coordinate goes through ``stages[0]`` first and the last
    stage yields the source coordinate. Source and output images have the same size ``(H, W)``.

    * ``grid`` (B, H, W, 2): normalised source location of every output pixel centre, for
      ``F.grid_sample(src, grid, align_corners=False)``. Differentiable in the stage parameters.
    * ``apply(images)``: the warped images (B, C, H, W).
    * ``valid_mask`` (B, H, W) bool: output pixels whose source location lies within the outermost
      source pixel centres (``0 ≤ x ≤ W−1``, ``0 ≤ y ≤ H−1``), i.e. whose bilinear sample reads
      source pixels only, never the padding.
    * ``points(xy)``: forward map of points, source pixels → warped pixels (exact to ``tol``; see
      the module docstring). ``source_points(xy)``: warped pixels → source pixels (closed form).
    """

    def __init__(self, stages: Sequence, size: tuple[int, int]):
        fn = "Warp"
        if not isinstance(size, (tuple, list)) or len(size) != 2:
            raise ValueError(f"{fn}: size must be (H, W), got {size!r}")
        self.H, self.W = _pos_int(size[0], "size[0] (H)", fn), _pos_int(size[1], "size[1] (W)", fn)
        stages = list(stages)
        if not stages:
            raise ValueError(f"{fn}: stages must hold at least one affine (B, 2, 3) tensor or TPS")
        B = None
        for k, s in enumerate(stages):
            if isinstance(s, TPS):
                b = s.batch
            elif isinstance(s, torch.Tensor):
                if s.dim() != 3 or tuple(s.shape[1:]) != (2, 3) or not s.dtype.is_floating_point:
                    raise ValueError(f"{fn}: stages[{k}] must be a floating (B, 2, 3) affine tensor or a TPS, "
                                     f"got tensor {tuple(s.shape)} {s.dtype}")
                b = s.shape[0]
            else:
                raise TypeError(f"{fn}: stages[{k}] must be a (B, 2, 3) tensor or a TPS, got {type(s).__name__}")
            if B is None:
                B = b
            elif b != B:
                raise ValueError(f"{fn}: every stage must have the same batch size, stage 0 has {B}, "
                                 f"stages[{k}] has {b}")
        self.stages = stages
        self.B = B
        self._grid = None

    # -- construction helpers --------------------------------------------------------------------
    @staticmethod
    def identity(B: int, H: int, W: int, device=None, dtype=torch.float32) -> "Warp":
        """The identity warp (one identity affine stage)."""
        B = _pos_int(B, "B", "Warp.identity")
        theta = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]], device=device, dtype=dtype).expand(B, 2, 3).clone()
        return Warp([theta], (H, W))

    def then(self, other: "Warp") -> "Warp":
        """The warp equal to applying ``self`` and then ``other`` (``other.apply(self.apply(x))``)."""
        if not isinstance(other, Warp):
            raise TypeError(f"Warp.then: other must be a Warp, got {type(other).__name__}")
        if (other.B, other.H, other.W) != (self.B, self.H, self.W):
            raise ValueError(f"Warp.then: both warps must have the same (B, H, W), got {(self.B, self.H, self.W)} "
                             f"and {(other.B, other.H, other.W)}")
        return Warp(other.stages + self.stages, (self.H, self.W))

    def to(self, device=None, dtype=None) -> "Warp":
        return Warp([s.to(device=device, dtype=dtype) for s in self.stages], (self.H, self.W))

    @property
    def device(self) -> torch.device:
        s = self.stages[0]
        return (s.weights if isinstance(s, TPS) else s).device

    @property
    def dtype(self) -> torch.dtype:
        s = self.stages[0]
        return (s.weights if isinstance(s, TPS) else s).dtype

    # -- maps ------------------------------------------------------------------------------------
    def map_norm(self, q: torch.Tensor) -> torch.Tensor:
        """Backward map in normalised coordinates: q (B, P, 2) output → (B, P, 2) source."""
        for s in self.stages:
            q = s(q) if isinstance(s, TPS) else _affine_apply(s, q)
        return q

    @property
    def grid(self) -> torch.Tensor:
        """(B, H, W, 2) normalised source coordinates of every output pixel (cached)."""
        if self._grid is None:
            dev, dt = self.device, self.dtype
            # the pixel centres form a lattice; axis-aligned affine stages (crops) keep it one
            xs = ((torch.arange(self.W, device=dev, dtype=dt) * 2 + 1) / self.W - 1).unsqueeze(0)
            ys = ((torch.arange(self.H, device=dev, dtype=dt) * 2 + 1) / self.H - 1).unsqueeze(0)
            q = None
            for s in self.stages:
                if q is None and isinstance(s, TPS):
                    q = s.eval_lattice(xs, ys)
                elif q is None and bool((s[:, 0, 1] == 0).all() and (s[:, 1, 0] == 0).all()):
                    xs = s[:, 0, 0:1] * xs + s[:, 0, 2:3]
                    ys = s[:, 1, 1:2] * ys + s[:, 1, 2:3]
                else:
                    if q is None:
                        q = self._lattice_points(xs, ys)
                    q = s(q) if isinstance(s, TPS) else _affine_apply(s, q)
            if q is None:
                q = self._lattice_points(xs, ys)
            self._grid = q.reshape(self.B, self.H, self.W, 2)
        return self._grid

    def _lattice_points(self, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        """xs (b, W), ys (b, H) → (B, H·W, 2) row-major points."""
        X = xs.expand(self.B, self.W)[:, None, :].expand(self.B, self.H, self.W)
        Y = ys.expand(self.B, self.H)[:, :, None].expand(self.B, self.H, self.W)
        return torch.stack((X, Y), -1).reshape(self.B, self.H * self.W, 2)

    @property
    def grid_pixels(self) -> torch.Tensor:
        """(B, H, W, 2) source pixel coordinates (x, y) of every output pixel."""
        return norm_to_pixel(self.grid, self.H, self.W)

    @property
    def valid_mask(self) -> torch.Tensor:
        """(B, H, W) bool: the output pixel's source location lies in [0, W−1] × [0, H−1] (pixels, ±1e-4)."""
        g = self.grid_pixels
        eps = 1e-4  # float32 rounding of the pixel-centre coordinates
        return ((g[..., 0] >= -eps) & (g[..., 0] <= self.W - 1 + eps) &
                (g[..., 1] >= -eps) & (g[..., 1] <= self.H - 1 + eps))

    def apply(self, images: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
        """images (B, C, H, W) floating → warped (B, C, H, W) (``grid_sample``, ``align_corners=False``)."""
        fn = "Warp.apply"
        if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
            raise TypeError(f"{fn}: images must be a floating torch.Tensor of shape "
                            f"(B={self.B}, C, {self.H}, {self.W})")
        if images.dim() != 4 or images.shape[0] != self.B or tuple(images.shape[2:]) != (self.H, self.W):
            raise ValueError(f"{fn}: images must have shape (B={self.B}, C, H={self.H}, W={self.W}), "
                             f"got {tuple(images.shape)}")
        grid = self.grid.to(device=images.device, dtype=images.dtype)
        return F.grid_sample(images, grid, mode=mode, padding_mode=padding_mode, align_corners=False)

    def source_points(self, xy: torch.Tensor) -> torch.Tensor:
        """Warped-image pixels → source pixels (the backward map, closed form).

        xy: (B, N, 2) or (N, 2) pixel (x, y) in the warped image → (B, N, 2) pixels in the source.
        """
        xy = _points_arg(xy, self.B, "xy", "Warp.source_points")
        q = pixel_to_norm(xy.to(self.dtype), self.H, self.W).to(self.device)
        return norm_to_pixel(self.map_norm(q), self.H, self.W)

    def points(self, xy: torch.Tensor, *, tol: float = 1e-4, max_iter: int = 100,
               return_ok: bool = False):
        """Forward map of points: source pixels → warped-image pixels.

        xy: (B, N, 2) or (N, 2) pixel (x, y) in the source image (any floating dtype). Returns (B, N, 2)
        in ``xy``'s dtype; with ``return_ok=True`` also ``ok`` (B, N) bool. Affine stages invert in
        closed form, TPS stages by Newton in float64. ``ok`` is true where the result ``q`` verifies
        ``‖g⁻¹(q) − x‖ ≤ tol`` source pixels (``g⁻¹`` = the grid map, evaluated in float64); elsewhere
        the result is NaN. Points outside the source image are mapped too (their images may fall
        outside the warped image; compare with ``[0, W−1] × [0, H−1]``).

        Gradients: when autograd is on and ``xy`` or a stage parameter requires grad, one
        implicit-function Newton step in the parameters' dtype gives ``∂q/∂x = J⁻¹`` and
        ``∂q/∂θ = −J⁻¹ ∂g⁻¹/∂θ`` (J the Jacobian of the stage at the solution).
        """
        fn = "Warp.points"
        xy = _points_arg(xy, self.B, "xy", fn)
        tol = _nonneg(tol, "tol", fn)
        max_iter = _pos_int(max_iter, "max_iter", fn)
        out_dtype = xy.dtype
        dev = self.device
        # float64 copies of the stages (on the CPU for backends without float64)
        hp = torch.float64
        ndev = torch.device("cpu") if dev.type == "mps" else dev
        st64 = [s.to(device=ndev, dtype=hp) for s in self.stages]
        # stage tolerance in normalised units: well below tol source pixels
        tol_n = min(tol, 1e-6) * 2.0 / max(self.H, self.W) * 1e-2
        with torch.no_grad():
            p = pixel_to_norm(xy.detach().to(device=ndev, dtype=hp), self.H, self.W)
            inter = [p]  # inter[k]: the point in the frame after stage k (counted from the source end)
            for s in reversed(st64):
                if isinstance(s, TPS):
                    q, _ = s.inverse(inter[-1], tol=tol_n, max_iter=max_iter)
                else:
                    q = _affine_apply(_affine_inverse(s), inter[-1])
                inter.append(q)
            q = inter[-1]
            back = q
            for s in st64:
                back = s(back) if isinstance(s, TPS) else _affine_apply(s, back)
            resid_px = (norm_to_pixel(back, self.H, self.W) - norm_to_pixel(p, self.H, self.W)).norm(dim=-1)
            ok = torch.isfinite(resid_px) & (resid_px <= tol)
        needs_grad = torch.is_grad_enabled() and (xy.requires_grad or any(
            (s.weights.requires_grad or s.affine.requires_grad or s.ctrl.requires_grad) if isinstance(s, TPS)
            else s.requires_grad for s in self.stages))
        if needs_grad:
            dt = self.dtype
            okd = ok.to(dev)
            cur = pixel_to_norm(xy.to(device=dev, dtype=dt), self.H, self.W)
            cur = torch.where(okd.unsqueeze(-1), cur, 0.0)  # non-finite inputs must not reach the gradients
            for k, s in enumerate(reversed(self.stages)):
                if isinstance(s, TPS):
                    # q* is a constant; one Newton step from it carries the implicit-function gradient.
                    # Points without a solution get a finite stand-in (masked below) so that no NaN
                    # reaches the parameters' gradients.
                    qs = torch.where(okd.unsqueeze(-1), inter[k + 1].to(device=dev, dtype=dt), 0.0)
                    J = s.jacobian(qs).detach()
                    a, b, c, d = J[..., 0, 0], J[..., 0, 1], J[..., 1, 0], J[..., 1, 1]
                    det = a * d - b * c
                    det = torch.where(okd & (det != 0), det, torch.ones_like(det))
                    r = s(qs) - cur
                    corr = torch.stack((d * r[..., 0] - b * r[..., 1], a * r[..., 1] - c * r[..., 0]), -1)
                    cur = qs - corr / det.unsqueeze(-1)
                else:
                    cur = _affine_apply(_affine_inverse(s), cur)
            res, ok = norm_to_pixel(cur, self.H, self.W), okd
        else:
            res = norm_to_pixel(q, self.H, self.W).to(dev)
            ok = ok.to(dev)
        res = torch.where(ok.unsqueeze(-1), res, torch.full_like(res, math.nan)).to(device=xy.device, dtype=out_dtype)
        ok = ok.to(xy.device)
        return (res, ok) if return_ok else res

    def folds(self) -> torch.Tensor:
        """(B,) bool: the backward map has a non-positive Jacobian determinant somewhere on the output grid.

        Finite differences of ``grid_pixels`` between neighbouring pixel centres, over the cells whose
        four corners all sample inside the source image area. A warp that does not fold is locally
        one-to-one, so :meth:`points` has one answer.
        """
        g = self.grid.detach()  # normalised; the sign of det is the same as in pixels
        if self.H < 2 or self.W < 2:
            return torch.zeros(self.B, dtype=torch.bool, device=g.device)
        dx = g[:, :-1, 1:] - g[:, :-1, :-1]
        dy = g[:, 1:, :-1] - g[:, :-1, :-1]
        det = dx[..., 0] * dy[..., 1] - dx[..., 1] * dy[..., 0]
        inside = (g.abs() <= 1.0).all(-1)
        cell = inside[:, :-1, :-1] & inside[:, :-1, 1:] & inside[:, 1:, :-1] & inside[:, 1:, 1:]
        return ((det <= 0) & cell).flatten(1).any(1)

    def __repr__(self) -> str:
        kinds = ["tps" if isinstance(s, TPS) else "affine" for s in self.stages]
        return f"Warp(B={self.B}, H={self.H}, W={self.W}, stages={kinds})"


# --------------------------------------------------------------------------------------------------
# random parameters
# --------------------------------------------------------------------------------------------------

def _common(B, generator, device, dtype, fn):
    B = _pos_int(B, "B", fn)
    _float_dtype(dtype, fn)
    gdev = _gen_device(generator)
    device = torch.device(device) if device is not None else gdev
    return B, device


def tps_warp_params(B: int, *, preset: str | WarpPreset = "demystifying", grid: int | None = None,
                    scale: float = 1.0, generator: torch.Generator | None = None, device=None,
                    dtype: torch.dtype = torch.float32) -> TPS:
    """Random TPS warps (non-affine part only; the affine part is the identity).

    ``preset.tps_param == "weights"`` (Demystifying/DVE): centres a ``grid×grid`` lattice over
    ``[-1, 1]²``; weights ~ N(0, (scale·tps_sd_all)²), each coordinate replaced with probability
    ``tps_subset_p`` by N(0, (scale·tps_sd_subset)²). ``"jitter"`` (Universal): the TPS that maps the
    lattice to itself plus a jitter ~ N(0, (scale·tps_jitter_sd)²) clipped to ±scale·tps_jitter_max
    (it interpolates the jittered lattice exactly).

    ``grid`` overrides the preset's lattice size (≥ 2). Random numbers are drawn in float64 on the
    generator's device (CPU by default), so a seed gives the same warp on every device; the result
    is moved to ``device`` (default: the generator's) in ``dtype``. Returns a :class:`TPS` of batch B.
    """
    fn = "tps_warp_params"
    B, device = _common(B, generator, device, dtype, fn)
    p = get_preset(preset)
    n = p.grid if grid is None else _pos_int(grid, "grid", fn, minimum=2)
    scale = _nonneg(scale, "scale", fn)
    ctrl = _ctrl_grid(n, _gen_device(generator), torch.float64)
    N = n * n
    if p.tps_param == "weights":
        w_all = _randn((B, N, 2), generator) * (scale * p.tps_sd_all)
        subset = _rand((B, N, 2), generator) < p.tps_subset_p
        w_sub = _randn((B, N, 2), generator) * (scale * p.tps_sd_subset)
        w = torch.where(subset, w_sub, w_all)
        aff = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64, device=ctrl.device)
        tps = TPS(ctrl.expand(B, N, 2), w, aff.expand(B, 3, 2).clone())
    else:
        jit = _randn((B, N, 2), generator) * (scale * p.tps_jitter_sd)
        lim = scale * p.tps_jitter_max
        if lim > 0:
            jit = jit.clamp(-lim, lim)
        tps = tps_fit(ctrl, ctrl.unsqueeze(0) + jit)
    return tps.to(device=device, dtype=dtype)


def affine_params(B: int, *, preset: str | WarpPreset = "demystifying", scale: float = 1.0, aspect: float = 1.0,
                  generator: torch.Generator | None = None, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random similarity transforms (the Demystifying/DVE affine part) as (B, 2, 3) thetas.

    ``theta`` maps output normalised coordinates to source ones, ``src = A·out + t`` (as
    ``F.affine_grid``). Rotation θ ~ N(0, (scale·rot_sd_deg)²) degrees, isotropic scale
    ``s = 1 + N(0, (scale·scale_sd)²)``, translation ``t`` ~ N(0, (scale·trans_sd)²) per axis in
    normalised units; ``A = s·[[cos θ, sin θ], [−sin θ, cos θ]]`` in *pixel-isotropic* units, so that
    a rotation stays a rotation on non-square images: ``A_norm = D⁻¹ A D`` with ``D = diag(aspect, 1)``,
    ``aspect = W / H`` (1 for square images, where this is exactly DVE's matrix). For a crop-type
    preset (Universal) this draws a random rescaled crop (:func:`crop_params`).
    """
    fn = "affine_params"
    B, device = _common(B, generator, device, dtype, fn)
    p = get_preset(preset)
    scale = _nonneg(scale, "scale", fn)
    if isinstance(aspect, bool) or not isinstance(aspect, Real) or not (math.isfinite(aspect) and aspect > 0):
        raise ValueError(f"{fn}: aspect must be a finite number > 0 (W / H), got {aspect!r}")
    if p.affine == "crop":
        return crop_params(B, preset=p, scale=scale, aspect=aspect, generator=generator, device=device, dtype=dtype)
    z = _randn((B, 4), generator)
    rot = z[:, 0] * (scale * p.rot_sd_deg) * math.pi / 180.0
    s = 1.0 + z[:, 1] * (scale * p.scale_sd)
    t = z[:, 2:4] * (scale * p.trans_sd)
    c, sn = torch.cos(rot) * s, torch.sin(rot) * s
    theta = torch.stack((torch.stack((c, sn / aspect, t[:, 0]), -1),
                         torch.stack((-sn * aspect, c, t[:, 1]), -1)), 1)
    return theta.to(device=device, dtype=dtype)


def crop_params(B: int, *, preset: str | WarpPreset = "universal", scale: float = 1.0, aspect: float = 1.0,
                generator: torch.Generator | None = None, device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random rescaled crops as (B, 2, 3) thetas (output normalised → source normalised).

    Area fraction ``a`` ~ U[1 − scale·(1 − lo), 1 − scale·(1 − hi)] with ``(lo, hi) = preset.crop_area``;
    aspect ratio ``r`` log-uniform in ``[lo^scale, hi^scale]`` (``preset.crop_ratio``), relative to the
    image's own aspect; crop width/height fractions ``fw = √(a·r)``, ``fh = √(a/r)`` (each capped at 1);
    the crop centre is uniform over the positions that keep the crop inside the image. The crop is
    resized to the full output: ``src = diag(fw, fh)·out + c``. ``aspect`` is accepted for symmetry
    with :func:`affine_params` and unused (fractions are relative).
    """
    fn = "crop_params"
    B, device = _common(B, generator, device, dtype, fn)
    p = get_preset(preset)
    scale = _nonneg(scale, "scale", fn)
    u = _rand((B, 4), generator)
    a_lo, a_hi = 1 - scale * (1 - p.crop_area[0]), 1 - scale * (1 - p.crop_area[1])
    a_lo = max(a_lo, 1e-3)
    area = a_lo + (a_hi - a_lo) * u[:, 0]
    lr_lo, lr_hi = scale * math.log(p.crop_ratio[0]), scale * math.log(p.crop_ratio[1])
    r = torch.exp(lr_lo + (lr_hi - lr_lo) * u[:, 1])
    fw = torch.sqrt(area * r).clamp(max=1.0)
    fh = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - fw) * (2 * u[:, 2] - 1)
    cy = (1 - fh) * (2 * u[:, 3] - 1)
    zero = torch.zeros_like(fw)
    theta = torch.stack((torch.stack((fw, zero, cx), -1), torch.stack((zero, fh, cy), -1)), 1)
    return theta.to(device=device, dtype=dtype)


def random_warp(B: int, H: int, W: int, kind: str = "tps+affine", *, preset: str | WarpPreset = "demystifying",
                scale: float = 1.0, affine_scale: float | None = None, grid: int | None = None,
                generator: torch.Generator | None = None, device=None, dtype: torch.dtype = torch.float32) -> Warp:
    """A batch of B random warps on H×W images.

    kind: ``"tps"``, ``"affine"`` or ``"tps+affine"``. With a ``"weights"`` preset (Demystifying)
    ``"tps+affine"`` is one TPS whose affine part is the random similarity, exactly DVE's warp; with a
    ``"jitter"`` preset (Universal) it is the TPS followed by the rescaled crop (stages
    ``[crop, tps]``: the output is a crop of the TPS-warped image). ``scale`` multiplies the TPS
    magnitudes and ``affine_scale`` (default ``scale``) the affine/crop ones. Draw order per call is
    fixed (TPS, then affine), so a seeded generator reproduces the warp. Returns a :class:`Warp`.
    """
    fn = "random_warp"
    B, device = _common(B, generator, device, dtype, fn)
    H, W = _pos_int(H, "H", fn), _pos_int(W, "W", fn)
    if kind not in _KINDS:
        raise ValueError(f"{fn}: kind must be one of {_KINDS}, got {kind!r}")
    p = get_preset(preset)
    scale = _nonneg(scale, "scale", fn)
    affine_scale = scale if affine_scale is None else _nonneg(affine_scale, "affine_scale", fn)
    kw = dict(generator=generator, device=device, dtype=dtype)
    tps = tps_warp_params(B, preset=p, grid=grid, scale=scale, **kw) if kind in ("tps", "tps+affine") else None
    theta = (affine_params(B, preset=p, scale=affine_scale, aspect=W / H, **kw)
             if kind in ("affine", "tps+affine") else None)
    if tps is None:
        return Warp([theta], (H, W))
    if theta is None:
        return Warp([tps], (H, W))
    if p.tps_param == "weights":
        aff = torch.cat((theta[:, :, 2].unsqueeze(1), theta[:, :, :2].transpose(1, 2)), 1)  # [t; Aᵀ]
        return Warp([TPS(tps.ctrl, tps.weights, aff)], (H, W))
    return Warp([theta, tps], (H, W))


def random_warp_pair(B: int, H: int, W: int, kind: str = "tps+affine", *, preset: str | WarpPreset = "demystifying",
                     generator: torch.Generator | None = None, device=None,
                     dtype: torch.dtype = torch.float32) -> tuple[Warp, Warp]:
    """The two-stage warp of DVE/Demystifying: ``(first, second)``.

    ``im1 = first.apply(x)`` uses the preset's first-warp multipliers (Demystifying: TPS ×0.5, affine
    ×1); ``im2 = second.apply(im1)`` is a full-strength warp, and ``second`` is the known
    correspondence im1 → im2 used by the EQ/DVE losses. ``first.then(second)`` maps x → im2 (its
    ``valid_mask`` marks im2 pixels that come from inside x).
    """
    p = get_preset(preset)
    kw = dict(preset=p, generator=generator, device=device, dtype=dtype)
    first = random_warp(B, H, W, kind, scale=p.first_tps_multiplier, affine_scale=p.first_affine_multiplier, **kw)
    second = random_warp(B, H, W, kind, **kw)
    return first, second


# --------------------------------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------------------------------

_LUMA = (0.299, 0.587, 0.114)
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.595716, -0.274453, -0.321263), (0.211456, -0.522591, 0.311135))


def color_jitter(images: torch.Tensor, *, brightness: float | None = None, contrast: float | None = None,
                 saturation: float | None = None, hue: float | None = None, preset: str | WarpPreset | None = None,
                 generator: torch.Generator | None = None, return_params: bool = False):
    """Batched random colour jitter of RGB images in [0, 1] (a different draw per image).

    images: (B, 3, H, W) floating. Strengths as torchvision's ``ColorJitter``: factors
    ``b, c, s ~ U[max(0, 1 − strength), 1 + strength]``, hue shift ``h ~ U[−hue, hue]`` of a full turn
    (``hue ≤ 0.5``). Applied in a fixed order, clamping to [0, 1] after each step:
    brightness ``x·b``; contrast ``(x − m)·c + m`` with ``m`` the image's mean luma; saturation
    ``y + s·(x − y)`` with ``y`` the pixel's luma (Rec. 601); hue-lite: a rotation by ``2πh`` of the
    chroma plane in YIQ space (linear, differentiable; close to, not equal to, an HSV hue shift).
    Unset strengths come from ``preset`` (``"universal"``: 0.4/0.4/0.4/0.1) or are 0.
    Returns the jittered images (same shape/dtype), and with ``return_params=True`` also the (B, 4)
    factors ``(b, c, s, h)``. Differentiable in ``images``.
    """
    fn = "color_jitter"
    if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
        raise TypeError(f"{fn}: images must be a floating torch.Tensor of shape (B, 3, H, W)")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{fn}: images must have shape (B, 3, H, W), got {tuple(images.shape)}")
    base = (0.0, 0.0, 0.0, 0.0)
    if preset is not None:
        pc = get_preset(preset).color
        base = pc if pc is not None else base
    vals = []
    given = (brightness, contrast, saturation, hue)
    for name, v, d in zip(("brightness", "contrast", "saturation", "hue"), given, base):
        vals.append(d if v is None else _nonneg(v, name, fn))
    if vals[3] > 0.5:
        raise ValueError(f"{fn}: hue must be in [0, 0.5], got {vals[3]}")
    B = images.shape[0]
    u = _rand((B, 4), generator)
    f = [max(0.0, 1 - v) + (1 + v - max(0.0, 1 - v)) * u[:, k] for k, v in enumerate(vals[:3])]
    h = (2 * u[:, 3] - 1) * vals[3]
    params = torch.stack(f + [h], -1).to(device=images.device, dtype=images.dtype)
    b, c, s, hh = (params[:, k].view(B, 1, 1, 1) for k in range(4))
    luma = images.new_tensor(_LUMA).view(1, 3, 1, 1)
    x = (images * b).clamp(0, 1)
    m = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = ((x - m) * c + m).clamp(0, 1)
    y = (x * luma).sum(1, keepdim=True)
    x = (y + s * (x - y)).clamp(0, 1)
    if vals[3] > 0:
        M = images.new_tensor(_RGB2YIQ)
        Minv = torch.linalg.inv(M.double()).to(images.dtype)
        yiq = torch.einsum("ij,bjhw->bihw", M, x)
        ang = 2 * math.pi * hh
        cos, sin = torch.cos(ang), torch.sin(ang)
        i2 = yiq[:, 1:2] * cos - yiq[:, 2:3] * sin
        q2 = yiq[:, 1:2] * sin + yiq[:, 2:3] * cos
        x = torch.einsum("ij,bjhw->bihw", Minv, torch.cat((yiq[:, :1], i2, q2), 1)).clamp(0, 1)
    return (x, params) if return_params else x
