"""ONNX fragments of every codec: the encoder ends cloud.onnx, the decoder begins edge.onnx.

Each fragment performs the float operations of the numpy reference (`mist_kit.runtime.codec.Codec`) in the
same order (pooling as a left-to-right Add chain over Gathers, then a power-of-two Mul; Div, Round half to even,
Clip, Cast), so integer outputs are bit-identical to the reference; tests prove it with onnxruntime. PCA's MatMul
is the exception: BLAS and MLAS sum in different orders, so its int8 codes may differ by one step on values that
sit on a rounding boundary.

Seam for the exporter: `attach_encoder(cloud_model, codec)` and `attach_decoder(edge_model, codec)` rewrite a
model whose single float32 features output/input is [B, T, D] (resp. [B, T', D]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mist_kit.errors import ExportError
from mist_kit.runtime.codec import Codec, Quant

MIN_OPSET = 13  # QuantizeLinear with axis, ReduceMax with axes attribute
ONNX_DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int8": TensorProto.INT8,
               "uint8": TensorProto.UINT8}


@dataclass
class Fragment:
    """Nodes + initializers that turn one tensor into others; names are prefixed to avoid collisions."""

    prefix: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)

    def const(self, name: str, value: np.ndarray | float | int, dtype: type = np.float32) -> str:
        full = f"{self.prefix}{name}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), full))
        return full

    def op(self, op_type: str, inputs: list[str], out: str | None = None, **attrs: object) -> str:
        name = out or f"{self.prefix}{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=f"{self.prefix}n{len(self.nodes)}",
                                           **attrs))
        return name


def _pool(f: Fragment, x: str, codec: Codec) -> str:
    """(B, T, D) -> (B, T', D): p x p mean of the patch grid, prefix tokens concatenated in front; or the prefix
    tokens alone for a prefix-only codec."""
    p, n, g, d = codec.params.pool, int(codec.prefix or 0), codec.grid, int(codec.dim or 0)
    if codec.params.prefix_only:
        return f.op("Slice", [x, f.const("zstart", [0], np.int64), f.const("zend", [n], np.int64),
                              f.const("zaxis", [1], np.int64)])
    if p == 1:
        return x
    big = np.iinfo(np.int64).max
    patches = f.op("Slice", [x, f.const("pstart", [n], np.int64), f.const("pend", [big], np.int64),
                             f.const("paxis", [1], np.int64)])
    v = f.op("Reshape", [patches, f.const("grid6", [-1, g // p, p, g // p, p, d], np.int64)])
    acc = None
    for i in range(p):
        row = f.op("Gather", [v, f.const(f"i{i}", i, np.int64)], axis=2)  # (B, g, g, p, D)
        for j in range(p):
            cell = f.op("Gather", [row, f.const(f"j{i}_{j}", j, np.int64)], axis=3)  # (B, g, g, D)
            acc = cell if acc is None else f.op("Add", [acc, cell])
    assert acc is not None
    mean = f.op("Mul", [acc, f.const("inv_area", 1.0 / (p * p))])
    flat = f.op("Reshape", [mean, f.const("flat3", [-1, (g // p) ** 2, d], np.int64)])
    if n == 0:
        return flat
    prefix = f.op("Slice", [x, f.const("zstart", [0], np.int64), f.const("zend", [n], np.int64),
                            f.const("zaxis", [1], np.int64)])
    return f.op("Concat", [prefix, flat], axis=1)


def _round_clip(f: Fragment, x: str, scale: str, quant: Quant) -> str:
    lo, hi = {Quant.INT4: (-8.0, 7.0)}.get(quant, (-128.0, 127.0))
    r = f.op("Round", [f.op("Div", [x, scale])])
    return f.op("Clip", [r, f.const(f"lo{len(f.nodes)}", lo), f.const(f"hi{len(f.nodes)}", hi)])


def encoder_fragment(codec: Codec, x: str, prefix: str = "codec_enc/",
                     opset: int = 17) -> tuple[Fragment, list[str]]:
    """Nodes computing the codec's outputs (named as `codec.outputs()`) from float32 features `x`."""
    f = Fragment(prefix)
    names = [s.name for s in codec.outputs()]
    y = _pool(f, x, codec)
    q = codec.params.quant
    if q is Quant.FP32:
        f.op("Identity", [y], names[0])
    elif q is Quant.FP16:
        f.op("Cast", [y], names[0], to=TensorProto.FLOAT16)
    elif q is Quant.INT8 and codec.prefix_scale is None:
        assert codec.scale is not None
        f.op("QuantizeLinear", [y, f.const("scale", codec.scale), f.const("zp", np.zeros(len(codec.scale)), np.int8)],
             names[0], axis=2)
    elif q in (Quant.INT8, Quant.INT4):
        vals = _round_clip(f, y, f.const("scale", codec.full_scale()), q)
        if q is Quant.INT8:
            f.op("Cast", [vals], names[0], to=TensorProto.INT8)
        else:
            pairs = f.op("Reshape", [vals, f.const("pairs", [-1, int(codec.out_tokens or 0), int(codec.dim or 0) // 2,
                                                             2], np.int64)])
            lo = f.op("Add", [f.op("Gather", [pairs, f.const("even", 0, np.int64)], axis=3), f.const("off_lo", 8.0)])
            hi = f.op("Add", [f.op("Gather", [pairs, f.const("odd", 1, np.int64)], axis=3), f.const("off_hi", 8.0)])
            packed = f.op("Add", [lo, f.op("Mul", [hi, f.const("sixteen", 16.0)])])
            f.op("Cast", [packed], names[0], to=TensorProto.UINT8)
    elif q is Quant.INT8_TOKEN:
        if opset >= 18:  # axes moved from attribute to input in opset 18
            amax = f.op("ReduceMax", [f.op("Abs", [y]), f.const("axes", [2], np.int64)], keepdims=1)  # (B, T', 1)
        else:
            amax = f.op("ReduceMax", [f.op("Abs", [y])], axes=[2], keepdims=1)
        scale = f.op("Max", [f.op("Div", [amax, f.const("qmax", 127.0)]), f.const("min_scale", 1e-12)], names[1])
        f.op("Cast", [_round_clip(f, y, scale, q)], names[0], to=TensorProto.INT8)
    else:  # PCA
        assert codec.mean is not None and codec.basis is not None and codec.scale is not None
        proj = f.op("MatMul", [f.op("Sub", [y, f.const("mean", codec.mean)]), f.const("basis", codec.basis)])
        f.op("Cast", [_round_clip(f, proj, f.const("scale", codec.scale), q)], names[0], to=TensorProto.INT8)
    return f, names


def decoder_fragment(codec: Codec, out: str, prefix: str = "codec_dec/") -> Fragment:
    """Nodes computing float32 features `out` [B, T', D] from the codec's encoded inputs."""
    f = Fragment(prefix)
    q = codec.params.quant
    specs = codec.outputs()
    if q in (Quant.FP32, Quant.FP16):
        f.op("Cast", [specs[0].name], out, to=TensorProto.FLOAT)
    elif q is Quant.INT8 and codec.prefix_scale is None:
        assert codec.scale is not None
        f.op("DequantizeLinear", [specs[0].name, f.const("scale", codec.scale),
                                  f.const("zp", np.zeros(len(codec.scale)), np.int8)], out, axis=2)
    elif q is Quant.INT8:
        f.op("Mul", [f.op("Cast", [specs[0].name], to=TensorProto.FLOAT), f.const("scale", codec.full_scale())], out)
    elif q is Quant.INT8_TOKEN:
        f.op("Mul", [f.op("Cast", [specs[0].name], to=TensorProto.FLOAT), specs[1].name], out)
    elif q is Quant.INT4:
        packed = f.op("Cast", [specs[0].name], to=TensorProto.FLOAT)  # (B, T', D/2)
        hi = f.op("Floor", [f.op("Div", [packed, f.const("sixteen", 16.0)])])
        lo = f.op("Sub", [packed, f.op("Mul", [hi, f.const("sixteen_b", 16.0)])])
        axis = f.const("last", [-1], np.int64)
        lo_v = f.op("Unsqueeze", [f.op("Sub", [lo, f.const("eight", 8.0)]), axis])
        hi_v = f.op("Unsqueeze", [f.op("Sub", [hi, f.const("eight_b", 8.0)]), axis])
        vals = f.op("Reshape", [f.op("Concat", [lo_v, hi_v], axis=-1),
                                f.const("shape3", [-1, int(codec.out_tokens or 0), int(codec.dim or 0)], np.int64)])
        f.op("Mul", [vals, f.const("scale", codec.full_scale())], out)
    else:  # PCA
        assert codec.mean is not None and codec.basis is not None and codec.scale is not None
        deq = f.op("Mul", [f.op("Cast", [specs[0].name], to=TensorProto.FLOAT), f.const("scale", codec.scale)])
        proj = f.op("MatMul", [deq, f.const("basis_t", np.ascontiguousarray(codec.basis.T))])
        f.op("Add", [proj, f.const("mean", codec.mean)], out)
    return f


def _value_infos(codec: Codec) -> list[onnx.ValueInfoProto]:
    return [helper.make_tensor_value_info(s.name, ONNX_DTYPES[s.dtype], ["batch", *s.shape]) for s in codec.outputs()]


def _model(graph: onnx.GraphProto, opset: int) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="mist-kit")
    model.ir_version = min(model.ir_version, 8)  # onnxruntime >= 1.17 reads IR 8 at opset <= 17
    return model


