"""Split export on the tiny checkpoint: files vs manifest, bundle chain vs torch, int8-ness, deploy files."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from mist_kit.runtime.manifest import files_table, open_bundle


def _torch_top1(checkpoint: str, pixels: np.ndarray) -> np.ndarray:
    import torch

    from mist_kit.backbone import load_backbone_for
    from mist_kit.backbone_run import CloudModule
    from mist_kit.checkpoint import load_checkpoint

    config, method = load_checkpoint(checkpoint)
    cloud = CloudModule(load_backbone_for(config.backbone), method.plan).eval()
    with torch.no_grad():
        return method(dict(zip(method.plan.names, cloud(torch.from_numpy(pixels)), strict=True))).numpy().argmax(1)


def _test_pixels(digits_lists: dict, manifest: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    from mist_kit.data import load_image_list, load_pixels

    images = load_image_list(digits_lists["test"])
    spec = manifest["input"]
    px = np.stack([load_pixels(p, spec["size"], spec["mean"], spec["std"]) for p in images.paths[:n]])
    return px.astype(np.float32), np.asarray(images.labels[:n])


@pytest.mark.parametrize("fixture", ["tiny_bundle", "tiny_bundle_fp32"])
def test_bundle_files_match_manifest(fixture: str, request: pytest.FixtureRequest) -> None:
    bundle = request.getfixturevalue(fixture)
    manifest = open_bundle(bundle)  # verifies every listed file's size and sha256
    assert manifest["files"] == files_table(bundle), "a file on disk is missing from the manifest"
    for rel in ("cloud.onnx", "edge.onnx", "edge.fp32.onnx", "head.safetensors",
                "deploy/kserve-inferenceservice.yaml"):
        assert rel in manifest["files"]
    assert [(e["name"], e["dtype"]) for e in manifest["edge"]["inputs"]] == \
        [(e["name"], e["dtype"]) for e in manifest["cloud"]["outputs"]]
    assert manifest["cloud"]["inputs"] == [{"name": "pixel_values", "dtype": "float32", "shape": [-1, 3, 32, 32]}]
    if fixture == "tiny_bundle":  # the export default for an fp32-trained checkpoint: the int8-channel codec
        assert manifest["cloud"]["plan"]["tensors"][0]["codec"]["name"] == "int8-channel"
        assert manifest["cloud"]["outputs"] == [{"name": "gather_q", "dtype": "int8", "shape": [-1, 5, 64]}]
    else:
        assert manifest["cloud"]["plan"]["tensors"][0]["codec"]["name"] == "fp32"
        assert manifest["cloud"]["outputs"] == [{"name": "gather", "dtype": "float32", "shape": [-1, 5, 64]}]
    assert manifest["edge"]["outputs"] == [{"name": "embedding", "dtype": "float32", "shape": [-1, 64]}]
    p = manifest["parity"]
    assert p["cloud_max_abs_err"] < 1e-3 and p["edge_top1_agreement"] >= 0.99 and p["n_eval"] >= 200
    assert p["eval_data"] == "val.txt"  # held out: the tiny checkpoint was not refit on val


def test_bundle_chain_gives_torch_top1(tiny_bundle_fp32: Path, tiny_checkpoint: dict, digits_lists: dict) -> None:
    from mist_kit.exporters.verify import run_chain

    manifest = open_bundle(tiny_bundle_fp32)
    pixels, labels = _test_pixels(digits_lists, manifest, 400)
    ref = _torch_top1(tiny_checkpoint["checkpoint"], pixels)
    fp32 = run_chain(tiny_bundle_fp32, manifest, pixels, "reference").argmax(1)
    int8 = run_chain(tiny_bundle_fp32, manifest, pixels, "file").argmax(1)
    assert np.array_equal(fp32, ref), "cloud.onnx -> edge.fp32.onnx -> head must reproduce torch top-1 exactly"
    assert (int8 == ref).mean() >= 0.98, f"int8 chain agrees with torch on only {(int8 == ref).mean():.3f}"
    assert abs((int8 == labels).mean() - (ref == labels).mean()) <= 0.02


def test_default_codec_chain_agrees_with_torch(tiny_bundle: Path, tiny_checkpoint: dict,
                                               digits_lists: dict) -> None:
    """int8 features on the wire and an int8 edge graph: still the torch checkpoint's answers (>= 98%)."""
    from mist_kit.exporters.verify import run_chain

    manifest = open_bundle(tiny_bundle)
    pixels, labels = _test_pixels(digits_lists, manifest, 400)
    ref = _torch_top1(tiny_checkpoint["checkpoint"], pixels)
    for graph in ("reference", "file"):
        pred = run_chain(tiny_bundle, manifest, pixels, graph).argmax(1)
        assert (pred == ref).mean() >= 0.98, f"{graph}: agrees with torch on only {(pred == ref).mean():.3f}"
        assert abs((pred == labels).mean() - (ref == labels).mean()) <= 0.02


