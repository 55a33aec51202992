"""Property tests: round trips hold for any features, and no byte string makes decoding crash or hang."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mist_kit.errors import CodecError
from mist_kit.runtime.codec import codec_params, create_codec, decode_payload, encode_payload, fit_codec, list_codecs

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def features(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    """[B, prefix + g*g, D] features with a patch grid of 2 or 4 and an even D."""
    b = draw(st.integers(1, 3))
    prefix = draw(st.integers(0, 2))
    g = draw(st.sampled_from([2, 4]))
    d = 2 * draw(st.integers(1, 4))
    x = draw(arrays(np.float32, (b, prefix + g * g, d), elements=finite))
    return x, prefix


def _usable(name: str, prefix: int, tokens: int, dim: int) -> bool:
    p = codec_params(name)
    grid = int(np.sqrt(tokens - prefix))
    return grid % p.pool == 0 and (p.rank or 0) <= dim and (prefix >= 1 or not p.prefix_only)


@SETTINGS
@given(data=features(), name=st.sampled_from(list_codecs()), zstd=st.sampled_from([None, 1, 3]))
def test_any_features_round_trip_through_the_wire(data: tuple[np.ndarray, int], name: str, zstd: int | None) -> None:
    x, prefix = data
    if not _usable(name, prefix, x.shape[1], x.shape[2]):
        return
    codec = fit_codec(name, x, prefix)
    enc = codec.encode(x)
    back = decode_payload(create_codec(codec.spec()), encode_payload(codec, enc, zstd_level=zstd))
    for key, arr in enc.items():
        np.testing.assert_array_equal(back[key], arr)
    dec = codec.decode(back)
    assert dec.shape == (len(x), codec.out_tokens, x.shape[2]) and np.all(np.isfinite(dec))
    if codec.lossless:
        np.testing.assert_array_equal(dec, x)


@SETTINGS
@given(x=arrays(np.float32, (2, 5, 6), elements=finite))
def test_int8_channel_error_bound(x: np.ndarray) -> None:
    codec = fit_codec("int8-channel", x, 1)  # absmax: nothing clips on the calibration data itself
    assert np.all(np.abs(codec.roundtrip(x) - x) <= codec.scale * 0.5 * (1 + 1e-5) + 1e-30)


@pytest.fixture(scope="module")
def codecs() -> list:
    x = np.random.default_rng(0).standard_normal((3, 17, 128)).astype(np.float32)
    return [fit_codec(n, x, 1) for n in list_codecs()] + [create_codec({"name": "fp32"})]


@SETTINGS
@given(blob=st.binary(max_size=512), prefix_real=st.booleans(), idx=st.integers(0, 100))
def test_garbage_bytes_raise_only_codec_error(codecs: list, blob: bytes, prefix_real: bool, idx: int) -> None:
    codec = codecs[idx % len(codecs)]
    if prefix_real:  # a valid header start, so parsing goes deeper than the magic check
        blob = encode_payload(codec, codec.encode(np.ones((1, 17, 128), np.float32)) if codec.dim else
                              {"features": np.ones((1, 17, 128), np.float32)})[: len(blob) % 64] + blob
    with contextlib.suppress(CodecError):  # any other exception type fails the test
        decode_payload(codec, blob)


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), idx=st.integers(0, 100), flips=st.integers(1, 8))
def test_randomly_damaged_payloads_are_refused(codecs: list, seed: int, idx: int, flips: int) -> None:
    rng = np.random.default_rng(seed)
    codec = codecs[idx % len(codecs)]
    x = rng.standard_normal((2, 17, 128)).astype(np.float32)
    payload = bytearray(encode_payload(codec, codec.encode(x), zstd_level=int(rng.integers(0, 4)) or None))
    good = codec.encode(x)
    for pos in rng.choice(len(payload), size=min(flips, len(payload)), replace=False):
        payload[pos] ^= int(rng.integers(1, 256))
    try:  # refused, or (a flip in a field that does not matter) exactly the original tensors: never wrong data
        back = decode_payload(codec, bytes(payload))
    except CodecError:
        return
    for key, arr in good.items():
        np.testing.assert_array_equal(back[key], arr)
