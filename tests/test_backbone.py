"""The backbone wrapper: gather g_k against a reference built from timm's own `forward_intermediates`, weight
loading, and the one-line errors for bad backbone choices.

Models are tiny random-init timm ViTs: `test_vit` (cls token, no layer scale) and a shrunken DINOv2-with-registers
(`vit_small_patch14_reg4_dinov2` at width 48, depth 4: cls + 4 register tokens, layer scale, position embeddings
that skip the prefix tokens), whose layer-scale gammas are randomised so every block's residual really counts.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from mist_kit.backbone import _hub_reachable, create_vit, load_backbone, load_backbone_for, save_random_backbone
from mist_kit.backbone_run import CloudModule, run_backbone
from mist_kit.errors import CheckpointError, DependencyError, UsageError
from mist_kit.runtime.plan import FINAL_CLS, BackboneShape, CloudPlan, block, gather, normed


def _tiny_vit(kind: str) -> torch.nn.Module:
    import timm

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "test_vit":
            model = timm.create_model("test_vit", img_size=32, num_classes=0)
        else:
            model = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=28, embed_dim=48, depth=4,
                                      num_heads=2, num_classes=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".gamma", "pos_embed", "cls_token", "reg_token")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)  # no near-zero layer scale, real embeddings
    return model.eval()


def _reference_tokens(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """[z_0, z_1, ..., z_N], each (B, T, D): z_0 hand-rolled, z_1..z_N from timm's forward_intermediates."""
    patches = model.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, P, D), conv stem written out
    prefix = [t.expand(x.shape[0], -1, -1) for t in (model.cls_token, model.reg_token) if t is not None]
    if model.no_embed_class:  # DINOv2 layout: position embeddings cover patches only, prefix tokens concatenated
        z0 = torch.cat([*prefix, patches + model.pos_embed], dim=1)
    else:  # original ViT layout: the cls token has its own position embedding
        z0 = torch.cat([*prefix, patches], dim=1) + model.pos_embed
    inter = model.forward_intermediates(x, indices=list(range(len(model.blocks))), norm=False, output_fmt="NLC",
                                        return_prefix_tokens=True, intermediates_only=True)
    blocks = [torch.cat([pre, spatial], dim=1) for spatial, pre in inter]
    return [z0, *blocks]


@pytest.mark.parametrize("kind", ["test_vit", "dinov2_reg4_tiny"])
def test_gather_equals_forward_intermediates_reference(kind: str) -> None:
    model = _tiny_vit(kind)
    size = model.patch_embed.img_size[0]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    n = len(model.blocks)
    with torch.no_grad():
        zs = _reference_tokens(model, x)
        ours = run_backbone(model, x, [gather(k) for k in range(n + 1)] + [block(i) for i in range(n + 1)]
                            + [normed(n - 1)])
    assert zs[0].shape == (3, model.patch_embed.num_patches + model.num_prefix_tokens, model.embed_dim)
    for k in range(n + 1):
        ref = torch.stack(zs[: k + 1]).sum(dim=0)
        torch.testing.assert_close(ours[f"gather:{k}"], ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours[f"block:{k}"], zs[k], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[f"normed:{n - 1}"], model.norm(zs[n - 1]), atol=1e-5, rtol=1e-5)
    # the blocks really add something: g_N is far from z_0 (a gather that ignored blocks would fail above anyway)
    assert (ours[f"gather:{n}"] - zs[0]).abs().max() > 0.1


