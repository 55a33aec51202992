"""A codec per sent tensor: what each tensor of a cloud plan looks like on the wire and after decoding.

Each tensor of a plan has its own codec spec (recorded in checkpoint `codecs` and manifest `cloud.plan`); a tensor
without one travels as plain float32. The codec's encoded tensors are named after the sent tensor (`gather` ->
`gather_q` for int8), so N tensors with N codecs never collide. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from mist_kit.runtime.codec.codec import Codec, TensorSpec
from mist_kit.runtime.plan import CloudPlan, SentTensor

Specs = Mapping[str, Mapping[str, Any]]


def tensor_codec(tensor: SentTensor, spec: Mapping[str, Any] | None, num_prefix_tokens: int) -> Codec:
    """The codec of one sent tensor (plain fp32 with its geometry when `spec` is None or fp32 by name)."""
    if spec is None or (spec.get("name", "fp32") == "fp32" and "tokens" not in spec):
        t, d = tensor.shape
        return Codec.from_spec({"name": "fp32", "tokens": t, "dim": d, "prefix": min(num_prefix_tokens, t - 1)
                                if t > 1 else 0, "tensor": tensor.name})
    codec = Codec.from_spec({**dict(spec), "tensor": tensor.name})
    return codec


def plan_codecs(plan: CloudPlan, specs: Specs, num_prefix_tokens: int) -> dict[str, Codec]:
    """{tensor name: Codec} in plan order; a spec for a tensor the plan does not send is an error."""
    unknown = sorted(set(specs) - set(plan.names))
    if unknown:
        from mist_kit.errors import CodecError

        raise CodecError(f"codecs for tensors {unknown} that the cloud plan does not send ({list(plan.names)})")
    return {t.name: tensor_codec(t, specs.get(t.name), num_prefix_tokens) for t in plan.tensors}


def decoded_shapes(plan: CloudPlan, specs: Specs) -> dict[str, tuple[int, int]]:
    """What the edge network receives per tensor after decoding: [T', D] (a pooling codec changes T)."""
    out = {}
    for t in plan.tensors:
        spec = specs.get(t.name) or {}
        tokens = spec.get("num_tokens")
        out[t.name] = (int(tokens) if isinstance(tokens, int) else t.shape[0], t.shape[1])
    return out


def encoded_outputs(codecs: Mapping[str, Codec]) -> list[TensorSpec]:
    """Every encoded tensor of every sent tensor, in plan order: cloud.onnx outputs = edge.onnx inputs."""
    return [spec for codec in codecs.values() for spec in codec.outputs()]


def bytes_per_image(codecs: Mapping[str, Codec]) -> int:
    """Bytes one image costs on the wire before zstd (every tensor, every encoded part)."""
    return sum(codec.bytes_per_image() for codec in codecs.values())


def roundtrips(codecs: Mapping[str, Codec]) -> dict[str, Callable[[np.ndarray], np.ndarray] | None]:
    """The encode->decode round trip per tensor (None where lossless): what the edge network is trained on."""
    return {name: None if c.lossless else c.roundtrip for name, c in codecs.items()}


def encode_all(codecs: Mapping[str, Codec], tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Encode every sent tensor (name -> float32 [B, T, D]) into the wire tensors."""
    out: dict[str, np.ndarray] = {}
    for name, codec in codecs.items():
        out.update(codec.encode(tensors[name]))
    return out


def decode_all(codecs: Mapping[str, Codec], encoded: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Decode the wire tensors back into the sent tensors (name -> float32 [B, T', D])."""
    out = {}
    for name, codec in codecs.items():
        mine = {s.name: encoded[s.name] for s in codec.outputs()}
        out[name] = codec.decode(mine)
    return out
