"""MIST's low-rank attention edge network (LAE): 4 attention blocks with rank-16 projections and no MLP.

    x = x + W_o softmax((W_q LN(x)) (W_k LN(x))^T / sqrt(r)) (W_v LN(x))      per block
    then a final LayerNorm, pooling (cls token or patch-token mean), and a linear classifier.
Read top to bottom: shapes in comments, B = batch, T = tokens, D = backbone width, r = rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mist_kit.edge.base import EdgeMethod, InputShapes
from mist_kit.edge.registry import register_edge_method
from mist_kit.runtime.plan import FINAL_CLS, BackboneShape, CloudPlan, gather

POOLS = ("cls", "mean")
GATHER = "gather"  # MIST's one sent tensor: g_k
CLS = "cls"  # the linear probe's one sent tensor: the final-norm cls token, [1, D]


class LowRankAttentionBlock(nn.Module):
    """One residual low-rank attention block (single head of width r)."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, rank)
        self.k = nn.Linear(dim, rank)
        self.v = nn.Linear(dim, rank)
        self.o = nn.Linear(rank, dim)
        self.scale = 1.0 / math.sqrt(rank)
        nn.init.zeros_(self.o.weight)  # each block starts as the identity: training begins from the gather itself
        nn.init.zeros_(self.o.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # (B, T, D)
        q, k, v = self.q(h), self.k(h), self.v(h)  # (B, T, r) each
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # (B, T, T)
        return x + self.o(attn @ v)  # (B, T, D)


@register_edge_method("mist")
class LowRankAttentionEdge(EdgeMethod):
    """MIST's LAE edge network on the gather g_k (one tensor, `gather`, from blocks 0..k)."""

    depth_name = "k"

    def __init__(self, *, backbone: BackboneShape, depth: int | None, inputs: InputShapes, num_classes: int,
                 rank: int = 16, depth_blocks: int = 4, pool: str = "cls", dropout: float = 0.0,
                 **legacy: Any) -> None:
        super().__init__(backbone=backbone, depth=depth, inputs=inputs, num_classes=num_classes)
        if "depth" in legacy:  # checkpoints before bundle format 2 called the block count `depth`
            depth_blocks = int(legacy.pop("depth"))
        if legacy:
            raise TypeError(f"unexpected parameters {sorted(legacy)}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if rank < 1 or depth_blocks < 1:
            raise ValueError(f"rank and depth_blocks must be >= 1, got rank={rank}, depth_blocks={depth_blocks}")
        tokens, dim = self.input_shapes[GATHER]
        prefix = backbone.num_prefix_tokens
        if pool == "mean" and tokens <= prefix:
            raise ValueError("pool='mean' averages patch tokens and these features have none (a cls-only codec); "
                             "use pool='cls'")
        if pool == "cls" and prefix < 1:
            raise ValueError("pool='cls' needs a backbone with a cls token; use pool='mean'")
        self.embed_dim, self.num_tokens, self.num_prefix_tokens = dim, tokens, prefix
        self.rank, self.depth_blocks, self.pool, self.dropout_p = rank, depth_blocks, pool, dropout
        self.blocks = nn.ModuleList(LowRankAttentionBlock(dim, rank) for _ in range(depth_blocks))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    @classmethod
    def depth_candidates(cls, backbone: BackboneShape, params: Mapping[str, Any]) -> tuple[int | None, ...]:
        """MIST's k candidates: N/3, 2N/3, N (ViT-B: 4, 8, 12)."""
        n = backbone.num_blocks
        return tuple(sorted({max(1, round(n / 3)), max(1, round(2 * n / 3)), n}))

    @classmethod
    def check_depth(cls, backbone: BackboneShape, depth: int | None) -> None:
        if depth is None or isinstance(depth, bool) or not isinstance(depth, int) or \
                not 0 <= depth <= backbone.num_blocks:
            raise ValueError(f"k must be an integer in 0..{backbone.num_blocks} for this backbone, got {depth!r}")

    @classmethod
    def cloud_plan(cls, backbone: BackboneShape, depth: int | None, params: Mapping[str, Any]) -> CloudPlan:
        return CloudPlan.build(backbone, [(GATHER, gather(int(depth or 0)))])

    def hparams_for_plan(self) -> dict[str, Any]:
        return {}

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = inputs[GATHER]  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.pool == "cls":
            pooled = x[:, 0]  # (B, D)
        else:
            pooled = x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, D)
        return self.drop(pooled)

    def hparams(self) -> dict[str, Any]:
        return {"rank": self.rank, "depth_blocks": self.depth_blocks, "pool": self.pool, "dropout": self.dropout_p}

    def macs_per_image(self) -> int:
        t, d, r = self.num_tokens, self.embed_dim, self.rank
        per_block = 3 * t * d * r + 2 * t * t * r + t * r * d  # q,k,v projections; scores and mix; output
        return self.depth_blocks * per_block + d * self.num_classes

    def activation_bytes(self) -> int:
        """Live float32 tensors at the peak of one block: decoded tokens, residual stream, LayerNorm output,
        block output and new residual (5 x T x D), q/k/v/mix (4 x T x r), scores + softmax (2 x T x T)."""
        t, d, r = self.num_tokens, self.embed_dim, self.rank
        return 4 * (t * d * 5 + 4 * t * r + 2 * t * t)


@register_edge_method("linear")
class LinearProbe(EdgeMethod):
    """The paper's baseline: a linear classifier on the backbone's final-norm cls token (needs all N blocks)."""

    closed_form_head = True  # with --val: standardised logistic regression, C chosen on val (toolkit/linear_probe)

    def __init__(self, *, backbone: BackboneShape, depth: int | None, inputs: InputShapes,
                 num_classes: int) -> None:
        super().__init__(backbone=backbone, depth=depth, inputs=inputs, num_classes=num_classes)
        self.embed_dim = self.input_shapes[CLS][-1]
        self.head = nn.Linear(self.embed_dim, num_classes)

    @classmethod
    def cloud_plan(cls, backbone: BackboneShape, depth: int | None, params: Mapping[str, Any]) -> CloudPlan:
        return CloudPlan.build(backbone, [(CLS, FINAL_CLS)])

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return inputs[CLS][:, 0]  # (B, 1, D) -> (B, D): the cls token is already the embedding

    def macs_per_image(self) -> int:
        return self.embed_dim * self.num_classes

    def activation_bytes(self) -> int:
        return 4 * self.embed_dim * 2
