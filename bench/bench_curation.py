"""Scaling of Universal correspondences' automatic pair curation (issue 7): time and memory vs database size.

The curation graph is the k = 500 nearest neighbours of every image under its class token (DINO ViT-S/8:
C = 384), cosine similarity, self excluded (``semcorr_fast.curation.curate_pairs``). Ours streams the
database through ``ops.topk_retrieval`` (no N×N matrix); naive = the way it is usually written:
normalise, the full N×N similarity matrix, ``torch.topk(k + 1)``, drop self. Random unit tokens (the
retrieval's cost does not depend on their values).

Run:  .venv/bin/python bench/bench_curation.py [--sizes 1024,4096,16384,32768] [--k 500] [--max-naive-gib 6]
      .venv/bin/python -m pytest bench/bench_curation.py --benchmark-group-by=group     (1k and 4k only)
The naive side is skipped where its N×N fp32 matrix alone would pass ``--max-naive-gib``.
"""
import argparse
import sys

import pytest
import torch

from semcorr_fast import bench as B
from semcorr_fast.curation import curate_pairs


def tokens(n: int, c: int = 384, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


def naive_curation(t: torch.Tensor, k: int):
    x = torch.nn.functional.normalize(t.float(), dim=1)
    s = x @ x.T
    s.fill_diagonal_(-torch.inf)
    return torch.topk(s, k, dim=1)


def fns(n: int, k: int, c: int = 384):
    t = tokens(n, c)
    return (lambda: curate_pairs(t, k)), (lambda: naive_curation(t, k))


@pytest.mark.parametrize("impl", ["ours", "naive"])
@pytest.mark.parametrize("n", [1024, 4096])
def test_curation(benchmark, n, impl):
    benchmark.group = f"curation N={n} k=500 C=384"
    ours, naive = fns(n, 500)
    fn = ours if impl == "ours" else naive
    benchmark.extra_info["peak_extra_MiB"] = B.peak_extra_mib(fn)
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)


def test_same_graph():
    """The benchmark compares like with like: both sides return the same neighbours (up to fp ties)."""
    ours, naive = fns(1024, 50)
    v1, i1 = ours()
    v2, i2 = naive()
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    assert (i1 == i2).float().mean() > 0.999


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1024,4096,16384,32768")
    ap.add_argument("--k", type=int, default=500)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--max-naive-gib", type=float, default=6.0)
    args = ap.parse_args(argv)
    print(f"machine: {B.machine()}; k = {args.k}, C = {args.dim}, cosine, self excluded")
    print("| images N | ours s | naive s | speedup | ours peak MiB | naive peak MiB | ours s per 1k queries |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(s) for s in args.sizes.split(",")):
        k = min(args.k, n - 1)
        ours, naive = fns(n, k, args.dim)
        op = B.peak_extra_mib(ours)
        if n * n * 4 > args.max_naive_gib * 2 ** 30:
            om = B.time_ms(ours, repeat=1, warmup=0)
            print(f"| {n} | {om / 1e3:.2f} | — | — | {op:.0f} | ~{n * n * 4 / 2 ** 20:.0f} (N×N matrix alone; not run) "
                  f"| {om / 1e3 / (n / 1000):.3f} |")
        else:
            npk = B.peak_extra_mib(naive)
            om, nm = B.time_pair_ms(ours, naive, repeat=3 if n <= 4096 else 1)
            print(f"| {n} | {om / 1e3:.2f} | {nm / 1e3:.2f} | {nm / om:.2f}x | {op:.0f} | {npk:.0f} "
                  f"| {om / 1e3 / (n / 1000):.3f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
