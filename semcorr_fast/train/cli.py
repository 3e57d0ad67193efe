"""``semcorr train METHOD --config FILE [--set KEY=VALUE ...] [--resume] [--out DIR]``.

:func:`add_train_parser` registers the sub-command on the ``semcorr`` parser; :func:`main` runs it
stand-alone (``python -m semcorr_fast.train.cli train ...``, also under ``torchrun``).
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_train_parser", "run_train", "main"]


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to an ``argparse`` sub-parsers object; returns the new parser (its ``fn`` default is
    :func:`run_train`)."""
    p = subparsers.add_parser(
        "train", help="train a method (config: configs/<paper>/<method>_<backbone>.toml; torchrun for DDP)",
        description="Train a semcorr_fast method from a TOML config (schema: configs/README.md). Under torchrun "
                    "(WORLD_SIZE > 1) the global batch is split over the ranks.")
    p.add_argument("method", help="a semcorr_fast.methods name (must match the config's `method` key)")
    p.add_argument("--config", required=True, metavar="FILE", help="TOML training config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.steps=100 --set method_args.tau=0.1 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (starts fresh if there is none)")
    p.add_argument("--out", metavar="DIR", help="output directory (overrides train.out_dir)")
    p.set_defaults(fn=run_train)
    return p


def run_train(args) -> int:
    """Run the parsed ``train`` command; returns the exit status (2 for a bad config or missing file)."""
    import torch.distributed as dist

    from .config import ConfigError, load_config
    from .trainer import train

    try:
        cfg = load_config(args.config, args.overrides, method=args.method)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"semcorr train: {exc}", file=sys.stderr)
        return 2
    try:
        res = train(cfg, resume=args.resume, out_dir=args.out)
    except (ConfigError, FileExistsError) as exc:
        print(f"semcorr train: {exc}", file=sys.stderr)
        return 2
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        last = res.logs[-1] if res.logs else {}
        msg = f"trained {cfg.method} on {cfg.backbone} to step {res.step}"
        if "loss" in last:
            msg += f", loss {last['loss']:.5g}"
        if res.best is not None:
            msg += f", best {res.best['metric']} = {res.best['value']:.4f} at step {res.best['step']}"
        print(msg + f"; outputs in {res.out_dir}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="semcorr")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_train_parser(sub)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
