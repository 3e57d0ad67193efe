"""Training layer shared by every method: configs, training data, the trainer and ``semcorr train``.

    from semcorr_fast.train import load_config, train
    cfg = load_config("configs/demystifying/eq_resnet50_conv3.toml", ["train.steps=100"])
    result = train(cfg)                      # out_dir/last.pt, best.pt, metrics.jsonl

See :mod:`.config` (schema, overrides), :mod:`.data` (sources, batch stream), :mod:`.trainer` (loop,
checkpoints, evaluation, DDP) and ``configs/README.md``.
"""
from .config import ConfigError, TrainConfig, config_from_dict, load_config, parse_override  # noqa: F401
from .data import BatchStream, DatasetPairs, ImageFolder, ShippedPhotos, derive_seed, training_size  # noqa: F401
from .trainer import TrainResult, load_checkpoint, load_trained, train  # noqa: F401


def __getattr__(name):  # `add_train_parser` without importing .cli eagerly (python -m semcorr_fast.train.cli)
    if name == "add_train_parser":
        from .cli import add_train_parser
        return add_train_parser
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config", "parse_override", "BatchStream",
           "DatasetPairs", "ImageFolder", "ShippedPhotos", "derive_seed", "training_size", "TrainResult",
           "load_checkpoint", "load_trained", "train", "add_train_parser"]
