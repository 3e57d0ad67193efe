"""pytest-benchmark suite of the training-loss family (issue 5's targets), forward + backward.

Run:  .venv/bin/python -m pytest bench/bench_losses.py --benchmark-group-by=group \
          --benchmark-columns=min,median,max,rounds
or    .venv/bin/python bench/bench_losses.py        (a table, plus the 20 GB extrapolation)
Naive = the reference implementation (dense torch, what the papers' code does), fp32. The table's
times are best-of-3 of alternating runs (fused, naive, ...); peak memory is measured first.
"""
import sys

import pytest
import torch

from semcorr_fast import bench as B
from semcorr_fast import ops
from semcorr_fast import reference as ref


def asym_case(side=64, batch=8, cs=256, ct=1024):
    n = side * side
    ts, tt = B.features(batch, n, ct, torch.float32, 0), B.features(batch, n, ct, torch.float32, 1)
    ss, st = B.features(batch, n, cs, torch.float32, 2, True), B.features(batch, n, cs, torch.float32, 3, True)

    def fused():
        ops.rowsoftmax_distill(ts, tt, ss, st, 0.2, 0.4, loss="mse", backend="cpu").sum().backward()

    def naive():
        ref.rowsoftmax_distill(ts, tt, ss, st, 0.2, 0.4, "mse").sum().backward()

    return fused, naive


def eq_case(side=64, batch=16, c=256):
    n = side * side
    s, t = B.features(batch, n, c, torch.float32, 4, True), B.features(batch, n, c, torch.float32, 5, True)
    g = torch.Generator().manual_seed(6)
    warp = ref.coordinate_grid(side, side)[None] + torch.randn(batch, n, 2, generator=g)  # g(u): a jittered warp

    def fused():
        ops.expected_cost(s, t, 0.05, warp, (side, side), p=1.0, backend="cpu").sum().backward()

    def naive():
        ref.expected_cost(s, t, 0.05, warp, (side, side), 1.0).sum().backward()

    return fused, naive


def epe_case(side=60, c=768, k=30):
    n = side * side
    s, t = B.features(1, n, c, torch.float32, 7, True), B.features(1, n, c, torch.float32, 8, True)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(9))[:k]
    gt = torch.rand(1, k, 2) * (side - 1)

    def fused():  # keypoint rows only; gradients into every target cell
        pred = ops.soft_argmax(s[:, idx], t, 0.02, (side, side), backend="cpu")
        (pred - gt).norm(dim=-1).mean().backward()

    def naive():  # GeoAware-SC's habit: the full 3600×3600 soft-argmax, then index the keypoint rows
        pred = ref.soft_argmax(s, t, 0.02, (side, side))[:, idx]
        (pred - gt).norm(dim=-1).mean().backward()

    return fused, naive


CASES = {
    "ASYM distill (mse) 64x64 B=8 Cs=256 Ct=1024": asym_case,
    "EQ expected cost 64x64 B=16 C=256": eq_case,
    "dense soft-argmax EPE, 30 rows vs 60x60, C=768": epe_case,
}


@pytest.mark.parametrize("impl", ["fused", "naive"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_fwd_bwd(benchmark, case, impl):
    benchmark.group = case
    fused, naive = CASES[case]()
    fn = fused if impl == "fused" else naive
    benchmark.extra_info["peak_extra_MiB"] = B.peak_extra_mib(fn)
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


def largest_grid_in(budget_gib=20.0):
    """Largest square grid side whose fwd+bwd fits in ``budget_gib`` of extra memory, extrapolated from
    peak memory measured at two small sides (naive: a·N² + b in N = side²; fused: a·N + b)."""
    rows = []
    for name, make, kw in [("EQ expected cost, B=16, C=256", eq_case, {}),
                           ("ASYM distill, B=8, Cs=256, Ct=1024", asym_case, {})]:
        fits = {}
        for impl in ("naive", "fused"):
            pts = []
            for side in (24, 40):
                fused, naive = make(side=side, **kw)
                pts.append((side * side, B.peak_extra_mib(fused if impl == "fused" else naive) or 0.0))
            (n1, m1), (n2, m2) = pts
            budget = budget_gib * 1024
            if impl == "naive":  # memory ∝ N²
                a = (m2 - m1) / (n2 ** 2 - n1 ** 2)
                n = ((budget - (m1 - a * n1 ** 2)) / a) ** 0.5 if a > 0 else float("inf")
            else:  # memory ∝ N
                a = (m2 - m1) / (n2 - n1)
                n = (budget - (m1 - a * n1)) / a if a > 0 else float("inf")
            fits[impl] = int(n ** 0.5) if n != float("inf") else None
        rows.append((name, fits["naive"], fits["fused"]))
    return rows


if __name__ == "__main__":
    print(f"machine: {B.machine()}")
    print("| case (fwd+bwd) | fused ms | naive ms | speedup | fused peak MiB | naive peak MiB | memory ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, make in CASES.items():
        fused, naive = make()
        fused(), naive()  # warm-up: thread pools and caches are not the op's memory
        fp, npk = B.peak_extra_mib(fused), B.peak_extra_mib(naive)  # memory before the timing loop
        fm, nm = B.time_pair_ms(fused, naive, repeat=3)
        print(f"| {name} | {fm:.0f} | {nm:.0f} | {nm / fm:.2f}x | {fp:.0f} | {npk:.0f} | {fp / npk:.1%} |")
        sys.stdout.flush()
    print("\n| loss | largest side in 20 GiB, naive (extrapolated) | fused (extrapolated) |\n|---|---:|---:|")
    for name, n_naive, n_fused in largest_grid_in():
        print(f"| {name} | {n_naive} | {n_fused} |")
