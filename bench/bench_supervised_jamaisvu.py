"""One Jamais Vu training step (forward + backward), ours vs the released code's formulation.

Ours (``impl="fused"``): GeoAware-SC's keypoint-row soft-argmax (``ops.soft_argmax``); farthest-point
sampling over the object pixels only; Φ sampled bilinearly at the 1,024 sampled points
(:func:`semcorr_fast.geometry.sample_at_points`); all 2 × 1,024 neighbourhood Kabsch fits in one
``ops.kabsch`` call. Naive (``impl="naive"``, what the released code does): GeoAware-SC's full Ns×Nt
soft-argmax per augmented pair; FPS over every pixel of the zero-padded point map (masked); Φ upsampled
to the whole padded point-map square (768 × P × P, plus its gradient) before gathering; one
``torch.linalg.svd`` Umeyama fit per neighbourhood in a Python loop. The pseudo-geodesic / kNN
neighbourhood search is the same vectorised code on both sides.

Cases (batch size 1 = the paper's, K = 30 keypoints, flip_aug = "paper", 1,024 points, k′ = 64; a
synthetic 500 × 375 point map — SPair's typical image size — with a 40 % object mask):

* ``step``: the whole step from raw backbone features (4 maps of 3968 channels) through the paper-size
  post-processor, GeoAware-SC's losses and the prototype losses;
* ``proto``: the prototype losses only (``L_𝒫``, ``L_𝒵``, ``L_geom``), from post-processed 768-d unit
  maps (a leaf tensor), i.e. the part Jamais Vu adds.

Run:  .venv/bin/python bench/bench_supervised_jamaisvu.py [--grids 60 120] [--cases proto step] [--repeat 2]
or    .venv/bin/python -m pytest bench/bench_supervised_jamaisvu.py --benchmark-group-by=group   (60² only)
Times are best-of-``repeat`` of alternating runs (ours, naive, ours, ...) after one unmeasured call each;
peak memory (resident memory above the level before the call) is measured first.
"""
import math

import torch
import torch.nn.functional as F

from semcorr_fast import bench as B
from semcorr_fast import geometry as G
from semcorr_fast.data.canvas import Canvas
from semcorr_fast.methods import build_method

FEATURE_DIMS = (640, 1280, 1280, 768)
CANVAS = 840
PM_HW = (375, 500)


class _RawFeatures(torch.nn.Module):
    """Stand-in for the ``sd_dino`` backbone in ``mode="raw"`` (the step reads cached features)."""

    name, dim, stride, canvas = "sd_dino", sum(FEATURE_DIMS), 14, Canvas.pad_square(CANVAS)

    def forward(self, images):  # pragma: no cover - never called on feature batches
        raise RuntimeError("feature batches only")


def synthetic_geometry(hw=PM_HW, seed: int = 0) -> G.ImageGeometry:
    """A smooth bumpy surface seen by a pinhole camera, an elliptical object mask (≈ 40 % of the pixels)
    with a leak onto the background (removed by the depth-MAD filter)."""
    H, W = hw
    g = torch.Generator().manual_seed(seed)
    K = G.intrinsics_from_fov(55.0, 2 * math.degrees(math.atan(math.tan(math.radians(27.5)) * H / W)), H, W)
    v, u = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    e = ((u - W / 2) / (0.38 * W)) ** 2 + ((v - H / 2) / (0.4 * H)) ** 2
    obj = e < 1
    phase = torch.rand(2, generator=g) * 6
    depth = torch.where(obj, 3.0 - 0.6 * (1 - e).clamp(min=0).sqrt() + 0.05 * torch.sin(u / 17 + phase[0])
                        * torch.cos(v / 13 + phase[1]), torch.full_like(u, 8.0))
    pts = G.backproject(torch.stack((u, v), -1).double(), depth.double(), K).float()
    prob = obj.float()
    prob[(e >= 1) & (e < 1.08)] = 1.0                                            # leak onto the far background
    return G.ImageGeometry(pts, depth.float(), torch.ones(H, W, dtype=torch.bool), K, prob)


def _batch(side: int, c: int, geom: G.ImageGeometry, k: int = 30, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    maps = {n: torch.randn(1, c, side, side, generator=g).abs() for n in
            ("src_feat", "trg_feat", "src_feat_flip", "trg_feat_flip")}
    perm = torch.arange(k)
    perm[0:10:2], perm[1:10:2] = perm[1:10:2].clone(), perm[0:10:2].clone()   # 5 left/right pairs
    # source keypoints on object pixels (so that they lift), mapped point map → canvas → grid
    obj = (geom.object_prob >= 0.99).reshape(-1).nonzero().squeeze(1)
    pick = obj[torch.randperm(obj.numel(), generator=g)[:k]]
    H, W = geom.size
    pix = torch.stack((pick % W, pick // W), -1).double() + 0.5
    tf = Canvas.pad_square(CANVAS).transform_for(H, W)
    src = (tf.points(pix) * side / CANVAS).float()[None]
    trg = torch.rand(1, k, 2, generator=g) * (side - 0.01)
    return {**maps, "src_kps": src, "trg_kps": trg, "valid": torch.ones(1, k, dtype=torch.bool),
            "flip_perm": perm[None], "src_flip_width": torch.tensor([float(side)]),
            "trg_flip_width": torch.tensor([float(side)]), "thr": torch.tensor([side * 0.6]),
            "src_thr": torch.tensor([side * 0.5]), "category": ["car"], "src_geometry": [geom]}


def _methods():
    torch.manual_seed(0)
    ours = build_method("jamaisvu", _RawFeatures(), feature_dims=FEATURE_DIMS, backend="cpu")
    naive = build_method("jamaisvu", _RawFeatures(), feature_dims=FEATURE_DIMS, impl="naive")
    naive.load_state_dict(ours.state_dict())
    return ours, naive


def step_case(side: int = 60):
    """The whole training step from raw 3968-channel features."""
    batch = _batch(side, sum(FEATURE_DIMS), synthetic_geometry())
    ours, naive = _methods()

    def run(m):
        def fn():
            m.zero_grad(set_to_none=True)
            m.training_step({**batch, "generator": torch.Generator().manual_seed(1)}, 0)["loss"].backward()
        return fn

    return run(ours), run(naive)


def proto_case(side: int = 60, d: int = 768):
    """The prototype losses only, from a post-processed unit map (leaf)."""
    geom = synthetic_geometry()
    batch = _batch(side, 1, geom)
    desc = F.normalize(torch.randn(1, d, side, side, generator=torch.Generator().manual_seed(2)).abs(), dim=1)
    desc.requires_grad_()
    ours, naive = _methods()

    def run(m):
        def fn():
            desc.grad = None
            m.zero_grad(set_to_none=True)
            out = m.prototype_losses(desc, batch["src_kps"], ["car"], [geom], (CANVAS, CANVAS),
                                     torch.Generator().manual_seed(1))
            (out["proto_align"] + 0.3 * out["proto_feat"] + out["geom_f"] + out["geom_b"]).backward()
        return fn

    return run(ours), run(naive)


CASES = {"proto": proto_case, "step": step_case}


test_jamaisvu_step = B.pytest_cases("jamaisvu", CASES)


def main(argv=None) -> None:
    B.ours_vs_naive_main(__doc__.split("\n")[0], CASES,
                         "case (fwd+bwd, B=1, K=30, 1024 FPS points, k'=64, point map 500x375)", argv)


if __name__ == "__main__":
    main()
