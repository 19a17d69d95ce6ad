"""Compressor registry: visual-token rankers with one interface (see base.Compressor).

>>> from epic_ext.compress import get_compressor
>>> get_compressor("dart", image_pivots=8)
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Compressor, LayerContext, select_by_score
from .dart import DART
from .fastv import FastV
from .random import RandomCompressor

_REGISTRY: dict[str, Callable[..., Compressor]] = {}


def register_compressor(name: str, factory: Callable[..., Compressor]) -> None:
    """Make `factory(**method_kwargs)` available as apply_compression(method=name)."""
    if not name or not isinstance(name, str):
        raise ValueError(f"register_compressor: name must be a non-empty string, got {name!r}")
    _REGISTRY[name] = factory


def available() -> list[str]:
    return sorted(_REGISTRY)


def get_compressor(name: str, **method_kwargs) -> Compressor:
    if name not in _REGISTRY:
        raise ValueError(f"unknown compression method {name!r}; available: {', '.join(available())}")
    try:
        return _REGISTRY[name](**method_kwargs)
    except TypeError as exc:
        raise TypeError(f"{name}: bad method arguments {sorted(method_kwargs)}: {exc}") from exc


register_compressor("fastv", FastV)
register_compressor("dart", DART)
register_compressor("random", RandomCompressor)

__all__ = ["Compressor", "LayerContext", "select_by_score", "register_compressor", "available", "get_compressor",
           "FastV", "DART", "RandomCompressor"]
