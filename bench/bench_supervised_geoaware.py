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
import argparse
import math
import sys

import pytest
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


@pytest.mark.parametrize("impl", ["ours", "naive"])
@pytest.mark.parametrize("case", list(CASES))
def test_geoaware_step(benchmark, case, impl):
    benchmark.group = f"geoaware {case} 60x60"
    ours, naive = CASES[case](60)
    fn = ours if impl == "ours" else naive
    fn()
    benchmark.extra_info["peak_extra_MiB"] = B.peak_extra_mib(fn)
    benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grids", type=int, nargs="+", default=[60, 120], help="feature grid sides (default 60 120)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeat", type=int, default=2, help="alternating timing rounds (best of)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"machine: {B.machine()}")
    print("| case (fwd+bwd, B=1, K=30, 4 augmented pairs) | grid | ours ms | naive ms | speedup | ours peak MiB "
          "| naive peak MiB | memory ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        for side in args.grids:
            ours, naive = CASES[case](side)
            if side <= 60:
                ours(), naive()                               # warm-up (thread pools, allocator)
            op, npk = B.peak_extra_mib(ours), B.peak_extra_mib(naive)
            om, nm = B.time_pair_ms(ours, naive, repeat=args.repeat)
            ratio = f"{op / npk:.1%}" if op is not None and npk else "n/a"
            fmt = lambda v: "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0f}"  # noqa: E731
            print(f"| {case} | {side}x{side} | {om:.0f} | {nm:.0f} | {nm / om:.2f}x | {fmt(op)} | {fmt(npk)} | {ratio} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
