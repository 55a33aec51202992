"""MIST's low-rank attention edge network (LAE): 4 attention blocks with rank-16 projections and no MLP.

    x = x + W_o softmax((W_q LN(x)) (W_k LN(x))^T / sqrt(r)) (W_v LN(x))      per block
    then a final LayerNorm, pooling (cls token or patch-token mean), and a linear classifier.
Read top to bottom: shapes in comments, B = batch, T = tokens, D = backbone width, r = rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mist_kit.edge.base import EdgeMethod
from mist_kit.edge.registry import register_edge_method

POOLS = ("cls", "mean")


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
    """MIST's LAE edge network on the gather g_k."""

    input_kind = "gather"

    def __init__(self, *, embed_dim: int, num_tokens: int, num_prefix_tokens: int, num_classes: int,
                 rank: int = 16, depth: int = 4, pool: str = "cls", dropout: float = 0.0) -> None:
        super().__init__(embed_dim=embed_dim, num_tokens=num_tokens, num_prefix_tokens=num_prefix_tokens,
                         num_classes=num_classes)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if pool == "mean" and num_tokens <= num_prefix_tokens:
            raise ValueError("pool='mean' averages patch tokens and these features have none (a cls-only codec); "
                             "use pool='cls'")
        if pool == "cls" and num_prefix_tokens < 1:
            raise ValueError("pool='cls' needs a backbone with a cls token; use pool='mean'")
        self.rank, self.depth, self.pool, self.dropout_p = rank, depth, pool, dropout
        self.blocks = nn.ModuleList(LowRankAttentionBlock(embed_dim, rank) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        x = features  # (B, T, D)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.pool == "cls":
            pooled = x[:, 0]  # (B, D)
        else:
            pooled = x[:, self.num_prefix_tokens:].mean(dim=1)  # (B, D)
        return self.drop(pooled)

    def hparams(self) -> dict[str, Any]:
        return {"rank": self.rank, "depth": self.depth, "pool": self.pool, "dropout": self.dropout_p}

    def macs_per_image(self, num_tokens: int | None = None) -> int:
        t, d, r = num_tokens or self.num_tokens, self.embed_dim, self.rank
        per_block = 3 * t * d * r + 2 * t * t * r + t * r * d  # q,k,v projections; scores and mix; output
        return self.depth * per_block + d * self.num_classes


@register_edge_method("linear")
class LinearProbe(EdgeMethod):
    """The paper's baseline: a linear classifier on the backbone's final-norm cls token (needs all N blocks)."""

    input_kind = "final_cls"

    def __init__(self, *, embed_dim: int, num_tokens: int, num_prefix_tokens: int, num_classes: int) -> None:
        super().__init__(embed_dim=embed_dim, num_tokens=num_tokens, num_prefix_tokens=num_prefix_tokens,
                         num_classes=num_classes)
        self.head = nn.Linear(embed_dim, num_classes)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return features  # (B, D): the cls token is already the embedding

    def macs_per_image(self, num_tokens: int | None = None) -> int:
        return self.embed_dim * self.num_classes
