"""GPU benchmarks of the Triton backend: measure, on a GPU, what docs/performance.md estimates on paper.

Run on a machine with a GPU:
    .venv/bin/python -m pytest bench/bench_gpu.py --benchmark-group-by=group \
        --benchmark-columns=min,median,max,rounds
Without a GPU every case is skipped with the reason. Each group puts the fused Triton kernel beside the
naive torch path (which writes and re-reads Ns×Nt) at the roofline table's sizes: 60², 120², 240²
maps, C = 768 and 3968, bf16; peak CUDA memory above the starting level goes to ``extra_info``.
"""
import pytest
import torch

from semcorr_fast import bench as B
from semcorr_fast import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")

SIDES = [60, 120, 240]
CHANNELS = [768, 3968]
TAU = 0.02


def _feats(side, c, seed, grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(1, side * side, c, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(grad)


def _naive_fits(side, c):
    need = 3 * (side * side) ** 2 * 4 + 4 * side * side * c  # sim, softmax, grad: fp32 Ns×Nt each
    return need < 0.8 * torch.cuda.get_device_properties(0).total_memory


def _run(benchmark, fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    benchmark.extra_info["peak_extra_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("impl", ["triton", "naive"])
def test_soft_argmax_forward(benchmark, side, c, impl):
    benchmark.group = f"soft_argmax fwd {side}x{side} C={c} bf16"
    if impl == "naive" and not _naive_fits(side, c):
        pytest.skip("the naive path does not fit in this GPU's memory")
    s, t = _feats(side, c, 0), _feats(side, c, 1)
    fn = (lambda: ops.soft_argmax(s, t, TAU, (side, side), backend="triton")) if impl == "triton" else \
        (lambda: B.naive_soft_argmax(s, t, TAU, (side, side)))
    with torch.no_grad():
        _run(benchmark, fn)


@pytest.mark.parametrize("c", CHANNELS)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("impl", ["triton", "naive"])
def test_soft_argmax_forward_backward(benchmark, side, c, impl):
    benchmark.group = f"soft_argmax fwd+bwd {side}x{side} C={c} bf16"
    if impl == "naive" and not _naive_fits(side, c):
        pytest.skip("the naive path does not fit in this GPU's memory")
    s, t = _feats(side, c, 0, True), _feats(side, c, 1, True)

    def fn():
        if impl == "triton":
            out = ops.soft_argmax(s, t, TAU, (side, side), backend="triton")
        else:
            out = B.naive_soft_argmax(s, t, TAU, (side, side))
        out.float().sum().backward()

    _run(benchmark, fn)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("impl", ["triton", "naive"])
def test_window_soft_argmax(benchmark, side, impl):
    benchmark.group = f"window_soft_argmax r=7 {side}x{side} C=768 bf16"
    if impl == "naive" and not _naive_fits(side, 768):
        pytest.skip("the naive path does not fit in this GPU's memory")
    s, t = _feats(side, 768, 0), _feats(side, 768, 1)
    fn = (lambda: ops.window_soft_argmax(s, t, TAU, (side, side), 7, outside="zero", backend="triton")) \
        if impl == "triton" else (lambda: B.naive_window_soft_argmax(s, t, TAU, (side, side), 7))
    with torch.no_grad():
        _run(benchmark, fn)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("impl", ["triton", "naive"])
def test_match_topk(benchmark, side, impl):
    benchmark.group = f"match_topk k=5 {side}x{side} C=768 bf16"
    if impl == "naive" and not _naive_fits(side, 768):
        pytest.skip("the naive path does not fit in this GPU's memory")
    s, t = _feats(side, 768, 0), _feats(side, 768, 1)
    fn = (lambda: ops.match_topk(s, t, 5, backend="triton")) if impl == "triton" else \
        (lambda: B.naive_match_topk(s, t, 5))
    with torch.no_grad():
        _run(benchmark, fn)
