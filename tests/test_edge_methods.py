"""Edge methods: the LAE's size and cost against closed formulas and torch's FLOP counter, and a registry
completeness test that builds, runs and checkpoints every registered method (new methods are covered for free)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mist_kit.checkpoint import load_checkpoint, save_checkpoint
from mist_kit.config import BackboneSpec, CheckpointConfig, MethodSpec
from mist_kit.edge import create_edge_method, get_edge_method, list_edge_methods, register_edge_method
from mist_kit.edge.base import EdgeMethod
from mist_kit.errors import UsageError
from mist_kit.runtime.plan import BackboneShape

T, D, C = 5, 64, 10  # tokens (cls + 4 patches), width, classes


def _spec() -> BackboneSpec:
    return BackboneSpec(name="test_vit", weights_sha256="0" * 64, img_size=32, mean=(0.5, 0.5, 0.5),
                        std=(0.5, 0.5, 0.5), num_blocks=6, num_tokens=T, embed_dim=D, num_prefix_tokens=1,
                        weights="/nonexistent/tiny.safetensors")


def _shape(dim: int = D, tokens: int = T, prefix: int = 1, blocks: int = 6) -> BackboneShape:
    return BackboneShape(dim, tokens, prefix, blocks)


def _mist(dim: int = D, tokens: int = T, classes: int = C, prefix: int = 1, k: int = 3, **params) -> EdgeMethod:
    return create_edge_method("mist", backbone=_shape(dim, tokens, prefix), depth=k, num_classes=classes,
                              params=params)


def _default_depth(name: str) -> int | None:
    return get_edge_method(name).depth_candidates(_shape(), {})[0]


def _inputs_for(method: EdgeMethod, batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn((batch, *shape), generator=gen) for name, shape in method.input_shapes.items()}


@pytest.mark.parametrize(("dim", "rank", "depth", "classes"), [(64, 16, 4, 10), (384, 16, 4, 102), (768, 8, 2, 3)])
def test_lae_parameter_count_matches_formula(dim: int, rank: int, depth: int, classes: int) -> None:
    model = _mist(dim, classes=classes, rank=rank, depth_blocks=depth)
    # per block: LayerNorm (2D), q/k/v (3 (D r + r)), o (r D + D); then final LayerNorm (2D) and the head
    formula = depth * (2 * dim + 3 * (dim * rank + rank) + rank * dim + dim) + 2 * dim + (dim * classes + classes)
    assert model.trainable_params() == formula == model.cost().params


def test_lae_vitb_size_is_the_papers_order() -> None:
    model = _mist(768, 197, 100)
    body = model.trainable_params() - model.head.weight.numel() - model.head.bias.numel()
    assert 190_000 < body < 210_000  # DESIGN.md: about 0.2M parameters for D = 768 plus the head


def test_lae_macs_match_torch_flop_counter() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model = _mist().eval()
    x = _inputs_for(model, 1, seed=0)
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # the exported structure: explicit matmuls
        model.head(model.inference_module().embed(x))  # (the counter does not see SDPA's CPU kernel)
    assert counter.get_total_flops() == 2 * model.macs_per_image()  # matmul FLOPs = 2 x multiply-accumulates
    # ViT-B scale: DESIGN.md's "~0.09 G" per image is FLOPs: 2 x 43.8M multiply-accumulates
    big = _mist(768, 197, 100)
    assert 0.07e9 < 2 * big.macs_per_image() < 0.10e9  # 75 M: the cls-only last block saves 6 M of 44 M


def test_lae_on_pooled_tokens_counts_what_it_receives() -> None:
    """A pooling codec shrinks T before the edge network: MACs are the method's own count on its real input."""
    full = _mist(64, 17, 10)
    pooled = create_edge_method("mist", backbone=_shape(64, 17), depth=3, num_classes=10, inputs={"gather": (5, 64)})
    r, d = 16, 64
    full_block = 3 * 5 * d * r + 2 * 5 * 5 * r + 5 * r * d  # on T' = 5 tokens
    cls_block = 2 * 5 * d * r + d * r + 2 * 5 * r + r * d  # the last block answers the cls row only
    hand = 3 * full_block + cls_block + d * 10  # then the head
    assert pooled.macs_per_image() == hand < full.macs_per_image()


