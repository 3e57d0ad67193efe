"""Imports every dataset module so that each registers itself (see ``base.register_dataset``)."""
import importlib

for _m in ("spair", "pf", "ap10k", "cub", "stanford_dogs", "aflw", "awa", "warps"):
    try:
        importlib.import_module(f"{__package__}.{_m}")
    except ModuleNotFoundError as exc:  # a loader module not written yet; anything else is a real error
        if exc.name != f"{__package__}.{_m}":
            raise
