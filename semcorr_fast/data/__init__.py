"""Evaluation datasets in their published on-disk formats, brought to a declared canvas.

``build_dataset(name, root=..., split=..., canvas=...)`` returns a :class:`PairDataset` of
:class:`Pair` s; ``list_datasets()`` names them. See ``docs/ARCHITECTURE.md`` for the list.
"""
from .base import (DatasetFormatError, Pair, PairDataset, build_dataset, list_datasets, load_image,  # noqa: F401
                   register_dataset, require_dir, require_file)
from .canvas import Canvas, CanvasTransform  # noqa: F401
