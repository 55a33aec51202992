"""The cloud graph: pixel_values [B,3,H,W] -> backbone blocks 1..s -> the plan's tensors, exported, checked vs torch.

torch.onnx's dynamo exporter is tried first (it needs onnxscript); the TorchScript exporter is the fallback when
the dynamo path fails on an unusual timm variant. Either way the saved file is validated like Optimum's exporter
does it: names, dynamic batch axis, static T/D, and values vs the torch module on real images (max abs and max
relative error), and every problem is collected into the returned report rather than downgraded to a warning.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import nn

from mist_kit.exporters.onnx_utils import export_dynamic_batch, ort_session, signature
from mist_kit.runtime.plan import CloudPlan

PIXELS = "pixel_values"
OPSET = 18
# Tolerances declared next to the export spec: fp32 reassociation over k residual blocks stays far below these.
CLOUD_MAX_ABS = 1e-3
CLOUD_MAX_REL = 1e-3  # relative to the largest |value| of the reference (gathers hold outliers ~100x the median)


@dataclass
class CloudParity:
    """How closely cloud.onnx reproduces the torch gather on real images."""

    max_abs_err: float
    max_rel_err: float
    n_images: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def export_cloud(cloud: nn.Module, img_size: int, opset: int = OPSET) -> tuple[onnx.ModelProto, str]:
    """Export a `CloudModule` (pixel_values -> the plan's tensors) with a dynamic batch axis; (model, exporter)."""
    example = torch.zeros(2, 3, img_size, img_size)
    return export_dynamic_batch(cloud.eval(), (example,), [PIXELS], list(cloud.plan.names), opset, "cloud graph")


def check_signature(model: onnx.ModelProto, plan: CloudPlan, img_size: int) -> list[str]:
    """Structural validation: pixel_values in, the plan's tensors out (names, order), dynamic batch, static rest."""
    inputs, outputs = signature(model)
    problems = []
    want_in = [{"name": PIXELS, "dtype": "float32", "shape": [-1, 3, img_size, img_size]}]
    want_out = [{"name": t.name, "dtype": "float32", "shape": [-1, *t.shape]} for t in plan.tensors]
    if inputs != want_in:
        problems.append(f"cloud.onnx inputs {inputs} != expected {want_in}")
    if outputs != want_out:
        problems.append(f"cloud.onnx outputs {outputs} != expected {want_out}")
    return problems


def cloud_parity_model(model: onnx.ModelProto, cloud: nn.Module, pixels: np.ndarray,
                       batch_size: int = 8) -> CloudParity:
    """Max abs / max relative error of the cloud graph vs torch over `pixels` (float32 [N,3,H,W] real images),
    over every sent tensor.

    The relative error is max |onnx - torch| divided by max |torch| per tensor: element-wise ratios are
    meaningless for the near-zero entries every gather has.
    """
    session = ort_session(model.SerializeToString())
    names = list(cloud.plan.names)
    max_abs, max_rel, problems = 0.0, 0.0, []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            x = np.ascontiguousarray(pixels[start: start + batch_size], dtype=np.float32)
            refs = [r.numpy() for r in cloud(torch.from_numpy(x))]
            gots = session.run(names, {PIXELS: x})
            for name, ref, got in zip(names, refs, gots, strict=True):
                if got.shape != ref.shape:
                    problems.append(f"cloud.onnx output {name} shape {list(got.shape)} != torch {list(ref.shape)}")
                    break
                if not np.isfinite(got).all():
                    problems.append(f"cloud.onnx produced non-finite values in {name}")
                    break
                err = np.abs(got.astype(np.float64) - ref)
                max_abs = max(max_abs, float(err.max()))
                max_rel = max(max_rel, float(err.max() / max(float(np.abs(ref).max()), 1e-12)))
            if problems:
                break
    if max_rel > CLOUD_MAX_REL and max_abs > CLOUD_MAX_ABS:
        problems.append(f"cloud.onnx differs from torch: max abs err {max_abs:.3g} > {CLOUD_MAX_ABS:g} and max rel "
                        f"err {max_rel:.3g} > {CLOUD_MAX_REL:g}")
    return CloudParity(max_abs, max_rel, len(pixels), problems)
