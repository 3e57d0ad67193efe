"""Training-step benchmark of Demystifying's EQ, CL, DVE, ASYM and LEAD at higher feature resolution (issue 7).

One optimiser step (forward + backward + Adam) of each method on a frozen backbone, with its loss through
the fused CPU ops (``loss_backend="cpu"``) or the naive materialising formulation
(``loss_backend="reference"``: the Ns×Nt softmax matrices that the papers' code builds), at feature grids
32², 64², 96² and 128². The frozen backbone is a stand-in with ResNet-50 conv3's shape (1024-d, stride
16 on a 384×384 canvas → 24×24, bilinearly upsampled to the grid by the method, then ρ: 1024 → 256), so
the table isolates what the methods compute on top of the backbone.

Run:  .venv/bin/python bench/bench_train.py [--batch 2] [--sides 32,64,96,128] [--max-naive-gib 10]
      .venv/bin/python -m pytest bench/bench_train.py --benchmark-group-by=group     (32² and 64² only)
The naive step is skipped where its memory, extrapolated from the smaller grids as a·N² + b, would pass
``--max-naive-gib``; the table then gives that estimate. The last table is the largest grid side whose
step fits in 20 GiB at the paper's batch of 8, extrapolated from measurements at sides 24 and 40.
"""
import argparse
import sys

import pytest
import torch
from torch import nn

from semcorr_fast import bench as B
from semcorr_fast.backbones import Backbone
from semcorr_fast.data.canvas import Canvas
from semcorr_fast.methods import build_method

METHODS = ("eq", "cl", "dve", "asym", "lead")


class Conv3Shape(Backbone):
    """Frozen random 16×16/16 conv: ResNet-50 conv3's output shape (1024, 24, 24) from a 384² image."""

    def __init__(self):
        super().__init__("conv3-shape", 1024, 16, Canvas.resized(384))
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 1024, 16, stride=16)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.05)
            self.conv.bias.zero_()
        self.requires_grad_(False)

    def grid(self, H, W):
        return H // 16, W // 16

    def _features(self, x):
        return torch.relu(self.conv(x))


def step_fn(method: str, side: int, backend: str, batch: int = 2):
    """A closure running one training step; built once (model, optimiser, images)."""
    m = build_method(method, Conv3Shape(), grid=side, loss_backend=backend)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(1)
    imgs = {"src": torch.rand(batch, 3, 384, 384, generator=g), "trg": torch.rand(batch, 3, 384, 384, generator=g)}
    m.train()

    def step():
        out = m.training_step(dict(imgs, generator=torch.Generator().manual_seed(2),
                                   item_seeds=torch.arange(batch)), 0)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    return step


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("side", [32, 64])
@pytest.mark.parametrize("method", METHODS)
def test_train_step(benchmark, method, side, backend):
    benchmark.group = f"{method} {side}x{side} B=2"
    fn = step_fn(method, side, backend)
    fn()
    benchmark.extra_info["peak_extra_MiB"] = B.peak_extra_mib(fn)
    benchmark.pedantic(fn, rounds=2, iterations=1, warmup_rounds=0)


def _fit_n2(points):
    """(N, MiB) at two sizes → (a, b) of a·N² + b."""
    (n1, m1), (n2, m2) = points
    a = (m2 - m1) / (n2 ** 2 - n1 ** 2)
    return a, m1 - a * n1 ** 2


def largest_side(method, budget_gib=20.0, batch=8):
    out = {}
    for backend, power in (("reference", 2), ("cpu", 1)):
        pts = []
        for side in (24, 40):
            fn = step_fn(method, side, backend, batch)
            fn()
            pts.append((side * side, B.peak_extra_mib(fn) or 0.0))
        (n1, m1), (n2, m2) = pts
        a = (m2 - m1) / (n2 ** power - n1 ** power)
        b = m1 - a * n1 ** power
        n = ((budget_gib * 1024 - b) / a) ** (1.0 / power) if a > 0 else float("inf")
        out[backend] = int(n ** 0.5) if n != float("inf") else None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--sides", default="32,64,96,128")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--max-naive-gib", type=float, default=10.0)
    ap.add_argument("--no-extrapolation", action="store_true")
    args = ap.parse_args(argv)
    sides = [int(s) for s in args.sides.split(",")]
    print(f"machine: {B.machine()}; batch {args.batch}; frozen backbone: 1024-d stride-16 stand-in, ρ 1024→256")
    print("| method | grid | fused step s | naive step s | speedup | fused peak MiB | naive peak MiB | memory ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for method in args.methods.split(","):
        naive_pts = []
        for side in sides:
            fused = step_fn(method, side, "cpu", args.batch)
            fused()
            fp = B.peak_extra_mib(fused)
            est = None
            if len(naive_pts) >= 2:
                a, b = _fit_n2(naive_pts[-2:])
                est = a * (side * side) ** 2 + b
            if est is not None and est > args.max_naive_gib * 1024:
                fm = B.time_ms(fused, repeat=1, warmup=0)
                print(f"| {method} | {side}² | {fm / 1e3:.2f} | — | — | {fp:.0f} | ~{est:.0f} (extrapolated, not run) | — |")
            else:
                naive = step_fn(method, side, "reference", args.batch)
                naive()
                npk = B.peak_extra_mib(naive)
                naive_pts.append((side * side, npk or 0.0))
                fm, nm = B.time_pair_ms(fused, naive, repeat=2 if side <= 64 else 1)
                print(f"| {method} | {side}² | {fm / 1e3:.2f} | {nm / 1e3:.2f} | {nm / fm:.2f}x | {fp:.0f} | {npk:.0f} "
                      f"| {fp / npk:.1%} |")
            sys.stdout.flush()
            del fused
    if not args.no_extrapolation:
        print("\n| method | largest side in 20 GiB at B=8, naive (extrapolated) | fused (extrapolated) |\n|---|---:|---:|")
        for method in args.methods.split(","):
            r = largest_side(method)
            print(f"| {method} | {r['reference']} | {r['cpu']} |")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
