"""Side-by-side latency and peak-memory measurements: fused kernels vs the naive torch paths.

``semcorr bench`` prints a table; ``bench/`` holds the pytest-benchmark suites built on the same
cases. The naive paths are what the papers' code does (normalise, one dense ``@``, softmax or
argmax, another ``@``), in the input dtype.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import ops
from .reference import coordinate_grid


# ----------------------------------------------------------------------------- naive paths
def naive_soft_argmax(src, tgt, tau, hw):
    a, b = F.normalize(src, dim=-1), F.normalize(tgt, dim=-1)
    p = torch.softmax((a @ b.transpose(1, 2)) / tau, dim=-1)
    return p @ coordinate_grid(*hw, p.dtype)


def naive_window_soft_argmax(src, tgt, tau, hw, radius):
    """GeoAware-SC's evaluation path: dense sim, argmax, a dense window mask, zeros outside, softmax."""
    H, W = hw
    a, b = F.normalize(src, dim=-1), F.normalize(tgt, dim=-1)
    s = a @ b.transpose(1, 2)
    c = s.argmax(-1)
    g = coordinate_grid(H, W, s.dtype)
    inside = ((g[:, 0] - (c % W)[..., None]).abs() <= radius) & ((g[:, 1] - (c // W)[..., None]).abs() <= radius)
    s = s * inside
    return torch.softmax(s / tau, dim=-1) @ g


def naive_match_topk(src, tgt, k):
    a, b = F.normalize(src, dim=-1), F.normalize(tgt, dim=-1)
    return torch.topk(a @ b.transpose(1, 2), k, dim=-1)


# ----------------------------------------------------------------------------- measurement
def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _reset_hwm() -> bool:
    try:  # Linux ≥ 4.0: writing 5 resets the peak-RSS high-water mark of this process
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_freed_memory() -> None:
    """Hand memory that earlier runs freed back to the OS (glibc keeps large freed blocks in its heap),
    so that it is not counted as already resident — which would hide the next run's peak."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_extra_mib(fn: Callable[[], object]) -> float | None:
    """Peak resident memory above the current level while ``fn`` runs (MiB), or None if unknown."""
    gc.collect()
    _release_freed_memory()
    if not _reset_hwm():
        return None
    base = _rss_kib()
    out = fn()
    peak = _hwm_kib()
    del out
    gc.collect()
    return max(0.0, (peak - base) / 1024)


def time_ms(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time in ms (median of ``repeat`` runs after ``warmup``)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def time_pair_ms(a: Callable[[], object], b: Callable[[], object], repeat: int = 5) -> tuple[float, float]:
    """Best-of-``repeat`` wall times in ms of two functions measured alternately (a, b, a, b, ...), so
    that a change in machine speed during the run affects both alike: the ratio is what to read."""
    a(), b()
    ta, tb = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t0)
    return min(ta) * 1e3, min(tb) * 1e3


@dataclass
class Row:
    case: str
    fused_ms: float
    naive_ms: float
    fused_mib: float | None
    naive_mib: float | None
    note: str = ""

    @property
    def speedup(self) -> float:
        return self.naive_ms / self.fused_ms


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from . import _ext

    return (f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"bf16 tile GEMM: {_ext.cpu_bf16_gemm()}")


def features(B, n, C, dtype, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n, C, generator=g).to(dtype)
    return x.requires_grad_(grad)


def cases(quick: bool = True):
    """(name, fused fn, naive fn, note) for the table. 60×60 maps, C = 768, as in GeoAware-SC."""
    side, C, tau = 60, 768, 0.02
    hw = (side, side)
    n = side * side
    out = []
    for dt in ([torch.float32, torch.bfloat16]):
        s, t = features(1, n, C, dt, 0), features(1, n, C, dt, 1)
        name = str(dt).replace("torch.", "")
        out.append((f"soft_argmax 60x60 C=768 {name}",
                    lambda s=s, t=t: ops.soft_argmax(s, t, tau, hw, backend="cpu"),
                    lambda s=s, t=t: naive_soft_argmax(s, t, tau, hw), ""))
        out.append((f"soft_argmax vs bare torch.mm (same FLOPs) {name}",
                    lambda s=s, t=t: ops.soft_argmax(s, t, tau, hw, backend="cpu"),
                    lambda s=s, t=t: torch.mm(s[0], t[0].T),
                    "naive column = torch.mm alone; speedup = fraction of mm's speed"))
    s, t = features(1, n, C, torch.float32, 0), features(1, n, C, torch.float32, 1)
    sb, tb = s.bfloat16(), t.bfloat16()
    out.append(("soft_argmax: fused bfloat16 vs naive float32",
                lambda: ops.soft_argmax(sb, tb, tau, hw, backend="cpu"),
                lambda: naive_soft_argmax(s, t, tau, hw), ""))
    out.append(("window_soft_argmax r=7 float32",
                lambda: ops.window_soft_argmax(s, t, tau, hw, 7, outside="zero", backend="cpu"),
                lambda: naive_window_soft_argmax(s, t, tau, hw, 7), ""))
    out.append(("match_topk k=1 float32",
                lambda: ops.match_topk(s, t, 1, backend="cpu"),
                lambda: naive_match_topk(s, t, 1), ""))
    kp = s[:, :30].contiguous()
    out.append(("keypoint rows: 30 vs all 3600 float32",
                lambda: ops.soft_argmax(kp, t, tau, hw, backend="cpu"),
                lambda: naive_soft_argmax(s, t, tau, hw)[:, :30], "naive computes all rows, then indexes"))
    if not quick:
        side2, C2 = 160, 256
        s2 = features(1, side2 * side2, C2, torch.float32, 2, grad=True)
        t2 = features(1, side2 * side2, C2, torch.float32, 3, grad=True)

        def fused_fb():
            ops.soft_argmax(s2, t2, 0.05, (side2, side2), backend="cpu").sum().backward()

        out.append(("soft_argmax fwd+bwd 160x160 C=256 float32", fused_fb, None,
                    "naive needs >10 GB: not run"))
    return out


def run(quick: bool = True, repeat: int | None = None) -> list[Row]:
    rows = []
    repeat = repeat or (5 if quick else 7)
    for name, fused, naive, note in cases(quick):
        with torch.no_grad() if "bwd" not in name else torch.enable_grad():
            fused()  # one warm-up call: thread pools and kernel caches are not the op's memory
            if naive is not None:
                naive()
            f_mib = peak_extra_mib(fused)  # memory before the timing loop, freed memory returned first
            n_mib = peak_extra_mib(naive) if naive is not None else None
            if naive is not None:
                f_ms, n_ms = time_pair_ms(fused, naive, repeat=repeat)
            else:
                f_ms, n_ms = time_ms(fused, repeat=repeat), float("nan")
        rows.append(Row(name, f_ms, n_ms, f_mib, n_mib, note))
    return rows


def format_table(rows: list[Row]) -> str:
    def mib(x):
        return "n/a" if x is None else f"{x:.0f}"

    lines = [f"machine: {machine()}", "times: best of alternating runs (fused, naive, fused, ...); speedup = naive/fused",
             "| case | fused ms | naive ms | speedup | fused peak MiB | naive peak MiB | note |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        sp = "" if r.naive_ms != r.naive_ms else f"{r.speedup:.2f}x"
        lines.append(f"| {r.case} | {r.fused_ms:.1f} | {r.naive_ms:.1f} | {sp} | {mib(r.fused_mib)} | "
                     f"{mib(r.naive_mib)} | {r.note} |")
    return "\n".join(lines)


def main(quick: bool = True) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    print(format_table(run(quick=quick)))
    return 0


# ----------------------------------------------------------------------------- ours vs naive, per case
# The supervised-method benchmarks (bench/bench_supervised_*.py) share this driver: each case is
# make(side) -> (ours, naive), two zero-argument callables doing one forward + backward.
CaseFactory = Callable[[int], "tuple[Callable[[], object], Callable[[], object]]"]


def pytest_cases(name: str, cases: dict[str, CaseFactory], side: int = 60, rounds: int = 2):
    """A pytest-benchmark test over every case × ("ours", "naive") at one grid side, peak memory in
    extra_info; assign it to a module-level ``test_*`` name."""
    import pytest

    @pytest.mark.parametrize("impl", ["ours", "naive"])
    @pytest.mark.parametrize("case", list(cases))
    def test(benchmark, case, impl):
        ours, naive = cases[case](side)
        fn = ours if impl == "ours" else naive
        fn()
        benchmark.group = f"{name} {case} {side}x{side}"
        benchmark.extra_info["peak_extra_MiB"] = peak_extra_mib(fn)
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)

    return test


def ours_vs_naive_main(description: str, cases: dict[str, CaseFactory], header: str, argv=None,
                       warmup_max_side: int | None = None) -> None:
    """Command line of the supervised benchmarks: a markdown table of every case × grid side, the two
    sides timed alternately (best of --repeat) after a warm-up call (sides ≤ warmup_max_side only, when
    given: a large naive case may not afford two runs), peak memory measured before timing."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--grids", type=int, nargs="+", default=[60, 120], help="feature grid sides (default 60 120)")
    ap.add_argument("--cases", nargs="+", default=list(cases), choices=list(cases))
    ap.add_argument("--repeat", type=int, default=2, help="alternating timing rounds (best of)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.0f}"

    print(f"machine: {machine()}")
    print(f"| {header} | grid | ours ms | naive ms | speedup | ours peak MiB | naive peak MiB | memory ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for case in args.cases:
        for side in args.grids:
            ours, naive = cases[case](side)
            if warmup_max_side is None or side <= warmup_max_side:
                ours(), naive()  # warm-up (thread pools, allocator, extension)
            op, npk = peak_extra_mib(ours), peak_extra_mib(naive)
            om, nm = time_pair_ms(ours, naive, repeat=args.repeat)
            ratio = f"{op / npk:.1%}" if op is not None and npk else "n/a"
            print(f"| {case} | {side}x{side} | {om:.0f} | {nm:.0f} | {nm / om:.2f}x | {fmt(op)} | {fmt(npk)} | {ratio} |")
            sys.stdout.flush()
