"""Typed validation of `manifest.json` fields, after the structural check in `read_manifest`.

Why a small schema of our own rather than msgspec or pydantic: on the device every MB counts, and measured
`python -c 'import X'` peak RSS over a 10 MB interpreter was +4 MB for msgspec and +7 MB for pydantic, against
0 for these ~100 lines; the checks are few and the messages must name the manifest field exactly. Each rule is
one line in `RULES` so the bundle format 2 fields (cloud.plan, edge.params, ...) can be added beside them.
Every failure is one BundleError line: `<manifest>: field 'input.size': expected an integer in 16..4096, got 0`.
After the per-field rules, `_consistent` checks what ties fields together (backbone vs cloud.plan, codecs vs
cloud.outputs, edge.outputs vs head, the named files vs `files`), so every field docs/CONTRACTS.md lists is checked
even where the device never reads it. Torch-free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mist_kit.errors import BundleError
from mist_kit.runtime.paths import check_relative

_MISSING = object()
DTYPES = ("bool", "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32",
          "float64")


class _Bad(Exception):
    """A field's value is wrong; the message says what was expected."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def int_in(lo: int, hi: int) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not _is_int(v) or not lo <= v <= hi:
            raise _Bad(f"expected an integer in {lo}..{hi}")
    return check


def floats(n: int, positive: bool = False) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, list) or len(v) != n or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and (x > 0 or not positive)
                for x in v):
            raise _Bad(f"expected {n} finite{' positive' if positive else ''} numbers")
    return check


def one_of(*choices: str) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if not isinstance(v, str) or v not in choices:
            raise _Bad(f"expected one of {', '.join(repr(c) for c in choices)} (what the runtime implements)")
    return check


def str_list(v: Any) -> None:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v) or len(set(v)) != len(v):
        raise _Bad("expected a non-empty list of distinct non-empty strings")


def non_empty_str(v: Any) -> None:
    if not isinstance(v, str) or not v:
        raise _Bad("expected a non-empty string")


def _path_why(exc: BundleError) -> str:
    """check_relative's reason without its 'path: ' prefix and its own ', got ...' (the caller adds that)."""
    return str(exc).removeprefix("path: ").split(", got ")[0]


def optional_path(v: Any) -> None:
    if v not in (None, ""):
        try:
            check_relative(v, "path")
        except BundleError as exc:
            raise _Bad(_path_why(exc)) from None


def tensor_specs(v: Any) -> None:
    """[{name, dtype, shape}], shape a list of positive ints except a leading batch -1."""
    if not isinstance(v, list) or not v:
        raise _Bad("expected a non-empty list of {name, dtype, shape}")
    names = set()
    for i, t in enumerate(v):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise _Bad(f"entry {i}: expected an object with a string 'name'")
        if t["name"] in names:
            raise _Bad(f"entry {i}: name {t['name']!r} repeats")
        names.add(t["name"])
        if t.get("dtype") not in DTYPES:
            raise _Bad(f"entry {i} ({t['name']}): dtype must be one of {', '.join(DTYPES)}")
        shape = t.get("shape")
        if not isinstance(shape, list) or not 1 <= len(shape) <= 8 or not all(
                _is_int(d) and (1 <= d <= 2**31 - 1 or (j == 0 and d == -1)) for j, d in enumerate(shape)):
            raise _Bad(f"entry {i} ({t['name']}): shape must be 1..8 positive integers, the batch may be -1")


def files_table(v: Any) -> None:
    if not isinstance(v, dict) or not v:
        raise _Bad("expected an object {relative path: {sha256, bytes}}")
    for rel, entry in v.items():
        try:
            check_relative(rel, "path")
        except BundleError as exc:
            raise _Bad(_path_why(exc)) from None
        if not isinstance(entry, dict) or not _is_int(entry.get("bytes")) or entry["bytes"] < 0:
            raise _Bad(f"{rel!r}: expected {{sha256: 64 hex digits, bytes: integer >= 0}}")
        sha = entry.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise _Bad(f"{rel!r}: sha256 must be 64 lowercase hex digits")


def is_object(v: Any) -> None:
    if not isinstance(v, dict):
        raise _Bad("expected a JSON object")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def number_in(lo: float, hi: float, nullable: bool = False) -> Callable[[Any], None]:
    def check(v: Any) -> None:
        if (v is not None or not nullable) and (not _is_num(v) or not lo <= v <= hi):
            raise _Bad(f"expected a finite number in {lo:g}..{hi:g}{' or null' if nullable else ''}")
    return check


