"""A bundle's edge cost as its method recorded it (manifest `edge`): parameters, MACs and activation bytes.

Pure functions of the manifest: no formula keyed by method name (a method owns its cost, see
`mist_kit.edge.EdgeMethod.cost`), no session. The measured check (`devices check`) lives in
`mist_kit.runtime.device_check`, which runs the edge graph; keeping it there keeps devices/ free of runtime
imports (runtime uses devices' profiles and caps, never the reverse). Torch-free.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mist_kit.errors import BundleError

MB = 1024 * 1024


def edge_cost(manifest: dict[str, Any]) -> tuple[int, int, int]:
    """(params, MACs per image, activation bytes per image) of the edge graph, as its method computed them at
    export (`manifest.edge`); the codec decoders are not counted. No formula here: a method owns its cost."""
    edge = manifest.get("edge") or {}
    values = [edge.get(k) for k in ("params", "macs_per_image", "activation_bytes")]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise BundleError("manifest.json: edge.params / edge.macs_per_image / edge.activation_bytes must be "
                          "non-negative integers (re-export the bundle)")
    return values[0], values[1], values[2]  # type: ignore[return-value]


def activation_bytes_per_image(manifest: dict[str, Any]) -> int:
    """The encoded tensors the device receives plus the edge graph's own peak activations, per image."""
    encoded = sum(int(np.prod([int(x) for x in o["shape"][1:]])) * np.dtype(o["dtype"]).itemsize
                  for o in manifest["cloud"]["outputs"])
    return encoded + edge_cost(manifest)[2]
