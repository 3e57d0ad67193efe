"""On-disk feature cache: one safetensors file per (backbone, canvas, image key), resumable extraction.

Layout: ``<root>/<backbone_name>/<canvas tag>/<2 hex>/<sanitised key>-<hash>.safetensors``, each file
holding one tensor ``"feats"`` of shape ``(C, h, w)`` plus metadata (key, backbone, canvas, dtype).
The hash (SHA-1 of the key) keeps distinct keys distinct after sanitising; the metadata key is
checked on read.

Flipped images use the key ``flip_key(key) = key + ":flip"`` and hold the features of the
horizontally flipped image (computed by the backbone again, as GeoAware-SC pre-extracts them, not the
flipped map).

Writes are atomic: the tensor goes to a hidden temporary file in the same folder, is flushed and
fsync'ed, then ``os.replace``-d onto the final name. An interrupted run leaves either the complete
file or none (at worst a stray ``.*.tmp`` that is never read and that :meth:`FeatureCache.clean_tmp`
removes), so re-running :meth:`FeatureCache.extract` resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..data.canvas import Canvas

FLIP_SUFFIX = ":flip"
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def flip_key(key: str) -> str:
    """The cache key of the horizontally flipped image of ``key``."""
    return str(key) + FLIP_SUFFIX


def canvas_tag(canvas: Canvas) -> str:
    """A folder name describing ``canvas`` (e.g. ``pad_square-840-lanczos``)."""
    size = canvas.size
    if isinstance(size, tuple):
        size = "x".join(str(int(s)) for s in size)
    return f"{canvas.kind}-{size if size is not None else 'orig'}-{canvas.resample}"


class FeatureCache:
    """Per-image feature maps of one backbone on one canvas, stored under ``root``.

    Args:
        root: cache root folder (created on first write).
        backbone_name: the backbone's registry name; :meth:`extract` refuses another backbone.
        canvas: the canvas the images were brought to; :meth:`extract` refuses a backbone with another.
        dtype: storage dtype, ``torch.float16`` (default, half the disk) or ``torch.float32``.
        fsync: flush each file to disk before renaming it into place (default True).
    """

    def __init__(self, root: str | os.PathLike, backbone_name: str, canvas: Canvas, *,
                 dtype: torch.dtype = torch.float16, fsync: bool = True):
        if not isinstance(backbone_name, str) or not backbone_name:
            raise ValueError(f"FeatureCache: backbone_name must be a non-empty str, got {backbone_name!r}")
        if not isinstance(canvas, Canvas):
            raise TypeError(f"FeatureCache: canvas must be a semcorr_fast.data.canvas.Canvas, got "
                            f"{type(canvas).__name__}")
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"FeatureCache: dtype must be torch.float16 or torch.float32, got {dtype}")
        self.root = Path(root)
        self.backbone_name = backbone_name
        self.canvas = canvas
        self.dtype = dtype
        self.fsync = bool(fsync)
        self.dir = self.root / _SAFE.sub("_", backbone_name) / canvas_tag(canvas)

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.dir)!r}, dtype={self.dtype})"

    # ------------------------------------------------------------------ files
    def path(self, key: str) -> Path:
        """The file that holds ``key``'s features."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"FeatureCache: key must be a non-empty str, got {key!r}")
        h = hashlib.sha1(key.encode("utf-8")).hexdigest()
        safe = _SAFE.sub("_", key).strip("._")[-80:] or "key"
        return self.dir / h[:2] / f"{safe}-{h[:16]}.safetensors"

    def has(self, key: str) -> bool:
        """Whether ``key``'s features are stored (complete files only)."""
        return self.path(key).is_file()

    def put(self, key: str, feats: torch.Tensor) -> Path:
        """Store ``feats`` ``(C, h, w)`` (any floating dtype/device) for ``key``, atomically; returns the path."""
        if not isinstance(feats, torch.Tensor) or feats.ndim != 3 or not feats.is_floating_point():
            raise ValueError(f"FeatureCache.put({key!r}): feats must be a floating (C, h, w) tensor, got "
                             f"{type(feats).__name__ if not isinstance(feats, torch.Tensor) else (tuple(feats.shape), feats.dtype)}")
        from safetensors.torch import save_file
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        meta = {"key": key, "backbone": self.backbone_name, "canvas": canvas_tag(self.canvas),
                "dtype": str(self.dtype).replace("torch.", ""), "shape": "x".join(map(str, feats.shape))}
        t = feats.detach().to(device="cpu", dtype=self.dtype).contiguous()
        try:
            save_file({"feats": t}, str(tmp), metadata=meta)
            if self.fsync:
                fd = os.open(str(tmp), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            raise
        return path

    def get(self, key: str, *, dtype: torch.dtype | None = torch.float32, device=None) -> torch.Tensor:
        """``key``'s features ``(C, h, w)``, cast to ``dtype`` (None: the stored dtype) on ``device``."""
        from safetensors import safe_open
        path = self.path(key)
        if not path.is_file():
            raise KeyError(f"FeatureCache: no features for key {key!r} (expected file {path})")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                raise ValueError(f"FeatureCache: {path} holds key {meta.get('key')!r}, not {key!r}")
            t = f.get_tensor("feats")
        if dtype is not None:
            t = t.to(dtype)
        return t.to(device) if device is not None else t

    def clean_tmp(self) -> int:
        """Delete temporary files left by interrupted writes; returns how many were removed."""
        n = 0
        if self.dir.is_dir():
            for p in self.dir.glob("*/.*.tmp"):
                p.unlink(missing_ok=True)
                n += 1
        return n

    # ------------------------------------------------------------------ extraction
    def extract(self, backbone, items: Iterable, *, flip: bool = False, batch_size: int = 8,
                progress: bool = True) -> dict[str, int]:
        """Compute and store the features of every item whose key is missing.

        Args:
            backbone: a :class:`~semcorr_fast.backbones.Backbone` whose ``name`` and ``canvas`` match
                this cache's.
            items: iterable of ``(key, image)`` with ``image`` a ``(3, H, W)`` float tensor in [0, 1] on
                the canvas, or a zero-argument callable returning one (called only when the key, or
                its flipped key, is missing, so resuming skips image decoding).
            flip: also store the horizontally flipped image's features under ``flip_key(key)``.
            batch_size: images per backbone call (consecutive images of equal size are batched).
            progress: show a tqdm bar.
        Returns:
            ``{"computed": images run through the backbone, "skipped": already stored}`` (flipped
            variants count separately).
        """
        if getattr(backbone, "name", None) != self.backbone_name:
            raise ValueError(f"FeatureCache.extract: cache is for backbone {self.backbone_name!r}, got "
                             f"{getattr(backbone, 'name', None)!r}")
        if getattr(backbone, "canvas", None) != self.canvas:
            raise ValueError(f"FeatureCache.extract: cache canvas {self.canvas} differs from the backbone's "
                             f"{getattr(backbone, 'canvas', None)}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"FeatureCache.extract: batch_size must be a positive int, got {batch_size!r}")
        from tqdm.auto import tqdm
        total = len(items) if hasattr(items, "__len__") else None
        stats = {"computed": 0, "skipped": 0}
        pending: list[tuple[str, torch.Tensor]] = []

        def run() -> None:
            if not pending:
                return
            x = torch.stack([im for _, im in pending], 0)
            with torch.no_grad():
                feats = backbone(x)
            for (k, _), f in zip(pending, feats):
                self.put(k, f)
            stats["computed"] += len(pending)
            pending.clear()

        bar = tqdm(total=total, disable=not progress, desc=f"features {self.backbone_name}", unit="img")
        try:
            for item in items:
                try:
                    key, image = item
                except (TypeError, ValueError):
                    raise ValueError("FeatureCache.extract: items must yield (key, image) pairs") from None
                want = [(key, False)] + ([(flip_key(key), True)] if flip else [])
                todo = [(k, fl) for k, fl in want if not self.has(k)]
                stats["skipped"] += len(want) - len(todo)
                if todo:
                    img = image() if callable(image) else image
                    if not isinstance(img, torch.Tensor) or img.ndim != 3 or img.shape[0] != 3:
                        raise ValueError(f"FeatureCache.extract: image of {key!r} must be a (3, H, W) tensor, got "
                                         f"{type(img).__name__ if not isinstance(img, torch.Tensor) else tuple(img.shape)}")
                    for k, fl in todo:
                        im = img.flip(-1) if fl else img
                        if pending and pending[0][1].shape != im.shape:
                            run()
                        pending.append((k, im))
                        if len(pending) >= batch_size:
                            run()
                bar.update(1)
                bar.set_postfix(computed=stats["computed"] + len(pending), skipped=stats["skipped"], refresh=False)
            run()
        finally:
            bar.close()
        return stats


def items_from(keys: Iterable[str], load: Callable[[str], torch.Tensor]):
    """``(key, lambda: load(key))`` pairs for :meth:`FeatureCache.extract` (lazy image loading)."""
    return [(k, (lambda k=k: load(k))) for k in keys]
