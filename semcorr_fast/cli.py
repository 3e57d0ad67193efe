"""The ``semcorr`` command line.

    semcorr info                         which backends this installation has, and how it was built
    semcorr bench [--quick|--full]       fused vs naive latency and peak memory (docs/benchmarks.md)
    semcorr kernels --compile sm_80,sm_90   compile every Triton kernel ahead of time (no GPU needed)
"""
from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    import torch

    from . import _backend, _ext, __version__

    print(f"semcorr_fast {__version__}  (torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}, "
          f"GPU: {'yes' if torch.cuda.is_available() else 'no'})")
    info = _ext.build_info()
    print("extension: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    for dev in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        for name, why in _backend.available(dev).items():
            print(f"  backend {name:9s} on {dev:4s}: {'available' if why is None else 'unavailable - ' + why}")
    return 0


def _bench(args) -> int:
    from . import bench

    return bench.main(quick=not args.full)


def _kernels(args) -> int:
    try:
        from .kernels import aot
    except ImportError as exc:
        print(f"semcorr kernels: the Triton kernels are not available ({exc})", file=sys.stderr)
        return 2
    argv = []
    if args.compile:
        argv += ["--compile", args.compile]
    return aot.main(argv + list(args.extra))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="semcorr", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="backends and build configuration").set_defaults(fn=_info)
    b = sub.add_parser("bench", help="fused vs naive latency and peak memory")
    g = b.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="the default table (60x60, C=768)")
    g.add_argument("--full", action="store_true", help="also the 160x160 forward+backward case")
    b.set_defaults(fn=_bench)
    k = sub.add_parser("kernels", help="ahead-of-time compile of the Triton kernels")
    k.add_argument("--compile", default="sm_80,sm_90", help="comma-separated targets (default sm_80,sm_90)")
    k.set_defaults(fn=_kernels)
    args, extra = p.parse_known_args(argv)
    if extra and args.cmd != "kernels":  # other options are passed through to the AOT compiler
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