@pytest.mark.parametrize("kind", ["test_vit", "dinov2_reg4_tiny"])
def test_cloud_module_matches_run_backbone_and_stops_early(kind: str) -> None:
    model = _tiny_vit(kind)
    size = model.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    n = len(model.blocks)
    shape = BackboneShape(model.embed_dim, model.patch_embed.num_patches + model.num_prefix_tokens,
                          model.num_prefix_tokens, n)
    plan = CloudPlan.build(shape, [("z1", block(1)), ("g3", gather(3))])
    assert plan.blocks == 3
    calls: list[int] = []
    hooks = [b.register_forward_hook(lambda *_a, i=i: calls.append(i)) for i, b in enumerate(model.blocks)]
    with torch.no_grad():
        z1, g3 = CloudModule(model, plan)(x)
    for h in hooks:
        h.remove()
    assert calls == [0, 1, 2]  # blocks 4..N never run: the cloud stops at the deepest tensor it sends
    with torch.no_grad():
        all_t = run_backbone(model, x, [block(1), gather(3)])
    torch.testing.assert_close(z1, all_t["block:1"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g3, all_t["gather:3"], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=f"has {n} blocks"):
        CloudPlan.build(shape, [("g", gather(n + 1))])


def test_final_embedding_is_timm_pre_logits_not_a_register_token() -> None:
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        cls_model = timm.create_model("test_vit", img_size=32, num_classes=0).eval()
        reg_only = timm.create_model("test_vit2", img_size=32, num_classes=0).eval()  # 1 register token, no cls
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(run_backbone(cls_model, x, [FINAL_CLS])["final_cls"][:, 0],
                                   cls_model.forward_features(x)[:, 0])
        feats = reg_only.forward_features(x)  # final-norm tokens (B, 1 + P, D)
        got = run_backbone(reg_only, x, [FINAL_CLS])["final_cls"][:, 0]
    torch.testing.assert_close(got, reg_only.forward_head(feats, pre_logits=True))
    torch.testing.assert_close(got, reg_only.fc_norm(feats[:, 1:].mean(dim=1)))
    assert not torch.allclose(got, feats[:, 0])


def test_unknown_backbone_suggests_names() -> None:
    with pytest.raises(UsageError, match=r"unknown backbone 'vit_smal_patch16_224'.*did you mean.*vit_small_patch16"):
        create_vit("vit_smal_patch16_224")


def test_weights_and_pretrained_are_exclusive(tiny_weights: Path) -> None:
    with pytest.raises(UsageError, match="both --weights and --pretrained"):
        create_vit("test_vit", weights=tiny_weights, pretrained=True)
    with pytest.raises(UsageError, match="no backbone weights"):
        load_backbone("test_vit")


def test_pretrained_offline_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import mist_kit.backbone as bb

    monkeypatch.setattr(bb, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(bb, "_pretrained_in_local_cache", lambda name: False)
    start = time.perf_counter()
    with pytest.raises(DependencyError, match="unreachable") as info:
        create_vit("test_vit", pretrained=True)
    assert time.perf_counter() - start < 5
    assert "\n" not in str(info.value) and "--weights FILE" in str(info.value)


def test_hub_probe_times_out_on_a_closed_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens, refused at once
    start = time.perf_counter()
    assert _hub_reachable(timeout=1.0) is False
    assert time.perf_counter() - start < 3


def test_weights_roundtrip_safetensors_and_pth(tmp_path: Path, tiny_weights: Path) -> None:
    from safetensors.torch import load_file

    model, spec = load_backbone("test_vit", img_size=32, weights=tiny_weights)
    ref = load_file(str(tiny_weights))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ref[name])
    assert spec.num_tokens == 5 and spec.embed_dim == 64 and spec.num_blocks == 6 and spec.num_prefix_tokens == 1
    assert spec.mean == (0.5, 0.5, 0.5)  # from timm's pretrained config for test_vit
    pth = tmp_path / "w.pth"
    torch.save({"state_dict": ref}, pth)
    from_pth = create_vit("test_vit", img_size=32, weights=pth)
    torch.testing.assert_close(from_pth.state_dict()["blocks.0.attn.qkv.weight"], ref["blocks.0.attn.qkv.weight"])
    assert all(not p.requires_grad for p in from_pth.parameters())


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    import datetime

    bad = tmp_path / "evil.pth"
    torch.save({"x": datetime.timedelta(days=1)}, bad)  # any global outside torch's weights-only allowlist
    with pytest.raises(CheckpointError, match="cannot read weights"):
        create_vit("test_vit", img_size=32, weights=bad)


def test_weights_for_another_architecture_are_one_line(tiny_weights: Path) -> None:
    with pytest.raises(CheckpointError, match="do not fit backbone 'test_vit2'"):
        create_vit("test_vit2", img_size=32, weights=tiny_weights)


def test_load_backbone_for_refuses_other_weights(tmp_path: Path, tiny_weights: Path) -> None:
    _, spec = load_backbone("test_vit", img_size=32, weights=tiny_weights)
    other = save_random_backbone("test_vit", tmp_path / "other.safetensors", img_size=32, seed=1)
    with pytest.raises(CheckpointError, match="differs from the checkpoint's backbone"):
        load_backbone_for(spec, other)
    with pytest.raises(CheckpointError, match="not found"):
        load_backbone_for(spec, tmp_path / "missing.safetensors")
    assert isinstance(load_backbone_for(spec), torch.nn.Module)


@pytest.mark.parametrize("name, kwargs", [
    ("eva02_tiny_patch14_224", {"img_size": 28, "embed_dim": 32, "depth": 2, "num_heads": 2}),
    ("beit_base_patch16_224", {"img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}),
])
def test_eva_and_beit_gathers_equal_their_own_forward(name: str, kwargs: dict) -> None:
    """The other families: z_N through our block iteration equals timm's own forward_features before the norm,
    with every prefix token kept (the same gather semantics as VisionTransformer)."""
    import timm

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=0, **kwargs).eval()
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"], generator=torch.Generator().manual_seed(4))
    n = len(model.blocks)
    with torch.no_grad():
        ours = run_backbone(model, x, [block(n), FINAL_CLS])
        ref = model.forward_features(x)  # final norm applied (Identity when the model pools with fc_norm)
        torch.testing.assert_close(model.norm(ours[f"block:{n}"]), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours["final_cls"][:, 0], model.forward_head(ref, pre_logits=True), atol=1e-5,
                                   rtol=1e-5)


def test_non_vit_backbones_are_refused_before_building() -> None:
    with pytest.raises(UsageError, match="'resnet18' is not a Vision Transformer"):
        create_vit("resnet18")


def test_img_size_not_a_multiple_of_the_patch_is_one_line_before_any_work() -> None:
    """test_vit's name does not say its patch size, so the CLI preflight cannot catch this: the backbone does."""
    with pytest.raises(UsageError, match=r"--img-size 70 is not a multiple of test_vit's patch size 16 \(try 64"):
        create_vit("test_vit", img_size=70, seed=0)
