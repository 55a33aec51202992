"""ViT-Split edge methods (`vitsplit`, `vitsplit-lite`) on the tiny timm `test_vit`: the copied blocks reproduce the
backbone's own final tokens before training, the cls-only last block is exact, MACs equal a hand count and torch's
FLOP counter, learning-rate groups, and train -> export -> run-edge parity with the budget numbers of
`devices check` on rpi-zero-2w, rpi4 and rpi5."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mist_kit.cli.app import app
from mist_kit.edge import create_edge_method
from mist_kit.edge.vitsplit import cls_only_block, default_prior_layers
from mist_kit.runtime.plan import BackboneShape, TensorSource

runner = CliRunner()
D, C = 64, 10


def _tiny_vit(**kwargs) -> torch.nn.Module:
    """A seeded random timm ViT at 32 px (2x2 patches); kwargs add register tokens / layer scale."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng():
        torch.manual_seed(0)
        if not kwargs:
            return timm.create_model("test_vit", img_size=32, num_classes=0).eval()
        return VisionTransformer(img_size=32, patch_size=16, embed_dim=D, depth=6, num_heads=2, mlp_ratio=3,
                                 num_classes=0, **kwargs).eval()


def _method(name: str, vit: torch.nn.Module, split: int, **params):
    shape = BackboneShape(D, vit.patch_embed.num_patches + vit.num_prefix_tokens, vit.num_prefix_tokens,
                          len(vit.blocks))
    model = create_edge_method(name, backbone=shape, depth=split, num_classes=C, params=params, seed=0)
    model.init_from_backbone(vit)
    return model.eval()


