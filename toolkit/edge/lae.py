"""MIST's low-rank attention edge network (LAE): 4 attention blocks with rank-16 projections and no MLP.

    x = x + W_o softmax((W_q LN(x)) (W_k LN(x))^T / sqrt(r)) (W_v LN(x))      per block
    then a final LayerNorm, pooling (cls token or patch-token mean), and a linear classifier.
Read top to bottom: shapes in comments, B = batch, T = tokens, D = backbone width, r = rank.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from mist_kit.edge.base import EdgeMethod, InputShapes
from mist_kit.edge.registry import register_edge_method
from mist_kit.runtime.plan import FINAL_CLS, BackboneShape, CloudPlan, gather

POOLS = ("cls", "mean")
GATHER = "gather"  # MIST's one sent tensor: g_k
CLS = "cls"  # the linear probe's one sent tensor: the final-norm cls token, [1, D]


class LowRankAttentionBlock(nn.Module):
    """One residual low-rank attention block (single head of width r).

    The parameters stay three Linears (q, k, v: checkpoint keys `blocks.i.q.weight`...); `forward` concatenates
    them into one D -> 3r product (one GEMM instead of three) and runs `F.scaled_dot_product_attention`.
    `queries` restricts the rows that are answered (keys and values still cover every token): the last block of a
    cls-pooled LAE only has to answer the cls row.
    """

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.q = nn.Linear(dim, rank)
        self.k = nn.Linear(dim, rank)
        self.v = nn.Linear(dim, rank)
        self.o = nn.Linear(rank, dim)
        self.rank = rank
        self.scale = 1.0 / math.sqrt(rank)
        nn.init.zeros_(self.o.weight)  # each block starts as the identity: training begins from the gather itself
        nn.init.zeros_(self.o.bias)

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The three projections as one: weight (3r, D), bias (3r,), rows q | k | v."""
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight])
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        return weight, bias

    def forward(self, x: torch.Tensor, queries: slice | None = None) -> torch.Tensor:
        h = self.norm(x)  # (B, T, D)
        weight, bias = self.fused_qkv()
        r = self.rank
        if queries is None:
            q, k, v = F.linear(h, weight, bias).split(r, dim=-1)  # (B, T, r) each
        else:  # only the asked rows need a query and a residual; keys and values still span every token
            k, v = F.linear(h, weight[r:], bias[r:]).split(r, dim=-1)  # (B, T, r) each
            x = x[:, queries]  # (B, Q, D)
            q = F.linear(h[:, queries], weight[:r], bias[:r])  # (B, Q, r)
        mixed = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # softmax(q k^T / sqrt(r)) v: (B, Q, r)
        return x + self.o(mixed)  # (B, Q, D)


@register_edge_method("mist")
class LowRankAttentionEdge(EdgeMethod):
    """MIST's LAE edge network on the gather g_k (one tensor, `gather`, from blocks 0..k).

    With `cls_token` (our extension, not the paper's) the plan also sends the backbone's final-norm cls token
    (`cls`, [1, D]: D more values per image, 768 B in fp16 for ViT-S) and the head reads concat(LAE embedding, cls)
    [2D], so the linear probe's solution lies inside this model's hypothesis space; dropout covers both halves.
    """

    depth_name = "k"
    train_defaults: ClassVar[dict[str, Any]] = {"cls_token": True}  # chosen on val: BENCHMARKS.md, accuracy

    def __init__(self, *, backbone: BackboneShape, depth: int | None, inputs: InputShapes, num_classes: int,
                 rank: int = 16, depth_blocks: int = 4, pool: str = "cls", dropout: float = 0.1,
                 cls_token: bool = False, **legacy: Any) -> None:
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
        self.cls_token = bool(cls_token)
        if self.cls_token and self.input_shapes.get(CLS, (0, 0))[-1] != dim:
            raise ValueError(f"cls_token needs a `cls` input [1, {dim}], got {self.input_shapes.get(CLS)}")
        self.blocks = nn.ModuleList(LowRankAttentionBlock(dim, rank) for _ in range(depth_blocks))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(2 * dim if self.cls_token else dim, num_classes)

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
        tensors = [(GATHER, gather(int(depth or 0)))]
        if params.get("cls_token"):
            tensors.append((CLS, FINAL_CLS))
        return CloudPlan.build(backbone, tensors)

    def hparams_for_plan(self) -> dict[str, Any]:
        return {"cls_token": True} if self.cls_token else {}

    @classmethod
    def probe_input(cls, params: Mapping[str, Any]) -> str | None:
        return CLS if params.get("cls_token") else None  # the head reads concat(LAE embedding, cls): cls is last

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = inputs[GATHER]  # (B, T, D)
        for block in self.blocks[:-1]:
            x = block(x)
        # no work on tokens the pooling never reads: the last block answers only the pooled rows, the final norm
        # runs on those rows only (equal to the reference formula: tests/test_speed_lae.py)
        x = self.blocks[-1](x, queries=self.pooled_rows())  # (B, Q, D)
        x = self.norm(x)
        pooled = x[:, 0] if self.pool == "cls" else x.mean(dim=1)  # (B, D)
        if self.cls_token:
            pooled = torch.cat([pooled, inputs[CLS][:, 0]], dim=1)  # (B, 2D)
        return self.drop(pooled)

    def pooled_rows(self) -> slice:
        """The token rows the pooling reads: the cls token, or every patch token (prefix tokens excluded)."""
        return slice(0, 1) if self.pool == "cls" else slice(self.num_prefix_tokens, None)

    def inference_module(self) -> nn.Module:
        """The restructured module the edge graph is exported from (see `LaeInference`)."""
        return LaeInference(self)

    def hparams(self) -> dict[str, Any]:
        return {"rank": self.rank, "depth_blocks": self.depth_blocks, "pool": self.pool, "dropout": self.dropout_p,
                "cls_token": self.cls_token}

    def macs_per_image(self) -> int:
        """Multiply-accumulates of what `embed` computes: full blocks, then a last block answering Q rows."""
        t, d, r = self.num_tokens, self.embed_dim, self.rank
        rows = self.pooled_rows()
        q = len(range(t)[rows])
        per_block = 3 * t * d * r + 2 * t * t * r + t * r * d  # q,k,v projections; scores and mix; output
        last = 2 * t * d * r + q * d * r + 2 * q * t * r + q * r * d  # k,v on all tokens; q, scores, mix, output on Q
        return (self.depth_blocks - 1) * per_block + last + self.embedding_dim * self.num_classes

    def activation_bytes(self) -> int:
        """Live float32 tensors at the peak of one block: decoded tokens, residual stream, LayerNorm output,
        block output and new residual (5 x T x D), q/k/v/mix (4 x T x r), scores + softmax (2 x T x T)."""
        t, d, r = self.num_tokens, self.embed_dim, self.rank
        return 4 * (t * d * 5 + 4 * t * r + 2 * t * t + (2 * d if self.cls_token else 0))  # + cls input, concat


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