def nullable(check: Callable[[Any], None]) -> Callable[[Any], None]:
    def wrapped(v: Any) -> None:
        if v is not None:
            check(v)
    return wrapped


def boolean(v: Any) -> None:
    if not isinstance(v, bool):
        raise _Bad("expected true or false")


def hex64(v: Any) -> None:
    if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise _Bad("expected 64 lowercase hex digits")


_VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+)*([.+-]?[A-Za-z0-9.+-]*)?$")


def version(v: Any) -> None:
    if not isinstance(v, str) or len(v) > 64 or not _VERSION_RE.match(v):
        raise _Bad("expected a version string such as '0.1.0'")


def served_name(v: Any) -> None:
    """A model name servers use as a directory name (deploy/triton/<name>/): no separators, NUL or dot names."""
    if not isinstance(v, str) or not v or len(v) > 128 or v in (".", "..") or any(c in v for c in "/\\\0") \
            or not v.isprintable():
        raise _Bad("expected a printable name of 1..128 characters without '/', '\\' or NUL")


def check_served_name(v: Any, what: str) -> None:
    """`served_name` for a value a user typed (export --model-name): one UsageError line naming the option."""
    from mist_kit.errors import UsageError

    try:
        served_name(v)
    except _Bad as exc:
        raise UsageError(f"{what} {v!r}: {exc}") from None


def required_path(v: Any) -> None:
    try:
        check_relative(v, "path")
    except BundleError as exc:
        raise _Bad(_path_why(exc)) from None


def _param_value(v: Any) -> bool:
    scalar = v is None or isinstance(v, (str, bool)) or _is_num(v)
    return scalar or (isinstance(v, list) and len(v) <= 4096 and all(
        x is None or isinstance(x, (str, bool)) or _is_num(x) for x in v))


def method_params(v: Any) -> None:
    """The method's own hyper-parameters (rank, depth, pool...): typed per method by the checkpoint config; here
    JSON scalars or flat lists of them, finite."""
    if not isinstance(v, dict) or not all(isinstance(k, str) and k and _param_value(x) for k, x in v.items()):
        raise _Bad("expected an object of names to finite numbers, strings, booleans, null or flat lists of them")


def count_map(v: Any) -> None:
    if not isinstance(v, dict) or not all(isinstance(k, str) and k and _is_int(n) and 0 <= n <= 1 << 31
                                          for k, n in v.items()):
        raise _Bad("expected an object of op names to counts >= 0")


def names_list(v: Any) -> None:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v) or len(set(v)) != len(v):
        raise _Bad("expected a list of distinct non-empty strings")


def weights_digest(v: Any) -> None:
    """sha256 of the weights file, or 'pretrained:<timm name>' for hub weights (toolkit/backbone.py)."""
    if isinstance(v, str) and v.startswith("pretrained:") and len(v) > len("pretrained:"):
        return
    try:
        hex64(v)
    except _Bad:
        raise _Bad("expected the weights' sha256 (64 lowercase hex digits) or 'pretrained:<name>'") from None


def shape_map(v: Any) -> None:
    if not isinstance(v, dict) or not v or not all(
            isinstance(k, str) and k and isinstance(s, list) and 1 <= len(s) <= 8
            and all(_is_int(d) and 1 <= d <= 2**31 - 1 for d in s) for k, s in v.items()):
        raise _Bad("expected an object of tensor names to lists of 1..8 positive integers")


def int8_nodes(v: Any) -> None:
    """Every MatMul's int8 decision: [{node, op_type, int8, why, reduction_dim}]."""
    if not isinstance(v, list):
        raise _Bad("expected a list of {node, op_type, int8, why, reduction_dim}")
    for i, d in enumerate(v):
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) and d[k] for k in ("node", "op_type", "why")) \
                or not isinstance(d.get("int8"), bool) or "reduction_dim" not in d or not (
                    d["reduction_dim"] is None or (_is_int(d["reduction_dim"]) and 1 <= d["reduction_dim"] < 2**31)):
            raise _Bad(f"entry {i}: expected {{node, op_type, why: non-empty strings, int8: true/false, "
                       "reduction_dim: integer >= 1 or null}")
    if len({d["node"] for d in v}) != len(v):
        raise _Bad("a node is listed twice")
    if any(d["int8"] and d["reduction_dim"] is None for d in v):
        raise _Bad("an int8 node without its reduction_dim (only constant-weight products are made int8)")


