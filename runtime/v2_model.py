"""The served cloud model: a bundle's cloud.onnx in onnxruntime, its v2 metadata, and request -> pixel batch.

Torch-free and framework-free (the HTTP layer lives in v2_server.py), so the same object answers the server, the
batcher and the tests. Images are decoded and preprocessed with `mist_kit.data`, the code the trainer used, so a
JPEG sent to the server becomes exactly the tensor `extract` would have computed from the same file.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.data import decode_image, preprocess
from mist_kit.errors import BundleError, DataError, MistError
from mist_kit.runtime.cloud_engine import check_choice, open_cloud_session, output_parity
from mist_kit.runtime.manifest import CLOUD_FILE, manifest_codecs, open_bundle
from mist_kit.runtime.v2_protocol import InferRequest, ProtocolError, Tensor, check_tensor, v2_datatype

IMAGE_INPUT = "image"
PIXELS_INPUT = "pixel_values"
MODEL_VERSION = "1"
# Smaller than mist_kit.data's file limit: a server decodes many requests at once, each image costs 3 B/pixel.
DEFAULT_MAX_IMAGE_PIXELS = 16_000_000
IMAGE_FORMATS = ("JPEG", "PNG")
ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
             "tensor(uint8)": "uint8", "tensor(int32)": "int32", "tensor(int64)": "int64", "tensor(double)": "float64"}


@dataclass(frozen=True)
class ServeConfig:
    """Server knobs; contradictory values are refused here, not discovered under load."""

    max_batch: int = 16
    max_delay_ms: float = 5.0
    max_queue: int = 64
    max_body_mb: float = 32.0
    timeout_s: float = 30.0
    threads: int = 0  # engine intra-op threads; 0 = all cores
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    engine: str = "onnxruntime"  # or "openvino" (see runtime/cloud_engine.py)
    precision: str = "fp32"  # "bf16": openvino only, where the CPU has native bf16
    parity_images: int = 4  # seeded images compared against onnxruntime fp32 at startup (non-reference engines)

    def __post_init__(self) -> None:
        from mist_kit.errors import UsageError

        if self.max_batch < 1 or self.max_queue < 1:
            raise UsageError(f"--max-batch ({self.max_batch}) and --max-queue ({self.max_queue}) must be >= 1")
        if self.max_delay_ms < 0 or self.timeout_s <= 0 or self.max_body_mb <= 0:
            raise UsageError("--max-delay-ms must be >= 0, --timeout-s and --max-body-mb > 0")
        if self.threads < 0:
            raise UsageError(f"--threads {self.threads}: must be >= 0 (0 = all cores)")
        check_choice(self.engine, self.precision)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * (1 << 20))


def _specs(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": e["name"], "datatype": v2_datatype(e["dtype"]), "shape": [int(d) for d in e["shape"]]}
            for e in entries]


class CloudModel:
    """cloud.onnx of a verified bundle in an engine session (onnxruntime or OpenVINO, runtime/cloud_engine.py),
    plus what the v2 endpoints report about it, including which engine and precision run and their parity."""

    def __init__(self, bundle_dir: str | Path, config: ServeConfig | None = None) -> None:

        self.config = config or ServeConfig()
        self.bundle_dir = Path(bundle_dir)
        self.manifest = open_bundle(bundle_dir, only=(CLOUD_FILE,))
        m = self.manifest
        self.name: str = m["model_name"]
        self.size = int(m["input"]["size"])
        self.mean, self.std = tuple(m["input"]["mean"]), tuple(m["input"]["std"])
        self.output_specs = _specs(m["cloud"]["outputs"])
        pixel_specs = _specs(m["cloud"]["inputs"])
        if [s["name"] for s in pixel_specs] != [PIXELS_INPUT]:
            raise BundleError(f"{bundle_dir}: cloud inputs {[s['name'] for s in pixel_specs]}, expected "
                              f"['{PIXELS_INPUT}'] (docs/CONTRACTS.md)")
        self.pixel_spec = pixel_specs[0]
        path = self.bundle_dir / m["cloud"].get("file", CLOUD_FILE)
        self.cloud_path = path
        engine, precision = self.config.engine, self.config.precision
        try:
            self.session, self.engine = open_cloud_session(path, self.config.threads or 0, engine, precision)
        except MistError:
            raise
        except Exception as exc:
            raise BundleError(f"{path}: {engine} cannot load it ({str(exc).splitlines()[0][:300]})") from None
        self._check_session()
        self.output_names = [s["name"] for s in self.output_specs]
        self.parity = self._parity() if (engine, precision) != ("onnxruntime", "fp32") else None

    def _check_session(self) -> None:
        """The graph must have the manifest's inputs and outputs (names, order, dtypes): the contract clients see."""
        got_in = [(i.name, ORT_TYPES.get(i.type, i.type)) for i in self.session.get_inputs()]
        got_out = [(o.name, ORT_TYPES.get(o.type, o.type)) for o in self.session.get_outputs()]
        want_in = [(e["name"], e["dtype"]) for e in self.manifest["cloud"]["inputs"]]
        want_out = [(e["name"], e["dtype"]) for e in self.manifest["cloud"]["outputs"]]
        if got_in != want_in or got_out != want_out:
            raise BundleError(f"{self.bundle_dir / CLOUD_FILE}: graph has inputs {got_in} outputs {got_out}, "
                              f"manifest says {want_in} {want_out}")

    def _parity(self) -> dict[str, Any]:
        """This engine's outputs against onnxruntime fp32 (the exporter's reference) on seeded N(0, 1) pixels:
        relative error per output, so a server states at startup how far its features are from the reference."""
        rng = np.random.default_rng(0)
        n = max(1, min(self.config.parity_images, self.config.max_batch))
        pixels = rng.standard_normal((n, 3, self.size, self.size), dtype=np.float32)
        reference, _ = open_cloud_session(self.cloud_path, self.config.threads or 0, "onnxruntime", "fp32")
        want = dict(zip(self.output_names, reference.run(self.output_names, {PIXELS_INPUT: pixels}), strict=True))
        del reference
        errors = output_parity(want, self.run(pixels))
        return {"reference": "onnxruntime fp32", "images": n, "inputs": "seeded N(0,1) pixels",
                "rel_err": {k: float(f"{v:.3g}") for k, v in errors.items()}}

    def engine_line(self) -> str:
        """One startup line: engine, precision that runs, and (for non-reference engines) parity."""
        e = self.engine
        line = f"engine: {e.engine} {e.version.split('-')[0]}, precision {e.precision}"
        if self.parity is not None:
            errs = ", ".join(f"{k} {v:.3g}" for k, v in self.parity["rel_err"].items())
            line += f"; relative error vs {self.parity['reference']} on {self.parity['images']} seeded images: {errs}"
        return line

    # --- v2 metadata -------------------------------------------------------------------------------------------
    def input_specs(self) -> list[dict[str, Any]]:
        return [{"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]}, self.pixel_spec]

    def metadata(self) -> dict[str, Any]:
        """v2 model metadata; `parameters` carries what a device needs to trust the features (codec, shape)."""
        m = self.manifest
        cloud_file = m["cloud"].get("file", CLOUD_FILE)
        return {
            "name": self.name, "versions": [MODEL_VERSION], "platform": "onnxruntime_onnx",
            "inputs": self.input_specs(), "outputs": self.output_specs,
            "parameters": {"codecs": manifest_codecs(m), "plan": m["cloud"]["plan"], "input": m["input"],
                           "k": m.get("k"), "method": m["method"].get("name"),
                           "backbone": m["backbone"].get("name"), "max_batch_size": self.config.max_batch,
                           "cloud_sha256": m["files"].get(cloud_file, {}).get("sha256"),
                           "image_input": {"name": IMAGE_INPUT, "formats": list(IMAGE_FORMATS),
                                           "note": "decoded and preprocessed per parameters.input"},
                           "engine": {**self.engine.as_dict(), "parity": self.parity}},
        }

    # --- request -> pixels -------------------------------------------------------------------------------------
    def _decode_one(self, data: bytes, index: int) -> np.ndarray:
        from PIL import Image

        name = f"input '{IMAGE_INPUT}'[{index}]"
        try:  # header-only read: refuse unknown formats and oversized images before any pixel is allocated
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
                w, h = probe.size
        except Image.DecompressionBombError:
            raise DataError(f"{name}: image is over the {self.config.max_image_pixels:,} pixel limit "
                            "(decompression bomb?)") from None
        except Exception:
            raise DataError(f"{name}: {len(data)} bytes that are not a {' or '.join(IMAGE_FORMATS)} image") from None
        if w * h > self.config.max_image_pixels:
            raise DataError(f"{name}: image is {w}x{h}, over this server's {self.config.max_image_pixels:,} "
                            "pixel limit (decompression bomb?)")
        return preprocess(decode_image(data, name), self.size, self.mean, self.std)

    def pixels_for(self, request: InferRequest) -> np.ndarray:
        """Validate a request's inputs against the metadata and return float32 (B, 3, H, W)."""
        if len(request.inputs) != 1 or request.inputs[0].name not in (IMAGE_INPUT, PIXELS_INPUT):
            got = [t.name for t in request.inputs]
            raise ProtocolError(f"request inputs {got}: send exactly one of '{IMAGE_INPUT}' (BYTES, encoded "
                                f"JPEG/PNG) or '{PIXELS_INPUT}' (FP32 {self.pixel_spec['shape']})")
        tensor = request.inputs[0]
        if tensor.name == PIXELS_INPUT:
            check_tensor(tensor, self.pixel_spec, self.config.max_batch)
            if not np.isfinite(tensor.data).all():
                raise ProtocolError(f"input '{PIXELS_INPUT}': contains NaN or infinity")
            return np.ascontiguousarray(tensor.data, dtype=np.float32)
        if tensor.datatype != "BYTES" or tensor.data.ndim not in (1, 2) or \
                (tensor.data.ndim == 2 and tensor.data.shape[1] != 1):
            raise ProtocolError(f"input '{IMAGE_INPUT}': {tensor.datatype} {list(tensor.shape)}, expected BYTES "
                                "[N] or [N, 1] with one encoded image per element")
        items = tensor.data.reshape(-1)
        if not 1 <= len(items) <= self.config.max_batch:
            raise ProtocolError(f"input '{IMAGE_INPUT}': {len(items)} images, this server takes "
                                f"1..{self.config.max_batch} per request (serve-cloud --max-batch)")
        return np.stack([self._decode_one(bytes(b), i) for i, b in enumerate(items)])  # (B, 3, H, W)

    def outputs_for(self, request: InferRequest) -> list[tuple[str, bool]]:
        """(output name, as binary) in response order; unknown requested names are an error."""
        if request.outputs is None:
            return [(n, request.binary_data_output) for n in self.output_names]
        chosen = []
        for out in request.outputs:
            if out.name not in self.output_names:
                raise ProtocolError(f"requested output '{out.name}' is not one of {self.output_names}")
            chosen.append((out.name, request.binary_data_output if out.binary is None else out.binary))
        return chosen

    # --- inference ---------------------------------------------------------------------------------------------
    def run(self, pixels: np.ndarray) -> dict[str, np.ndarray]:
        """One engine call on a (B, 3, H, W) batch; outputs are batch-first."""
        values = self.session.run(self.output_names, {PIXELS_INPUT: pixels})
        return dict(zip(self.output_names, values, strict=True))

    def warmup(self) -> None:
        self.run(np.zeros((1, 3, self.size, self.size), dtype=np.float32))

    def tensors(self, outputs: dict[str, np.ndarray], chosen: list[tuple[str, bool]]) -> list[Tensor]:
        specs = {s["name"]: s for s in self.output_specs}
        return [Tensor(name, specs[name]["datatype"], outputs[name]) for name, _ in chosen]
