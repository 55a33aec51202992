"""ViT-Split-style edge methods (Li et al., ICCV 2025, arXiv 2506.03433): the device trains copies of the
backbone's last blocks on the raw output of the split block, plus a prior head over several frozen layers.

    cloud: blocks 1..s (s = the split, this method's depth = N - K_t), sends
           split   = z_s                      [T, D]  (cls and register tokens included)
           prior_j = final_norm(z_{l_j})      [T, D]  for the K_f = 4 prior layers l_j (vitsplit only)
    edge:  task    = final_norm(blocks s+1..N (z_s))   copies of the backbone's blocks, trained at 0.1x the lr;
                                                       the final norm is a frozen copy of the backbone's
           prior   = conv3x3(GELU(conv1x1(concat_j patches(prior_j))))           [D, g, g]
           fused   = task patches + conv3x3(GELU(conv1x1(concat(prior, task patches))))
           embed   = pool: 'mean' = mean(fused); 'cls' = [task cls ; mean(fused)] (2D, so the prior still counts)
           logits  = head(embed)

Differences from the authors' segmentation code, on purpose:
- plain 3x3 convs instead of deformable ones: onnxruntime has no CPU DeformConv kernel and torchvision's
  `deform_conv2d` does not export to ONNX; the authors' own LLaVA variant uses plain convs too;
- the fusion is residual on the task branch with its last conv zero-initialised, so before training the method is
  exactly the backbone's own final tokens (a conv stack with a GELU inside cannot be the identity otherwise);
- prior layers: round(N (j + 1) / 4) for j = 0..3 (blocks 3, 6, 9, 12 of 12 = the paper's 0-based [2, 5, 8, 11]).
  The last prior layer is the backbone's final block, deeper than the split: the cloud therefore runs all N blocks
  (`plan.blocks` = N, as for the linear probe; N / s times the split alone, 12/9 = 1.33x for K_t = 3) and sends
  1 + K_f tensors. `prior_layers` may be set to layers <= s to keep the cloud at s blocks.

`vitsplit-lite` is K_t = 1 (default) with no prior branch: the cloud runs N - 1 blocks and sends only z_{N-1}.
With cls pooling its last block computes attention for the cls query only (keys and values for every token),
which is exact: pooling never reads the other rows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mist_kit.edge.base import EdgeMethod, InputShapes
from mist_kit.edge.registry import register_edge_method
from mist_kit.runtime.plan import BackboneShape, CloudPlan, block, normed

SPLIT = "split"
POOLS = ("cls", "mean")
BLOCK_LR_SCALE = 0.1  # ViT-Split trains the copied blocks at 0.1x the base learning rate


def default_prior_layers(num_blocks: int) -> list[int]:
    """The K_f = 4 prior layers scaled to the depth: round(N (j + 1) / 4), j = 0..3 (12 blocks: 3, 6, 9, 12)."""
    return sorted({max(1, round(num_blocks * (j + 1) / 4)) for j in range(4)})


def _vit_block(dim: int, heads: int, mlp_hidden: int, qkv_bias: bool, qk_norm: bool, layer_scale: bool,
               norm_eps: float) -> nn.Module:
    """A timm ViT Block of this configuration, with explicit (not fused) attention: it counts and exports as
    MatMul + Softmax."""
    from timm.models.vision_transformer import Block

    blk = Block(dim, heads, mlp_ratio=mlp_hidden / dim, qkv_bias=qkv_bias, qk_norm=qk_norm,
                init_values=1e-5 if layer_scale else None, norm_layer=partial(nn.LayerNorm, eps=norm_eps))
    blk.attn.fused_attn = False
    return blk


def _block_config(blk: nn.Module) -> dict[str, Any]:
    """The constructor parameters that rebuild `blk` (a timm ViT Block); ValueError for anything else."""
    from timm.models.vision_transformer import Block

    if type(blk) is not Block or getattr(blk.attn, "gate", None) is not None:
        raise ValueError(f"vitsplit copies timm ViT `Block`s; this backbone's blocks are {type(blk).__name__} "
                         "(EVA / BEiT blocks need rope / relative position bias the edge graph does not carry)")
    return {"heads": int(blk.attn.num_heads), "mlp_hidden": int(blk.mlp.fc1.out_features),
            "qkv_bias": blk.attn.qkv.bias is not None, "qk_norm": not isinstance(blk.attn.q_norm, nn.Identity),
            "layer_scale": not isinstance(blk.ls1, nn.Identity), "norm_eps": float(blk.norm1.eps)}


def cls_only_block(blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The cls row of `blk(x)`, computing the query, attention row and MLP for token 0 only. (B, T, D) -> (B, 1, D).

    Keys and values still come from every token; the result equals `blk(x)[:, :1]` up to float rounding.
    """
    attn = blk.attn
    b, t, d = x.shape
    heads, hd = attn.num_heads, attn.head_dim
    h = blk.norm1(x)  # (B, T, D)
    w, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], w[:d], None if bias is None else bias[:d])  # (B, 1, D)
    kv = F.linear(h, w[d:], None if bias is None else bias[d:])  # (B, T, 2D)
    q = attn.q_norm(q.reshape(b, 1, heads, hd).transpose(1, 2))  # (B, h, 1, hd)
    k, v = kv.reshape(b, t, 2, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, T, hd) each
    k = attn.k_norm(k)
    scores = torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)  # (B, h, 1, T)
    o = (scores @ v).transpose(1, 2).reshape(b, 1, d)  # (B, 1, D)
    x0 = x[:, :1] + blk.ls1(attn.proj(attn.norm(o)))
    return x0 + blk.ls2(blk.mlp(blk.norm2(x0)))  # (B, 1, D)