_QUANT = "edge.quantization"

# (dotted field, required, check). Fields absent from a manifest and not required are skipped; an optional parent
# that is null (edge.quantization of a float edge graph) skips its children.
RULES: list[tuple[str, bool, Callable[[Any], None]]] = [
    ("model_name", True, served_name),
    ("mist_kit_version", True, version),
    ("backbone", True, is_object),
    ("backbone.name", True, non_empty_str),
    ("backbone.weights_sha256", True, weights_digest),
    ("backbone.num_blocks", True, int_in(1, 4096)),
    ("backbone.num_tokens", True, int_in(1, 1 << 20)),
    ("backbone.embed_dim", True, int_in(1, 1 << 20)),
    ("backbone.num_prefix_tokens", True, int_in(0, 1 << 20)),
    ("k", True, nullable(int_in(0, 4096))),  # the method's depth (information), = method.k
    ("method", True, is_object),
    ("method.name", True, non_empty_str),
    ("method.params", True, method_params),
    ("method.k", True, nullable(int_in(0, 4096))),
    ("input", True, is_object),
    ("input.size", True, int_in(16, 4096)),
    ("input.mean", True, floats(3)),
    ("input.std", True, floats(3, positive=True)),
    ("input.layout", False, one_of("NCHW")),
    ("input.resize", False, one_of("bicubic")),
    ("classes", True, str_list),
    ("files", True, files_table),
    ("cloud", True, is_object),
    ("cloud.file", True, required_path),
    ("cloud.inputs", True, tensor_specs),
    ("cloud.outputs", True, tensor_specs),
    ("cloud.plan", True, is_object),  # its tensors are parsed by runtime.plan.CloudPlan.from_dict
    ("edge", True, is_object),
    ("edge.params", True, int_in(0, 1 << 40)),
    ("edge.macs_per_image", True, int_in(0, 1 << 50)),
    ("edge.activation_bytes", True, int_in(0, 1 << 40)),
    ("edge.file", True, required_path),
    ("edge.reference", True, required_path),
    ("edge.tflite", True, nullable(required_path)),
    ("edge.inputs", True, tensor_specs),
    ("edge.outputs", True, tensor_specs),
    ("edge.decoded_inputs", True, shape_map),
    (_QUANT, True, nullable(is_object)),  # null: the edge graph is fp32 (nothing to quantize)
    (f"{_QUANT}.name", True, non_empty_str),
    (f"{_QUANT}.mode", True, one_of("dynamic", "static")),
    (f"{_QUANT}.per_channel", True, boolean),
    (f"{_QUANT}.reduce_range", True, boolean),
    (f"{_QUANT}.format", True, nullable(one_of("qdq", "qoperator"))),
    (f"{_QUANT}.calibration", True, nullable(one_of("minmax", "entropy", "percentile"))),
    (f"{_QUANT}.percentile", True, number_in(90, 100, nullable=True)),
    (f"{_QUANT}.op_types", True, names_list),
    (f"{_QUANT}.excluded_nodes", True, names_list),
    (f"{_QUANT}.quantized_nodes", False, nullable(names_list)),  # absent in bundles from before the node table
    (f"{_QUANT}.int8_ops", True, count_map),
    (f"{_QUANT}.runtime_int8_ops", True, count_map),
    (f"{_QUANT}.agreement", True, number_in(0, 1)),
    (f"{_QUANT}.min_agreement", True, number_in(0, 1)),
    (f"{_QUANT}.embedding_sqnr_db", True, lambda v: None if v == math.inf else number_in(-1e4, 1e4)(v)),
    (f"{_QUANT}.nodes", False, int8_nodes),
    ("head", True, is_object),
    ("head.file", True, required_path),
    ("head.embedding_dim", True, int_in(1, 1 << 20)),
    ("head.num_classes", True, int_in(1, 1 << 20)),
    ("parity", True, is_object),
    ("parity.cloud_max_abs_err", True, number_in(0, 1e30)),
    ("parity.cloud_max_rel_err", True, number_in(0, 1e30)),
    ("parity.edge_top1_agreement", True, number_in(0, 1)),
    ("parity.edge_top1_fp32", True, number_in(0, 1, nullable=True)),
    ("parity.edge_top1_int8", True, number_in(0, 1, nullable=True)),
    ("parity.n_eval", True, int_in(0, 1 << 40)),
    ("parity.eval_data", True, nullable(non_empty_str)),
    ("parity.n_cloud_images", True, int_in(1, 1 << 40)),
]


