"""A LoSA-style edge network: a low-rank side network run in parallel with the frozen backbone's blocks.

LoSA (Mercea et al., CVPR 2024, arXiv 2402.02887) adapts a frozen backbone with a light network that refines the
backbone's intermediate features with low-rank mixers alternating between the token and channel axes; gradients
never enter the backbone. No code is public and the full equations were not available, so this is "LoSA-style":
built from that description, not a reproduction. Under separated tuning the device receives the consumed blocks'
outputs z_i (one named tensor `z{i}` each, each with its own codec) and runs

    h_0 = z_{i_1}                                       the side state, from the first consumed tensor
    h <- h + f_i(h + z_i)                               for each consumed block i_1 < ... < i_M
    f(x) = t + c,  t = W2_t GELU(W1_t LN_t(x)^T)^T      token mixing on the token axis, T -> r_t -> T
                   c = W2_c GELU(W1_c LN_c(x + t))      channel mixing, D -> r_c -> D
    y = z_{i_M} + (h - h_0)                             the side network's accumulated update on the last output
    embedding = pool(LN(y)),  logits = head(embedding)

W2_t and W2_c are zero-initialised, so f_i = 0 and y == z_{i_M} exactly at the start: training begins from a probe
on the last consumed block's tokens (tests/test_losa.py proves the equality). The token MLP mixes T tokens, so the
edge graph is static in T (T is fixed by the plan and its codec). Read top to bottom: B = batch, T = tokens,
D = backbone width.

Which blocks are consumed is the `blocks` parameter, not a depth: "all" (1..N), "every2" / "every3" (every 2nd or
3rd block counted back from N, so block N is always in), "last4" (any "lastM": the last M blocks). The cloud runs
all N blocks for every choice; only the bytes sent and the edge cost change. `--k auto` has nothing to search
(depth is always None); compare `blocks` values on val from one cache holding their union (bench/losa_caltech.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mist_kit.edge.base import EdgeMethod, InputShapes
from mist_kit.edge.registry import register_edge_method
from mist_kit.runtime.plan import BackboneShape, CloudPlan, block

POOLS = ("cls", "mean")
# Defaults chosen on Caltech-101 val200 with DINOv2 ViT-S/14 (BENCHMARKS.md `losa`, short 4-epoch runs): every 6th
# block (z6, z12) 65.0 vs every3 63.5 and last2 64.5 (within noise: 200 images) at half every3's bytes; r 8 / 16
# tied r 16 / 32 with fewer MACs; cls 63.5 vs mean 53.5.
DEFAULT_BLOCKS = "every6"
_BLOCKS_RE = re.compile(r"^(all|every[1-9]\d{0,2}|last[1-9]\d{0,3})$")


def consumed_blocks(spec: str, num_blocks: int) -> tuple[int, ...]:
    """The backbone blocks (1-based) a `blocks` spec consumes, in order; ValueError for a bad spec."""
    if not isinstance(spec, str) or not _BLOCKS_RE.match(spec):
        raise ValueError(f"blocks must be 'all', 'everyS' (e.g. every2) or 'lastM' (e.g. last4), got {spec!r}")
    if spec == "all":
        return tuple(range(1, num_blocks + 1))
    if spec.startswith("every"):
        return tuple(sorted(range(num_blocks, 0, -int(spec[5:]))))
    m = int(spec[4:])
    if m > num_blocks:
        raise ValueError(f"blocks={spec!r}: the backbone has only {num_blocks} blocks")
    return tuple(range(num_blocks - m + 1, num_blocks + 1))


class LowRankMixer(nn.Module):
    """f(x) = t + c: a low-rank token-mixing MLP then a low-rank channel-mixing MLP, each on its own LayerNorm."""

    def __init__(self, tokens: int, dim: int, token_rank: int, channel_rank: int) -> None:
        super().__init__()
        self.token_norm = nn.LayerNorm(dim, eps=1e-6)
        self.token_in = nn.Linear(tokens, token_rank)
        self.token_out = nn.Linear(token_rank, tokens)
        self.channel_norm = nn.LayerNorm(dim, eps=1e-6)
        self.channel_in = nn.Linear(dim, channel_rank)
        self.channel_out = nn.Linear(channel_rank, dim)
        self.act = nn.GELU()
        for out in (self.token_out, self.channel_out):  # f = 0 at the start: y is the last block's output
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.token_norm(x).transpose(1, 2)  # (B, D, T): the token axis last, for the Linear
        t = self.token_out(self.act(self.token_in(n))).transpose(1, 2)  # (B, D, r_t) -> (B, T, D)
        c = self.channel_out(self.act(self.channel_in(self.channel_norm(x + t))))  # (B, T, r_c) -> (B, T, D)
        return t + c  # (B, T, D)


@register_edge_method("losa")
class LowRankSideNetwork(EdgeMethod):
    """LoSA-style side network on the stack of consumed block outputs (`z{i}`, one tensor per block)."""

    depth_name = "k"  # unused: the consumed blocks are the `blocks` parameter (depth is always None)

    def __init__(self, *, backbone: BackboneShape, depth: int | None, inputs: InputShapes, num_classes: int,
                 token_rank: int = 8, channel_rank: int = 16, blocks: str = DEFAULT_BLOCKS, pool: str = "cls",
                 dropout: float = 0.0) -> None:
        super().__init__(backbone=backbone, depth=depth, inputs=inputs, num_classes=num_classes)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if token_rank < 1 or channel_rank < 1:
            raise ValueError(f"token_rank and channel_rank must be >= 1, got {token_rank}, {channel_rank}")
        self.consumed = consumed_blocks(blocks, backbone.num_blocks)
        shapes = set(self.input_shapes.values())
        if len(shapes) != 1:
            raise ValueError(f"losa needs every consumed tensor decoded to one [T, D] shape, got {sorted(shapes)}")
        tokens, dim = next(iter(shapes))
        prefix = backbone.num_prefix_tokens
        if pool == "mean" and tokens <= prefix:
            raise ValueError("pool='mean' averages patch tokens and these features have none; use pool='cls'")
        if pool == "cls" and prefix < 1:
            raise ValueError("pool='cls' needs a backbone with a cls token; use pool='mean'")
        self.num_tokens, self.embed_dim, self.num_prefix_tokens = tokens, dim, prefix
        self.token_rank, self.channel_rank, self.blocks_spec = token_rank, channel_rank, blocks
        self.pool, self.dropout_p = pool, dropout
        self.names = tuple(f"z{i}" for i in self.consumed)
        self.mixers = nn.ModuleList(LowRankMixer(tokens, dim, token_rank, channel_rank) for _ in self.consumed)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, num_classes)

    @classmethod
    def cloud_plan(cls, backbone: BackboneShape, depth: int | None, params: Mapping[str, Any]) -> CloudPlan:
        spec = params.get("blocks", DEFAULT_BLOCKS)
        return CloudPlan.build(backbone, [(f"z{i}", block(i)) for i in consumed_blocks(spec, backbone.num_blocks)])

    def hparams_for_plan(self) -> dict[str, Any]:
        return {"blocks": self.blocks_spec}

    def side_output(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """y = z_last + (h - h_0): the tokens the final norm sees, (B, T, D)."""
        h0 = inputs[self.names[0]]  # (B, T, D)
        h = h0
        for name, mixer in zip(self.names, self.mixers, strict=True):
            h = h + mixer(h + inputs[name])
        return inputs[self.names[-1]] + (h - h0)

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        y = self.norm(self.side_output(inputs))  # (B, T, D)
        pooled = y[:, 0] if self.pool == "cls" else y[:, self.num_prefix_tokens:].mean(dim=1)  # (B, D)
        return self.drop(pooled)

    def hparams(self) -> dict[str, Any]:
        return {"token_rank": self.token_rank, "channel_rank": self.channel_rank, "blocks": self.blocks_spec,
                "pool": self.pool, "dropout": self.dropout_p}

    def macs_per_image(self) -> int:
        """Per consumed block: token MLP D x (T r_t + r_t T), channel MLP T x (D r_c + r_c D); then the head."""
        t, d, m = self.num_tokens, self.embed_dim, len(self.consumed)
        return m * 2 * t * d * (self.token_rank + self.channel_rank) + d * self.num_classes

    def activation_bytes(self) -> int:
        """float32 peak: the M decoded inputs (all live: they are the graph's inputs), seven [T, D] working tensors
        of one mixer (h, h + z_i, its LayerNorm, the transposed copy, the token-mix output, u = x + t and its
        LayerNorm) and the wider of the two hidden layers with its GELU."""
        t, d, m = self.num_tokens, self.embed_dim, len(self.consumed)
        return 4 * (m * t * d + 7 * t * d + 2 * max(d * self.token_rank, t * self.channel_rank))
