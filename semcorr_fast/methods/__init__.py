"""Training methods of the four papers, by name.

``register_method(name)`` registers a :class:`~semcorr_fast.methods.base.Method` subclass;
``build_method(name, backbone, **method_args)`` builds one; ``list_methods()`` names them. The method
modules (``demystifying``, ...) register themselves when first needed.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from .base import Method, count_parameters  # noqa: F401

__all__ = ["Method", "build_method", "list_methods", "register_method", "count_parameters"]

#: modules that register methods; imported lazily by build_method / list_methods. A module that does
#: not exist (yet) is skipped; any other import error is raised.
_METHOD_MODULES = ("demystifying", "geoaware", "universal", "jamaisvu")

_REGISTRY: dict[str, type] = {}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a :class:`Method` subclass reachable as ``build_method(name, ...)``.

    Sets the class attribute ``method_name = name``. Registering a second class under a taken name
    is an error.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_method: name must be a non-empty str, got {name!r}")

    def deco(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({name!r}): {cls!r} is not a subclass of semcorr_fast.methods.Method")
        other = _REGISTRY.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise ValueError(f"register_method: {name!r} is already registered by {other.__module__}.{other.__qualname__}")
        cls.method_name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_all() -> None:
    for mod in _METHOD_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{mod}":
                raise


def list_methods() -> list[str]:
    """Sorted names of the registered methods."""
    _load_all()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type:
    """The registered class of ``name`` (KeyError listing the registered names otherwise)."""
    if name not in _REGISTRY:
        _load_all()
    if name not in _REGISTRY:
        raise KeyError(f"method: unknown name {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_method(name: str, backbone, **method_args) -> Method:
    """Build a registered method on ``backbone``.

    Args:
        name: a name from :func:`list_methods`.
        backbone: a :mod:`semcorr_fast.backbones` model.
        **method_args: the method's options (its ``__init__`` keywords). Unknown options raise a
            ``TypeError`` listing the accepted ones.
    Returns:
        The :class:`Method` (an ``nn.Module``, on the CPU unless the method moves itself).
    """
    cls = get_method_class(name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = [k for k, p in params.items() if k not in ("self", "backbone")
                    and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(k for k in method_args if k not in accepted)
        if unknown:
            raise TypeError(f"build_method({name!r}): unknown method_args {unknown}; accepted: {accepted}")
    return cls(backbone, **method_args)
