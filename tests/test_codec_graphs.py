"""ONNX codec fragments == the numpy reference (bit-exact integers), and the export seam rewires graphs."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from mist_kit.errors import ExportError  # noqa: E402
from mist_kit.exporters.codec_graphs import (  # noqa: E402
    attach_decoder,
    attach_encoder,
    decoder_model,
    encoder_model,
)
from mist_kit.runtime.codec import Quant, codec_params, fit_codec, list_codecs  # noqa: E402
from mist_kit.runtime.codec.bench import synthetic_features  # noqa: E402

T, D = 1 + 8 * 8, 128  # 8x8 grid: pool2 and pool4 both apply


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    onnx.checker.check_model(model, full_check=True)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x = synthetic_features(12, T, D, prefix=1, seed=3)
    return x[:8], x[8:]  # calibration rows, held-out rows (values beyond the calibrated range clip)


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("name", list_codecs())
def test_graph_equals_reference(name: str, opset: int, data: tuple[np.ndarray, np.ndarray]) -> None:
    calib, x = data
    codec = fit_codec(name, calib, 1)
    enc = _session(encoder_model(codec, opset))
    outs = dict(zip([o.name for o in enc.get_outputs()], enc.run(None, {"features_in": x}), strict=True))
    ref = codec.encode(x)
    assert list(outs) == list(ref)
    for key, want in ref.items():
        got = outs[key]
        assert got.dtype == want.dtype and got.shape == want.shape
        if codec_params(name).quant is Quant.PCA_INT8:
            # MatMul sums in another order than numpy's BLAS: a code may move by one step at a rounding boundary
            diff = np.abs(got.astype(np.int32) - want.astype(np.int32))
            assert diff.max() <= 1 and diff.mean() < 1e-3
        elif want.dtype.kind in "iu":
            np.testing.assert_array_equal(got, want)  # bit-exact integers
        else:
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))  # float paths match bitwise too
    dec = _session(decoder_model(codec, opset))
    got = dec.run(None, ref)[0]
    # PCA's decoder is a MatMul too: MLAS and numpy's BLAS sum the rank in other orders (a few ulps at |x| ~ 1)
    tol = 1e-5 if codec_params(name).quant is Quant.PCA_INT8 else 1e-6
    np.testing.assert_allclose(got, codec.decode(ref), rtol=tol, atol=tol)


def _toy_cloud(opset: int = 17) -> onnx.ModelProto:
    """pixel_values [B, 4] -> features [B, T, D] through a MatMul + Reshape (a stand-in backbone)."""
    w = np.random.default_rng(0).standard_normal((4, T * D)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["pixel_values", "w"], ["flat"]),
             helper.make_node("Reshape", ["flat", "shape"], ["features"])]
    graph = helper.make_graph(
        nodes, "cloud", [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["B", 4])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", T, D])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([-1, T, D], np.int64), "shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _toy_edge(tokens: int, opset: int = 17) -> onnx.ModelProto:
    """features [B, T', D] -> embedding [B, D]: mean over tokens."""
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["features"], ["embedding"], axes=[1], keepdims=0)], "edge",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", tokens, D])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["B", D])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("name", ["int8-channel", "int8-token", "pool2-int4", "pool4-int8", "fp16",
                                  "cls-int8"])
def test_attached_fragments_run_end_to_end(name: str) -> None:
    rng = np.random.default_rng(1)
    cloud = _toy_cloud()
    pixels = rng.standard_normal((3, 4)).astype(np.float32)
    feats = _session(cloud).run(None, {"pixel_values": pixels})[0]
    codec = fit_codec(name, feats, 1)
    full_cloud = _session(attach_encoder(cloud, codec.spec()))  # the seam accepts the recorded spec
    outs = full_cloud.run(None, {"pixel_values": pixels})
    names = [o.name for o in full_cloud.get_outputs()]
    ref = codec.encode(feats)
    assert names == list(ref)
    for got, key in zip(outs, names, strict=True):
        np.testing.assert_array_equal(got, ref[key])
    edge = _session(attach_decoder(_toy_edge(int(codec.out_tokens)), codec))
    assert [i.name for i in edge.get_inputs()] == names
    emb = edge.run(None, dict(zip(names, outs, strict=True)))[0]
    np.testing.assert_allclose(emb, codec.roundtrip(feats).mean(axis=1), rtol=1e-5, atol=1e-5)


def test_seam_refuses_what_it_cannot_rewire() -> None:
    codec = fit_codec("int8-channel", synthetic_features(2, T, D), 1)
    with pytest.raises(ExportError, match="opset 11"):
        attach_encoder(_toy_cloud(opset=11), codec)
    two = _toy_cloud()
    two.graph.output.append(helper.make_tensor_value_info("flat", TensorProto.FLOAT, ["B", T * D]))
    with pytest.raises(ExportError, match="exactly one features tensor"):
        attach_encoder(two, codec)
    assert attach_encoder(two, fit_codec("fp32", synthetic_features(2, T, D), 1)) is two  # lossless: untouched
