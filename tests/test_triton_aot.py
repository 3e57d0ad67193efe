"""Ahead-of-time compilation of the Triton kernels (``semcorr_fast.kernels.aot``), no GPU needed.

* The dispatcher and the AOT enumeration agree: every configuration a launch can pick is compiled.
* A representative subset compiles for sm_80 and sm_90 without spills, inside the shared memory of
  the target, with tensor-core instructions in the bf16 and tf32 GEMM tiles.
* The gate itself flags bad rows (a gate that cannot fail would prove nothing).

The full table (every kernel x config x dtype x target) is ``semcorr kernels --compile sm_80,sm_90``.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from semcorr_fast.kernels import _config, aot  # noqa: E402


# ----------------------------------------------------------------------------- dispatcher coverage
def _job_keys(kernel: str) -> set:
    keys = set()
    for j in aot.jobs_for(aot._BY_NAME[kernel], ["sm_80"]):
        c = j["constexprs"]
        tiles = tuple(sorted((k, v) for k, v in c.items() if k.startswith("BLOCK") or k == "KP"))
        keys.add((j["dtype"], j["prec"], tiles, j["num_warps"], j["num_stages"], j.get("maxnreg")))
    return keys


_DT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@pytest.fixture(params=[False, True], ids=["no_tf32", "tf32"])
def tf32(request):
    """torch.backends.cuda.matmul.allow_tf32 set for the test, restored after."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", list(_DT), ids=str)
def test_every_dispatched_config_is_compiled_ahead_of_time(monkeypatch, dtype, tf32):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU table, not the interpreter's tiles
    prec = _config.dot_precision(dtype)
    assert prec == ("tf32" if (tf32 and dtype == torch.float32) else "ieee")
    dn = _DT[dtype]
    for C in (1, 3, 16, 33, 64, 768, 1000, 3968, 4096):
        for kernel, family in (("soft_argmax_fwd", "score"), ("argmax", "score"), ("ncc", "score"),
                               ("soft_argmax_bwd", "bwd")):
            cfg = _config.tile_config(family, dtype, C)
            key = (dn, prec, tuple(sorted(cfg.meta().items())), cfg.num_warps, cfg.num_stages, None)
            assert key in _job_keys(kernel), (kernel, C, cfg)
        for k in (2, 5, 8, 9, 16, 17, 40, 64):
            cfg = _config.topk_config(dtype, C, k)
            meta = dict(cfg.meta(), KP=_config.topk_kp(k))
            key = (dn, prec, tuple(sorted(meta.items())), cfg.num_warps, cfg.num_stages, None)
            assert key in _job_keys("topk"), (C, k, cfg)
            assert _config.topk_kp(k) >= k
        for H, W, r in ((1, 1, 0), (3, 4, 1), (60, 60, 3), (60, 60, 7), (240, 240, 7), (20, 30, 30)):
            wmax = _config.window_cells(H, W, r)
            for kernel, backward in (("window_fwd", False), ("window_bwd", True)):
                wc = _config.window_config(C, wmax, backward=backward)
                assert wc.BLOCK_W >= min(wmax, _config.WINDOW_BLOCK_W_CAP)
                key = (dn, "-", tuple(sorted(wc.meta().items())), wc.num_warps, 1, wc.maxnreg)
                assert key in _job_keys(kernel), (kernel, H, W, r, wc)


def test_tile_shared_memory_budget_on_paper():
    """num_stages x (BLOCK_M + BLOCK_N) x BLOCK_C x itemsize fits sm_80 for every table entry."""
    for family in ("score", "bwd", "topk"):
        for dname, cfg, _ in _config.all_tile_configs(family):
            item = 4 if dname == "fp32" else 2
            need = cfg.num_stages * (cfg.BLOCK_M + cfg.BLOCK_N) * cfg.BLOCK_C * item
            assert need <= _config.SMEM_LIMIT["sm_80"], (family, dname, cfg)


# ----------------------------------------------------------------------------- the gate
def _row(**kw):
    row = dict(kernel="soft_argmax_fwd", target="sm_80", dtype="bf16", prec="ieee", config="x",
               smem=1024, regs=128, spill_stores=0, spill_loads=0, mma=8, wgmma=0, error=None)
    row.update(kw)
    return row


