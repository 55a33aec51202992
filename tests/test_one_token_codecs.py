"""A token-changing codec (pooling, prefix only) on a one-token tensor (the final cls) means its quantizer alone:
there is no patch grid to pool or drop. MIST with its cls-token extension and the linear probe can therefore take
every codec the gather takes."""

from __future__ import annotations

import numpy as np
import pytest

from mist_kit.cache import InputRows
from mist_kit.calibration.codec_calib import fit_for_inputs
from mist_kit.runtime.codec.registry import same_tokens_codec


@pytest.mark.parametrize(("name", "expected"), [("pool2-int4", "int4-channel"), ("pool4-int8", "int8-channel"),
                                                ("cls-int8", "int8-channel"), ("cls-fp16", "fp16"),
                                                ("int8-channel", "int8-channel"), ("fp32", "fp32")])
def test_same_tokens_codec(name: str, expected: str) -> None:
    assert same_tokens_codec(name) == expected


def test_one_token_tensor_gets_the_quantizer_and_the_gather_the_pooling() -> None:
    rng = np.random.default_rng(0)
    rows = InputRows.of({"gather": rng.standard_normal((16, 17, 8)).astype(np.float16),
                         "cls": rng.standard_normal((16, 1, 8)).astype(np.float16)})
    codecs = fit_for_inputs("pool2-int4", rows, num_prefix_tokens=1)
    assert codecs["gather"].spec()["name"] == "pool2-int4" and codecs["gather"].spec()["num_tokens"] == 1 + 4
    cls = codecs["cls"].spec()
    assert cls["name"] == "int4-channel" and cls["num_tokens"] == 1 and cls["tensor"] == "cls"
    x = rows.batch(np.arange(16))["cls"]
    back = codecs["cls"].decode(codecs["cls"].encode(x))
    assert back.shape == x.shape and np.abs(back - x).max() <= np.abs(x).max() / 7 + 1e-3  # int4: 1/7 of range
    codecs = fit_for_inputs("cls-int8+zstd3", rows, num_prefix_tokens=1)
    assert codecs["cls"].spec()["name"] == "int8-channel" and codecs["gather"].spec()["num_tokens"] == 1


def test_mist_with_cls_token_trains_and_exports_with_a_pooling_codec(tiny_checkpoint: dict, digits_lists: dict,
                                                                     tiny_weights, tmp_path) -> None:
    """`train --codec pool2-int4` on mist + cls token pools the gather and int4-quantizes the cls; `export --codec
    pool2-int4` accepts that checkpoint and the bundle carries both codecs."""
    from pathlib import Path

    from mist_kit.exporters.export import export_bundle
    from mist_kit.pipeline import TrainRequest, run_training
    from mist_kit.runtime.manifest import open_bundle
    from mist_kit.train import TrainParams

    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), out=tmp_path / "run", method="mist", k=2,
                       method_params={"cls_token": True}, params=TrainParams(epochs=1, min_steps=0, seed=0),
                       progress=False, refit=False, cache_dir=Path(tiny_checkpoint["out"]) / "cache")
    report = run_training(req, log=lambda _m: None, codec={"name": "pool2-int4"})
    exported = export_bundle(report["checkpoint"], tmp_path / "bundle", codec="pool2-int4", log=lambda _m: None)
    assert exported.ok, exported.problems
    tensors = {t["name"]: t["codec"]["name"] for t in open_bundle(tmp_path / "bundle")["cloud"]["plan"]["tensors"]}
    assert tensors == {"gather": "pool2-int4", "cls": "int4-channel"}


def test_linear_probe_trains_and_exports_with_a_pooling_codec_name(tiny_checkpoint: dict, digits_lists: dict,
                                                                   tiny_weights, tmp_path) -> None:
    """The linear probe sends only the cls: `--codec cls-int8` means int8-channel on it, in train and in export; an
    export asking a codec the network was not trained for is still refused."""
    from pathlib import Path

    import pytest

    from mist_kit.errors import UsageError
    from mist_kit.exporters.export import export_bundle
    from mist_kit.pipeline import TrainRequest, run_training

    req = TrainRequest(backbone="test_vit", weights=str(tiny_weights), img_size=32, train=str(digits_lists["train"]),
                       val=str(digits_lists["val"]), out=tmp_path / "run", method="linear", progress=False,
                       refit=False, cache_dir=Path(tiny_checkpoint["out"]) / "cache")
    report = run_training(req, log=lambda _m: None, codec={"name": "cls-int8"})
    assert report["bytes_per_image"] == 64  # one int8 [1, 64] token
    assert export_bundle(report["checkpoint"], tmp_path / "b", codec="cls-int8", log=lambda _m: None).ok
    with pytest.raises(UsageError, match="was trained for codec int8-channel"):
        export_bundle(report["checkpoint"], tmp_path / "b2", codec="int4-channel", log=lambda _m: None)
