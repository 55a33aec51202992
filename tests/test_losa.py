"""The LoSA-style side network (`losa`): its plan, its zero-init identity, its recursion against an independent
einsum reference, its cost against hand counts and torch's FLOP counter, and a tiny model end to end (train ->
export -> extract -> run-edge -> finetune-edge -> serve-cloud sending three tensors -> devices check)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from edge_path import check_device_path
from typer.testing import CliRunner

from mist_kit.cli.app import app
from mist_kit.edge import create_edge_method, get_edge_method
from mist_kit.edge.losa import consumed_blocks
from mist_kit.runtime.plan import BackboneShape

runner = CliRunner()
T, D, N, C = 5, 64, 6, 10  # the tiny test_vit: cls + 4 patches, width 64, 6 blocks; 10 digit classes


def _shape() -> BackboneShape:
    return BackboneShape(D, T, 1, N)


def _losa(**params):
    return create_edge_method("losa", backbone=_shape(), depth=None, num_classes=C, params=params, seed=0)


def _inputs(model, batch: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn((batch, *shape), generator=gen) for name, shape in model.input_shapes.items()}


def _perturb(model, seed: int = 5) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)


def test_blocks_specs_and_plan() -> None:
    assert consumed_blocks("all", 12) == tuple(range(1, 13))
    assert consumed_blocks("every2", 12) == (2, 4, 6, 8, 10, 12)
    assert consumed_blocks("every3", 12) == (3, 6, 9, 12)
    assert consumed_blocks("every5", 12) == (2, 7, 12)  # counted back from N: the last block is always consumed
    assert consumed_blocks("last4", 12) == (9, 10, 11, 12)
    for bad in ("some", "every0", "last", "last13", 3):
        with pytest.raises(ValueError, match="blocks"):
            consumed_blocks(bad, 12)  # type: ignore[arg-type]
    plan = get_edge_method("losa").cloud_plan(_shape(), None, {"blocks": "every2"})
    assert [(t.name, str(t.source), t.shape) for t in plan.tensors] == [
        ("z2", "block:2", (T, D)), ("z4", "block:4", (T, D)), ("z6", "block:6", (T, D))]
    assert plan.blocks == N and plan.fp32_bytes == 3 * 4 * T * D
    assert not get_edge_method("losa").searches_depth()
    with pytest.raises(ValueError, match="takes no depth"):
        create_edge_method("losa", backbone=_shape(), depth=3, num_classes=C)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_zero_init_side_network_outputs_the_last_consumed_block(pool: str) -> None:
    """y = z_last + (h - h_0) and every mixer's output layers are zero: y is z_last bit for bit, so the embedding
    is the final norm of the last consumed block's tokens, pooled."""
    model = _losa(blocks="every2", pool=pool).eval()
    assert len(model.mixers) == 3
    x = _inputs(model, 4, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model.side_output(x), x["z6"], atol=0, rtol=0)
        y = model.norm(x["z6"])
        want = y[:, 0] if pool == "cls" else y[:, 1:].mean(dim=1)
        torch.testing.assert_close(model.embed(x), want, atol=0, rtol=0)
        _perturb(model)
        assert (model.side_output(x) - x["z6"]).abs().max() > 1e-2  # trained mixers do change the tokens


def _layer_norm(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def test_recursion_matches_an_independent_einsum_reference() -> None:
    model = _losa(blocks="every2", token_rank=3, channel_rank=7).eval()
    _perturb(model)
    x = _inputs(model, 3, seed=2)
    gelu = torch.nn.functional.gelu
    with torch.no_grad():
        h0 = x["z2"]
        h = h0
        for name, m in zip(("z2", "z4", "z6"), model.mixers, strict=True):
            s = h + x[name]
            a = gelu(torch.einsum("btd,rt->bdr", _layer_norm(s, m.token_norm), m.token_in.weight) + m.token_in.bias)
            t = torch.einsum("bdr,tr->btd", a, m.token_out.weight) + m.token_out.bias[None, :, None]
            b = gelu(torch.einsum("btd,rd->btr", _layer_norm(s + t, m.channel_norm), m.channel_in.weight)
                     + m.channel_in.bias)
            c = torch.einsum("btr,dr->btd", b, m.channel_out.weight) + m.channel_out.bias
            h = h + t + c
        ref = _layer_norm(x["z6"] + h - h0, model.norm)[:, 0]
        torch.testing.assert_close(model.embed(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("blocks", "rt", "rc", "tokens", "dim"), [("every2", 16, 32, 5, 64), ("all", 4, 8, 17, 32),
                                                                   ("last4", 8, 16, 257, 384)])
def test_cost_equals_hand_count_and_torch_flop_counter(blocks: str, rt: int, rc: int, tokens: int, dim: int) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    shape = BackboneShape(dim, tokens, 1, N)
    model = create_edge_method("losa", backbone=shape, depth=None, num_classes=C, seed=0,
                               params={"blocks": blocks, "token_rank": rt, "channel_rank": rc}).eval()
    m = len(consumed_blocks(blocks, N))
    # per consumed block: token MLP D (T rt + rt T), channel MLP T (D rc + rc D); then the head D C
    macs = m * (dim * (tokens * rt + rt * tokens) + tokens * (dim * rc + rc * dim)) + dim * C
    assert model.macs_per_image() == macs
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(_inputs(model, 1, seed=0))
    assert counter.get_total_flops() == 2 * macs
    # 2 LayerNorms + token Linear pair + channel Linear pair per block, final LayerNorm, head
    per_block = 2 * 2 * dim + (tokens * rt + rt) + (rt * tokens + tokens) + (dim * rc + rc) + (rc * dim + dim)
    assert model.cost().params == m * per_block + 2 * dim + dim * C + C
    act = 4 * (m * tokens * dim + 7 * tokens * dim + 2 * max(dim * rt, tokens * rc))
    assert model.activation_bytes() == act


def test_pooled_codec_shrinks_the_token_mixer() -> None:
    """A pooling codec sends T' < T tokens: the token MLPs are built on T' and the MACs count T'."""
    model = create_edge_method("losa", backbone=BackboneShape(D, 17, 1, N), depth=None, num_classes=C,
                               params={"blocks": "every3", "token_rank": 16, "channel_rank": 32},
                               inputs={"z3": (5, D), "z6": (5, D)})
    assert model.mixers[0].token_in.in_features == 5
    assert model.macs_per_image() == 2 * 2 * 5 * D * (16 + 32) + D * C


def test_bad_parameters_are_one_clear_error() -> None:
    with pytest.raises(ValueError, match="pool must be one of"):
        _losa(pool="max")
    with pytest.raises(ValueError, match="token_rank and channel_rank must be >= 1"):
        _losa(token_rank=0)
    with pytest.raises(ValueError, match="unexpected keyword"):
        _losa(rank=4)


@pytest.fixture(scope="module")
def losa_run(digits_lists: dict, tiny_weights: Path, tmp_path_factory) -> dict:
    """losa consuming blocks 2, 4, 6 of the tiny ViT (three sent tensors), int8-channel on each, 2 epochs; exported
    with an int8 edge graph."""
    from mist_kit.exporters.export import export_bundle
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.train import TrainParams

    out = tmp_path_factory.mktemp("losa")
    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), test=str(digits_lists["test"]), out=out, method="losa",
                       method_params={"blocks": "every2", "token_rank": 16, "channel_rank": 32},
                       params=TrainParams(epochs=2, min_steps=0, lr=1e-2, seed=0),
                       progress=False, cache_dir=out / "cache", refit=False)
    report = run_training(req, log=lambda _m: None, codec={"name": "int8-channel"})
    export = export_bundle(report["checkpoint"], out / "bundle", log=lambda _m: None)
    assert export.ok, export.problems
    return {"report": report, "export": export, "bundle": out / "bundle"}


