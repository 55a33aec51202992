"""`mist-kit extract`: run a bundle's cloud graph over a dataset and write a features file.

Torch-free (onnxruntime + Pillow): preprocessing follows `manifest.input` with the same `load_pixels` the trainer
used, and the file holds exactly what cloud.onnx emits (the codec's encoded tensors) plus labels and ids, so the
device-side commands (`run-edge`, `finetune-edge`) consume it as if it had arrived over the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.errors import BundleError
from mist_kit.runtime.manifest import CLOUD_FILE, codec_names, open_bundle

Progress = Callable[[int], None]


def cloud_session(bundle: str | Path, threads: int = 0) -> tuple[Any, dict[str, Any]]:
    """A verified bundle's manifest and an onnxruntime session over its cloud.onnx."""
    from mist_kit.runtime.ort_session import cpu_session

    manifest = open_bundle(bundle, only=(CLOUD_FILE,))
    path = Path(bundle) / CLOUD_FILE
    try:
        sess = cpu_session(path, threads)
    except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
        raise BundleError(f"{path}: onnxruntime cannot load the cloud graph ({str(exc)[:160]})") from None
    return sess, manifest


def cloud_batches(sess: Any, manifest: dict[str, Any], paths: list[Path], batch_size: int = 16,
                  progress: Progress | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Yield the cloud outputs (by manifest name) for consecutive batches of image files."""
    from mist_kit.data import load_pixels

    spec = manifest["input"]
    names = [o["name"] for o in manifest["cloud"]["outputs"]]
    graph_names = [o.name for o in sess.get_outputs()]
    if graph_names != names:
        raise BundleError(f"cloud.onnx outputs {graph_names} differ from manifest cloud.outputs {names}")
    inp = sess.get_inputs()[0].name
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        pixels = np.stack([load_pixels(p, spec["size"], spec["mean"], spec["std"]) for p in chunk])
        outs = sess.run(None, {inp: pixels})
        yield dict(zip(names, outs, strict=True))
        if progress is not None:
            progress(len(chunk))


def extract(bundle: str | Path, data: str | Path, out: str | Path, batch_size: int = 16,
            progress: Progress | None = None) -> dict[str, Any]:
    """Encode every image of `data` with the bundle's cloud graph into the features file `out` (atomic)."""
    from mist_kit.data import load_image_list
    from mist_kit.runtime.features_file import FeaturesWriter

    t0 = time.perf_counter()
    sess, manifest = cloud_session(bundle)
    images = load_image_list(data)
    root = Path(images.source)
    root = root if root.is_dir() else root.parent
    ids = []
    for p in images.paths:
        try:
            ids.append(p.relative_to(root).as_posix())
        except ValueError:
            ids.append(p.as_posix())
    labels = np.asarray(images.labels, dtype=np.int64)
    pos = 0
    with FeaturesWriter(out, manifest, ids, with_labels=True) as writer:
        for tensors in cloud_batches(sess, manifest, list(images.paths), batch_size, progress):
            b = len(next(iter(tensors.values())))
            writer.write(tensors, labels[pos:pos + b])
            pos += b
    per_image = sum(int(np.dtype(o["dtype"]).itemsize * np.prod(o["shape"][1:])) for o in manifest["cloud"]["outputs"])
    return {"out": str(out), "images": len(ids), "codec": codec_names(manifest), "bytes_per_image": per_image,
            "file_bytes": Path(out).stat().st_size, "seconds": round(time.perf_counter() - t0, 3),
            "outputs": manifest["cloud"]["outputs"]}
