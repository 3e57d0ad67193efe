"""One GeoAware-SC supervised training step (forward + backward), ours vs the released code's formulation.

Ours: the dense soft-argmax EPE of the K keypoint rows of every augmented pair through
``ops.soft_argmax`` (pairs sharing a target map share one op call; no Ns×Nt matrix, gradients into
every target cell). Naive (``dense_impl="naive"``, what the released code's ``Correlation2Displacement``
does): for each augmented pair (original, single, double, self flip) the full Ns×Nt similarity of the
whole source map, a row softmax with β = 0.02, the expected coordinates of all Ns rows, then the K
keypoint rows. Both sides run the same post-processor and CLIP loss.

Cases (batch size 1 = the paper's, K = 30 keypoints = SPair's largest, flip_aug = "paper"):

* ``step``: the whole step from raw backbone features (4 maps of 3968 channels: source, target and
  their mirrors) through the paper-size post-processor (5.15 M parameters) and every loss term;
* ``loss``: the losses only, from post-processed 768-d unit maps (leaf tensors), i.e. the part the two
  formulations differ in.

Run:  .venv/bin/python bench/bench_supervised_geoaware.py [--grids 60 120] [--cases step loss] [--repeat 2]
or    .venv/bin/python -m pytest bench/bench_supervised_geoaware.py --benchmark-group-by=group   (60² only)
The table's times are best-of-``repeat`` of alternating runs (ours, naive, ours, ...) after one
unmeasured call each; peak memory (resident memory above the level before the call) is measured first
(after a warm-up call for grids up to 60²; at larger grids the one-time allocations are negligible).
"""

import torch
import torch.nn.functional as F

from semcorr_fast import bench as B
from semcorr_fast.data.canvas import Canvas
from semcorr_fast.methods import build_method

FEATURE_DIMS = (640, 1280, 1280, 768)


class _RawFeatures(torch.nn.Module):
    """Stand-in for the ``sd_dino`` backbone in ``mode="raw"`` (the step reads cached features)."""

    name, dim, stride, canvas = "sd_dino", sum(FEATURE_DIMS), 16, Canvas.pad_square(960)

    def forward(self, images):  # pragma: no cover - never called on feature batches
        raise RuntimeError("feature batches only")


def _batch(side: int, c: int, k: int = 30, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    maps = {n: torch.randn(1, c, side, side, generator=g).abs() for n in
            ("src_feat", "trg_feat", "src_feat_flip", "trg_feat_flip")}
    perm = torch.arange(k)
    perm[0:10:2], perm[1:10:2] = perm[1:10:2].clone(), perm[0:10:2].clone()   # 5 left/right pairs
    kps = lambda: torch.rand(1, k, 2, generator=g) * (side - 0.01)  # noqa: E731
    return {**maps, "src_kps": kps(), "trg_kps": kps(), "valid": torch.ones(1, k, dtype=torch.bool),
            "flip_perm": perm[None], "src_flip_width": torch.tensor([float(side)]),
            "trg_flip_width": torch.tensor([float(side)]), "thr": torch.tensor([side * 0.6]),
            "src_thr": torch.tensor([side * 0.5])}


def step_case(side: int = 60):
    """The whole training step from raw 3968-channel features (post-processor + every loss)."""
    batch = _batch(side, sum(FEATURE_DIMS))
    torch.manual_seed(0)
    ours = build_method("geoaware", _RawFeatures(), feature_dims=FEATURE_DIMS, backend="cpu")
    naive = build_method("geoaware", _RawFeatures(), feature_dims=FEATURE_DIMS, dense_impl="naive")
    naive.load_state_dict(ours.state_dict())

    def run(m):
        def fn():
            m.zero_grad(set_to_none=True)
            m.training_step({**batch, "generator": torch.Generator().manual_seed(1)}, 0)["loss"].backward()
        return fn

    return run(ours), run(naive)


def loss_case(side: int = 60, d: int = 768):
    """The losses only, from post-processed unit maps: the post-processor is replaced by the identity."""
    batch = _batch(side, d)
    leaves = {n: F.normalize(batch[n], dim=1).requires_grad_() for n in
              ("src_feat", "trg_feat", "src_feat_flip", "trg_feat_flip")}
    batch.update(leaves)
    torch.manual_seed(0)
    ours = build_method("geoaware", _RawFeatures(), feature_dims=FEATURE_DIMS, backend="cpu")
    naive = build_method("geoaware", _RawFeatures(), feature_dims=FEATURE_DIMS, dense_impl="naive")
    for m in (ours, naive):
        m.descriptor_from_features = lambda x: x  # noqa: E731  (maps are already unit descriptors)

    def run(m):
        def fn():
            for t in leaves.values():
                t.grad = None
            m.training_step({**batch, "generator": torch.Generator().manual_seed(1)}, 0)["loss"].backward()
        return fn

    return run(ours), run(naive)


CASES = {"step": step_case, "loss": loss_case}


test_geoaware_step = B.pytest_cases("geoaware", CASES)


def main(argv=None) -> None:
    B.ours_vs_naive_main(__doc__.split("\n")[0], CASES,
                         "case (fwd+bwd, B=1, K=30, 4 augmented pairs)", argv, warmup_max_side=60)


if __name__ == "__main__":
    main()
