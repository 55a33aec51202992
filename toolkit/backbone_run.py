"""Run a frozen timm ViT once and return every tensor a set of cloud plans asks for.

z_0 is the token sequence entering block 1 (patch embedding + position embedding + cls/register tokens, after
`norm_pre`), z_i the output of block i before the final norm. Blocks are iterated directly through timm's public
modules (no hooks), with each family's own prologue, the one timm's `forward_features` / `forward_intermediates`
use: VisionTransformer (ViT, DeiT, DINO/DINOv2), Eva (EVA-02: rotary embeddings passed to every block) and Beit
(a shared relative position bias). The pass stops after the deepest block any requested tensor needs.

`run_backbone` (cache filling, no grad, optional bf16) and `CloudModule` (the exported cloud graph) share the same
code, so the cache and cloud.onnx compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from mist_kit.errors import UsageError
from mist_kit.runtime.plan import CloudPlan, TensorSource

PRECISIONS = ("fp32", "bf16")
FAMILIES = ("VisionTransformer", "Eva", "Beit")


def family(model: nn.Module) -> str:
    """The supported timm family a model belongs to, or a one-line UsageError."""
    from timm.models.beit import Beit
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    for cls in (VisionTransformer, Eva, Beit):
        if isinstance(model, cls):
            return cls.__name__
    raise UsageError(f"backbone {type(model).__name__} is not a supported timm ViT family ({', '.join(FAMILIES)}); "
                     "pick a ViT, DeiT, DINOv2, EVA-02 or BEiT model")


def prologue(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, Callable[[int], dict[str, Any]]]:
    """(z_0 [B, T, D], block i -> the keyword arguments block i takes) for the model's family."""
    kind = family(model)
    if kind == "VisionTransformer":
        x = model.patch_embed(pixels)
        x = model._pos_embed(x)  # timm's own prologue step (adds cls/reg tokens and position embeddings)
        x = model.patch_drop(x)
        return model.norm_pre(x), lambda i: {}
    if kind == "Eva":
        x = model.patch_embed(pixels)
        x, rope = model._pos_embed(x)
        x = model.norm_pre(x)
        if getattr(model, "rope_mixed", False) and rope is not None:
            return x, lambda i: {"rope": rope[i]}
        return x, lambda i: {"rope": rope}
    x = model.patch_embed(pixels)  # Beit
    x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    x = model.pos_drop(x)
    bias = model.rel_pos_bias() if model.rel_pos_bias is not None else None
    return x, lambda i: {"shared_rel_pos_bias": bias}


def embed_tokens(model: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """z_0: (B, 3, H, W) -> (B, T, D)."""
    return prologue(model, pixels)[0]


def final_embedding(model: nn.Module, last: torch.Tensor) -> torch.Tensor:
    """The backbone's own pre-logits embedding from the last block's tokens: final norm, then timm's pooling.

    That is the final-norm cls token for cls-token models (ViT, DeiT, DINOv2) and timm's pool (e.g. the patch-token
    mean after fc_norm) for models without one, never a register token. (B, T, D) -> (B, D).
    """
    pooled = model.forward_head(model.norm(last), pre_logits=True)
    if pooled.ndim == 3:  # global_pool='' keeps the sequence: fall back to the first token / token mean
        pooled = pooled[:, 0] if getattr(model, "cls_token", None) is not None else pooled.mean(dim=1)
    return pooled


def backbone_tensors(model: nn.Module, pixels: torch.Tensor,
                     sources: Iterable[TensorSource]) -> dict[str, torch.Tensor]:
    """{str(source): tensor} for every source, from one pass that stops at the deepest block needed.

    Gathers are cumulative sums of the float32 residual stream (the order of additions is z_0 + z_1 + ... + z_k);
    block outputs and normed maps are [B, T, D]; final_cls is [B, 1, D].
    """
    wanted = set(sources)
    n = len(model.blocks)
    depth = max((s.blocks_needed(n) for s in wanted), default=0)
    if depth > n:
        raise UsageError(f"a requested tensor needs {depth} blocks; the backbone has {n}")
    x, kwargs = prologue(model, pixels)
    running = x.float()
    out: dict[str, torch.Tensor] = {}

    def emit(i: int) -> None:
        for src in wanted:
            if src.index != i:
                continue
            if src.kind == "gather":
                out[str(src)] = running.clone()
            elif src.kind == "block":
                out[str(src)] = x.float()
            elif src.kind == "normed":
                out[str(src)] = model.norm(x).float()

    emit(0)
    for i, blk in enumerate(model.blocks[:depth], start=1):
        x = blk(x, **kwargs(i - 1))
        running = running + x.float()
        emit(i)
    if TensorSource("final_cls") in wanted:
        out["final_cls"] = final_embedding(model, x).float()[:, None, :]  # (B, 1, D)
    return out


@torch.no_grad()
def run_backbone(model: nn.Module, pixels: torch.Tensor, sources: Iterable[TensorSource],
                 precision: str = "fp32") -> dict[str, torch.Tensor]:
    """One backbone pass producing every requested tensor (prefix sums share the work).

    precision "bf16" runs the matrix products under bfloat16 autocast (LayerNorm, softmax and the residual
    stream stay fp32): on CPUs with AMX it is about 10x faster, at ~0.3% relative error in the gathers. It is
    an opt-in for caching large datasets on weak machines; fp32 is the reference the exported cloud graph matches.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"backbone precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return backbone_tensors(model, pixels, sources)


class CloudModule(nn.Module):
    """pixel_values -> the plan's tensors, in order, running only the blocks the plan needs: the cloud graph."""

    def __init__(self, vit: nn.Module, plan: CloudPlan) -> None:
        super().__init__()
        n = len(vit.blocks)
        if plan.num_blocks != n:
            raise UsageError(f"cloud plan is for a {plan.num_blocks}-block backbone; this one has {n}")
        self.vit, self.plan = vit, plan

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        got = backbone_tensors(self.vit, pixel_values, self.plan.sources)
        return tuple(got[str(t.source)] for t in self.plan.tensors)
