"""The edge-method registry: `@register_edge_method("mist")` makes a method addressable by name.

The name is the address (as timm's `create_model`): checkpoints record it, `train --method NAME` and the exporter
look it up, and the registry-completeness tests build a tiny instance of every registered method.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from mist_kit.errors import UsageError
from mist_kit.runtime.plan import BackboneShape

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


def create_edge_method(name: str, *, backbone: BackboneShape, depth: int | None, num_classes: int,
                       params: Mapping[str, Any] | None = None, inputs: Mapping[str, tuple[int, ...]] | None = None,
                       seed: int | None = None) -> EdgeMethod:
    """Build method `name` at `depth` for `num_classes` outputs: the one way every caller builds a method.

    `inputs` are the decoded tensor shapes the edge network receives (a token-pooling codec changes T); by default
    the cloud plan's own shapes. With `seed` the initialisation is seeded without touching the global RNG stream.
    A parameter or depth the method rejects raises ValueError.
    """
    import torch

    cls = get_edge_method(name)
    params = dict(params or {})
    cls.check_depth(backbone, depth)
    plan = cls.cloud_plan(backbone, depth, params)
    shapes = dict(inputs) if inputs is not None else {t.name: t.shape for t in plan.tensors}
    if tuple(shapes) != plan.names:
        raise ValueError(f"inputs {list(shapes)} do not match the plan's tensors {list(plan.names)}")
    with torch.random.fork_rng():
        if seed is not None:
            torch.manual_seed(seed)
        try:
            return cls(backbone=backbone, depth=depth, inputs=shapes, num_classes=num_classes, **params)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
