"""pytest-benchmark suite of the correlation family on the fused CPU backend (issue 2's targets).

Run:  .venv/bin/python -m pytest bench/bench_correlation.py --benchmark-group-by=group \
          --benchmark-columns=min,median,max,rounds
Each group puts the fused kernel beside the naive torch path and bare ``torch.mm`` on the same FLOPs;
peak resident memory above the starting level is stored in each result's ``extra_info``.
The numbers in docs/benchmarks.md come from this file.
"""
import pytest
import torch

from semcorr_fast import bench as B
from semcorr_fast import ops

SIDE, C, TAU = 60, 768, 0.02
HW = (SIDE, SIDE)
N = SIDE * SIDE


def _feats(dtype, seed, n=N, c=C, grad=False):
    return B.features(1, n, c, dtype, seed, grad)


def _run(benchmark, fn, rounds=5):
    benchmark.extra_info["peak_extra_MiB"] = B.peak_extra_mib(fn)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=1)


DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.parametrize("dt", list(DT))
@pytest.mark.parametrize("impl", ["fused", "naive", "mm_floor"])
def test_soft_argmax_60(benchmark, dt, impl):
    benchmark.group = f"soft_argmax 60x60 C=768 {dt}"
    s, t = _feats(DT[dt], 0), _feats(DT[dt], 1)
    fn = {
        "fused": lambda: ops.soft_argmax(s, t, TAU, HW, backend="cpu"),
        "naive": lambda: B.naive_soft_argmax(s, t, TAU, HW),
        "mm_floor": lambda: torch.mm(s[0], t[0].T),
    }[impl]
    with torch.no_grad():
        _run(benchmark, fn)


@pytest.mark.parametrize("impl", ["fused_C768", "fused_C32_epilogue", "fused_topk_C32", "fused_topk_C768",
                                  "mm_floor_C768"])
def test_soft_argmax_bf16_budget(benchmark, impl):
    """Where the bf16 time goes: the fused op at C = 768; the same op at C = 32 (its GEMM ~24× smaller,
    so what remains is the softmax epilogue over the 13 M scores); the streamed GEMM with the cheap top-1
    epilogue (at C = 32: the same op minus the softmax); bare torch.mm at C = 768 (the floor)."""
    benchmark.group = "soft_argmax 60x60 bf16: epilogue and GEMM budget"
    c = 32 if "C32" in impl else C
    s, t = _feats(torch.bfloat16, 0, c=c), _feats(torch.bfloat16, 1, c=c)
    fn = {
        "fused_C768": lambda: ops.soft_argmax(s, t, TAU, HW, backend="cpu"),
        "fused_C32_epilogue": lambda: ops.soft_argmax(s, t, TAU, HW, backend="cpu"),
        "fused_topk_C32": lambda: ops.match_topk(s, t, 1, backend="cpu"),
        "fused_topk_C768": lambda: ops.match_topk(s, t, 1, backend="cpu"),
        "mm_floor_C768": lambda: torch.mm(s[0], t[0].T),
    }[impl]
    with torch.no_grad():
        _run(benchmark, fn)


@pytest.mark.parametrize("kernel", ["brgemm", "avx512bf16", "off"])
@pytest.mark.parametrize("op", ["soft_argmax", "match_topk_k1"])
def test_bf16_tile_gemm(benchmark, kernel, op):
    """The same bf16 op on each bf16 tile GEMM this CPU has: oneDNN's brgemm (AMX), our AVX512-BF16
    micro-kernel, or off (bf16 → fp32 copies → sgemm). Compare with the bf16 torch.mm floor above."""
    from semcorr_fast import _ext

    benchmark.group = "bf16 60x60 C=768 by tile GEMM"
    s, t = _feats(torch.bfloat16, 0), _feats(torch.bfloat16, 1)
    fn = (lambda: ops.soft_argmax(s, t, TAU, HW, backend="cpu")) if op == "soft_argmax" else \
        (lambda: ops.match_topk(s, t, 1, backend="cpu"))
    with _ext.use_cpu_bf16_gemm(kernel) as got:
        if got != kernel:
            pytest.skip(f"bf16 tile GEMM '{kernel}' is not available on this CPU")
        with torch.no_grad():
            _run(benchmark, fn)


