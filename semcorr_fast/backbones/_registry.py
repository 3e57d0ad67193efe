"""Name → builder registry for backbones (``register_backbone`` / ``create_backbone``)."""
from __future__ import annotations

import inspect
from typing import Callable

import torch

_REGISTRY: dict[str, Callable] = {}


def register_backbone(name: str) -> Callable[[Callable], Callable]:
    """Decorator registering ``builder(*, weights=None, pretrained=True, **cfg) -> Backbone`` as ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_backbone: name must be a non-empty str, got {name!r}")

    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"register_backbone: {name!r} is already registered (by {_REGISTRY[name].__module__})")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    """Sorted names of the registered backbones (including those that method modules define)."""
    from .. import methods
    methods.list_methods()
    return sorted(_REGISTRY)


def create_backbone(name: str, *, weights=None, pretrained: bool = True, device="cpu",
                    dtype: torch.dtype = torch.float32, **cfg):
    """Build a registered backbone, frozen (eval mode, no grad), on ``device`` in ``dtype``.

    Args:
        name: a name from :func:`list_backbones`.
        weights: a local state-dict file (``.safetensors``/``.pth``), or for Stable Diffusion a
            diffusers-layout directory. When given it is always loaded.
        pretrained: with ``weights=None``, look for the published weights in
            ``$SEMCORR_WEIGHTS_<NAME>``, the Hugging Face cache and the torch hub folder, and raise a
            ``FileNotFoundError`` naming what to put where if none is found. ``False``: random init.
        device, dtype: where and in which floating dtype the network runs (outputs are float32).
        **cfg: builder options (``tiny=True`` for the small random-init test configurations, layers,
            facets, sizes, ...); see each builder's docstring. Unknown options raise ``TypeError``.

    Returns:
        A :class:`~semcorr_fast.backbones.Backbone`.
    """
    from ._base import freeze
    if name not in _REGISTRY:  # backbones that method modules define (e.g. "smallcnn" in methods/nets.py)
        from .. import methods
        methods.list_methods()
    if name not in _REGISTRY:
        raise KeyError(f"create_backbone: unknown backbone {name!r}; registered: {list_backbones()}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"create_backbone: dtype must be a floating torch.dtype, got {dtype!r}")
    fn = _REGISTRY[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [k for k in params if k not in ("weights", "pretrained")]
        unknown = [k for k in cfg if k not in params]
        if unknown:
            raise TypeError(f"create_backbone({name!r}): unknown option(s) {unknown}; accepted: {accepted}")
    model = fn(weights=weights, pretrained=pretrained, **cfg)
    model = model.to(device=torch.device(device), dtype=dtype)
    return freeze(model)
