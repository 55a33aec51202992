"""The features file: round trip, interoperability with safetensors, and one clear error per bad input."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mist_kit.runtime.features_file import FeaturesError, FeaturesWriter, read_features, write_features

T, D = 5, 8


def _manifest(codec: dict | None = None, dtype: str = "int8", model: str = "m") -> dict:
    plan = {"blocks": 1, "num_blocks": 2, "tensors": [{"name": "x", "source": "gather:1", "shape": [T, D],
                                                       "codec": codec or {"name": "int8-channel", "bits": 8}}]}
    return {"model_name": model,
            "cloud": {"plan": plan, "outputs": [{"name": "q", "dtype": dtype, "shape": [-1, T, D]},
                                                {"name": "scale", "dtype": "float16", "shape": [-1, T]}]}}


def _tensors(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"q": rng.integers(-128, 128, (n, T, D)).astype(np.int8),
            "scale": rng.random((n, T)).astype(np.float16)}


@pytest.fixture
def written(tmp_path):
    rng = np.random.default_rng(0)
    tensors = _tensors(11, rng)
    labels = np.array([0, 1, 2, -1, 4, 5, 6, 7, 8, 9, 1])
    path = write_features(tmp_path / "f.safetensors", _manifest(), tensors, [f"d/{i}.png" for i in range(11)],
                          labels)
    return path, tensors, labels


def test_round_trip_batches_and_plain_safetensors(written):
    path, tensors, labels = written
    ff = read_features(path, _manifest())
    assert ff.n == 11 and ff.ids[3] == "d/3.png" and ff.has_labels
    np.testing.assert_array_equal(ff.labels, labels)
    got = {k: np.concatenate([b[k] for _, b in ff.batches(4)]) for k in tensors}
    for k in tensors:
        np.testing.assert_array_equal(got[k], tensors[k])
    plain = load_file(str(path))  # any safetensors reader opens it
    np.testing.assert_array_equal(plain["q"], tensors["q"])
    assert plain["labels"].dtype == np.int64


def test_streaming_writer_equals_one_shot(tmp_path, written):
    path, tensors, labels = written
    ids = [f"d/{i}.png" for i in range(11)]
    with FeaturesWriter(tmp_path / "s.safetensors", _manifest(), ids, with_labels=True) as w:
        for s in range(0, 11, 3):
            w.write({k: v[s:s + 3] for k, v in tensors.items()}, labels[s:s + 3])
    assert (tmp_path / "s.safetensors").read_bytes() == path.read_bytes()


def test_short_stream_leaves_nothing(tmp_path, written):
    _, tensors, _ = written
    target = tmp_path / "short.safetensors"
    with pytest.raises(FeaturesError, match="2 samples written, 11 announced"), \
            FeaturesWriter(target, _manifest(), [str(i) for i in range(11)]) as w:
        w.write({k: v[:2] for k, v in tensors.items()})
    assert list(tmp_path.iterdir()) == [tmp_path / "f.safetensors"]


def test_writer_rejects_wrong_dtype(tmp_path):
    rng = np.random.default_rng(1)
    bad = _tensors(2, rng)
    bad["q"] = bad["q"].astype(np.float32)
    with pytest.raises(FeaturesError, match="tensor 'q' is float32"):
        write_features(tmp_path / "x.safetensors", _manifest(), bad, ["a", "b"])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("manifest", "message"), [
    (_manifest(codec={"name": "fp16"}), "codecs x: int8-channel .*bundle's x: fp16 .*another bundle"),
    (_manifest(dtype="uint8"), "cloud outputs .* do not match.*another bundle"),
    (_manifest(model="other"), "model 'm', bundle serves 'other'"),
])
def test_file_from_another_bundle(written, manifest, message):
    with pytest.raises(FeaturesError, match=message):
        read_features(written[0], manifest)


def test_truncated_file(tmp_path, written):
    data = written[0].read_bytes()
    for cut in (4, 100, len(data) - 7):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(FeaturesError, match="truncated") as err:
            read_features(bad, _manifest())
        assert "\n" not in str(err.value) and str(bad) in str(err.value)


def test_not_a_features_file(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(plain))
    with pytest.raises(FeaturesError, match="metadata format None, expected 'mist-kit/features/1'"):
        read_features(plain)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(FeaturesError, match="not valid safetensors JSON"):
        read_features(junk)
    with pytest.raises(FeaturesError, match="no such features file"):
        read_features(tmp_path / "missing.safetensors")
