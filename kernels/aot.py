"""Ahead-of-time compile of every Triton kernel at every configuration the dispatcher can pick.

    python -m semcorr_fast.kernels.aot --compile sm_80,sm_90      (``semcorr kernels --compile ...``)

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` lowers to PTX
and a cubin on any machine. For each (kernel, dtype, config, target) the table reports

* ``smem``: the dynamic shared memory Triton allocates (``metadata.shared``), checked against the
  target (163 KiB on sm_80, 227 KiB on sm_90);
* ``regs`` / ``spill``: registers per thread and spill stores+loads in bytes, from ``ptxas -v`` run on
  the PTX with the ptxas Triton ships, ``--gpu-name`` taken from the PTX ``.target`` (sm_90a for
  Hopper);
* ``tc``: tensor-core instructions in the PTX (``mma.sync`` on sm_80, ``wgmma`` on sm_90).

The run fails (exit 1) when a kernel does not compile, exceeds the target's shared memory, spills,
or when a GEMM-tile kernel on bf16/fp16 (or fp32 with tf32 allowed) has no tensor-core instruction.
fp32 with ``input_precision="ieee"`` (tf32 disallowed, the torch default) is exact fp32 FMA and is
expected to have none.

Kernel variants: configurations (block sizes, warps, stages) are enumerated exhaustively from
``_config``; epilogue flags are compiled at their heaviest setting (cosine normalisation on, masks
on, column reduction on, "zero" window mode), since they add code and registers but no shared memory.
The loss kernels are the exception: each expected_cost distance variant (POW) and each distill loss
code is its own entry, since ptxas allocates registers differently per variant; kernels of family
``table`` (softmax_aggregate's forward, distill's forward passes) take their tiles from their module's
``aot_tiles``. Pointers are declared 16-byte aligned and channel counts (C, Cv, Ct, Cs) divisible by
16, as Triton's JIT specialises them for torch allocations and C in {768, 1024, 3968, ...}.

Compilation runs in worker subprocesses with ``TRITON_INTERPRET`` unset (the kernels must be
``JITFunction``s, not the interpreter's wrappers), ``--jobs`` of them at once.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from . import _config as cfgmod

# The importable name of this module, also under ``python -m`` (where __name__ is "__main__").
_MODULE = __spec__.name if __spec__ is not None else __name__
_PKG = _MODULE.rsplit(".", 1)[0]

# --------------------------------------------------------------------------------------------
# kernel registry: argument types (T = the feature dtype), heaviest epilogue flags, config source
# --------------------------------------------------------------------------------------------
_FEAT2 = [("q_ptr", "*T"), ("k_ptr", "*T"), ("qn_ptr", "*fp32"), ("kn_ptr", "*fp32")]
# teacher then student feature pairs of rowsoftmax_distill
_DISTILL = [("tq_ptr", "*T"), ("tk_ptr", "*T"), ("tqn_ptr", "*fp32"), ("tkn_ptr", "*fp32"),
            ("sq_ptr", "*T"), ("sk_ptr", "*T"), ("sqn_ptr", "*fp32"), ("skn_ptr", "*fp32")]
# expected_cost's distance variants (POW: 0 any p, 1 p = 1, 2 p = 2) and distill's loss codes
_POW_VARIANTS = (("", 0), ("_p1", 1), ("_p2", 2))
_DISTILL_LOSSES = ("ce", "mse", "l1")
# channel counts: specialised as divisible by 16, as Triton's JIT does for C in {768, 1024, 3968, ...}
_CHANNEL_ARGS = ("C", "L", "CV", "CT", "CS")


@dataclass(frozen=True)
class KernelSpec:
    name: str
    module: str
    attr: str
    args: list
    flags: dict = field(default_factory=dict)
    family: str = "score"       # score | bwd | topk | window | row | softmax | table
    gemm: bool = True           # a tl.dot tile kernel (tensor cores expected for 16-bit / tf32)
    value_operand: bool = False  # also a P @ V operand of dtype T (PREC_V / EMU_BF16_V mirror PREC / EMU_BF16)


KERNELS = [
    KernelSpec("soft_argmax_fwd", "soft_argmax", "_soft_argmax_fwd_kernel",
               _FEAT2 + [("out_ptr", "*fp32"), ("lse_ptr", "*fp32"), ("M", "i32"), ("N", "i32"),
                         ("C", "i32"), ("W", "i32"), ("scale2", "fp32")],
               {"NORMALIZE": True}),
    KernelSpec("soft_argmax_bwd", "soft_argmax", "_soft_argmax_bwd_kernel",
               _FEAT2 + [("go_ptr", "*fp32"), ("out_ptr", "*fp32"), ("lse_ptr", "*fp32"),
                         ("dq_ptr", "*fp32"), ("dk_ptr", "*fp32"), ("qdot_ptr", "*fp32"),
                         ("kdot_ptr", "*fp32"), ("M", "i32"), ("N", "i32"), ("C", "i32"), ("W", "i32"),
                         ("scale2", "fp32"), ("inv_tau", "fp32")],
               {"NORMALIZE": True}, family="bwd"),
    KernelSpec("argmax", "topk", "_argmax_kernel",
               _FEAT2 + [("tmask_ptr", "*u8"), ("val_ptr", "*fp32"), ("idx_ptr", "*i64"),
                         ("colkey_ptr", "*i64"), ("M", "i32"), ("N", "i32"), ("C", "i32")],
               {"HAS_TMASK": True, "WITH_COLS": True, "DIST": False, "NORMALIZE": True}),
    KernelSpec("argmax_dist", "topk", "_argmax_kernel",
               _FEAT2 + [("tmask_ptr", "*u8"), ("val_ptr", "*fp32"), ("idx_ptr", "*i64"),
                         ("colkey_ptr", "*i64"), ("M", "i32"), ("N", "i32"), ("C", "i32")],
               {"HAS_TMASK": True, "WITH_COLS": False, "DIST": True, "NORMALIZE": True}),
    KernelSpec("topk", "topk", "_topk_kernel",
               _FEAT2 + [("tmask_ptr", "*u8"), ("val_ptr", "*fp32"), ("idx_ptr", "*i64"),
                         ("M", "i32"), ("N", "i32"), ("C", "i32"), ("K", "i32")],
               {"HAS_TMASK": True, "NORMALIZE": True}, family="topk"),
    KernelSpec("ncc", "ncc", "_ncc_kernel",
               _FEAT2 + [("out_ptr", "*T"), ("M", "i32"), ("N", "i32"), ("C", "i32")],
               {"NORMALIZE": True}),
    KernelSpec("window_fwd", "window_soft_argmax", "_window_fwd_kernel",
               _FEAT2 + [("ctr_ptr", "*i64"), ("out_ptr", "*fp32"), ("lse_ptr", "*fp32"), ("M", "i32"),
                         ("N", "i32"), ("C", "i32"), ("H", "i32"), ("W", "i32"), ("radius", "i32"),
                         ("wmax", "i32"), ("scale2", "fp32")],
               {"ZERO": True, "NORMALIZE": True}, family="window", gemm=False),
    KernelSpec("window_bwd", "window_soft_argmax", "_window_bwd_kernel",
               _FEAT2 + [("ctr_ptr", "*i64"), ("go_ptr", "*fp32"), ("out_ptr", "*fp32"), ("lse_ptr", "*fp32"),
                         ("dq_ptr", "*fp32"), ("dk_ptr", "*fp32"), ("qdot_ptr", "*fp32"), ("kdot_ptr", "*fp32"),
                         ("M", "i32"), ("N", "i32"), ("C", "i32"), ("H", "i32"), ("W", "i32"),
                         ("radius", "i32"), ("wmax", "i32"), ("scale2", "fp32"), ("inv_tau", "fp32")],
               {"NORMALIZE": True}, family="window", gemm=False),
    # training losses (expected_cost, softmax_aggregate, rowsoftmax_distill), one entry per epilogue
    # variant: the variants change the code enough that ptxas allocates registers differently.
    *[KernelSpec(f"expected_cost_fwd{sfx}", "expected_cost", "_expected_cost_fwd_kernel",
                 _FEAT2 + [("t_ptr", "*fp32"), ("loss_ptr", "*fp32"), ("lse_ptr", "*fp32"), ("M", "i32"),
                           ("N", "i32"), ("C", "i32"), ("W", "i32"), ("scale2", "fp32"), ("half_p", "fp32")],
                 {"POW": pw, "NORMALIZE": True}) for sfx, pw in _POW_VARIANTS],
    *[KernelSpec(f"expected_cost_bwd{sfx}", "expected_cost", "_expected_cost_bwd_kernel",
                 _FEAT2 + [("t_ptr", "*fp32"), ("go_ptr", "*fp32"), ("loss_ptr", "*fp32"), ("lse_ptr", "*fp32"),
                           ("dq_ptr", "*fp32"), ("dk_ptr", "*fp32"), ("qdot_ptr", "*fp32"), ("kdot_ptr", "*fp32"),
                           ("M", "i32"), ("N", "i32"), ("C", "i32"), ("W", "i32"), ("scale2", "fp32"),
                           ("inv_tau", "fp32"), ("half_p", "fp32")],
                 {"POW": pw, "NORMALIZE": True}, family="bwd") for sfx, pw in _POW_VARIANTS],
    KernelSpec("aggregate_fwd", "softmax_aggregate", "_aggregate_fwd_kernel",
               _FEAT2 + [("v_ptr", "*T"), ("out_ptr", "*fp32"), ("lse_ptr", "*fp32"), ("M", "i32"), ("N", "i32"),
                         ("C", "i32"), ("CV", "i32"), ("scale2", "fp32")],
               {"NORMALIZE": True}, family="table", value_operand=True),
    KernelSpec("aggregate_bwd", "softmax_aggregate", "_aggregate_bwd_kernel",
               _FEAT2 + [("v_ptr", "*T"), ("go_ptr", "*T"), ("d_ptr", "*fp32"), ("lse_ptr", "*fp32"),
                         ("dq_ptr", "*fp32"), ("dk_ptr", "*fp32"), ("qdot_ptr", "*fp32"), ("kdot_ptr", "*fp32"),
                         ("dv_ptr", "*fp32"), ("M", "i32"), ("N", "i32"), ("C", "i32"), ("CV", "i32"),
                         ("scale2", "fp32"), ("inv_tau", "fp32")],
               {"NORMALIZE": True}, family="bwd", value_operand=True),
    *[KernelSpec(f"distill_fwd_{loss}", "rowsoftmax_distill", "_distill_fwd_kernel",
                 _DISTILL + [("loss_ptr", "*fp32"), ("stats_ptr", "*fp32"), ("M", "i32"), ("N", "i32"),
                             ("CT", "i32"), ("CS", "i32"), ("scale_t2", "fp32"), ("scale_s2", "fp32")],
                 {"LOSS": code, "NORMALIZE": True}, family="table") for code, loss in enumerate(_DISTILL_LOSSES)],
    KernelSpec("distill_l1_pass2", "rowsoftmax_distill", "_distill_l1_kernel",
               _DISTILL + [("loss_ptr", "*fp32"), ("stats_ptr", "*fp32"), ("M", "i32"), ("N", "i32"),
                           ("CT", "i32"), ("CS", "i32"), ("scale_t2", "fp32"), ("scale_s2", "fp32")],
               {"NORMALIZE": True}, family="table"),
    *[KernelSpec(f"distill_bwd_{loss}", "rowsoftmax_distill", "_distill_bwd_kernel",
                 _DISTILL + [("go_ptr", "*fp32"), ("stats_ptr", "*fp32"), ("dq_ptr", "*fp32"), ("dk_ptr", "*fp32"),
                             ("qdot_ptr", "*fp32"), ("kdot_ptr", "*fp32"), ("M", "i32"), ("N", "i32"),
                             ("CT", "i32"), ("CS", "i32"), ("scale_t2", "fp32"), ("scale_s2", "fp32"),
                             ("inv_tau_s", "fp32")],
                 {"LOSS": code, "NORMALIZE": True}, family="bwd") for code, loss in enumerate(_DISTILL_LOSSES)],
    KernelSpec("row_norm", "_stream", "_row_norm_kernel",
               [("x_ptr", "*T"), ("n_ptr", "*fp32"), ("R", "i32"), ("C", "i32")],
               family="row", gemm=False),
    KernelSpec("finalize_grad", "_stream", "_finalize_grad_kernel",
               [("acc_ptr", "*fp32"), ("x_ptr", "*T"), ("n_ptr", "*fp32"), ("dot_ptr", "*fp32"),
                ("out_ptr", "*T"), ("R", "i32"), ("C", "i32")],
               {"NORMALIZE": True, "EMU_BF16": False}, family="row", gemm=False),
    KernelSpec("pair_dist", "topk", "_pair_dist_kernel",
               _FEAT2 + [("idx_ptr", "*i64"), ("out_ptr", "*fp32"), ("M", "i32"), ("N", "i32"), ("C", "i32")],
               {"NORMALIZE": True}, family="row", gemm=False),
    KernelSpec("softmax_t", "ncc", "_softmax_t_kernel",
               [("x_ptr", "*T"), ("y_ptr", "*T"), ("L", "i32"), ("scale2", "fp32")],
               {"EMU_BF16": False}, family="softmax", gemm=False),
]
_BY_NAME = {k.name: k for k in KERNELS}
_DTYPES = ("fp16", "bf16", "fp32")


def _targets(spec: str | list | tuple) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for t in items:
        t = t.strip().lower()
        if not t:
            continue
        m = re.fullmatch(r"(?:sm_?)?(\d+)a?", t)
        if not m or int(m.group(1)) < 80:
            raise ValueError(f"unknown or unsupported target {t!r} (expected sm_80, sm_90, ...)")
        out.append(f"sm_{m.group(1)}")
    return out


def jobs_for(kernel: KernelSpec, targets) -> list[dict]:
    """Every (dtype, precision, config) a launch can pick for ``kernel``, per target."""
    variants = []  # (dtype, prec, constexprs, num_warps, num_stages, label, maxnreg)
    if kernel.family in ("score", "bwd", "topk"):
        for dname, tc, bound in cfgmod.all_tile_configs(kernel.family):
            precs = ("ieee", "tf32") if dname == "fp32" else ("ieee",)
            for prec in precs:
                const = dict(tc.meta(), PREC=prec, EMU_BF16=False)
                label = tc.label()
                if bound is not None:
                    const["KP"] = bound
                    label += f"-KP{bound}"
                variants.append((dname, prec, const, tc.num_warps, tc.num_stages, label, None))
    elif kernel.family == "table":  # a loss kernel with its own tile table, enumerated by its module
        mod = importlib.import_module(f"{_PKG}.{kernel.module}")
        for dname, tc, extra in mod.aot_tiles(kernel.attr):
            precs = ("ieee", "tf32") if dname == "fp32" else ("ieee",)
            for prec in precs:
                const = dict(tc.meta(), **extra, PREC=prec, EMU_BF16=False)
                label = tc.label() + "".join(f"-{k.replace('BLOCK_', '')}{v}" for k, v in extra.items())
                variants.append((dname, prec, const, tc.num_warps, tc.num_stages, label,
                                 getattr(tc, "maxnreg", None)))
    elif kernel.family == "window":
        for wc in cfgmod.all_window_configs(backward=kernel.name == "window_bwd"):
            for dname in _DTYPES:
                variants.append((dname, "-", wc.meta(), wc.num_warps, 1, wc.label(), wc.maxnreg))
    elif kernel.family == "row":
        for dname in _DTYPES:
            const = {"BLOCK_R": cfgmod.ROW_BLOCK_R, "BLOCK_C": cfgmod.ROW_BLOCK_C}
            variants.append((dname, "-", const, cfgmod.ROW_NUM_WARPS, cfgmod.ROW_NUM_STAGES,
                             f"R{cfgmod.ROW_BLOCK_R}-C{cfgmod.ROW_BLOCK_C}-w{cfgmod.ROW_NUM_WARPS}", None))
    elif kernel.family == "softmax":
        for dname in _DTYPES:
            bl = cfgmod.SOFTMAX_BLOCK
            variants.append((dname, "-", {"BLOCK": bl}, cfgmod.ROW_NUM_WARPS, cfgmod.ROW_NUM_STAGES,
                             f"B{bl}-w{cfgmod.ROW_NUM_WARPS}", None))
    if kernel.value_operand:  # values share the features' dtype T, hence their precision
        for v in variants:
            v[2].update(PREC_V=v[2]["PREC"], EMU_BF16_V=False)
    jobs = []
    for target in targets:
        for dname, prec, const, nw, ns, label, maxnreg in variants:
            jobs.append({"kernel": kernel.name, "target": target, "dtype": dname, "prec": prec,
                         "constexprs": dict(kernel.flags, **const), "num_warps": nw, "num_stages": ns,
                         "maxnreg": maxnreg, "config": label, "order": len(jobs)})
    return jobs


# --------------------------------------------------------------------------------------------
# one compile (runs in a worker subprocess)
# --------------------------------------------------------------------------------------------
def _ptxas_path() -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def _ptxas_stats(ptx: str) -> dict:
    m = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    arch = m.group(1) if m else "sm_80"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([_ptxas_path(), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(d, "k.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed ({arch}): {log.strip()[-2000:]}")
    regs = re.search(r"Used (\d+) registers", log)
    st = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"ptxas_arch": arch, "regs": int(regs.group(1)) if regs else -1,
            "spill_stores": int(st.group(1)) if st else -1, "spill_loads": int(st.group(2)) if st else -1}


def compile_one(job: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget

    spec = _BY_NAME[job["kernel"]]
    fn = getattr(importlib.import_module(f"{_PKG}.{spec.module}"), spec.attr)
    row = dict(job)
    t0 = time.time()
    try:
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            raise RuntimeError(f"{spec.attr} is a {type(fn).__name__}, not a JITFunction "
                               "(TRITON_INTERPRET must be unset for AOT compilation)")
        signature, attrs = {}, {}
        names = list(fn.arg_names)
        for name, ty in spec.args:
            ty = ty.replace("T", job["dtype"])
            signature[name] = ty
            if ty.startswith("*") or name in _CHANNEL_ARGS:
                attrs[(names.index(name),)] = [["tt.divisibility", 16]]
        for name in job["constexprs"]:
            signature[name] = "constexpr"
        missing = [n for n in names if n not in signature]
        if missing:
            raise RuntimeError(f"AOT registry lacks arguments {missing} of {spec.attr}")
        signature = {n: signature[n] for n in names}
        cc = int(job["target"].split("_")[1])
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=job["constexprs"], attrs=attrs)
        options = {"num_warps": job["num_warps"], "num_stages": job["num_stages"]}
        if job.get("maxnreg"):
            options["maxnreg"] = job["maxnreg"]
        ck = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        ptx = ck.asm["ptx"]
        row["smem"] = int(ck.metadata.shared)
        row["wgmma"] = len(re.findall(r"\bwgmma\.mma_async", ptx))
        row["mma"] = len(re.findall(r"\bmma\.sync\.aligned", ptx))
        row.update(_ptxas_stats(ptx))
        row["error"] = None
    except Exception as exc:  # reported in the table, fails the run
        row["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
    row["seconds"] = round(time.time() - t0, 2)
    return row


def _worker(path_in: str, path_out: str) -> None:
    with open(path_in) as f:
        jobs = json.load(f)
    with open(path_out, "w") as out:
        for job in jobs:
            out.write(json.dumps(compile_one(job)) + "\n")
            out.flush()


# --------------------------------------------------------------------------------------------
# checks, table, driver
# --------------------------------------------------------------------------------------------
def problems(row: dict) -> list[str]:
    """Why a compiled row fails the AOT gate (empty list: it passes)."""
    if row.get("error"):
        return [f"compile: {row['error']}"]
    out = []
    limit = cfgmod.SMEM_LIMIT.get(row["target"], min(cfgmod.SMEM_LIMIT.values()))
    if row["smem"] > limit:
        out.append(f"shared memory {row['smem']} B > {limit} B")
    if row["spill_stores"] != 0 or row["spill_loads"] != 0:
        out.append(f"spills ({row['spill_stores']} B stores, {row['spill_loads']} B loads)")
    if row["regs"] < 0:
        out.append("ptxas reported no register count")
    if needs_tensor_cores(row) and row["mma"] + row["wgmma"] == 0:
        out.append("GEMM tile without tensor-core instructions")
    return out


def needs_tensor_cores(row: dict) -> bool:
    spec = _BY_NAME[row["kernel"]]
    return spec.gemm and (row["dtype"] in ("fp16", "bf16") or row["prec"] == "tf32")


def _tc_label(row: dict) -> str:
    if row.get("error"):
        return "-"
    if row["wgmma"]:
        return "wgmma"
    if row["mma"]:
        return "mma"
    return "none" if _BY_NAME[row["kernel"]].gemm else "n/a"


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "target", "dtype", "prec", "config", "smem_B", "regs", "spill_B", "tc", "status")
    lines = []
    for r in rows:
        p = problems(r)
        err = bool(r.get("error"))
        lines.append((r["kernel"], r["target"], r["dtype"], r["prec"], r["config"],
                      "-" if err else str(r["smem"]), "-" if err else str(r["regs"]),
                      "-" if err else str(r["spill_stores"] + r["spill_loads"]), _tc_label(r),
                      "ok" if not p else "FAIL: " + "; ".join(p)))
    widths = [max(len(h), *(len(x[i]) for x in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*x) for x in lines]
    return "\n".join(out)


def compile_all(targets=("sm_80", "sm_90"), kernels=None, jobs: int | None = None,
                select=None) -> list[dict]:
    """Compile the distinct configurations of ``kernels`` (default: all) for ``targets``.

    Returns one row per (kernel, target, dtype, precision, config): the job description plus smem,
    regs, spill_stores, spill_loads, mma, wgmma, ptxas_arch, error, seconds. ``select(job) -> bool``
    keeps a subset of the jobs (quick checks); ``jobs`` is the number of worker processes.
    """
    targets = _targets(targets)
    specs = [_BY_NAME[k] for k in kernels] if kernels else list(KERNELS)
    todo = [j for spec in specs for j in jobs_for(spec, targets) if select is None or select(j)]
    if not todo:
        return []
    n = max(1, min(jobs or min(os.cpu_count() or 1, 8), len(todo)))
    shards = [todo[i::n] for i in range(n)]
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as d:
        procs = []
        for i, shard in enumerate(shards):
            pin, pout = os.path.join(d, f"in{i}.json"), os.path.join(d, f"out{i}.jsonl")
            with open(pin, "w") as f:
                json.dump(shard, f)
            cmd = [sys.executable, "-c",
                   f"import importlib; importlib.import_module({_MODULE!r})._worker({pin!r}, {pout!r})"]
            perr = open(os.path.join(d, f"err{i}.txt"), "w")
            procs.append((subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=perr), perr, pout, shard))
        for proc, perr, pout, shard in procs:
            proc.wait()
            perr.close()
            got = []
            if os.path.exists(pout):
                with open(pout) as f:
                    got = [json.loads(line) for line in f if line.strip()]
            if len(got) < len(shard):  # a worker that died mid-way: its remaining jobs fail
                with open(perr.name) as f:
                    err = f.read().strip()[-300:]
                for job in shard[len(got):]:
                    got.append(dict(job, error=f"worker exited with {proc.returncode}: {err}"))
            rows += got
    key = {(s.name): i for i, s in enumerate(KERNELS)}
    rows.sort(key=lambda r: (key[r["kernel"]], r["target"], r["dtype"], r["prec"], r["order"]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="semcorr kernels",
                                 description="Compile the Triton kernels ahead of time and check them.")
    ap.add_argument("--compile", dest="targets", default="sm_80,sm_90",
                    help="comma-separated targets (default: sm_80,sm_90)")
    ap.add_argument("--kernels", default="", help=f"comma-separated subset of: {', '.join(_BY_NAME)}")
    ap.add_argument("--dtypes", default="", help="comma-separated subset of: fp16, bf16, fp32")
    ap.add_argument("--jobs", type=int, default=None, help="parallel compile workers (default: CPU count, <= 8)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    args = ap.parse_args(argv)
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()] or None
    unknown = [k for k in kernels or [] if k not in _BY_NAME]
    if unknown:
        ap.error(f"unknown kernels {unknown}")
    dtypes = {d.strip() for d in args.dtypes.split(",") if d.strip()}
    if dtypes - set(_DTYPES):
        ap.error(f"unknown dtypes {sorted(dtypes - set(_DTYPES))}")
    try:
        targets = _targets(args.targets)
    except ValueError as exc:
        ap.error(str(exc))
    t0 = time.time()
    rows = compile_all(targets, kernels=kernels, jobs=args.jobs,
                       select=(lambda j: j["dtype"] in dtypes) if dtypes else None)
    print(format_table(rows))
    bad = [r for r in rows if problems(r)]
    print(f"\n{len(rows)} compiles, {len(bad)} failing, {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