def _get(manifest: dict[str, Any], dotted: str) -> Any:
    obj: Any = manifest
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return _MISSING
        obj = obj[part]
    return obj


def validate_manifest(manifest: dict[str, Any], path: str | Path) -> None:
    """Check every rule, then the fields against each other; the first failure is one BundleError naming the file
    and the field."""
    for dotted, required, check in RULES:
        parent = _get(manifest, dotted.rpartition(".")[0]) if "." in dotted else manifest
        if parent is None or parent is _MISSING:
            continue  # an absent or null optional object: its own rule (checked first) said whether that is allowed
        value = _get(manifest, dotted)
        if value is _MISSING:
            if required:
                raise BundleError(f"{path}: missing field '{dotted}'")
            continue
        try:
            check(value)
        except _Bad as exc:
            raise BundleError(f"{path}: field '{dotted}': {exc}, got {_short(value)}") from None
    try:
        _consistent(manifest)
    except _Field as exc:
        raise BundleError(f"{path}: field '{exc.args[0]}': {exc.args[1]}") from None


class _Field(Exception):
    """(dotted field, what disagrees): a cross-field inconsistency."""


def _consistent(m: dict[str, Any]) -> None:
    """What ties fields together, as the exporter writes it (exporters/bundle.py `base_manifest`)."""
    from mist_kit.errors import CodecError
    from mist_kit.runtime.codec.codec import Codec

    b, method, cloud, edge, head = m["backbone"], m["method"], m["cloud"], m["edge"], m["head"]
    if len(m["classes"]) != head["num_classes"]:
        raise _Field("head.num_classes", f"{head['num_classes']}, but 'classes' lists {len(m['classes'])}")
    if b["num_prefix_tokens"] >= b["num_tokens"]:
        raise _Field("backbone.num_prefix_tokens", f"{b['num_prefix_tokens']}, not below num_tokens {b['num_tokens']}")
    if "k" in m and m["k"] != method.get("k"):
        raise _Field("k", f"{m['k']!r} differs from method.k {method.get('k')!r}")
    for key in ("k", "method.k"):
        k = _get(m, key)
        if _is_int(k) and k > b["num_blocks"]:
            raise _Field(key, f"{k} exceeds backbone.num_blocks {b['num_blocks']}")
    size = m["input"]["size"]
    want_in = [{"name": "pixel_values", "dtype": "float32", "shape": [-1, 3, size, size]}]
    if cloud["inputs"] != want_in:
        raise _Field("cloud.inputs", f"expected {want_in} (input.size {size})")
    plan = cloud["plan"]
    if plan.get("num_blocks") != b["num_blocks"]:
        raise _Field("cloud.plan.num_blocks", f"{plan.get('num_blocks')!r} differs from backbone.num_blocks "
                                              f"{b['num_blocks']}")
    rows = plan.get("tensors")
    outputs: list[dict[str, Any]] = []
    for i, row in enumerate(rows if isinstance(rows, list) else []):
        at = f"cloud.plan.tensors[{i}]"
        if not isinstance(row, dict):
            continue  # CloudPlan.from_dict names it
        src = row.get("source")
        want = [1 if src == "final_cls" else b["num_tokens"], b["embed_dim"]]
        if row.get("shape") != want:
            raise _Field(f"{at}.shape", f"{row.get('shape')!r}, expected {want} for {src!r} of the backbone")
        spec = row.get("codec")
        try:
            codec = Codec.from_spec(spec)  # type: ignore[arg-type]
        except CodecError as exc:
            raise _Field(f"{at}.codec", str(exc)) from None
        if not _same(codec.spec(), spec):
            raise _Field(f"{at}.codec", "fields disagree with what codec "
                                        f"{codec.name!r} records (quant, pool, num_tokens or extra keys)")
        if codec.tensor != row.get("name") or (codec.tokens, codec.dim) not in ((None, None), tuple(want)):
            raise _Field(f"{at}.codec", f"tensor/tokens/dim {codec.tensor!r}/{codec.tokens}/{codec.dim} differ "
                                        f"from the tensor {row.get('name')!r} {want}")
        prefix = 0 if src == "final_cls" else b["num_prefix_tokens"]
        if codec.prefix not in (None, prefix):
            raise _Field(f"{at}.codec.prefix", f"{codec.prefix}, expected {prefix} (the prefix tokens of {src!r})")
        decoded = edge["decoded_inputs"].get(row.get("name"))
        if decoded is not None and decoded != [codec.out_tokens or want[0], want[1]]:
            raise _Field(f"edge.decoded_inputs.{row.get('name')}", f"{decoded}, but codec {codec.name!r} decodes "
                                                                   f"{[codec.out_tokens or want[0], want[1]]}")
        outputs += [{"name": t.name, "dtype": t.dtype, "shape": [-1, *t.shape]} for t in codec.outputs(*want)]
    if outputs and cloud["outputs"] != outputs:
        raise _Field("cloud.outputs", "differ from the encoded tensors of cloud.plan's codecs")
    if isinstance(rows, list) and set(edge["decoded_inputs"]) != {r.get("name") for r in rows if isinstance(r, dict)}:
        raise _Field("edge.decoded_inputs", "names differ from cloud.plan's tensors")
    want_out = [{"name": "embedding", "dtype": "float32", "shape": [-1, head["embedding_dim"]]}]
    if edge["outputs"] != want_out:
        raise _Field("edge.outputs", f"expected {want_out} (head.embedding_dim)")
    _quantization_consistent(edge["quantization"], m["parity"])
    named = [("cloud.file", cloud["file"]), ("edge.file", edge["file"]), ("edge.reference", edge["reference"]),
             ("edge.tflite", edge.get("tflite")), ("head.file", head["file"])]
    for field_name, rel in named:
        if rel and rel not in m["files"]:
            raise _Field(field_name, f"{rel!r} is not listed in 'files'")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _same(a: Any, b: Any) -> bool:
    """JSON equality that tells true from 1 and 1 from 1.0 (a codec spec must round-trip exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _quantization_consistent(q: dict[str, Any] | None, parity: dict[str, Any]) -> None:
    """The int8 recipe as calibration/modes.py QuantSpec allows it, and the export gate it passed."""
    n_eval = parity["n_eval"]
    if (n_eval == 0) != (parity.get("eval_data") is None):
        raise _Field("parity.eval_data", "must be null exactly when parity.n_eval is 0")
    for key in ("edge_top1_fp32", "edge_top1_int8"):
        if n_eval == 0 and parity[key] is not None:
            raise _Field(f"parity.{key}", "must be null when parity.n_eval is 0 (nothing was scored)")
    if q is None:
        if parity["edge_top1_agreement"] != 1.0:
            raise _Field("parity.edge_top1_agreement", "must be 1.0 for an fp32 edge graph (edge.quantization null)")
        return
    static = q["mode"] == "static"
    if static != (q["format"] is not None) or static != (q["calibration"] is not None):
        raise _Field(f"{_QUANT}.format", "format and calibration are set exactly when mode is 'static'")
    if (q["calibration"] == "percentile") != (q["percentile"] is not None):
        raise _Field(f"{_QUANT}.percentile", "set exactly when calibration is 'percentile'")
    if q["percentile"] is not None and q["percentile"] <= 90:
        raise _Field(f"{_QUANT}.percentile", f"{q['percentile']}, expected in (90, 100]")
    if not q["op_types"]:
        raise _Field(f"{_QUANT}.op_types", "is empty")
    chosen = q.get("quantized_nodes")
    if chosen is not None and (not chosen or set(chosen) & set(q["excluded_nodes"])):
        raise _Field(f"{_QUANT}.quantized_nodes", "must be non-empty and disjoint from excluded_nodes")
    if q["min_agreement"] <= 0:
        raise _Field(f"{_QUANT}.min_agreement", "must be in (0, 1] (export --min-agreement)")
    if q["agreement"] < q["min_agreement"]:
        raise _Field(f"{_QUANT}.agreement", f"{q['agreement']} is below min_agreement {q['min_agreement']} "
                                            "(the export gate)")
    if parity["edge_top1_agreement"] != q["agreement"]:
        raise _Field("parity.edge_top1_agreement", f"{parity['edge_top1_agreement']} differs from "
                                                   f"edge.quantization.agreement {q['agreement']}")
    int8 = {d["node"] for d in q.get("nodes", []) if d["int8"]}
    if chosen is not None and q.get("nodes") and int8 != set(chosen):
        raise _Field(f"{_QUANT}.nodes", "the int8 decisions differ from quantized_nodes")
    if not sum(q["int8_ops"].values()):
        raise _Field(f"{_QUANT}.int8_ops", "no int8 operator in edge.onnx")
    if not sum(q["runtime_int8_ops"].values()):
        raise _Field(f"{_QUANT}.runtime_int8_ops", "no int8 operator runs (the export gate)")
