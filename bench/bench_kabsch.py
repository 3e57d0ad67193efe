"""Benchmark: ``ops.kabsch`` (closed-form C++ kernels) vs the ``torch.linalg.svd`` Umeyama path.

Workload: 16,384 weighted 3-D problems of 64 points with scale (Jamais Vu's L_geom runs 2,048 such
problems per image), float32, CPU tensors.

* pytest-benchmark:  ``python -m pytest bench/bench_kabsch.py --benchmark-group-by=group
  --benchmark-columns=min,median,max,rounds``
* script:            ``python bench/bench_kabsch.py [--B 16384] [--P 64] [--repeat 10] [--threads 1,2]``
  prints a table of milliseconds and the speedup, for 1 thread and for all threads.

The SVD path is the usual PyTorch Umeyama (weighted moments with tensor ops, batched
``torch.linalg.svd`` of the 3x3 covariances, sign fix, scale, translation) with autograd through
the SVD for the backward.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from semcorr_fast import _ext  # noqa: E402
from semcorr_fast.ops.kabsch import kabsch  # noqa: E402


class _JitStub:
    @staticmethod
    def build_info():
        return {"cuda": False}


def ensure_native() -> None:
    """Use the installed extension; before it is built, JIT-compile the kabsch CPU kernels."""
    if _ext.loaded() and hasattr(torch.ops.semcorr_ext, "kabsch_fwd"):
        return
    from torch.utils.cpp_extension import load

    build = os.path.join(tempfile.gettempdir(), "semcorr_fast_kabsch_jit")
    os.makedirs(build, exist_ok=True)
    load(name="semcorr_kabsch_jit", sources=[os.path.join(ROOT, "csrc", "kabsch", "kabsch_cpu.cpp")],
         extra_include_paths=[os.path.join(ROOT, "csrc")],
         extra_cflags=["-O3", "-fopenmp", "-march=native", "-std=c++20"], extra_ldflags=["-fopenmp"],
         build_directory=build, is_python_module=False)
    if not _ext.loaded():
        _ext._C = _JitStub  # development only: the package's _C is not built yet


def svd_umeyama(src, tgt, w, min_scale=None):
    """The torch.linalg.svd path: R (B,3,3), t (B,3), s (B,) with tgt ≈ s R src + t."""
    wn = w / w.sum(1, keepdim=True)
    mu_s = (wn[..., None] * src).sum(1)
    mu_t = (wn[..., None] * tgt).sum(1)
    a = src - mu_s[:, None]
    b = tgt - mu_t[:, None]
    M = (b * wn[..., None]).mT @ a
    var = (wn * (a * a).sum(-1)).sum(1)
    U, S, Vh = torch.linalg.svd(M)
    sign = torch.sign(torch.linalg.det(U @ Vh))
    D = torch.cat([torch.ones_like(S[:, :-1]), sign[:, None]], 1)
    R = U @ (D[..., None] * Vh)
    s = (S * D).sum(-1) / var
    if min_scale is not None:
        s = s.clamp_min(min_scale)
    t = mu_t - s[:, None] * (R @ mu_s[..., None])[..., 0]
    return R, t, s


def make_inputs(B=16384, P=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(B, P, 3, generator=g, dtype=dtype)
    Q, _ = torch.linalg.qr(torch.randn(B, 3, 3, generator=g, dtype=dtype))
    Q = Q * torch.sign(torch.linalg.det(Q))[:, None, None]
    tgt = 1.3 * src @ Q.mT + torch.randn(B, 1, 3, generator=g, dtype=dtype) + 0.05 * torch.randn(B, P, 3, generator=g,
                                                                                                    dtype=dtype)
    w = torch.rand(B, P, generator=g, dtype=dtype)
    return src, tgt, w


def ours(src, tgt, w):
    return kabsch(src, tgt, w, estimate_scale=True, backend="cpu")


def _loss(out):
    R, t, s = out
    return R.sum() + t.sum() + s.sum()


def fwd(fn, src, tgt, w):
    with torch.no_grad():
        return fn(src, tgt, w)


def fwd_bwd(fn, src, tgt, w):
    x, y, ww = (v.detach().requires_grad_() for v in (src, tgt, w))
    _loss(fn(x, y, ww)).backward()
    return x.grad, y.grad, ww.grad


# ---------------------------------------------------------------- pytest-benchmark ---------------

try:
    import pytest
except ImportError:  # pragma: no cover - script mode without pytest
    pytest = None

if pytest is not None:
    GROUP = "kabsch {}: 16384 problems x 64 pts, 3-D, weighted, scale, fp32"

    @pytest.fixture(scope="module")
    def inputs():
        ensure_native()
        return make_inputs()

    def _run(benchmark, fn, rounds=5):
        benchmark.extra_info["threads"] = torch.get_num_threads()
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)

    @pytest.mark.parametrize("impl", ["ours", "svd"])
    def test_forward(benchmark, inputs, impl):
        benchmark.group = GROUP.format("forward")
        fn = ours if impl == "ours" else svd_umeyama
        _run(benchmark, lambda: fwd(fn, *inputs))

    @pytest.mark.parametrize("impl", ["ours", "svd"])
    def test_forward_backward(benchmark, inputs, impl):
        benchmark.group = GROUP.format("forward+backward")
        fn = ours if impl == "ours" else svd_umeyama
        _run(benchmark, lambda: fwd_bwd(fn, *inputs))

    def test_same_answer(inputs):
        a = fwd(ours, *inputs)
        b = fwd(svd_umeyama, *inputs)
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=2e-4, rtol=2e-4)


# ---------------------------------------------------------------- script mode --------------------

def _time_ms(fn, repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=16384)
    ap.add_argument("--P", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                    help="comma-separated torch thread counts to measure (default: 1 and all)")
    args = ap.parse_args(argv)
    ensure_native()
    src, tgt, w = make_inputs(args.B, args.P)
    a, b = fwd(ours, src, tgt, w), fwd(svd_umeyama, src, tgt, w)
    err = max((x - y).abs().max().item() for x, y in zip(a, b))
    print(f"kabsch: B={args.B} problems x P={args.P} points, 3-D, weighted, estimate_scale=True, float32, CPU; "
          f"max |ours - svd| = {err:.2e}; median of {args.repeat} runs")
    print(f"{'threads':<9}{'pass':<20}{'ours (ms)':>12}{'svd path (ms)':>16}{'speedup':>10}")
    for nt in sorted({int(v) for v in args.threads.split(",")}):
        torch.set_num_threads(nt)
        for name, runner in (("forward", fwd), ("forward+backward", fwd_bwd)):
            t_ours = _time_ms(lambda: runner(ours, src, tgt, w), args.repeat)
            t_svd = _time_ms(lambda: runner(svd_umeyama, src, tgt, w), args.repeat)
            print(f"{nt:<9}{name:<20}{t_ours:>12.2f}{t_svd:>16.2f}{t_svd / t_ours:>9.1f}x")


if __name__ == "__main__":
    main()