def _patch_map(x: torch.Tensor, prefix: int, grid: int) -> torch.Tensor:
    """Patch tokens as a feature map: (B, T, D) -> (B, D, g, g)."""
    p = x[:, prefix:]
    return p.transpose(1, 2).reshape(p.shape[0], p.shape[2], grid, grid)


class _ViTSplitBase(EdgeMethod):
    """Copies of the backbone's blocks s+1..N on z_s, the frozen final norm, an optional prior head, a linear head."""

    depth_name = "split"
    needs_backbone_init = True
    with_prior = True

    def __init__(self, *, backbone: BackboneShape, depth: int | None, inputs: InputShapes, num_classes: int,
                 pool: str = "cls", dropout: float = 0.0, prior_layers: list[int] | None = None,
                 heads: int | None = None, mlp_hidden: int | None = None, qkv_bias: bool = True,
                 qk_norm: bool = False, layer_scale: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__(backbone=backbone, depth=depth, inputs=inputs, num_classes=num_classes)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        self.check_depth(backbone, depth)
        tokens, dim = self.input_shapes[SPLIT]
        prefix = backbone.num_prefix_tokens
        if pool == "cls" and prefix < 1:
            raise ValueError("pool='cls' needs a backbone with a cls token; use pool='mean'")
        if (pool == "mean" or self.with_prior) and tokens <= prefix:
            raise ValueError("these features have no patch tokens (a cls-only codec); use vitsplit-lite, pool='cls'")
        self.embed_dim, self.num_tokens, self.num_prefix_tokens = dim, tokens, prefix
        self.pool, self.dropout_p = pool, dropout
        self.block_config = {"heads": heads or max(1, dim // 64), "mlp_hidden": mlp_hidden or 4 * dim,
                             "qkv_bias": bool(qkv_bias), "qk_norm": bool(qk_norm), "layer_scale": bool(layer_scale),
                             "norm_eps": float(norm_eps)}
        self.task_blocks = nn.ModuleList(_vit_block(dim, **self.block_config)
                                         for _ in range(backbone.num_blocks - int(depth or 0)))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.norm.requires_grad_(False)  # the backbone's final norm, frozen (ViT-Split)
        # the last block needs only the cls row when nothing reads the patch tokens
        self.cls_only_last = pool == "cls" and not self.with_prior
        width = dim
        if self.with_prior:
            self.prior_layers = list(prior_layers or default_prior_layers(backbone.num_blocks))
            self.grid = math.isqrt(tokens - prefix)
            if self.grid * self.grid != tokens - prefix:
                raise ValueError(f"the prior head needs a square patch grid; got {tokens - prefix} patch tokens")
            for name, shape in self.input_shapes.items():
                if tuple(shape) != (tokens, dim):
                    raise ValueError(f"input {name!r} is {list(shape)}; the prior head needs every tensor "
                                     f"[{tokens}, {dim}] like the split")
            k_f = len(self.prior_layers)
            self.prior_in = nn.Conv2d(k_f * dim, dim, 1)  # prior head: 1x1 conv to D, GELU, plain 3x3 conv
            self.prior_out = nn.Conv2d(dim, dim, 3, padding=1)
            self.fuse_in = nn.Conv2d(2 * dim, dim, 1)  # fusion: concat(prior, task) -> 1x1 conv, GELU, 3x3 conv
            self.fuse_out = nn.Conv2d(dim, dim, 3, padding=1)
            nn.init.zeros_(self.fuse_out.weight)  # residual fusion starts as the task branch itself
            nn.init.zeros_(self.fuse_out.bias)
            width = 2 * dim if pool == "cls" else dim
        else:
            self.prior_layers = []
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(width, num_classes)

    # ---- cloud side --------------------------------------------------------------------------------------------
    @classmethod
    def check_depth(cls, backbone: BackboneShape, depth: int | None) -> None:
        n = backbone.num_blocks
        if depth is None or isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= n - 1:
            raise ValueError(f"split must be an integer in 1..{n - 1} for this backbone (K_t = N - split >= 1), "
                             f"got {depth!r}")

    @classmethod
    def cloud_plan(cls, backbone: BackboneShape, depth: int | None, params: Mapping[str, Any]) -> CloudPlan:
        tensors = [(SPLIT, block(int(depth or 0)))]
        if cls.with_prior:
            layers = list(params.get("prior_layers") or default_prior_layers(backbone.num_blocks))
            if not layers or any(not isinstance(i, int) or not 1 <= i <= backbone.num_blocks for i in layers):
                raise ValueError(f"prior_layers must be block indices in 1..{backbone.num_blocks}, got {layers!r}")
            tensors += [(f"prior{j}", normed(i)) for j, i in enumerate(layers)]
        return CloudPlan.build(backbone, tensors)

    def hparams_for_plan(self) -> dict[str, Any]:
        return {"prior_layers": self.prior_layers} if self.with_prior else {}

    def hparams(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pool": self.pool, "dropout": self.dropout_p, **self.block_config}
        if self.with_prior:
            out["prior_layers"] = list(self.prior_layers)
        return out

    # ---- training hooks ----------------------------------------------------------------------------------------
    def init_from_backbone(self, vit: nn.Module) -> None:
        """Deep-copy the backbone's blocks s+1..N and its final norm (frozen); record their configuration."""
        blocks = list(vit.blocks)
        if len(blocks) != self.backbone.num_blocks:
            raise ValueError(f"the backbone has {len(blocks)} blocks, this method was built for "
                             f"{self.backbone.num_blocks}")
        config = _block_config(blocks[-1])
        copies = nn.ModuleList(copy.deepcopy(b) for b in blocks[int(self.depth or 0):])
        for b in copies:
            if _block_config(b) != config:
                raise ValueError("vitsplit needs the copied blocks to share one configuration")
            b.attn.fused_attn = False
            b.requires_grad_(True)
        if not isinstance(vit.norm, nn.LayerNorm):
            raise ValueError(f"vitsplit copies a LayerNorm final norm; this backbone's is {type(vit.norm).__name__}")
        self.block_config = config
        self.task_blocks = copies
        self.norm = copy.deepcopy(vit.norm).requires_grad_(False)

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Copied blocks at 0.1x the lr (decay on matrices only); prior head, fusion and head at 1x; norm frozen."""
        blocks = {id(p) for p in self.task_blocks.parameters()}
        groups: list[dict[str, Any]] = []
        for in_blocks, scale in ((True, BLOCK_LR_SCALE), (False, 1.0)):
            params = [p for p in self.parameters() if p.requires_grad and (id(p) in blocks) == in_blocks]
            groups.append({"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay,
                           "lr_scale": scale})
            groups.append({"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale})
        return groups

    # ---- edge graph --------------------------------------------------------------------------------------------
    def task_tokens(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Final-normed tokens of the copied blocks on z_s: (B, T, D), or (B, 1, D) with the cls-only last block."""
        x = inputs[SPLIT]  # (B, T, D)
        last = len(self.task_blocks) - 1
        for i, blk in enumerate(self.task_blocks):
            x = cls_only_block(blk, x) if (i == last and self.cls_only_last) else blk(x)
        return self.norm(x)

    def fused_patches(self, inputs: Mapping[str, torch.Tensor], task: torch.Tensor) -> torch.Tensor:
        """Prior head + residual fusion on the task patch map: (B, D, g, g)."""
        p, g = self.num_prefix_tokens, self.grid
        priors = torch.cat([_patch_map(inputs[f"prior{j}"], p, g) for j in range(len(self.prior_layers))], 1)
        prior = self.prior_out(F.gelu(self.prior_in(priors)))  # (B, D, g, g)
        t = _patch_map(task, p, g)  # (B, D, g, g)
        return t + self.fuse_out(F.gelu(self.fuse_in(torch.cat([prior, t], dim=1))))

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        task = self.task_tokens(inputs)
        if self.with_prior:
            mean = self.fused_patches(inputs, task).mean(dim=(2, 3))  # (B, D)
            pooled = torch.cat([task[:, 0], mean], dim=1) if self.pool == "cls" else mean
        elif self.pool == "cls":
            pooled = task[:, 0]  # (B, D)
        else:
            pooled = task[:, self.num_prefix_tokens:].mean(dim=1)  # (B, D)
        return self.drop(pooled)

    # ---- cost --------------------------------------------------------------------------------------------------
    def _block_macs(self, cls_only: bool) -> int:
        t, d, h = self.num_tokens, self.embed_dim, self.block_config["mlp_hidden"]
        if cls_only:  # q for token 0, k and v for all; one attention row; proj and MLP on token 0
            return d * d + 2 * t * d * d + 2 * t * d + d * d + 2 * d * h
        return 3 * t * d * d + 2 * t * t * d + t * d * d + 2 * t * d * h  # qkv, scores + mix, proj, MLP

    def macs_per_image(self) -> int:
        n = len(self.task_blocks)
        macs = sum(self._block_macs(self.cls_only_last and i == n - 1) for i in range(n))
        if self.with_prior:
            cells, d, k_f = self.grid * self.grid, self.embed_dim, len(self.prior_layers)
            macs += cells * (k_f * d * d + 9 * d * d + 2 * d * d + 9 * d * d)  # prior 1x1, 3x3; fusion 1x1, 3x3
        return macs + self.head.in_features * self.num_classes

    def activation_bytes(self) -> int:
        """float32 bytes at the peak, stage by stage: the decoded inputs stay live throughout; inside a block the
        attention phase holds residual, LayerNorm output, qkv, mix (6 x T x D) and the scores before and after the
        softmax (2 x heads x T x T), the MLP phase residual, LayerNorm output and hidden before/after GELU
        (2 x T x D + 2 x T x H); the prior head holds the task tokens (T x D) and per cell the concatenated priors,
        1x1 output, GELU output and prior map ((K_f + 3) x D), the fusion the prior map, concat, 1x1, GELU, 3x3
        outputs and the sum ((1 + 2 + 1 + 1 + 1 + 1) x D per cell)."""
        t, d = self.num_tokens, self.embed_dim
        h, heads = self.block_config["mlp_hidden"], self.block_config["heads"]
        block = max(6 * t * d + 2 * heads * t * t, 2 * t * d + 2 * t * h)
        conv = 0
        if self.with_prior:
            cells, k_f = self.grid * self.grid, len(self.prior_layers)
            conv = t * d + cells * d * max(k_f + 3, 7)
        return self.input_bytes() + 4 * max(block, conv)


@register_edge_method("vitsplit")
class ViTSplitEdge(_ViTSplitBase):
    """ViT-Split: K_t copied blocks (split = N - K_t; candidates N-3, N-2, N-1) and the K_f = 4 layer prior head."""

    with_prior = True

    @classmethod
    def depth_candidates(cls, backbone: BackboneShape, params: Mapping[str, Any]) -> tuple[int | None, ...]:
        n = backbone.num_blocks
        return tuple(sorted({s for s in (n - 3, n - 2, n - 1) if s >= 1}))


@register_edge_method("vitsplit-lite")
class ViTSplitLiteEdge(_ViTSplitBase):
    """ViT-Split without the prior head, K_t = 1 by default (split = N - 1): one tensor, Pi-class budgets."""

    with_prior = False

    def __init__(self, **kwargs: Any) -> None:
        if kwargs.get("prior_layers"):
            raise ValueError("vitsplit-lite has no prior branch; prior_layers is a vitsplit parameter")
        kwargs.pop("prior_layers", None)
        super().__init__(**kwargs)

    @classmethod
    def depth_candidates(cls, backbone: BackboneShape, params: Mapping[str, Any]) -> tuple[int | None, ...]:
        return (max(1, backbone.num_blocks - 1),)
