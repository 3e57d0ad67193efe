"""The ``semcorr`` command line.

    semcorr info                         which backends this installation has, and how it was built
    semcorr bench [--quick|--full]       fused vs naive latency and peak memory (docs/benchmarks.md)
    semcorr kernels --compile sm_80,sm_90   compile every Triton kernel ahead of time (no GPU needed)
    semcorr eval --dataset NAME [--root DIR] --backbone NAME --matcher PRESET [--plot DIR] [--out FILE]
                                         PCK tables of a backbone + matcher on a dataset (torchrun shards it)
    semcorr demo [--out demo.png]        one warped photo pair, matched and drawn (no download needed)
    semcorr train METHOD --config FILE [--set k=v ...] [--resume]
                                         train a method of the papers (configs/; torchrun for DDP)
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


def _build_eval(args):
    import torch

    from . import matching
    from .backbones import create_backbone
    from .data import build_dataset

    kw = {}
    if args.dataset == "warps":
        kw.update(n_pairs=args.n_pairs or 20, seed=args.seed)
    else:
        if not args.root:
            raise SystemExit(f"semcorr eval: --root DIR is required for --dataset {args.dataset}")
        kw["root"] = args.root
        if args.split:
            kw["split"] = args.split
        if args.pairs:
            kw["pairs"] = args.pairs
        if args.n_pairs:
            kw["n_pairs"] = args.n_pairs
    ds = build_dataset(args.dataset, **kw)
    if args.checkpoint:  # a trained method (semcorr train) stands in for the backbone
        from .train.trainer import load_trained
        backbone = load_trained(args.checkpoint, device=args.device)
    else:
        bkw = {}
        if args.weights:
            bkw["weights"] = args.weights
        if args.random_init:
            bkw["pretrained"] = False
        backbone = create_backbone(args.backbone, device=args.device, **bkw).eval()
    overrides = {}
    if args.radius is not None:
        overrides["radius"] = args.radius
    if args.grid:
        overrides["grid"] = (args.grid, args.grid)
    matcher = matching.build_matcher(args.matcher, **overrides)
    cache = None
    if args.cache:
        from .backbones.cache import FeatureCache
        cache = FeatureCache(args.cache, backbone.name, backbone.canvas)
    torch.manual_seed(args.seed)
    return ds, backbone, matcher, cache


def _eval(args) -> int:
    import os

    import torch.distributed as dist

    from . import evaluate, metrics

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched and not dist.is_initialized():
        dist.init_process_group("gloo")
    try:
        ds, backbone, matcher, cache = _build_eval(args)
        res = evaluate.evaluate(ds, backbone, matcher, pose=args.pose, pose_score=args.pose_score, cache=cache,
                                device=args.device, limit=args.limit, geo_dataset=args.geo, progress=not args.quiet,
                                mask_dir=args.masks)
        if (dist.get_rank() if launched else 0) == 0:
            print(metrics.format_table(res.summary))
            print(f"{res.info['n_pairs']} pairs in {res.seconds:.1f} s on {res.info['world_size']} process(es)")
            if args.out:
                evaluate.write_json(res, args.out)
                print(f"wrote {args.out}")
            if args.plot:
                _plots(res, ds, args.plot, n_pictures=args.n_pictures)
    finally:
        if launched and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _plots(res, ds, out_dir: str, n_pictures: int = 4) -> None:
    import os

    from . import plots

    a, v = plots.pck_curve(res.records, per="image")
    a2, v2 = plots.pck_curve(res.records, per="point")
    path = plots.plot_pck_curves({"per image": (a, v), "per point": (a2, v2)}, os.path.join(out_dir, "pck_curve.png"),
                                 title=f"{res.info['dataset']} / {res.info['backbone']}")
    print(f"wrote {path}")
    for r in res.records[:n_pictures]:
        pair = ds[r.index]
        path = plots.plot_matches(pair.src_image, pair.trg_image, r.src_kps, r.pred, r.gt, r.valid, r.thr,
                                  os.path.join(out_dir, f"match_{r.index:05d}.png"), title=f"{r.pair_id} ({r.category})")
        print(f"wrote {path}")


def _demo(args) -> int:
    import os

    import torch

    from . import evaluate, matching, metrics, plots
    from .backbones import create_backbone
    from .data import build_dataset

    ds = build_dataset("warps", n_pairs=max(1, args.index + 1), seed=args.seed)
    backbone = create_backbone(args.backbone, pretrained=not args.random_init).eval()
    matcher = matching.build_matcher(args.matcher)
    feats = evaluate.FeatureSource(backbone)
    pair = ds[args.index]
    rec = evaluate.evaluate_pair(pair, feats, matcher, index=args.index)
    alphas = (0.05, 0.1)
    vals = metrics.pck(rec.pred[None], rec.gt[None], torch.tensor([rec.thr]), list(alphas), valid=rec.valid[None])
    path = plots.plot_matches(pair.src_image, pair.trg_image, rec.src_kps, rec.pred, rec.gt, rec.valid, rec.thr,
                              args.out, alpha=0.1, title=f"{pair.pair_id}: {backbone.name} + {args.matcher}")
    print(", ".join(f"PCK@{a:g} = {100 * float(v):.1f}%" for a, v in zip(alphas, vals)) +
          f"  ({int(rec.valid.sum())} keypoints)")
    print(f"wrote {os.path.abspath(path)}")
    return 0


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
    e = sub.add_parser("eval", help="evaluate a backbone + matcher on a dataset (PCK tables, JSON, plots)")
    e.add_argument("--dataset", required=True, help="a name from semcorr_fast.data.list_datasets(); 'warps' needs no files")
    e.add_argument("--root", help="the dataset's directory, in its published layout")
    e.add_argument("--split", help="dataset split (e.g. test)")
    e.add_argument("--pairs", help="pair-list file (Demystifying protocol datasets)")
    e.add_argument("--n-pairs", type=int, help="pairs to read from the pair list / to generate (warps)")
    e.add_argument("--limit", type=int, help="evaluate only the first N pairs")
    e.add_argument("--backbone", default="daisy", help="a name from semcorr_fast.backbones.list_backbones()")
    e.add_argument("--weights", help="local weights file or directory")
    e.add_argument("--checkpoint", help="evaluate a trained method (a last.pt/best.pt of semcorr train) instead of --backbone")
    e.add_argument("--random-init", action="store_true", help="random-init backbone (for testing the pipeline)")
    e.add_argument("--matcher", default="geoaware", help="matcher preset (semcorr_fast.matching.PRESETS)")
    e.add_argument("--radius", type=int, help="window radius override")
    e.add_argument("--grid", type=int, help="resample both maps to GRID x GRID before matching (Demystifying: 128)")
    e.add_argument("--pose", default="none", choices=["none", "code", "paper"], help="test-time pose alignment")
    e.add_argument("--pose-score", default="imd", choices=["imd", "mutual_nn"])
    e.add_argument("--masks", help="instance masks for the pose IMD: DIR/<image stem>.png, nonzero = object "
                                   "(e.g. SAM prompted by the GT box, as GeoAware-SC); default: the bbox")
    e.add_argument("--geo", help="also report the geometry-aware subset of this dataset's part groups (spair, ap10k)")
    e.add_argument("--cache", help="feature cache directory (safetensors; resumes)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="write the results as JSON here")
    e.add_argument("--plot", help="write PCK-vs-alpha curves and match pictures into this directory")
    e.add_argument("--n-pictures", type=int, default=4)
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(fn=_eval)
    d = sub.add_parser("demo", help="match one warped photo pair and draw it (no download needed)")
    d.add_argument("--out", default="semcorr_demo.png")
    d.add_argument("--backbone", default="daisy")
    d.add_argument("--random-init", action="store_true")
    d.add_argument("--matcher", default="geoaware")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--index", type=int, default=0, help="which pair of the warps dataset")
    d.set_defaults(fn=_demo)
    from .train.cli import add_train_parser
    add_train_parser(sub)
    args, extra = p.parse_known_args(argv)
    if extra and args.cmd != "kernels":  # other options are passed through to the AOT compiler
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    from .data.base import DatasetFormatError
    try:
        return args.fn(args)
    except (FileNotFoundError, DatasetFormatError) as exc:  # missing data/weights: the message names the file
        print(f"semcorr {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