def test_gate_flags_every_failure_kind():
    assert aot.problems(_row()) == []
    assert aot.problems(_row(spill_stores=4)) and aot.problems(_row(spill_loads=4))
    assert aot.problems(_row(smem=_config.SMEM_LIMIT["sm_80"] + 1))
    assert aot.problems(_row(target="sm_90", smem=_config.SMEM_LIMIT["sm_80"] + 1)) == []
    assert aot.problems(_row(target="sm_90", smem=_config.SMEM_LIMIT["sm_90"] + 1))
    assert aot.problems(_row(mma=0))  # bf16 GEMM tile on CUDA cores
    assert aot.problems(_row(dtype="fp32", prec="tf32", mma=0))
    assert aot.problems(_row(dtype="fp32", prec="ieee", mma=0)) == []  # exact fp32: no tensor cores
    assert aot.problems(_row(kernel="window_fwd", mma=0)) == []  # a gather kernel, not a GEMM tile
    assert aot.problems(_row(error="CompilationError: boom"))


# ----------------------------------------------------------------------------- real compiles
_SUBSET = {
    # kernel: predicate on the job
    "soft_argmax_fwd": lambda j: j["dtype"] == "bf16" or (j["dtype"] == "fp32" and j["prec"] == "tf32"),
    "soft_argmax_bwd": lambda j: j["dtype"] == "bf16",
    "topk": lambda j: j["dtype"] == "bf16" and j["constexprs"]["KP"] == 64,
    "window_bwd": lambda j: j["dtype"] == "bf16" and j["constexprs"]["BLOCK_W"] == 256,
}


@pytest.fixture(scope="module")
def subset_rows():
    return aot.compile_all(("sm_80", "sm_90"), kernels=list(_SUBSET), jobs=2,
                           select=lambda j: _SUBSET[j["kernel"]](j))


def test_aot_subset_compiles_without_spills_and_with_tensor_cores(subset_rows):
    rows = subset_rows
    assert {(r["kernel"], r["target"]) for r in rows} == {(k, t) for k in _SUBSET for t in ("sm_80", "sm_90")}
    table = aot.format_table(rows)
    for r in rows:
        assert r["error"] is None, (r["kernel"], r["target"], r["error"])
        assert aot.problems(r) == [], table
        assert r["regs"] > 0 and r["spill_stores"] == 0 and r["spill_loads"] == 0
        assert 0 < r["smem"] <= _config.SMEM_LIMIT[r["target"]]
        assert r["ptxas_arch"] == ("sm_90a" if r["target"] == "sm_90" else "sm_80")
        if aot._BY_NAME[r["kernel"]].gemm:
            if r["target"] == "sm_80":
                assert r["mma"] > 0 and r["wgmma"] == 0, table  # Ampere: mma.sync
            else:
                assert r["mma"] + r["wgmma"] > 0, table
        else:
            assert r["mma"] + r["wgmma"] == 0
    # Hopper's warpgroup MMA for the main streaming tile.
    fwd90 = [r for r in rows if r["kernel"] == "soft_argmax_fwd" and r["target"] == "sm_90" and r["dtype"] == "bf16"]
    assert fwd90 and all(r["wgmma"] > 0 for r in fwd90)
    assert "soft_argmax_bwd" in table and "FAIL" not in table


def test_main_prints_table_and_exit_code(capsys):
    assert aot.main(["--compile", "sm_80", "--kernels", "row_norm", "--dtypes", "bf16", "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    assert "row_norm" in out and "sm_80" in out and "0 failing" in out
    with pytest.raises(SystemExit):
        aot.main(["--compile", "sm_70"])
    with pytest.raises(SystemExit):
        aot.main(["--kernels", "no_such_kernel"])


def test_module_entry_point():
    """``python -m semcorr_fast.kernels.aot`` (what CI runs) compiles through its workers too."""
    proc = subprocess.run([sys.executable, "-m", "semcorr_fast.kernels.aot", "--compile", "sm_90",
                           "--kernels", "softmax_t", "--dtypes", "fp16", "--jobs", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "softmax_t" in proc.stdout and "1 compiles, 0 failing" in proc.stdout
