"""Typed manifest fields (issue 15 item 3): every field docs/CONTRACTS.md lists is type- and range-checked, and the
fields that must agree (backbone vs cloud.plan, codecs vs cloud.outputs, edge.outputs vs head, the named files vs
`files`, the int8 recipe vs the export gate) are checked against each other, even those the device never reads.
Each failure is one line naming manifest.json and the field, exit code 2; every bundle the exporter writes passes
(the tiny int8 bundle and its fp32-codec twin here, plus every bundle the other tests export)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest

from mist_kit.errors import BundleError
from mist_kit.runtime.manifest_schema import validate_manifest


@pytest.fixture(scope="module")
def manifest(tiny_bundle: Path) -> dict[str, Any]:
    return json.loads((tiny_bundle / "manifest.json").read_text())


def test_exported_bundles_are_valid(tiny_bundle: Path, tiny_bundle_fp32: Path) -> None:
    for b in (tiny_bundle, tiny_bundle_fp32):
        validate_manifest(json.loads((b / "manifest.json").read_text()), b / "manifest.json")


def _set(m: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    obj: Any = m
    for p in parents:
        obj = obj[int(p)] if isinstance(obj, list) else obj[p]
    if value is _DEL:
        del obj[last]
    elif isinstance(obj, list):
        obj[int(last)] = value
    else:
        obj[last] = value


_DEL = object()
Q = "edge.quantization"
# (field changed, new value, field the message names, words it contains)
CASES: list[tuple[str, Any, str, str]] = [
    ("mist_kit_version", 3, "mist_kit_version", "version string"),
    ("mist_kit_version", "x", "mist_kit_version", "version string"),
    ("model_name", "../etc", "model_name", "without '/'"),
    ("backbone", None, "backbone", "JSON object"),
    ("backbone.weights_sha256", "abc", "backbone.weights_sha256", "64 lowercase hex"),
    ("backbone.num_blocks", 0, "backbone.num_blocks", "integer in 1..4096"),
    ("backbone.num_blocks", 7, "cloud.plan.num_blocks", "differs from backbone.num_blocks 7"),
    ("backbone.embed_dim", 32, "cloud.plan.tensors[0].shape", ", 32] for 'gather:"),
    ("backbone.num_prefix_tokens", 100_000, "backbone.num_prefix_tokens", "not below num_tokens"),
    ("backbone.num_prefix_tokens", 0, "cloud.plan.tensors[0].codec.prefix", "expected 0"),
    ("k", 2.0, "k", "integer in 0..4096"),
    ("k", 1, "k", "differs from method.k"),
    ("k", _DEL, "k", "missing field"),
    ("method.params", [], "method.params", "object of names"),
    ("method.params.rank", math.nan, "method.params", "finite numbers"),
    ("method.params.rank", {"a": 1}, "method.params", "flat lists"),
    ("cloud.file", None, "cloud.file", "relative file path"),
    ("cloud.file", "other.onnx", "cloud.file", "not listed in 'files'"),
    ("cloud.inputs.0.shape", [-1, 3, 48, 48], "cloud.inputs", "input.size"),
    ("cloud.outputs.0.dtype", "float32", "cloud.outputs", "encoded tensors"),
    ("cloud.plan.tensors.0.codec.pool", True, "cloud.plan.tensors[0].codec", "fields disagree"),
    ("cloud.plan.tensors.0.codec.quant", "int4", "cloud.plan.tensors[0].codec", "fields disagree"),
    ("cloud.plan.tensors.0.codec.scale", [1.0], "cloud.plan.tensors[0].codec", "scale"),
    ("cloud.plan.tensors.0.codec.tensor", "other", "cloud.plan.tensors[0].codec", "differ from the tensor"),
    ("edge.tflite", "", "edge.tflite", "relative file path"),
    ("edge.reference", _DEL, "edge.reference", "missing field"),
    ("edge.outputs.0.shape", [-1, 7], "edge.outputs", "head.embedding_dim"),
    ("edge.decoded_inputs", {"other": [17, 64]}, "edge.decoded_inputs", "names differ"),
    ("edge.decoded_inputs.gather", [1, 2], "edge.decoded_inputs.gather", "decodes ["),
    (Q, [], Q, "JSON object"),
    (f"{Q}.mode", "fast", f"{Q}.mode", "'dynamic', 'static'"),
    (f"{Q}.format", "qdq", f"{Q}.format", "exactly when mode is 'static'"),
    (f"{Q}.percentile", 50, f"{Q}.percentile", "90..100"),
    (f"{Q}.per_channel", 1, f"{Q}.per_channel", "true or false"),
    (f"{Q}.agreement", 0.5, f"{Q}.agreement", "below min_agreement"),
    (f"{Q}.min_agreement", 0, f"{Q}.min_agreement", "(0, 1]"),
    (f"{Q}.int8_ops", {"MatMulInteger": -1}, f"{Q}.int8_ops", "counts >= 0"),
    (f"{Q}.runtime_int8_ops", {}, f"{Q}.runtime_int8_ops", "no int8 operator"),
    (f"{Q}.nodes.0.reduction_dim", 0, f"{Q}.nodes", "entry 0"),
    (f"{Q}.nodes.0.int8", "yes", f"{Q}.nodes", "entry 0"),
    (f"{Q}.embedding_sqnr_db", math.nan, f"{Q}.embedding_sqnr_db", "finite number"),
    ("head.file", _DEL, "head.file", "missing field"),
    ("head.num_classes", 9, "head.num_classes", "but 'classes' lists"),
    ("parity", None, "parity", "JSON object"),
    ("parity.cloud_max_abs_err", -1, "parity.cloud_max_abs_err", "finite number in 0..1e+30"),
    ("parity.cloud_max_rel_err", math.inf, "parity.cloud_max_rel_err", "finite number"),
    ("parity.edge_top1_agreement", 1.5, "parity.edge_top1_agreement", "0..1"),
    ("parity.edge_top1_agreement", 0.123, "parity.edge_top1_agreement", "differs from edge.quantization.agreement"),
    ("parity.edge_top1_fp32", "0.9", "parity.edge_top1_fp32", "or null"),
    ("parity.n_eval", 0, "parity.eval_data", "null exactly when parity.n_eval is 0"),
    ("parity.n_eval", 2.5, "parity.n_eval", "integer"),
    ("parity.eval_data", _DEL, "parity.eval_data", "missing field"),
    ("parity.n_cloud_images", 0, "parity.n_cloud_images", "integer in 1.."),
]


@pytest.mark.parametrize(("dotted", "value", "named", "words"), CASES, ids=[f"{c[0]}={c[1]!r}"[:60] for c in CASES])
def test_a_malformed_field_is_one_line_naming_it(manifest: dict[str, Any], dotted: str, value: Any, named: str,
                                                 words: str) -> None:
    m = copy.deepcopy(manifest)
    assert "gather" in m["edge"]["decoded_inputs"] and m["edge"]["quantization"]["nodes"]  # what CASES edit
    _set(m, dotted, value)
    with pytest.raises(BundleError) as err:
        validate_manifest(m, "b/manifest.json")
    msg = str(err.value)
    assert "\n" not in msg and err.value.exit_code == 2
    assert msg.startswith(f"b/manifest.json: field '{named}'") or msg == f"b/manifest.json: missing field '{named}'", \
        msg
    assert words in msg, msg


def test_an_fp32_edge_graph_has_null_quantization_and_full_agreement(manifest: dict[str, Any]) -> None:
    m = copy.deepcopy(manifest)
    m["edge"]["quantization"] = None  # an fp32 edge graph: parity agreement must then be 1.0 (itself)
    m["parity"]["edge_top1_agreement"] = 0.5
    with pytest.raises(BundleError, match=r"field 'parity.edge_top1_agreement': must be 1.0 for an fp32 edge graph"):
        validate_manifest(m, "b/manifest.json")
    m["parity"]["edge_top1_agreement"] = 1.0
    validate_manifest(m, "b/manifest.json")