HAND_MACS = 3 * (D * 2 * T * 16 + T * 2 * D * 32) + D * C  # every2 on 6 blocks = 3 mixers, ranks 16 / 32


def test_tiny_losa_trains_and_its_bundle_sends_three_tensors(losa_run: dict) -> None:
    from mist_kit.runtime.manifest import manifest_plan, open_bundle

    r = losa_run["report"]
    assert r["method"] == "losa" and r["k"] is None and r["k_search"] == {}
    assert r["test_top1"] > 0.2  # 10 classes: chance is 0.1
    assert r["bytes_per_image"] == 3 * T * D  # three int8 [5, 64] tensors
    assert r["edge"]["macs_per_image"] == HAND_MACS
    manifest = open_bundle(losa_run["bundle"])
    plan = manifest_plan(manifest)
    assert [(t.name, str(t.source)) for t in plan.tensors] == [("z2", "block:2"), ("z4", "block:4"), ("z6", "block:6")]
    assert [i["name"] for i in manifest["edge"]["inputs"]] == ["z2_q", "z4_q", "z6_q"]
    assert all(t["codec"]["name"] == "int8-channel" for t in manifest["cloud"]["plan"]["tensors"])
    assert losa_run["export"].quantization is not None  # the mixers' MatMuls went int8 ...
    assert manifest["parity"]["edge_top1_agreement"] >= 0.99  # ... and passed the agreement gate
    assert manifest["edge"]["macs_per_image"] == HAND_MACS


def test_tiny_losa_bundle_chain_equals_torch(losa_run: dict, digits_lists: dict) -> None:
    from mist_kit.backbone import load_backbone_for
    from mist_kit.backbone_run import CloudModule
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.data import load_image_list, load_pixels
    from mist_kit.exporters.verify import run_chain, torch_logits
    from mist_kit.runtime.codec.plan_codecs import plan_codecs, roundtrips
    from mist_kit.runtime.manifest import open_bundle

    config, method = load_checkpoint(losa_run["report"]["checkpoint"])
    cloud = CloudModule(load_backbone_for(config.backbone), method.plan).eval()
    images = load_image_list(digits_lists["test"])
    px = np.stack([load_pixels(p, 32, config.backbone.mean, config.backbone.std) for p in images.paths[:32]])
    ref = torch_logits(cloud, method, px.astype(np.float32), roundtrips(plan_codecs(method.plan, config.codecs, 1)))
    got = run_chain(losa_run["bundle"], open_bundle(losa_run["bundle"]), px.astype(np.float32), "reference")
    np.testing.assert_allclose(got, ref, atol=1e-3)


def test_tiny_losa_extract_run_edge_finetune_serve_and_devices_check(losa_run: dict, digits_lists: dict,
                                                                      tmp_path: Path) -> None:
    from mist_kit.data import load_image_list
    from mist_kit.runtime.v2_server import serve_roundtrip

    bundle, _ = check_device_path(losa_run["bundle"], digits_lists, losa_run["report"]["test_top1"], tmp_path)
    paths = list(load_image_list(digits_lists["test"]).paths[:8])
    sent, report = serve_roundtrip(bundle, paths, batch=4)
    assert set(sent) == {"z2_q", "z4_q", "z6_q"} and report["max_abs_diff_vs_in_process"] == 0.0
    assert report["wire_bytes_per_image"] == 3 * T * D
    res = runner.invoke(app, ["devices", "check", str(bundle), "--device", "rpi4", "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["edge_macs_per_image"] == HAND_MACS
