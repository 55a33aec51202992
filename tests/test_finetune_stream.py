"""finetune-edge embeds its features file in bounded chunks into one preallocated array (issue 14 item 5).

The reference is the edge session run on the whole file at once: the chunked stream must give the same embeddings
for the labelled rows, in file order, whatever the chunk size, with unlabelled rows skipped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mist_kit.runtime.bundle import open_edge_bundle
from mist_kit.runtime.edge_run import chunk_rows, embed_labelled
from mist_kit.runtime.edge_session import EdgeSession
from mist_kit.runtime.features_file import read_features, write_features


def _random_features(bundle_dir: Path, path: Path, labels: np.ndarray, seed: int = 0) -> Path:
    """A features file of random encoded tensors shaped and typed as the bundle's cloud outputs."""
    man = open_edge_bundle(bundle_dir).manifest
    rng = np.random.default_rng(seed)
    n = len(labels)
    tensors = {}
    for out in man["cloud"]["outputs"]:
        shape, dtype = (n, *[int(d) for d in out["shape"][1:]]), np.dtype(out["dtype"])
        if dtype.kind == "f":
            tensors[out["name"]] = rng.standard_normal(shape).astype(dtype)
        else:
            info = np.iinfo(dtype)
            tensors[out["name"]] = rng.integers(max(info.min, -100), min(info.max, 100) + 1, shape).astype(dtype)
    return write_features(path, man, tensors, [f"s{i}" for i in range(n)], labels)


@pytest.fixture(scope="module")
def mixed(tiny_bundle: Path, tmp_path_factory) -> dict:
    labels = np.array([0, -1, 3, 2, -1, -1, 1, 0, 5, -1, -1, -1, 4, 9, 7, -1, 8], np.int64)
    path = _random_features(tiny_bundle, tmp_path_factory.mktemp("ft_stream") / "mixed.safetensors", labels)
    bundle = open_edge_bundle(tiny_bundle, variant="int8")
    ff = read_features(path, bundle.manifest)
    session = EdgeSession(bundle)
    full = session.embed(ff.read(0, ff.n))  # every row in one call: the reference
    return {"ff": ff, "session": session, "labels": labels, "full": full}


@pytest.mark.parametrize("batch", [1, 2, 3, 5, 16, 64])
def test_chunked_embeddings_equal_one_call(mixed, batch):
    x, y = embed_labelled(mixed["session"], mixed["ff"], batch)
    keep = mixed["labels"] >= 0
    assert y.tolist() == mixed["labels"][keep].tolist()
    assert x.dtype == np.float32 and x.shape == (int(keep.sum()), mixed["full"].shape[1])
    np.testing.assert_allclose(x, mixed["full"][keep], rtol=1e-5, atol=1e-5)


def test_unlabelled_file_gives_no_rows(tiny_bundle: Path, tmp_path):
    path = _random_features(tiny_bundle, tmp_path / "none.safetensors", np.full(5, -1, np.int64))
    bundle = open_edge_bundle(tiny_bundle, variant="int8")
    x, y = embed_labelled(EdgeSession(bundle), read_features(path, bundle.manifest), 4)
    assert x.shape == (0, bundle.head.embedding_dim) and y.shape == (0,)


def test_chunk_rows_bounded_by_bytes_and_batch(mixed):
    ff = mixed["ff"]
    row = sum(i.row_bytes for i in ff.tensors)
    assert row > 0
    assert chunk_rows(ff, 32, budget=5 * row) == 5  # bytes bind
    assert chunk_rows(ff, 5, budget=5 * row + row - 1) == 5
    assert chunk_rows(ff, 2, budget=100 * row) == 2  # the batch binds
    assert chunk_rows(ff, 32, budget=row - 1) == 1  # never zero rows
    assert chunk_rows(ff, 32, budget=10 * row, activation_bytes=3 * row) == 3  # the graph's activations bind
    assert chunk_rows(ff, 32, budget=10 * row, activation_bytes=20 * row) == 1
    assert chunk_rows(ff, 32, budget=10 * row, activation_bytes=0) == 10  # unknown: features alone
