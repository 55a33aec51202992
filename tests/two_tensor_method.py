"""A small edge method that takes two tensors, registered for the tests: the worked example of the contract.

It sends block 1's output `z1` [T, D] and the gather of blocks 0..k `g` [T, D] (k = its depth, default 2), and
embeds `LayerNorm(W_a z1_cls + W_b mean(g))`. Everything else (cache, export, runtime, serving) is generic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mist_kit.edge import EdgeMethod, register_edge_method
from mist_kit.runtime.plan import BackboneShape, CloudPlan, block, gather

NAME = "test-two-tensor"


@register_edge_method(NAME)
class TwoTensorEdge(EdgeMethod):
    """Test method: cls token of block 1 and the mean token of the gather 0..k, projected and normed."""

    depth_name = "k"

    def __init__(self, *, backbone: BackboneShape, depth: int | None, inputs: Mapping[str, tuple[int, ...]],
                 num_classes: int, width: int = 16) -> None:
        super().__init__(backbone=backbone, depth=depth, inputs=inputs, num_classes=num_classes)
        d = backbone.embed_dim
        self.width = width
        self.proj_a = nn.Linear(d, width)
        self.proj_b = nn.Linear(d, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    @classmethod
    def depth_candidates(cls, backbone: BackboneShape, params: Mapping[str, Any]) -> tuple[int | None, ...]:
        return (2, 3)

    @classmethod
    def check_depth(cls, backbone: BackboneShape, depth: int | None) -> None:
        if not isinstance(depth, int) or not 1 <= depth <= backbone.num_blocks:
            raise ValueError(f"k must be in 1..{backbone.num_blocks}, got {depth!r}")

    @classmethod
    def cloud_plan(cls, backbone: BackboneShape, depth: int | None, params: Mapping[str, Any]) -> CloudPlan:
        return CloudPlan.build(backbone, [("z1", block(1)), ("g", gather(int(depth or 2)))])

    def hparams(self) -> dict[str, Any]:
        return {"width": self.width}

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = self.proj_a(inputs["z1"][:, 0])  # (B, w)
        b = self.proj_b(inputs["g"].mean(dim=1))  # (B, w)
        return self.norm(a + b)  # (B, w)

    def macs_per_image(self) -> int:
        d, w = self.backbone.embed_dim, self.width
        return 2 * d * w + w * self.num_classes

    def activation_bytes(self) -> int:
        return self.input_bytes() + 4 * 3 * self.width
