"""End-to-end check of a bundle as written: cloud.onnx -> edge graph -> head, files only, vs the torch model.

This is what a third party does with the bundle (manifest in hand, no mist-kit internals), run on the files in
the temporary directory before it is published. The fp32 chain must reproduce the torch checkpoint's top-1 on
every image; the int8 chain's agreement is reported (its gate is the held-out agreement measured at quantization).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mist_kit.exporters.onnx_utils import ort_session
from mist_kit.runtime.edge_session import one_row_at_a_time, runs_per_row


def run_chain(bundle: Path, manifest: dict[str, Any], pixels: np.ndarray, edge_key: str = "file") -> np.ndarray:
    """Logits from the bundle's own files: cloud outputs fed to the edge graph by name, then the numpy head."""
    from mist_kit.runtime.bundle import load_head_file

    cloud = ort_session(bundle / manifest["cloud"]["file"])
    edge = ort_session(bundle / manifest["edge"][edge_key])
    head = load_head_file(bundle / manifest["head"]["file"], tuple(manifest["classes"]))
    names = [o["name"] for o in manifest["cloud"]["outputs"]]
    feeds = dict(zip(names, cloud.run(names, {"pixel_values": pixels}), strict=True))

    def run(f: dict[str, np.ndarray]) -> np.ndarray:
        return edge.run(["embedding"], f)[0]  # (B, E)

    # dynamic int8: one image per call, as devices run it
    emb = one_row_at_a_time(run, feeds) if runs_per_row(manifest, manifest["edge"][edge_key]) else run(feeds)
    return head.logits(emb)  # (B, C)


def torch_logits(cloud: nn.Module, method: nn.Module, pixels: np.ndarray,
                 transforms: Mapping[str, Callable[[np.ndarray], np.ndarray] | None]) -> np.ndarray:
    """The reference: torch cloud module -> (each tensor's codec round trip) -> edge method incl. its head."""
    with torch.no_grad():
        inputs = {}
        for name, t in zip(cloud.plan.names, cloud(torch.from_numpy(pixels)), strict=True):
            x = t.numpy()
            fn = transforms.get(name)
            inputs[name] = torch.from_numpy(np.asarray(fn(x), dtype=np.float32) if fn is not None else x)
        return method(inputs).numpy()


def chain_check(bundle: Path, manifest: dict[str, Any], cloud: nn.Module, method: nn.Module,
                transforms: Mapping[str, Callable[[np.ndarray], np.ndarray] | None],
                pixels: np.ndarray) -> dict[str, Any]:
    """Compare both chains with torch on `pixels`; problems only for the fp32 chain (it must match exactly)."""
    ref = torch_logits(cloud, method, pixels, transforms).argmax(1)
    fp32 = run_chain(bundle, manifest, pixels, "reference").argmax(1)
    int8 = run_chain(bundle, manifest, pixels, "file").argmax(1)
    problems = []
    if not np.array_equal(fp32, ref):
        problems.append(f"bundle chain cloud.onnx -> edge.fp32.onnx -> head disagrees with the torch checkpoint's "
                        f"top-1 on {int((fp32 != ref).sum())} of {len(ref)} real images")
    return {"n_images": len(ref), "fp32_top1_match": float((fp32 == ref).mean()),
            "int8_top1_match": float((int8 == ref).mean()), "problems": problems}