def test_int8_graph_really_is_int8(tiny_bundle_fp32: Path) -> None:
    from mist_kit.exporters.onnx_utils import int8_op_counts
    from mist_kit.exporters.quantize import runtime_ops

    manifest = open_bundle(tiny_bundle_fp32)
    edge = onnx.load(str(tiny_bundle_fp32 / "edge.onnx"))
    ref = onnx.load(str(tiny_bundle_fp32 / "edge.fp32.onnx"))
    assert int8_op_counts(edge), "edge.onnx holds no quantization operators"
    assert not int8_op_counts(ref)
    executed = runtime_ops(edge)
    # int8 only where it pays (exporters/int8_nodes.py): the 4 blocks' D-reduction projections (3 fused q|k|v,
    # then the last block's k|v and cls-row q), each recorded in the manifest and executed as an int8 op
    int8_nodes = [n for n in manifest["edge"]["quantization"]["nodes"] if n["int8"]]
    assert sum(executed.values()) == len(int8_nodes) >= 5, executed
    assert manifest["edge"]["quantization"]["runtime_int8_ops"] == executed
    int8_weights = [i for i in edge.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8_weights, "no int8 weight tensors stored"


THIRD_PARTY = r'''
import json, struct, sys
import numpy as np, onnxruntime as ort
from PIL import Image
bundle, images = sys.argv[1], json.loads(sys.argv[2])
m = json.load(open(f"{bundle}/manifest.json"))
def safetensors(path):  # the format is 8-byte header length + JSON header + raw little-endian data
    raw = open(path, "rb").read(); n = struct.unpack("<Q", raw[:8])[0]; header = json.loads(raw[8:8 + n])
    return {k: np.frombuffer(raw[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]],
                             dtype={"F32": np.float32}[v["dtype"]]).reshape(v["shape"])
            for k, v in header.items() if k != "__metadata__"}
inp = m["input"]; assert inp["layout"] == "NCHW" and inp["resize"] == "bicubic"
def prep(path):
    img = Image.open(path).convert("RGB").resize((inp["size"], inp["size"]), Image.Resampling.BICUBIC)
    x = (np.asarray(img, np.float32) / 255.0 - np.array(inp["mean"], np.float32)) / np.array(inp["std"], np.float32)
    return x.transpose(2, 0, 1)
x = np.stack([prep(p) for p in images]).astype(np.float32)
cloud = ort.InferenceSession(f"{bundle}/{m['cloud']['file']}", providers=["CPUExecutionProvider"])
edge = ort.InferenceSession(f"{bundle}/{m['edge']['file']}", providers=["CPUExecutionProvider"])
enc = cloud.run([o["name"] for o in m["cloud"]["outputs"]], {m["cloud"]["inputs"][0]["name"]: x})
emb = edge.run(None, {i["name"]: t for i, t in zip(m["edge"]["inputs"], enc)})[0]
head = safetensors(f"{bundle}/{m['head']['file']}")
pred = (emb @ head["weight"].T + head["bias"]).argmax(1)
assert not any(k.startswith(("torch", "mist_kit", "timm", "onnx.")) for k in sys.modules)
print(json.dumps([m["classes"][i] for i in pred]))
'''


def test_third_party_runs_bundle_from_manifest_alone(tiny_bundle: Path, tiny_checkpoint: dict,
                                                     digits_lists: dict) -> None:
    import subprocess
    import sys

    from mist_kit.data import load_image_list

    images = load_image_list(digits_lists["test"])
    paths = [str(p) for p in images.paths[:120]]
    done = subprocess.run([sys.executable, "-c", THIRD_PARTY, str(tiny_bundle), json.dumps(paths)],
                          capture_output=True, text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr[-2000:]
    names = json.loads(done.stdout)
    manifest = open_bundle(tiny_bundle)
    pixels, _ = _test_pixels(digits_lists, manifest, 120)
    ref = [manifest["classes"][i] for i in _torch_top1(tiny_checkpoint["checkpoint"], pixels)]
    assert np.mean([a == b for a, b in zip(names, ref, strict=True)]) >= 0.98


def _model_config_pb2():
    import tritonclient

    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_deploy_files_parse_and_match_graph(tiny_bundle: Path) -> None:
    pytest.importorskip("tritonclient")
    yaml = pytest.importorskip("yaml")
    from google.protobuf import text_format

    from mist_kit.exporters.onnx_utils import signature

    manifest = open_bundle(tiny_bundle)
    name = manifest["model_name"]
    repo = tiny_bundle / "deploy" / "triton" / name
    cfg = text_format.Parse((repo / "config.pbtxt").read_text(), _model_config_pb2().ModelConfig())
    inputs, outputs = signature(onnx.load(str(repo / "1" / "model.onnx")))
    assert cfg.name == name and cfg.backend == "onnxruntime" and cfg.max_batch_size > 0
    assert cfg.HasField("dynamic_batching")
    triton_type = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}
    dtype = _model_config_pb2().DataType.Value
    for got, want in ((cfg.input, inputs), (cfg.output, outputs)):
        assert [(t.name, t.data_type, list(t.dims)) for t in got] == \
            [(w["name"], dtype(triton_type[w["dtype"]]), w["shape"][1:]) for w in want]
    files = manifest["files"]
    assert files[f"deploy/triton/{name}/1/model.onnx"]["sha256"] == files["cloud.onnx"]["sha256"]
    isvc = yaml.safe_load((tiny_bundle / "deploy" / "kserve-inferenceservice.yaml").read_text())
    assert isvc["kind"] == "InferenceService" and isvc["apiVersion"].startswith("serving.kserve.io/")
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "v2" and model["storageUri"].endswith(f"{name}/deploy/triton")
    assert isvc["metadata"]["name"].replace("-", "").isalnum() and isvc["metadata"]["name"].islower()