def test_lae_starts_as_identity_on_the_gather() -> None:
    model = _mist().eval()
    x = _inputs_for(model, 4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), model.norm(x["gather"])[:, 0])
    mean_pool = _mist(pool="mean").eval()
    with torch.no_grad():
        torch.testing.assert_close(mean_pool.embed(x), mean_pool.norm(x["gather"])[:, 1:].mean(dim=1))


def test_lae_rejects_bad_pooling_and_depths() -> None:
    with pytest.raises(ValueError, match="pool must be one of"):
        _mist(pool="max")
    with pytest.raises(ValueError, match="needs a backbone with a cls token"):
        _mist(tokens=4, prefix=0)
    for k in (-1, 7, 2.5, True, None):
        with pytest.raises(ValueError, match=r"k must be an integer in 0\.\.6"):
            _mist(k=k)  # type: ignore[arg-type]


def test_mist_and_linear_plans() -> None:
    mist = get_edge_method("mist").cloud_plan(_shape(), 4, {})
    assert [(t.name, str(t.source), t.shape) for t in mist.tensors] == [("gather", "gather:4", (T, D))]
    assert mist.blocks == 4
    linear = get_edge_method("linear").cloud_plan(_shape(), None, {})
    assert [(t.name, str(t.source), t.shape) for t in linear.tensors] == [("cls", "final_cls", (1, D))]
    assert linear.blocks == 6
    assert get_edge_method("mist").depth_candidates(_shape(blocks=12), {}) == (4, 8, 12)


@pytest.mark.parametrize("name", list_edge_methods())
def test_registry_completeness(name: str, tmp_path: Path) -> None:
    """Every registered method: builds tiny from its own plan, runs on the plan's tensors, counts its MACs as torch
    does, trains a step, and round-trips a checkpoint."""
    from torch.utils.flop_counter import FlopCounterMode

    cls = get_edge_method(name)
    depth = _default_depth(name)
    plan = cls.cloud_plan(_shape(), depth, {})
    model = create_edge_method(name, backbone=_shape(), depth=depth, num_classes=C, seed=0)
    if model.needs_backbone_init:
        import timm

        with torch.random.fork_rng():
            torch.manual_seed(0)
            model.init_from_backbone(timm.create_model("test_vit", img_size=32, num_classes=0).eval())
    assert model.method_name == name and get_edge_method(name) is cls
    assert tuple(model.input_shapes) == plan.names
    assert all(model.input_shapes[t.name] == t.shape for t in plan.tensors)
    x = _inputs_for(model, 6, seed=2)
    logits = model(x)
    assert logits.shape == (6, C)
    assert model.embed(x).shape == (6, model.embedding_dim)
    cost = model.cost()
    assert cost.params == sum(p.numel() for p in model.parameters()) > 0 and cost.activation_bytes > 0
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model({k: v[:1] for k, v in x.items()})
    assert 2 * cost.macs_per_image >= counter.get_total_flops() > 0.5 * 2 * cost.macs_per_image
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), torch.arange(6) % C)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():  # perturb every tensor so the round trip proves each one is saved and restored
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    model.eval()
    config = CheckpointConfig(backbone=_spec(), method=MethodSpec(name=name, k=depth, params=model.hparams()),
                              classes=tuple(str(i) for i in range(C)))
    save_checkpoint(tmp_path / "ckpt", config, model)
    loaded_config, loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded_config == config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(ValueError, match="'mist' is already registered"):

        @register_edge_method("mist")
        class Again(EdgeMethod):
            pass

    assert get_edge_method("mist").__name__ == "LowRankAttentionEdge"


def test_unknown_method_lists_registered_names() -> None:
    with pytest.raises(UsageError, match=r"unknown edge method 'lora'; registered: .*linear.*mist"):
        get_edge_method("lora")
