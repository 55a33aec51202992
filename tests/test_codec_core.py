"""Codec numpy reference and registry: every registered codec gets the same checks automatically."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mist_kit.errors import CodecError, UsageError
from mist_kit.runtime.codec import (
    Codec,
    CodecParams,
    Quant,
    codec_params,
    create_codec,
    decode_payload,
    encode_payload,
    fit_codec,
    list_codecs,
    parse_codec_name,
    register_codec,
    transform_for,
)
from mist_kit.runtime.codec.bench import measure, synthetic_features

PREFIX, GRID, DIM = 1, 4, 128  # 17 tokens: pool2 -> 5, pool4 -> 2; D fits pca128


@pytest.fixture(scope="module")
def feats() -> np.ndarray:
    return synthetic_features(6, PREFIX + GRID * GRID, DIM, prefix=PREFIX, seed=1)


@pytest.mark.parametrize("name", list_codecs())
def test_every_registered_codec_round_trips(name: str, feats: np.ndarray) -> None:
    codec = fit_codec(name, feats, PREFIX)
    enc = codec.encode(feats)
    specs = codec.outputs()
    assert [s.name for s in specs] == list(enc)
    for s in specs:
        assert enc[s.name].dtype == np.dtype(s.dtype) and enc[s.name].shape == (len(feats), *s.shape)
    assert codec.bytes_per_image() == sum(a[0].nbytes for a in enc.values())
    dec = codec.decode(enc)
    assert dec.dtype == np.float32 and dec.shape == (len(feats), codec.out_tokens, DIM)
    # the recorded spec survives JSON and rebuilds a codec that encodes identically
    again = create_codec(json.loads(json.dumps(codec.spec())))
    for key, arr in again.encode(feats).items():
        np.testing.assert_array_equal(arr, enc[key])
    # the wire format returns exactly the tensors, with and without zstd
    for level in (None, 3):
        back = decode_payload(again, encode_payload(codec, enc, zstd_level=level))
        for key, arr in back.items():
            np.testing.assert_array_equal(arr, enc[key])
    row = measure(codec, feats, repeats=1)
    assert row["bytes_per_image"] == codec.bytes_per_image()
    assert row["snr_db"] is None if codec.lossless else row["snr_db"] > 0
    tf = transform_for(codec.spec())
    assert (tf is None) == codec.lossless
    if tf is not None:
        np.testing.assert_array_equal(tf(feats), dec)


@pytest.mark.parametrize("name", [n for n in list_codecs() if codec_params(n).quant in (Quant.INT8, Quant.INT4)])
def test_quantization_error_is_at_most_half_a_step(name: str, feats: np.ndarray) -> None:
    codec = fit_codec(name, feats, PREFIX)
    ref = codec.pool(feats)
    scale = np.broadcast_to(codec.full_scale(), ref.shape)
    lo, hi = (-8, 7) if codec.params.quant is Quant.INT4 else (-128, 127)
    inside = (ref / scale >= lo) & (ref / scale <= hi)  # values the percentile scale clips are excluded
    err = np.abs(codec.roundtrip(feats) - ref)
    assert np.all(err[inside] <= scale[inside] * 0.5 * (1 + 1e-5))
    assert inside.mean() > 0.95  # a 99.99th-percentile scale clips only the tails


def test_pooling_averages_patch_blocks_and_keeps_prefix(feats: np.ndarray) -> None:
    codec = fit_codec("pool2-fp16", feats, PREFIX)
    pooled = codec.pool(feats)
    grid = feats[:, PREFIX:].reshape(-1, GRID, GRID, DIM)
    want = grid.reshape(-1, 2, 2, 2, 2, DIM).mean(axis=(2, 4)).reshape(-1, 4, DIM)
    np.testing.assert_allclose(pooled[:, PREFIX:], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pooled[:, :PREFIX], feats[:, :PREFIX])
    assert codec.out_tokens == 5 and codec.spec()["num_tokens"] == 5


def test_prefix_only_codecs_send_exactly_the_prefix_tokens() -> None:
    x = synthetic_features(4, 2 + GRID * GRID, DIM, prefix=2, seed=3)  # cls + one register token
    half = fit_codec("cls-fp16", x, 2)
    enc = half.encode(x)["features"]
    assert enc.shape == (4, 2, DIM) and half.out_tokens == 2 and half.spec()["num_tokens"] == 2
    np.testing.assert_array_equal(enc, x[:, :2].astype(np.float16))
    assert half.bytes_per_image() == 2 * DIM * 2
    q = fit_codec("cls-int8", x, 2)
    assert q.outputs()[0].shape == (2, DIM) and q.bytes_per_image() == 2 * DIM
    np.testing.assert_array_equal(q.scale, np.abs(x[:, :2]).reshape(-1, DIM).max(0) / np.float32(127))
    assert np.all(np.abs(q.roundtrip(x) - x[:, :2]) <= q.scale * 0.5 * (1 + 1e-5))  # absmax: nothing clips
    with pytest.raises(CodecError, match="prefix"):
        fit_codec("cls-int8", x, 0)  # no cls token to send


def test_int4_packs_two_values_per_byte(feats: np.ndarray) -> None:
    codec = fit_codec("int4-channel", feats, PREFIX)
    packed = codec.encode(feats)["features_q4"]
    assert packed.shape == (len(feats), 17, DIM // 2)
    vals = np.clip(np.rint(feats / codec.scale), -8, 7)
    np.testing.assert_array_equal(packed & 15, (vals[..., 0::2] + 8).astype(np.uint8))
    np.testing.assert_array_equal(packed >> 4, (vals[..., 1::2] + 8).astype(np.uint8))


def test_pca_keeps_the_top_variance_directions() -> None:
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0][:, :2]
    x = (rng.standard_normal((50, 17, 2)) * [5.0, 3.0]) @ basis.T  # rank-2 data
    codec = fit_codec("pca2-int8", x.astype(np.float32), PREFIX)
    assert codec.outputs()[0].shape == (17, 2)
    rel = np.linalg.norm(codec.roundtrip(x) - x) / np.linalg.norm(x)
    assert rel < 0.01


def test_registry_rejects_duplicates_and_unknown_names() -> None:
    with pytest.raises(UsageError, match="already registered"):
        register_codec("int8-channel")(lambda: CodecParams(quant=Quant.INT8))
    with pytest.raises(CodecError, match="unknown codec 'int3-magic'"):
        codec_params("int3-magic")
    assert codec_params("pca17-int8").rank == 17  # pca<r>-int8 for any r
    assert parse_codec_name("int8-channel+zstd7") == ("int8-channel", 7)
    assert parse_codec_name("fp16+zstd") == ("fp16", 3)
    with pytest.raises(CodecError):
        parse_codec_name("fp16+gzip")


def test_contradictory_params_are_rejected() -> None:
    with pytest.raises(UsageError):
        CodecParams(quant=Quant.INT8, rank=4)
    with pytest.raises(UsageError):
        CodecParams(quant=Quant.INT8, percentile=0)
    with pytest.raises(UsageError):
        CodecParams(quant=Quant.FP16, prefix_scales=True)
    with pytest.raises(UsageError, match="prefix_only"):
        CodecParams(quant=Quant.INT8, pool=2, prefix_only=True)
    assert CodecParams(quant=Quant.FP16, prefix_only=True).changes_tokens
    assert CodecParams(quant=Quant.INT4, pool=2).changes_tokens
    assert not CodecParams(quant=Quant.INT4).changes_tokens


def test_spec_problems_are_one_codec_error(feats: np.ndarray) -> None:
    spec = fit_codec("int8-channel", feats, PREFIX).spec()
    with pytest.raises(CodecError, match="'scale': expected shape \\[128\\]"):
        create_codec({**spec, "scale": spec["scale"][:5]})  # wrong scale count
    with pytest.raises(CodecError, match="positive"):
        create_codec({**spec, "scale": [0.0] * DIM})
    with pytest.raises(CodecError, match=r"not calibrated|missing"):
        transform_for({"name": "int8-channel"})
    with pytest.raises(CodecError, match="tokens"):
        create_codec({**spec, "tokens": "many"})
    assert transform_for({"name": "fp32"}) is None
    with pytest.raises(CodecError, match="divisible by 4"):
        fit_codec("pool4-int4", synthetic_features(2, 1 + 36, DIM), 1)  # 6x6 grid


def test_decode_rejects_mismatched_tensors(feats: np.ndarray) -> None:
    codec = fit_codec("int8-token", feats, PREFIX)
    enc = codec.encode(feats)
    with pytest.raises(CodecError, match="expected tensors"):
        codec.decode({"features_q": enc["features_q"]})
    with pytest.raises(CodecError, match="must be int8"):
        codec.decode({**enc, "features_q": enc["features_q"].astype(np.int16)})
    with pytest.raises(CodecError, match="batch"):
        codec.decode({**enc, "features_scale": enc["features_scale"][:2]})
    with pytest.raises(CodecError, match="calibrated for"):
        codec.encode(feats[:, :5])


def test_payload_for_another_codec_or_shape_is_refused(feats: np.ndarray) -> None:
    a, b = fit_codec("int8-channel", feats, PREFIX), fit_codec("int8-channel-p9999", feats, PREFIX)
    payload = encode_payload(a, a.encode(feats))
    with pytest.raises(CodecError, match="expected 'int8-channel-p9999'"):
        decode_payload(b, payload)
    other = fit_codec("int8-channel", synthetic_features(2, 17, 2 * DIM), PREFIX)
    with pytest.raises(CodecError, match="expected 'features_q' int8"):
        decode_payload(other, payload)


def test_payload_damage_is_always_detected(feats: np.ndarray) -> None:
    for level in (None, 3):
        codec = fit_codec("pool2-int4", feats, PREFIX)
        payload = encode_payload(codec, codec.encode(feats[:2]), zstd_level=level)
        for cut in range(len(payload)):  # every truncation
            with pytest.raises(CodecError):
                decode_payload(codec, payload[:cut])
        for pos in range(len(payload)):  # every single-byte corruption (CRC32 catches all of them)
            bad = bytearray(payload)
            bad[pos] ^= 0x5A
            with pytest.raises(CodecError):
                decode_payload(codec, bytes(bad))


def test_huge_claimed_shape_allocates_nothing() -> None:
    import struct
    import tracemalloc

    codec = Codec.from_spec({"name": "fp32"})
    name = b"fp32"
    header = (b"MKC1" + struct.pack("<BBH", 1, 0, len(name)) + name + struct.pack("<B", 1)
              + struct.pack("<B", 8) + b"features" + struct.pack("<BB", 1, 3) + struct.pack("<3I", 2**31, 2**16, 2**10))
    huge = 2**31 * 2**16 * 2**10 * 4
    for raw_len in (huge, 64):
        payload = header + struct.pack("<QIQ", raw_len, 0, 16) + b"\0" * 16
        tracemalloc.start()
        with pytest.raises(CodecError):
            decode_payload(codec, payload)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20


def test_runtime_codec_never_imports_torch_timm_or_onnx() -> None:
    import subprocess
    import sys

    code = ("import sys, mist_kit.runtime.codec, mist_kit.runtime.codec.bench, mist_kit.runtime.codec.extract; "
            "print(sorted(m for m in ('torch', 'timm', 'onnx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
