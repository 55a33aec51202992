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

T, D, C = 5, 64, 10  # tokens (cls + 4 patches), width, classes


def _spec() -> BackboneSpec:
    return BackboneSpec(name="test_vit", weights_sha256="0" * 64, img_size=32, mean=(0.5, 0.5, 0.5),
                        std=(0.5, 0.5, 0.5), num_blocks=6, num_tokens=T, embed_dim=D, num_prefix_tokens=1,
                        weights="/nonexistent/tiny.safetensors")


def _input_for(method: EdgeMethod, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, T, D) if method.input_kind == "gather" else (batch, D)
    return torch.randn(shape, generator=gen)


@pytest.mark.parametrize(("dim", "rank", "depth", "classes"), [(64, 16, 4, 10), (384, 16, 4, 102), (768, 8, 2, 3)])
def test_lae_parameter_count_matches_formula(dim: int, rank: int, depth: int, classes: int) -> None:
    model = create_edge_method("mist", embed_dim=dim, num_tokens=T, num_prefix_tokens=1, num_classes=classes,
                               rank=rank, depth=depth)
    # per block: LayerNorm (2D), q/k/v (3 (D r + r)), o (r D + D); then final LayerNorm (2D) and the head
    formula = depth * (2 * dim + 3 * (dim * rank + rank) + rank * dim + dim) + 2 * dim + (dim * classes + classes)
    assert model.trainable_params() == formula


def test_lae_vitb_size_is_the_papers_order() -> None:
    model = create_edge_method("mist", embed_dim=768, num_tokens=197, num_prefix_tokens=1, num_classes=100)
    body = model.trainable_params() - model.head.weight.numel() - model.head.bias.numel()
    assert 190_000 < body < 210_000  # DESIGN.md: about 0.2M parameters for D = 768 plus the head


def test_lae_macs_match_torch_flop_counter() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model = create_edge_method("mist", embed_dim=D, num_tokens=T, num_prefix_tokens=1, num_classes=C).eval()
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() == 2 * model.macs_per_image()  # matmul FLOPs = 2 x multiply-accumulates
    # ViT-B scale: DESIGN.md's "~0.09 G" per image is FLOPs: 2 x 43.8M multiply-accumulates
    big = create_edge_method("mist", embed_dim=768, num_tokens=197, num_prefix_tokens=1, num_classes=100)
    assert 0.08e9 < 2 * big.macs_per_image() < 0.10e9


def test_lae_starts_as_identity_on_the_gather() -> None:
    model = create_edge_method("mist", embed_dim=D, num_tokens=T, num_prefix_tokens=1, num_classes=C).eval()
    x = torch.randn(4, T, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.embed(x), model.norm(x)[:, 0])
    mean_pool = create_edge_method("mist", embed_dim=D, num_tokens=T, num_prefix_tokens=1, num_classes=C,
                                   pool="mean").eval()
    with torch.no_grad():
        torch.testing.assert_close(mean_pool.embed(x), mean_pool.norm(x)[:, 1:].mean(dim=1))


def test_lae_rejects_bad_pooling() -> None:
    with pytest.raises(ValueError, match="pool must be one of"):
        create_edge_method("mist", embed_dim=D, num_tokens=T, num_prefix_tokens=1, num_classes=C, pool="max")
    with pytest.raises(ValueError, match="needs a backbone with a cls token"):
        create_edge_method("mist", embed_dim=D, num_tokens=4, num_prefix_tokens=0, num_classes=C)


@pytest.mark.parametrize("name", list_edge_methods())
def test_registry_completeness(name: str, tmp_path: Path) -> None:
    """Every registered method: builds tiny, runs on its input kind, trains a step, round-trips a checkpoint."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = create_edge_method(name, embed_dim=D, num_tokens=T, num_prefix_tokens=1, num_classes=C)
    assert model.method_name == name and get_edge_method(name) is type(model)
    assert model.input_kind in ("gather", "final_cls")
    x = _input_for(model, 6, seed=2)
    logits = model(x)
    assert logits.shape == (6, C)
    assert model.embed(x).shape == (6, model.embedding_dim)
    assert model.trainable_params() > 0 and model.macs_per_image() > 0
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(6) % C)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():  # perturb every tensor so the round trip proves each one is saved and restored
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.1)
    model.eval()
    config = CheckpointConfig(backbone=_spec(), method=MethodSpec(name=name, k=3, params=model.hparams()),
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
