"""`--tflite`: an int8 LiteRT edge graph (litert-torch PT2E quantizer, validated with ai-edge-litert).

Status in this build: NOT AVAILABLE. litert-torch 0.10 and ai-edge-litert 2.3 do resolve from PyPI for Python 3.11
(`pip install 'mist-kit[tflite]'`), but they pull jax, transformers and torchao and pin typing_extensions/pydantic
versions that conflict with the serve stack, and the conversion could not be built and validated here. Rather than
ship an unvalidated edge.tflite, the option fails fast with one line, before any export work starts.
"""

from __future__ import annotations

import importlib.util

from mist_kit.errors import DependencyError, ExportError

REQUIRED = ("litert_torch", "ai_edge_litert")


def require_tflite() -> None:
    """Fail fast (before exporting anything) with a one-line error saying why edge.tflite cannot be written."""
    missing = [m for m in REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise DependencyError(f"--tflite needs litert-torch and ai-edge-litert ({', '.join(missing)} not installed): "
                              "pip install 'mist-kit[tflite]', or export without --tflite")
    raise ExportError("--tflite: LiteRT int8 conversion is not validated in this mist-kit build (the ORT int8 "
                      "edge.onnx is); export without --tflite")