def _backbone_inputs(vit: torch.nn.Module, model, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The plan's tensors from the backbone on seeded pixels, and the backbone's own final tokens."""
    from mist_kit.backbone_run import backbone_tensors

    px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        got = backbone_tensors(vit, px, [t.source for t in model.plan.tensors])
        final = vit.forward_features(px)
    return {t.name: got[str(t.source)] for t in model.plan.tensors}, final


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 2, "init_values": 0.3}])
@pytest.mark.parametrize("split", [3, 5])
def test_copied_blocks_reproduce_the_backbones_final_tokens(split: int, extra: dict) -> None:
    """Before training, the copies of blocks split+1..N + frozen final norm are the backbone's own last tokens, and
    the zero-initialised residual fusion passes the task branch through (with register tokens and layer scale
    too)."""
    vit = _tiny_vit(**extra)
    model = _method("vitsplit", vit, split, pool="mean")
    inputs, final = _backbone_inputs(vit, model)
    prefix = vit.num_prefix_tokens
    with torch.no_grad():
        task = model.task_tokens(inputs)
        torch.testing.assert_close(task, final, atol=1e-5, rtol=0)
        fused = model.fused_patches(inputs, task).flatten(2).transpose(1, 2)  # (B, P, D)
        torch.testing.assert_close(fused, final[:, prefix:], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.embed(inputs), final[:, prefix:].mean(1), atol=1e-5, rtol=0)
        cls_pool = _method("vitsplit", vit, split, pool="cls")
        want = torch.cat([final[:, 0], final[:, prefix:].mean(1)], dim=1)
        torch.testing.assert_close(cls_pool.embed(inputs), want, atol=1e-5, rtol=0)
        lite = _method("vitsplit-lite", vit, split)  # pool cls: cls-only last block
        torch.testing.assert_close(lite.embed({"split": inputs["split"]}), final[:, 0], atol=1e-5, rtol=0)


def test_cls_only_last_block_equals_the_full_blocks_cls_row() -> None:
    vit = _tiny_vit(reg_tokens=2, init_values=0.3)
    x = torch.randn(4, 7, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for blk in vit.blocks:
        blk = blk.double()
        blk.attn.fused_attn = False
        with torch.no_grad():
            torch.testing.assert_close(cls_only_block(blk, x), blk(x)[:, :1], atol=1e-12, rtol=0)


def test_plans_and_depths() -> None:
    shape = BackboneShape(384, 257, 1, 12)
    from mist_kit.edge import get_edge_method

    full, lite = get_edge_method("vitsplit"), get_edge_method("vitsplit-lite")
    assert default_prior_layers(12) == [3, 6, 9, 12]  # the paper's 0-based layers [2, 5, 8, 11]
    assert full.depth_candidates(shape, {}) == (9, 10, 11) and lite.depth_candidates(shape, {}) == (11,)
    plan = full.cloud_plan(shape, 9, {})
    assert [(t.name, str(t.source)) for t in plan.tensors] == [
        ("split", "block:9"), ("prior0", "normed:3"), ("prior1", "normed:6"), ("prior2", "normed:9"),
        ("prior3", "normed:12")]
    assert plan.blocks == 12 and plan.fp32_bytes == 5 * 4 * 257 * 384  # the prior needs block 12: full cloud
    assert full.cloud_plan(shape, 9, {"prior_layers": [2, 5, 8, 9]}).blocks == 9  # prior within the split
    assert lite.cloud_plan(shape, 11, {}).blocks == 11 and lite.cloud_plan(shape, 11, {}).sources == {
        TensorSource("block", 11)}
    for bad in (0, 12, None, 2.5):
        with pytest.raises(ValueError, match=r"split must be an integer in 1\.\.11"):
            full.check_depth(shape, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prior_layers"):
        full.cloud_plan(shape, 9, {"prior_layers": [3, 13]})


def _hand_block(t: int, d: int, h: int) -> int:
    return 3 * t * d * d + 2 * t * t * d + t * d * d + 2 * t * d * h  # qkv, scores + mix, proj, MLP


def test_vits14_macs_and_params_equal_a_hand_count() -> None:
    """DINOv2 ViT-S/14 at 224 px (257 tokens x 384, 6 heads, MLP 1536, layer scale), 102 classes."""
    shape = BackboneShape(384, 257, 1, 12)
    cfg = {"heads": 6, "mlp_hidden": 1536, "layer_scale": True}
    t, d, h, cells, c = 257, 384, 1536, 256, 102
    # norm1, qkv, proj, ls1, norm2, fc1, fc2, ls2
    block_params = 2 * d + 3 * d * d + 3 * d + d * d + d + d + 2 * d + d * h + h + h * d + d + d
    full = create_edge_method("vitsplit", backbone=shape, depth=9, num_classes=c, params=cfg)
    conv = cells * (4 * d * d + 9 * d * d + 2 * d * d + 9 * d * d)
    assert full.macs_per_image() == 3 * _hand_block(t, d, h) + conv + 2 * d * c
    assert 0.49e9 < _hand_block(t, d, h) < 0.52e9 and 0.85e9 < conv < 0.95e9  # the 0.5 and 0.9 GMAC
    convs = (4 * d * d + d) + (9 * d * d + d) + (2 * d * d + d) + (9 * d * d + d)
    assert full.num_params() == 3 * block_params + 2 * d + convs + 2 * d * c + c
    assert block_params == 1_775_232  # the 1.78M per block
    lite = create_edge_method("vitsplit-lite", backbone=shape, depth=11, num_classes=c, params=cfg)
    cls_block = d * d + 2 * t * d * d + 2 * t * d + d * d + 2 * d * h
    assert lite.macs_per_image() == cls_block + d * c
    mean = create_edge_method("vitsplit-lite", backbone=shape, depth=10, num_classes=c, params={**cfg, "pool": "mean"})
    assert mean.macs_per_image() == 2 * _hand_block(t, d, h) + d * c


@pytest.mark.parametrize(("name", "split", "pool"), [("vitsplit", 3, "cls"), ("vitsplit", 4, "mean"),
                                                     ("vitsplit-lite", 5, "cls"), ("vitsplit-lite", 4, "mean")])
def test_macs_equal_torch_flop_counter(name: str, split: int, pool: str) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model = _method(name, _tiny_vit(), split, pool=pool)
    x = {k: torch.randn(1, *s, generator=torch.Generator().manual_seed(2)) for k, s in model.input_shapes.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() == 2 * model.macs_per_image()


def test_param_groups_scale_the_copied_blocks_and_freeze_the_norm() -> None:
    model = _method("vitsplit", _tiny_vit(), 3)
    groups = model.param_groups(0.05)
    blocks = {id(p) for p in model.task_blocks.parameters()}
    for g in groups:
        assert g["lr_scale"] == (0.1 if g["params"] and id(g["params"][0]) in blocks else 1.0)
        assert all((id(p) in blocks) == (g["lr_scale"] == 0.1) for p in g["params"])
        assert g["weight_decay"] == (0.05 if all(p.ndim >= 2 for p in g["params"]) and g["params"] else 0.0) \
            or not g["params"]
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) and set(seen) == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(p.requires_grad for p in model.norm.parameters())
    assert len(blocks) == sum(1 for _ in model.task_blocks.parameters()) and len(model.task_blocks) == 3


def test_non_vit_blocks_are_refused_in_one_line() -> None:
    model = create_edge_method("vitsplit-lite", backbone=BackboneShape(D, 5, 1, 6), depth=5, num_classes=C)
    vit = _tiny_vit()
    vit.blocks[5] = torch.nn.Identity()
    with pytest.raises(ValueError, match="copies timm ViT `Block`s; this backbone's blocks are Identity"):
        model.init_from_backbone(vit)


@pytest.fixture(scope="module")
def vitsplit_run(tiny_checkpoint: dict, digits_lists: dict, tiny_weights: Path, tmp_path_factory) -> dict:
    """vitsplit (split searched over 3, 4, 5) with the int8-channel codec on its five tensors, exported with an int8
    edge graph."""
    from mist_kit.exporters.export import export_bundle
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.train import TrainParams

    out = tmp_path_factory.mktemp("vitsplit")
    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), test=str(digits_lists["test"]), out=out, method="vitsplit",
                       params=TrainParams(epochs=2, min_steps=0, lr=1e-2, seed=0), progress=False,
                       cache_dir=Path(tiny_checkpoint["out"]) / "cache", refit=False)
    report = run_training(req, log=lambda _m: None, codec={"name": "int8-channel"})
    export = export_bundle(report["checkpoint"], out / "bundle", log=lambda _m: None)
    assert export.ok, export.problems
    return {"report": report, "export": export, "bundle": out / "bundle"}


def test_train_export_run_edge_parity(vitsplit_run: dict, digits_lists: dict, tmp_path: Path) -> None:
    from mist_kit.runtime.codec.extract import extract
    from mist_kit.runtime.manifest import manifest_plan, open_bundle

    r = vitsplit_run["report"]
    assert set(r["k_search"]) == {"3", "4", "5"} and r["k"] in (3, 4, 5)
    assert r["bytes_per_image"] == 5 * 5 * 64  # five int8 [5, 64] tensors
    manifest = open_bundle(vitsplit_run["bundle"])
    plan = manifest_plan(manifest)
    assert [str(t.source) for t in plan.tensors] == [f"block:{r['k']}", "normed:2", "normed:3", "normed:4",
                                                     "normed:6"]
    assert manifest["cloud"]["plan"]["blocks"] == 6
    assert manifest["edge"]["macs_per_image"] == r["edge"]["macs_per_image"]
    assert vitsplit_run["export"].quantization is not None and manifest["parity"]["edge_top1_agreement"] >= 0.99
    feats = tmp_path / "test.safetensors"
    extract(vitsplit_run["bundle"], digits_lists["test"], feats, batch_size=64)
    res = runner.invoke(app, ["run-edge", "--device", "rpi4", "--bundle", str(vitsplit_run["bundle"]), "--features",
                              str(feats), "--json", "--no-cap"])
    assert res.exit_code == 0, res.stderr
    # the torch checkpoint's own test top-1, through int8 tensors, the cloud graph and an int8 edge graph
    assert abs(json.loads(res.stdout)["top1"] - r["test_top1"]) <= 0.03


def test_devices_check_reports_the_hand_count_on_three_pis(vitsplit_run: dict) -> None:
    """In a fresh torch-free process, as on a device: MACs and params are the hand count; the verdict follows the
    profile's budget (the tiny model fits all three; an estimate at a 1 GB batch fits only the larger boards)."""
    r = vitsplit_run["report"]
    t, d, h, cells, k_t = 5, 64, 192, 4, 6 - r["k"]
    hand = k_t * (3 * t * d * d + 2 * t * t * d + t * d * d + 2 * t * d * h) + cells * 24 * d * d + 2 * d * C
    assert r["edge"]["macs_per_image"] == hand
    code = ("import json, sys\nfrom mist_kit.devices import get_device\n"
            "from mist_kit.runtime.device_check import check_bundle\nout = {}\n"
            "for name in ('rpi-zero-2w', 'rpi4', 'rpi5'):\n"
            "    m = check_bundle(sys.argv[1], get_device(name))\n"
            "    e = check_bundle(sys.argv[1], get_device(name), batch=int(sys.argv[2]), measure=False)\n"
            "    out[name] = [m['fits'], m['edge_macs_per_image'], m['edge_params'], m['budget_mb'], e['fits']]\n"
            "print(json.dumps(out))\n")
    manifest = json.loads((vitsplit_run["bundle"] / "manifest.json").read_text())
    per_image = 5 * 5 * 64 + manifest["edge"]["activation_bytes"]  # int8 tensors received + edge peak
    batch = (1 << 30) // per_image  # ~1 GB of activations
    proc = subprocess.run([sys.executable, "-c", code, str(vitsplit_run["bundle"]), str(batch)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    # memory_mb - os_reserve_mb of devices/profiles/*.json: 512 - 100, 2048 - 200, 4096 - 250
    assert {n: v[3] for n, v in got.items()} == {"rpi-zero-2w": 412, "rpi4": 1848, "rpi5": 3846}
    for name, (fits, macs, params, _budget, fits_1gb) in got.items():
        assert fits and macs == hand and params == r["edge"]["params"], name
        assert fits_1gb == (name != "rpi-zero-2w"), name
    assert np.isfinite(manifest["edge"]["activation_bytes"])
