"""The edge-method registry: `@register_edge_method("mist")` makes a method addressable by name.

The name is the address (as timm's `create_model`): checkpoints record it, `train --method NAME` and the exporter
look it up, and the registry-completeness tests build a tiny instance of every registered method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from mist_kit.errors import UsageError

if TYPE_CHECKING:
    from mist_kit.edge.base import EdgeMethod

_REGISTRY: dict[str, type[EdgeMethod]] = {}
T = TypeVar("T")


def register_edge_method(name: str) -> Callable[[T], T]:
    """Class decorator registering an `EdgeMethod` subclass under `name`; a duplicate name is an error."""

    def deco(cls: T) -> T:
        if name in _REGISTRY:
            raise ValueError(f"edge method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.method_name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def list_edge_methods() -> list[str]:
    """Names of every registered edge method, sorted."""
    return sorted(_REGISTRY)


def get_edge_method(name: str) -> type[EdgeMethod]:
    """The class registered under `name`, or a one-line error listing the valid names."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown edge method {name!r}; registered: {', '.join(list_edge_methods())}")
    return _REGISTRY[name]


def create_edge_method(name: str, *, embed_dim: int, num_tokens: int, num_prefix_tokens: int, num_classes: int,
                       **params: Any) -> EdgeMethod:
    """Build the method `name` for features of shape [T, D] and `num_classes` outputs."""
    cls = get_edge_method(name)
    return cls(embed_dim=embed_dim, num_tokens=num_tokens, num_prefix_tokens=num_prefix_tokens,
               num_classes=num_classes, **params)
