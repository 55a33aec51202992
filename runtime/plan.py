"""The cloud plan: which backbone tensors the cloud computes and sends, declared by each edge method.

A separated-tuning method is two halves joined by named tensors. Its *cloud plan* says, for every tensor the cloud
sends, where it comes from in the frozen backbone (its `TensorSource`) and its shape; the edge half is built on
those names. Everything downstream reads the plan, never a method name: the feature cache stores one array per
source (so one backbone pass serves every candidate of every method), the cloud graph emits the plan's tensors in
order, each tensor gets its own codec, and the bundle manifest records the plan (`cloud.plan`).

Sources (z_0 = the tokens entering block 1, z_i = the output of block i before the final norm; shapes [T, D]):
    block:i      z_i (i = 0 is the patch-embedding tokens)
    gather:k     z_0 + z_1 + ... + z_k (MIST's gather)
    normed:i     the backbone's final norm applied to z_i (ViT-Split's prior maps)
    final_cls    the backbone's own pre-logits embedding (final-norm cls token), shape [1, D]
Every sent tensor is a token sequence [T, D] (final_cls has T = 1), so every codec applies to every tensor.
Torch-free: the runtime, the device budget and third-party readers parse plans from manifests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mist_kit.errors import BundleError

SOURCE_KINDS = ("block", "gather", "normed", "final_cls")
_SOURCE_RE = re.compile(r"^(block|gather|normed):(\d{1,4})$|^final_cls$")
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,47}$")


@dataclass(frozen=True)
class BackboneShape:
    """The numbers a plan and an edge method need about the frozen backbone (no weights, no torch)."""

    embed_dim: int  # D
    num_tokens: int  # T = prefix tokens + patches
    num_prefix_tokens: int  # cls + register tokens
    num_blocks: int  # N


@dataclass(frozen=True, order=True)
class TensorSource:
    """Where a sent tensor comes from in the backbone; `str(source)` is its cache and manifest key."""

    kind: str
    index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"tensor source kind {self.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        if (self.kind == "final_cls") != (self.index is None):
            raise ValueError(f"tensor source {self.kind!r}: " +
                             ("takes no block index" if self.kind == "final_cls" else "needs a block index"))
        if self.index is not None and self.index < 0:
            raise ValueError(f"tensor source {self.kind}:{self.index}: the block index must be >= 0")

    @classmethod
    def parse(cls, text: str) -> TensorSource:
        """'gather:4' -> TensorSource('gather', 4); 'final_cls' -> TensorSource('final_cls')."""
        if not isinstance(text, str) or not _SOURCE_RE.match(text):
            raise ValueError(f"tensor source {text!r}: expected block:I, gather:K, normed:I or final_cls")
        kind, _, index = text.partition(":")
        return cls(kind, int(index) if index else None)

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    def blocks_needed(self, num_blocks: int) -> int:
        """How many backbone blocks the cloud must run to produce this tensor."""
        return num_blocks if self.index is None else self.index

    def shape(self, backbone: BackboneShape) -> tuple[int, int]:
        """[T, D] of this tensor per image (final_cls: [1, D])."""
        if self.index is not None and self.index > backbone.num_blocks:
            raise ValueError(f"tensor source {self}: the backbone has {backbone.num_blocks} blocks")
        t = 1 if self.kind == "final_cls" else backbone.num_tokens
        return (t, backbone.embed_dim)


def gather(k: int) -> TensorSource:
    return TensorSource("gather", k)


def block(i: int) -> TensorSource:
    return TensorSource("block", i)


def normed(i: int) -> TensorSource:
    return TensorSource("normed", i)


FINAL_CLS = TensorSource("final_cls")


@dataclass(frozen=True)
class SentTensor:
    """One tensor the cloud sends per image: its name (graph input/output name stem), source and [T, D] shape."""

    name: str
    source: TensorSource
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_RE.match(self.name):
            raise ValueError(f"sent tensor name {self.name!r}: expected a letter then letters, digits or '_' "
                             "(at most 48)")
        if len(self.shape) != 2 or any(not isinstance(d, int) or d < 1 for d in self.shape):
            raise ValueError(f"sent tensor {self.name!r}: shape {list(self.shape)} is not [T, D] with T, D >= 1")

    @property
    def fp32_bytes(self) -> int:
        return 4 * math.prod(self.shape)


@dataclass(frozen=True)
class CloudPlan:
    """The ordered tensors one method's cloud half sends; `blocks` is how deep the cloud must run."""

    tensors: tuple[SentTensor, ...]
    num_blocks: int  # the backbone's N (to resolve final_cls)

    def __post_init__(self) -> None:
        if not self.tensors:
            raise ValueError("a cloud plan sends at least one tensor")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise ValueError(f"cloud plan tensor names must be unique, got {names}")
        for t in self.tensors:
            if t.source.blocks_needed(self.num_blocks) > self.num_blocks:
                raise ValueError(f"cloud plan tensor {t.name!r} ({t.source}) needs more than the backbone's "
                                 f"{self.num_blocks} blocks")

    @classmethod
    def build(cls, backbone: BackboneShape, tensors: Iterable[tuple[str, TensorSource]]) -> CloudPlan:
        """A plan from (name, source) pairs, shapes filled in from the backbone."""
        return cls(tuple(SentTensor(name, src, src.shape(backbone)) for name, src in tensors), backbone.num_blocks)

    @property
    def blocks(self) -> int:
        """Backbone blocks the cloud runs: the deepest source's."""
        return max(t.source.blocks_needed(self.num_blocks) for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    @property
    def sources(self) -> frozenset[TensorSource]:
        return frozenset(t.source for t in self.tensors)

    def tensor(self, name: str) -> SentTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"cloud plan has no tensor {name!r} (has {list(self.names)})")

    @property
    def fp32_bytes(self) -> int:
        """What the plan's tensors weigh per image before any codec."""
        return sum(t.fp32_bytes for t in self.tensors)

    def to_dict(self, codecs: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """The manifest's `cloud.plan`: blocks and the tensors with name, source, shape (and codec spec)."""
        out = []
        for t in self.tensors:
            row: dict[str, Any] = {"name": t.name, "source": str(t.source), "shape": list(t.shape)}
            if codecs is not None:
                row["codec"] = dict(codecs[t.name])
            out.append(row)
        return {"blocks": self.blocks, "num_blocks": self.num_blocks, "tensors": out}

    @classmethod
    def from_dict(cls, d: Any, where: str = "cloud.plan") -> CloudPlan:
        """Parse a recorded plan; a malformed field is one BundleError line naming it."""
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected an object with 'blocks', 'num_blocks' and 'tensors'")
        n = d.get("num_blocks")
        rows = d.get("tensors")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 4096:
            raise BundleError(f"{where}.num_blocks: expected an integer in 0..4096, got {n!r}")
        if not isinstance(rows, list) or not rows:
            raise BundleError(f"{where}.tensors: expected a non-empty list")
        tensors = []
        for i, row in enumerate(rows):
            at = f"{where}.tensors[{i}]"
            if not isinstance(row, dict):
                raise BundleError(f"{at}: expected an object")
            shape = row.get("shape")
            if not isinstance(shape, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                                      for x in shape):
                raise BundleError(f"{at}.shape: expected a list of integers, got {shape!r}")
            try:
                tensors.append(SentTensor(row.get("name"), TensorSource.parse(row.get("source")),  # type: ignore
                                          tuple(shape)))
            except ValueError as exc:
                raise BundleError(f"{at}: {exc}") from None
        try:
            plan = cls(tuple(tensors), n)
        except ValueError as exc:
            raise BundleError(f"{where}: {exc}") from None
        blocks = d.get("blocks")
        if blocks != plan.blocks:
            raise BundleError(f"{where}.blocks: {blocks!r} disagrees with its tensors' sources ({plan.blocks})")
        return plan


def union_sources(plans: Sequence[CloudPlan]) -> frozenset[TensorSource]:
    """Every source any of `plans` needs: what one backbone pass must produce to serve them all."""
    out: set[TensorSource] = set()
    for p in plans:
        out |= p.sources
    return frozenset(out)


@dataclass(frozen=True)
class EdgeCost:
    """What the edge network costs per image, as its method computes it (the device budget uses only these)."""

    params: int  # parameters of the edge graph + head
    macs_per_image: int  # multiply-accumulates of the edge graph + head (codec decoders excluded)
    activation_bytes: int  # float32 bytes live at the edge graph's peak, per image (model weights excluded)

    def to_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs_per_image": self.macs_per_image,
                "activation_bytes": self.activation_bytes}
