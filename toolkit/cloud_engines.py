"""The engine that runs the frozen backbone while the feature cache is filled: torch (the reference) or OpenVINO.

`backbone_runner` returns one callable, pixels -> {source: tensor}, for either engine, so `cache_features` keeps a
single loop. For OpenVINO the backbone's cloud part (exactly `backbone_tensors`, the function cloud.onnx is
exported from, over the requested sources) is converted from the torch module with `openvino.convert_model` and
compiled for the CPU at the requested precision (bf16 only where OpenVINO's CPU plugin reports native bf16; the
plugin's own default on such CPUs is bf16, so fp32 is pinned). Why: on x86 it is several times faster than torch
eager (BENCHMARKS.md, cloud engines), and caching is most of a training run's time.

`engine_parity` measures what that costs: relative gather error against torch fp32 on real images and, given the
trained edge network, its top-1 agreement on the two feature sets. It goes into the train report.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mist_kit.backbone_run import backbone_tensors, run_backbone
from mist_kit.errors import UsageError
from mist_kit.runtime.cloud_engine import OpenVINOSession, openvino_core
from mist_kit.runtime.plan import TensorSource

BACKBONE_ENGINES = ("torch", "openvino")
Runner = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def check_engine(engine: str, precision: str) -> None:
    """Unknown engine or precision names fail as one UsageError line, before any backbone work."""
    if engine not in BACKBONE_ENGINES:
        raise UsageError(f"--backbone-engine {engine!r}: expected one of {', '.join(BACKBONE_ENGINES)}")
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"--backbone-precision {precision!r}: expected fp32 or bf16")
    if engine == "openvino":  # missing package or bf16 on a CPU without it: fail now, not after training
        from mist_kit.runtime import cloud_engine

        core = openvino_core()
        if precision == "bf16" and not cloud_engine.cpu_bf16_supported(core):
            raise UsageError(f"--backbone-precision bf16: this CPU ({core.get_property('CPU', 'FULL_DEVICE_NAME')}) "
                             "has no native bf16 in OpenVINO's CPU plugin; use fp32")


def cache_tag(engine: str, precision: str) -> str:
    """The cache's precision key: 'fp32' / 'bf16' for torch (as before), 'openvino-fp32' / 'openvino-bf16' else,
    so a cache one engine filled never serves another's request."""
    return precision if engine == "torch" else f"{engine}-{precision}"


class _SourcesModule(nn.Module):
    """pixels -> the requested tensors in a fixed order: the graph OpenVINO converts (no grad, eval mode)."""

    def __init__(self, vit: nn.Module, sources: Sequence[TensorSource]) -> None:
        super().__init__()
        self.vit, self.sources = vit, list(sources)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        got = backbone_tensors(self.vit, pixel_values, self.sources)
        return tuple(got[str(s)] for s in self.sources)


def openvino_backbone(model: nn.Module, sources: Sequence[TensorSource], img_size: int, precision: str = "fp32",
                      threads: int = 0) -> OpenVINOSession:
    """The backbone's tensors for `sources` as a compiled OpenVINO model, dynamic in the batch dimension."""
    import openvino as ov

    core = openvino_core()
    module = _SourcesModule(model, sources).eval()
    example = torch.zeros(2, 3, img_size, img_size)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # timm's shape checks: constants at this size
        converted = ov.convert_model(module, example_input=example,
                                     input=[ov.PartialShape([-1, 3, img_size, img_size])])
    for port, src in zip(converted.outputs, sources, strict=True):  # stable names: the source keys
        port.get_tensor().set_names({str(src)})
    session = OpenVINOSession(converted, precision, threads, core)
    if session.precision != precision:
        raise UsageError(f"--backbone-precision {precision}: OpenVINO compiled the backbone at {session.precision}")
    return session


def backbone_runner(model: nn.Module, sources: Sequence[TensorSource], precision: str = "fp32",
                    engine: str = "torch", img_size: int | None = None) -> Runner:
    """pixels (B, 3, H, W) -> {str(source): float32 tensor}, on `engine` at `precision`."""
    check_engine(engine, precision)
    sources = list(sources)
    if engine == "torch":
        return lambda pixels: run_backbone(model, pixels, sources, precision)
    if img_size is None:
        raise UsageError("the openvino backbone engine needs the input size")
    session = openvino_backbone(model, sources, img_size, precision, torch.get_num_threads())
    names = [str(s) for s in sources]

    def run(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        values = session.run(names, {session.get_inputs()[0].name: pixels.numpy().astype(np.float32, copy=False)})
        return {n: torch.from_numpy(v) for n, v in zip(names, values, strict=True)}

    return run


def relative_error(ref: np.ndarray, got: np.ndarray) -> float:
    """||got - ref|| / ||ref|| over the whole array (float64)."""
    r = ref.astype(np.float64)
    return float(np.linalg.norm(got.astype(np.float64) - r) / max(float(np.linalg.norm(r)), 1e-30))


def engine_parity(model: nn.Module, pixels: torch.Tensor, sources: Sequence[TensorSource], engine: str,
                  precision: str, img_size: int,
                  predict: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None) -> dict[str, Any]:
    """{rel_err per source, worst, edge top-1 agreement} of (engine, precision) against torch fp32 on `pixels`.

    `predict` maps {source: array} to logits (the trained edge network); agreement is the fraction of images
    whose argmax is the same on both feature sets.
    """
    sources = sorted(set(sources), key=str)
    with torch.no_grad():
        ref = {k: v.numpy() for k, v in run_backbone(model, pixels, sources, "fp32").items()}
        got = {k: v.numpy() for k, v in backbone_runner(model, sources, precision, engine, img_size)(pixels).items()}
    errs = {k: relative_error(ref[k], got[k]) for k in ref}
    out: dict[str, Any] = {"engine": engine, "precision": precision, "reference": "torch fp32",
                           "images": len(pixels), "rel_err": {k: float(f"{v:.3g}") for k, v in errs.items()},
                           "max_rel_err": float(f"{max(errs.values()):.3g}")}
    if predict is not None:
        agree = np.argmax(predict(ref), axis=1) == np.argmax(predict(got), axis=1)
        out["edge_top1_agreement"] = float(np.mean(agree))
    return out


def train_engine_parity(req: Any, spec: Any, final: Any, plan: Any, transforms: Any, images: Any,
                        n: int = 32, seed: int = 0) -> dict[str, Any]:
    """The train report's `backbone_engine` entry: `engine_parity` of the request's engine on `n` seeded images
    of `images` (val when given, else train), with the trained edge network's top-1 agreement.

    The edge network sees both feature sets rounded to float16, as the cache stores them.
    """
    from mist_kit.backbone import load_backbone
    from mist_kit.data import load_pixels
    from mist_kit.train import predict_logits

    model, _ = load_backbone(req.backbone, img_size=req.img_size, weights=req.weights, pretrained=req.pretrained,
                             mean=req.mean, std=req.std)
    model.eval()
    rng = np.random.default_rng(seed)
    rows = sorted(rng.choice(len(images), size=min(n, len(images)), replace=False))
    pixels = torch.from_numpy(np.stack([load_pixels(images.paths[r], spec.img_size, spec.mean, spec.std)
                                        for r in rows]))

    def predict(feats: dict[str, np.ndarray]) -> np.ndarray:
        x = {t.name: feats[str(t.source)].astype(np.float16) for t in plan.tensors}
        with torch.no_grad():
            return predict_logits(final, x, transforms)

    out = engine_parity(model, pixels, plan.sources, req.backbone_engine, req.backbone_precision, spec.img_size,
                        predict)
    out["images_from"] = str(images.source)
    return out
