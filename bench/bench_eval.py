"""pytest-benchmark suite of the evaluation layer (issue 6): matching + metric time per SPair-style pair.

With cached features (a 60×60 source and target map, K = 30 keypoints, C = 768 or 3968), one pair's
prediction and PCK, ours vs the anchors' way:

* ours: ``matching.match_keypoints`` queries only the K keypoint rows (streamed window soft-argmax or
  argmax, no 3600×3600 matrix), then ``metrics.pck``;
* anchors: GeoAware-SC / Jamais Vu's ``get_flow`` habit: the full 3600×3600 cosine matrix, the window
  soft-argmax of EVERY row (a flow field), then index the K keypoint rows; then the same PCK.

Run:  .venv/bin/python -m pytest bench/bench_eval.py --benchmark-group-by=group \
          --benchmark-columns=min,median,max,rounds
or    .venv/bin/python bench/bench_eval.py          (a table; best of alternating runs, peak memory first)
      .venv/bin/python bench/bench_eval.py --e2e    (also: wall time of `semcorr eval --dataset warps`)
"""
import subprocess
import sys
import time

import pytest
import torch

from semcorr_fast import bench as B
from semcorr_fast import matching, metrics


def pair_case(C=768, side=60, K=30, kind="window"):
    g = torch.Generator().manual_seed(0)
    src = torch.randn(C, side, side, generator=g)
    trg = torch.randn(C, side, side, generator=g)
    canvas = 840.0
    frame = (0.0, 0.0, canvas, canvas)
    kps = torch.rand(K, 2, generator=g) * (canvas - 1)
    gt = torch.rand(K, 2, generator=g) * (canvas - 1)
    valid = torch.rand(K, generator=g) > 0.2
    thr = torch.tensor([300.0])
    matcher = matching.build_matcher("geoaware" if kind == "window" else "geoaware-zeroshot")

    def ours():
        pred = matching.match_keypoints(src, trg, kps, matcher, src_frame=frame, trg_frame=frame)
        return metrics.pck(pred[None], gt[None], thr, 0.1, valid=valid[None])

    def anchors():
        a = torch.nn.functional.normalize(src.reshape(C, -1).t(), dim=-1)[None]
        b = torch.nn.functional.normalize(trg.reshape(C, -1).t(), dim=-1)[None]
        if kind == "window":
            flow = B.naive_window_soft_argmax(a, b, 0.02, (side, side), 7)[0]     # every row: (3600, 2)
        else:
            j = (a @ b.transpose(1, 2))[0].argmax(-1)
            flow = torch.stack((j % side, j // side), -1).float()
        cell = (kps * side / canvas).floor().long()
        pred = (flow[cell[:, 1] * side + cell[:, 0]] + 0.5) * (canvas / side)
        return metrics.pck(pred[None], gt[None], thr, 0.1, valid=valid[None])

    return ours, anchors


CASES = {f"{kind} K=30 60x60 C={C}": (C, kind) for kind in ("window", "argmax") for C in (768, 3968)}


@pytest.mark.parametrize("impl", ["ours", "anchors"])
@pytest.mark.parametrize("case", list(CASES))
def test_match_pair(benchmark, case, impl):
    benchmark.group = case
    C, kind = CASES[case]
    ours, anchors = pair_case(C=C, kind=kind)
    fn = ours if impl == "ours" else anchors
    benchmark.extra_info["peak_extra_MiB"] = B.peak_extra_mib(fn)
    benchmark.pedantic(fn, rounds=5, iterations=1, warmup_rounds=1)


def e2e_warps(n_pairs=20) -> float:
    """Wall time (s) of `semcorr eval --dataset warps` with the default DAISY backbone, end to end."""
    cmd = [sys.executable, "-m", "semcorr_fast.cli", "eval", "--dataset", "warps", "--n-pairs", str(n_pairs),
           "--backbone", "daisy", "--matcher", "geoaware", "--quiet"]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    print(out.stdout.strip().splitlines()[-1])
    return dt


if __name__ == "__main__":
    print(f"machine: {B.machine()}")
    print("| case (one pair: match + PCK) | ours ms | anchors ms | speedup | ours peak MiB | anchors peak MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (C, kind) in CASES.items():
        ours, anchors = pair_case(C=C, kind=kind)
        ours(), anchors()
        po, pa = B.peak_extra_mib(ours), B.peak_extra_mib(anchors)
        to, ta = B.time_pair_ms(ours, anchors, repeat=5)
        print(f"| {name} | {to:.1f} | {ta:.1f} | {ta / to:.1f}x | {po:.1f} | {pa:.1f} |")
        sys.stdout.flush()
    if "--e2e" in sys.argv:
        print(f"\n`semcorr eval --dataset warps --n-pairs 20` (daisy, geoaware): {e2e_warps(20):.1f} s wall")
