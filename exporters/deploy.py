"""Deployment files for the cloud graph: a Triton model repository and a KServe InferenceService.

Both are generated from the exported graph's own signature (names, dtypes, dims), so a server started from them
accepts exactly what cloud.onnx takes. The Triton version directory holds the graph as a hard link to the bundle's
cloud.onnx (a copy where links are not possible): a valid repository without doubling the bundle on disk.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from mist_kit.errors import UsageError

TRITON_DIR = "triton"
KSERVE_FILE = "kserve-inferenceservice.yaml"
MAX_BATCH = 64
# Triton backends the generated config.pbtxt can name; all serve the bundle's own cloud.onnx.
TRITON_BACKENDS = ("onnxruntime", "openvino", "openvino-bf16")
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8",
                 "int32": "TYPE_INT32", "int64": "TYPE_INT64", "bool": "TYPE_BOOL"}


def triton_type(dtype: str) -> str:
    """Manifest dtype name -> Triton `data_type` enum name."""
    try:
        return _TRITON_TYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype!r} has no Triton type; known: {', '.join(_TRITON_TYPES)}") from None


def dns_name(name: str) -> str:
    """A Kubernetes-safe (DNS-1035) version of a model name: lowercase alphanumerics and '-', starting a letter."""
    s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if not s or not s[0].isalpha():
        s = "m-" + s
    return s[:63].rstrip("-")


def _tensor_block(entries: list[dict[str, Any]]) -> str:
    rows = []
    for e in entries:
        dims = ", ".join(str(d) for d in e["shape"][1:])  # batch dim is implicit with max_batch_size > 0
        rows.append(f'  {{\n    name: "{e["name"]}"\n    data_type: {triton_type(e["dtype"])}\n'
                    f"    dims: [ {dims} ]\n  }}")
    return ",\n".join(rows)


def _parameters(params: dict[str, str]) -> str:
    rows = [f'  {{\n    key: "{k}"\n    value: {{ string_value: "{v}" }}\n  }}' for k, v in params.items()]
    return "parameters [\n" + ",\n".join(rows) + "\n]\n"


def _backend_lines(backend: str) -> tuple[str, str]:
    """(lines after `name`, trailing parameters block) for one of TRITON_BACKENDS.

    Triton's OpenVINO backend reads the same model.onnx when told its file name (its default is model.xml); it
    parses only INFERENCE_NUM_THREADS, COMPILATION_NUM_THREADS, HINT_BF16, NUM_STREAMS and PERFORMANCE_HINT, so
    fp32 cannot be pinned there: on a CPU with native bf16, OpenVINO's CPU plugin default (bf16) applies.
    """
    if backend == "onnxruntime":
        return 'backend: "onnxruntime"\n', ""
    params = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if backend == "openvino-bf16":
        params["HINT_BF16"] = "YES"
    head = ('# OpenVINO CPU plugin: on CPUs with native bf16 it computes in bf16 by default (fp32 is not settable '
            'through this backend)\nbackend: "openvino"\ndefault_model_filename: "model.onnx"\n')
    return head, _parameters(params)


def triton_config(model_name: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
                  max_batch: int = MAX_BATCH, backend: str = "onnxruntime") -> str:
    """config.pbtxt text: the chosen backend (TRITON_BACKENDS) on the same model.onnx, the graph's
    inputs/outputs, dynamic batching on the batch axis."""
    if backend not in TRITON_BACKENDS:
        raise UsageError(f"--triton-backend {backend!r}: expected one of {', '.join(TRITON_BACKENDS)}")
    head, params = _backend_lines(backend)
    return (f'name: "{model_name}"\n{head}max_batch_size: {max_batch}\n'
            f"input [\n{_tensor_block(inputs)}\n]\noutput [\n{_tensor_block(outputs)}\n]\n"
            "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}\n"
            "instance_group [\n  {\n    count: 1\n    kind: KIND_CPU\n  }\n]\n" + params)


def kserve_yaml(model_name: str, storage_uri: str) -> str:
    """An InferenceService serving the Triton repository over the Open Inference Protocol (v2)."""
    return ("apiVersion: serving.kserve.io/v1beta1\nkind: InferenceService\n"
            f"metadata:\n  name: {dns_name(model_name)}\n"
            "  annotations:\n    mist-kit/role: cloud\nspec:\n  predictor:\n    model:\n      modelFormat:\n"
            "        name: triton\n      protocolVersion: v2\n      runtime: kserve-tritonserver\n"
            f"      storageUri: {storage_uri}\n      args:\n        - --strict-model-config=true\n"
            "      resources:\n        requests:\n          cpu: \"2\"\n          memory: 4Gi\n"
            "        limits:\n          cpu: \"4\"\n          memory: 8Gi\n")


def write_deploy(bundle_tmp: Path, cloud_file: str, model_name: str, inputs: list[dict[str, Any]],
                 outputs: list[dict[str, Any]], storage_uri: str | None = None,
                 backend: str = "onnxruntime") -> list[str]:
    """Write deploy/ inside a bundle being assembled; returns the relative paths written."""
    deploy = bundle_tmp / "deploy"
    version = deploy / TRITON_DIR / model_name / "1"
    version.mkdir(parents=True, exist_ok=True)
    target = version / "model.onnx"
    try:
        os.link(bundle_tmp / cloud_file, target)
    except OSError:
        shutil.copyfile(bundle_tmp / cloud_file, target)
    (deploy / TRITON_DIR / model_name / "config.pbtxt").write_text(triton_config(model_name, inputs, outputs,
                                                                                     backend=backend))
    uri = storage_uri or f"pvc://mist-models/{model_name}/deploy/{TRITON_DIR}"
    (deploy / KSERVE_FILE).write_text(kserve_yaml(model_name, uri))
    return [p.relative_to(bundle_tmp).as_posix() for p in sorted(deploy.rglob("*")) if p.is_file()]