def encoder_model(codec: Codec, opset: int = 17) -> onnx.ModelProto:
    """Standalone encoder: input `features` float32 [B, T, D] -> the codec's outputs."""
    f, _ = encoder_fragment(codec, "features_in", opset=opset)
    inp = helper.make_tensor_value_info("features_in", TensorProto.FLOAT, ["batch", codec.tokens, codec.dim])
    return _model(helper.make_graph(f.nodes, f"encode_{codec.name}", [inp], _value_infos(codec), f.inits), opset)


def decoder_model(codec: Codec, opset: int = 17) -> onnx.ModelProto:
    """Standalone decoder: the codec's outputs -> `features` float32 [B, T', D]."""
    f = decoder_fragment(codec, "features_out")
    out = helper.make_tensor_value_info("features_out", TensorProto.FLOAT, ["batch", codec.out_tokens, codec.dim])
    return _model(helper.make_graph(f.nodes, f"decode_{codec.name}", _value_infos(codec), [out], f.inits), opset)


def _opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return 0


def _single(items: list, what: str, given: str | None) -> str:
    names = [v.name for v in items]
    if given is not None:
        if given not in names:
            raise ExportError(f"{what}: no tensor named {given!r} (has {names})")
        return given
    if len(names) != 1:
        raise ExportError(f"{what}: expected exactly one features tensor, got {names}; name it explicitly")
    return names[0]