@pytest.mark.parametrize("impl", ["fused", "fused_fp32_grad_gemms", "naive"])
@pytest.mark.parametrize("dt", list(DT))
def test_soft_argmax_fwd_bwd_60(benchmark, monkeypatch, dt, impl):
    """Forward + backward (a training step's loss). bf16 "fused": the backward's three tile GEMMs in bf16
    (stream_backward_bf16, where the AVX512-BF16 kernel is in use); "fused_fp32_grad_gemms": the same
    op with SEMCORR_CPU_BF16_BWD=0 (fp32 backward on converted inputs; for fp32 both are the same)."""
    benchmark.group = f"soft_argmax fwd+bwd 60x60 C=768 {dt}"
    s, t = _feats(DT[dt], 0, grad=True), _feats(DT[dt], 1, grad=True)
    monkeypatch.setenv("SEMCORR_CPU_BF16_BWD", "0" if impl == "fused_fp32_grad_gemms" else "1")
    fwd = (lambda: B.naive_soft_argmax(s, t, TAU, HW)) if impl == "naive" else \
        (lambda: ops.soft_argmax(s, t, TAU, HW, backend="cpu"))

    def fn():
        s.grad = t.grad = None
        fwd().float().sum().backward()

    _run(benchmark, fn, rounds=3)


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_soft_argmax_60_naive_fp32_vs_fused_bf16(benchmark, impl):
    benchmark.group = "soft_argmax 60x60: fused bf16 vs naive fp32"
    dt = torch.bfloat16 if impl == "fused" else torch.float32
    s, t = _feats(dt, 0), _feats(dt, 1)
    fn = (lambda: ops.soft_argmax(s, t, TAU, HW, backend="cpu")) if impl == "fused" else \
        (lambda: B.naive_soft_argmax(s, t, TAU, HW))
    with torch.no_grad():
        _run(benchmark, fn)


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_window_soft_argmax_60(benchmark, impl):
    benchmark.group = "window_soft_argmax r=7 60x60 C=768 fp32"
    s, t = _feats(torch.float32, 0), _feats(torch.float32, 1)
    fn = (lambda: ops.window_soft_argmax(s, t, TAU, HW, 7, outside="zero", backend="cpu")) if impl == "fused" else \
        (lambda: B.naive_window_soft_argmax(s, t, TAU, HW, 7))
    with torch.no_grad():
        _run(benchmark, fn)


@pytest.mark.parametrize("k", [1, 5])
@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_match_topk_60(benchmark, impl, k):
    benchmark.group = f"match_topk k={k} 60x60 C=768 fp32"
    s, t = _feats(torch.float32, 0), _feats(torch.float32, 1)
    fn = (lambda: ops.match_topk(s, t, k, backend="cpu")) if impl == "fused" else (lambda: B.naive_match_topk(s, t, k))
    with torch.no_grad():
        _run(benchmark, fn)


def _smooth_feats(seed, side=SIDE, c=C):
    """Spatially smooth features (bicubic upsampling of coarse noise + a little fine noise): neighbouring
    cells are alike, so a row's best targets are near-ties, the hard case for bf16 screening."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.interpolate(torch.randn(1, c, side // 4 + 2, side // 4 + 2, generator=g), (side, side),
                                        mode="bicubic", align_corners=False)
    return (z + 0.3 * torch.randn(1, c, side, side, generator=g)).flatten(2).transpose(1, 2).contiguous()


@pytest.mark.parametrize("features", ["random", "smooth"])
@pytest.mark.parametrize("impl", ["screened", "plain_fp32", "naive"])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_match_topk_screening(benchmark, monkeypatch, impl, features, k):
    """fp32 match_topk: bf16 screening + fp32 certificate vs the plain fp32 stream (SEMCORR_CPU_SCREEN=0)."""
    benchmark.group = f"match_topk k={k} 60x60 C=768 fp32, {features} features: screening"
    if features == "random":
        s, t = _feats(torch.float32, 0), _feats(torch.float32, 1)
    else:
        s = _smooth_feats(0)
        t = s + 0.5 * _smooth_feats(1)
    monkeypatch.setenv("SEMCORR_CPU_SCREEN", "0" if impl == "plain_fp32" else "1")
    fn = (lambda: B.naive_match_topk(s, t, k)) if impl == "naive" else (lambda: ops.match_topk(s, t, k, backend="cpu"))
    with torch.no_grad():
        _run(benchmark, fn)


@pytest.mark.parametrize("impl", ["fused_30_rows", "naive_all_rows_then_index"])
def test_keypoint_mode(benchmark, impl):
    benchmark.group = "keypoint mode: 30 query rows vs a 60x60 map, C=768 fp32"
    s, t = _feats(torch.float32, 0), _feats(torch.float32, 1)
    kp = s[:, :30].contiguous()
    fn = (lambda: ops.soft_argmax(kp, t, TAU, HW, backend="cpu")) if impl.startswith("fused") else \
        (lambda: B.naive_soft_argmax(s, t, TAU, HW)[:, :30])
    with torch.no_grad():
        _run(benchmark, fn)


def test_soft_argmax_fwd_bwd_160(benchmark):
    """160×160, C = 256, forward + backward: the naive path would hold 655M-entry matrices (>10 GB)."""
    benchmark.group = "soft_argmax fwd+bwd 160x160 C=256 fp32"
    side = 160
    s = _feats(torch.float32, 2, side * side, 256, grad=True)
    t = _feats(torch.float32, 3, side * side, 256, grad=True)

    def fn():
        ops.soft_argmax(s, t, 0.05, (side, side), backend="cpu").sum().backward()

    _run(benchmark, fn, rounds=2)