class _InferenceBlock(nn.Module):
    """One LAE block as the edge graph runs it: one fused projection, softmax scale folded into the q rows, and
    explicit MatMul/Softmax (what onnxruntime runs fastest and what the int8 selection can name)."""

    def __init__(self, block: LowRankAttentionBlock, queries: slice | None) -> None:
        super().__init__()
        r = block.rank
        weight, bias = (t.detach().clone() for t in block.fused_qkv())
        weight[:r] *= block.scale  # (s W) h + s b = s (W h + b): exact for r = 16 (s = 1/4)
        bias[:r] *= block.scale
        self.rank, self.queries = r, queries
        self.norm = nn.LayerNorm(block.norm.normalized_shape, eps=block.norm.eps)
        self.norm.load_state_dict(block.norm.state_dict())
        if queries is None:
            self.qkv = _linear(weight, bias)  # D -> 3r, one GEMM
        else:
            self.kv = _linear(weight[r:], bias[r:])  # D -> 2r on every token
            self.q = _linear(weight[:r], bias[:r])  # D -> r on the answered rows only
        self.o = _linear(block.o.weight.detach(), block.o.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)  # (B, T, D)
        if self.queries is None:
            q, k, v = self.qkv(h).split(self.rank, dim=-1)  # (B, T, r) each, q already scaled
        else:
            k, v = self.kv(h).split(self.rank, dim=-1)  # (B, T, r)
            x = x[:, self.queries]  # (B, Q, D)
            q = self.q(h[:, self.queries])  # (B, Q, r)
        attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # (B, Q, T)
        return x + self.o(attn @ v)  # (B, Q, D)


class LaeInference(nn.Module):
    """The trained LAE restructured for inference (what `exporters.edge_onnx` exports); same function.

    Built from a `LowRankAttentionEdge`, which keeps its own parameters and checkpoint keys. Differences from the
    training module, all exact in real arithmetic: q|k|v fused into one D -> 3r MatMul; 1/sqrt(r) folded into the
    q weights; the last block answers only the rows the pooling reads (cls: one row; mean: the patch tokens); the
    final LayerNorm runs only on those rows. For `mean` the final norm is per token and nonlinear, so pooling can
    not move before the last block's output projection; only the norm's affine moves after the mean
    (mean_t(g * n_t + b) = g * mean_t(n_t) + b).
    """

    def __init__(self, lae: LowRankAttentionEdge) -> None:
        super().__init__()
        self.input_shapes = dict(lae.input_shapes)
        self.pool, self.cls_token = lae.pool, lae.cls_token
        rows = lae.pooled_rows()
        self.blocks = nn.ModuleList([*(_InferenceBlock(b, None) for b in lae.blocks[:-1]),
                                     _InferenceBlock(lae.blocks[-1], rows)])
        self.dim, self.eps = lae.embed_dim, lae.norm.eps
        self.register_buffer("norm_weight", lae.norm.weight.detach().clone())
        self.register_buffer("norm_bias", lae.norm.bias.detach().clone())

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = inputs[GATHER]  # (B, T, D)
        for block in self.blocks:
            x = block(x)  # last block: (B, Q, D)
        if self.pool == "cls":
            out = F.layer_norm(x[:, 0], (self.dim,), self.norm_weight, self.norm_bias, self.eps)  # (B, D)
        else:
            n = F.layer_norm(x, (self.dim,), None, None, self.eps).mean(dim=1)  # (B, D)
            out = n * self.norm_weight + self.norm_bias
        return torch.cat([out, inputs[CLS][:, 0]], dim=1) if self.cls_token else out  # (B, 2D) or (B, D)

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.embed(inputs)


def reference_embed(lae: LowRankAttentionEdge, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The LAE formula exactly as the module docstring writes it (every token through every block, three separate
    projections, then the final norm on every token): the ground truth the restructured paths are tested against
    and the "old structure" of bench/speed_edge.py."""
    x = inputs[GATHER]
    for b in lae.blocks:
        h = b.norm(x)
        q, k, v = b.q(h), b.k(h), b.v(h)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * b.scale, dim=-1)
        x = x + b.o(attn @ v)
    x = lae.norm(x)
    out = x[:, 0] if lae.pool == "cls" else x[:, lae.num_prefix_tokens:].mean(dim=1)
    return torch.cat([out, inputs[CLS][:, 0]], dim=1) if lae.cls_token else out


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