def as_codec(codec: Codec | dict[str, Any]) -> Codec:
    """Accept a fitted Codec or its recorded spec (as stored in checkpoint config and manifest)."""
    return codec if isinstance(codec, Codec) else Codec.from_spec(codec)


def _rename(g: onnx.GraphProto, old: str, new: str) -> None:
    """Rename tensor `old` everywhere in the graph's nodes (the codec reuses names like `features`)."""
    for node in g.node:
        for io in (node.input, node.output):
            for i, name in enumerate(io):
                if name == old:
                    io[i] = new


def _copy_for_codec(model: onnx.ModelProto, what: str, part: str) -> onnx.ModelProto:
    """A copy of `model` to splice a codec fragment into; its opset must have what the fragment uses."""
    if _opset(model) < MIN_OPSET:
        raise ExportError(f"{what} opset {_opset(model)} < {MIN_OPSET}, needed by the codec {part}")
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _yield_name(g: onnx.GraphProto, feat: str, codec: Codec, suffix: str) -> str:
    """If the codec's own tensors are called `feat`, rename the graph's `feat` (+ suffix) and return the new name."""
    if feat not in {s.name for s in codec.outputs()}:
        return feat
    _rename(g, feat, feat + suffix)
    return feat + suffix


def attach_encoder(cloud_model: onnx.ModelProto, codec: Codec | dict[str, Any],
                   features_output: str | None = None) -> onnx.ModelProto:
    """Append the codec's encoder to the cloud graph: its features output is replaced by the encoded tensors."""
    codec = as_codec(codec)
    if codec.lossless:
        return cloud_model
    model = _copy_for_codec(cloud_model, "cloud graph", "encoder")
    g = model.graph
    feat = _single(list(g.output), "cloud graph outputs", features_output)
    outputs = list(g.output)
    at = [o.name for o in outputs].index(feat)
    feat = _yield_name(g, feat, codec, "_raw")  # e.g. fp16 also names its output `features`
    f, _ = encoder_fragment(codec, feat, prefix=f"codec_enc/{codec.tensor}/", opset=_opset(cloud_model))
    del g.output[:]
    g.output.extend(outputs[:at] + _value_infos(codec) + outputs[at + 1:])  # encoded tensors where the raw one was
    g.node.extend(f.nodes)
    g.initializer.extend(f.inits)
    return model


def attach_decoder(edge_model: onnx.ModelProto, codec: Codec | dict[str, Any],
                   features_input: str | None = None) -> onnx.ModelProto:
    """Prepend the codec's decoder to the edge graph: its features input is replaced by the encoded tensors."""
    codec = as_codec(codec)
    if codec.lossless:
        return edge_model
    model = _copy_for_codec(edge_model, "edge graph", "decoder")
    g = model.graph
    init_names = {i.name for i in g.initializer}
    feat = _single([i for i in g.input if i.name not in init_names], "edge graph inputs", features_input)
    inputs = list(g.input)
    at = [i.name for i in inputs].index(feat)
    feat = _yield_name(g, feat, codec, "_decoded")  # the encoded input takes the name; the core reads the decoded
    f = decoder_fragment(codec, feat, prefix=f"codec_dec/{codec.tensor}/")  # one namespace per sent tensor
    del g.input[:]
    g.input.extend(inputs[:at] + _value_infos(codec) + inputs[at + 1:])  # in place: the plan's order is kept
    nodes = list(f.nodes) + list(g.node)  # decoder first: keeps the node list topologically sorted
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(f.inits)
    return model
