"""Running the edge graph: onnxruntime (threads, arena, optimisation level from a device profile) or LiteRT.

Why one class for both backends: callers (run-edge, finetune-edge, the demo) want "encoded features in,
embedding out" and should not care which engine a profile prefers. LiteRT is used only when the profile prefers
it, the bundle ships `edge.tflite` and `ai_edge_litert` is importable; otherwise onnxruntime runs `edge.onnx` and
`backend_note` says why. Batch (`embed`) and streaming (`stream`) APIs. Torch-free.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.devices.caps import capped_threads, looks_like_oom
from mist_kit.errors import DependencyError, InputError, MistError
from mist_kit.runtime.bundle import EdgeBundle, open_edge_bundle
from mist_kit.runtime.ort_session import DISABLED_OPTIMIZERS, cpu_session, session_options

EMBEDDING = "embedding"
# onnxruntime fuses residual Add + LayerNormalization into SkipLayerNormalization; on the LAE's [T, D] rows that
# fused kernel measured ~4.5x slower than Add + LayerNorm on x86 (issue 14, ORT profiler), so it stays off
def ort_options(threads: int = 1, graph_optimization: str = "all", cpu_mem_arena: bool = True) -> Any:
    """onnxruntime SessionOptions for an edge graph: the one factory's (`runtime.ort_session`), with the fusions
    measured slow (`DISABLED_OPTIMIZERS`) turned off. Export-time latency probes and `devices tune` use the same
    options as the device."""
    return session_options(threads, optimization=graph_optimization, mem_arena=cpu_mem_arena)


def edge_ort_session(model: str | bytes, threads: int = 1) -> Any:
    """A CPU session on an edge graph (file path or serialized model) with the device's options."""
    return cpu_session(model, threads)


@dataclass(frozen=True)
class SessionSettings:
    """How to run the edge graph; `from_profile` derives it from a device profile."""

    threads: int = 1
    graph_optimization: str = "all"  # disable | basic | extended | all
    cpu_mem_arena: bool = False
    backend: str = "onnxruntime"  # onnxruntime | litert
    device: str | None = None  # the profile's name: whose `devices tune` record applies
    use_tune: bool = True  # honour `<bundle>.tune.json` (devices tune) for the default graph

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise InputError(f"threads: expected >= 1, got {self.threads}")
        if self.backend not in ("onnxruntime", "litert"):
            raise InputError(f"backend: expected 'onnxruntime' or 'litert', got {self.backend!r}")

    @classmethod
    def from_profile(cls, profile: Any, threads: int | None = None) -> SessionSettings:
        return cls(threads=threads or profile.threads, graph_optimization=profile.ort.graph_optimization,
                   cpu_mem_arena=profile.ort.cpu_mem_arena, backend=profile.backend, device=profile.name)


def litert_available() -> bool:
    return importlib.util.find_spec("ai_edge_litert") is not None


def one_row_at_a_time(run: Callable[[dict[str, np.ndarray]], np.ndarray],
                      feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """`run` on each row of `feeds` in turn, outputs stacked along the batch axis.

    For graphs whose answer must not depend on batch mates (dynamic int8, see `runs_per_row`) or that only take
    batch 1 (edge.tflite from litert-torch 0.10).
    """
    n = len(next(iter(feeds.values())))
    return np.concatenate([run({k: v[i:i + 1] for k, v in feeds.items()}) for i in range(n)])


def runs_per_row(manifest: dict[str, Any], graph_file: str) -> bool:
    """True for a dynamically quantized int8 edge graph: it must see one image per call.

    Dynamic int8 takes activation scales from the whole input tensor, so in a batch each image would be quantized
    with its batch mates' ranges: answers would depend on what else is in the batch. One row per call keeps every
    prediction a function of its own image, and is what the export-time agreement gate measured.
    """
    q = manifest.get("edge", {}).get("quantization") or {}
    return q.get("mode") == "dynamic" and graph_file == manifest.get("edge", {}).get("file")


class EdgeSession:
    """Encoded features (the cloud outputs) -> embedding (B, E), and -> logits with the bundle's or a given head."""

    def __init__(self, bundle: EdgeBundle, settings: SessionSettings | None = None) -> None:
        self.settings = settings or SessionSettings()
        self.backend_note = ""
        self.threads, self.threads_note = capped_threads(self.settings.threads)
        self.tune_note = ""
        bundle, tuned = self._apply_tune(bundle)
        # a tune record decides the engine (it timed them on this device); otherwise the profile's preference
        use_litert = bundle.edge_path.suffix == ".tflite" if tuned else self.settings.backend == "litert"
        if use_litert and not bundle.manifest["edge"].get("tflite"):
            use_litert, self.backend_note = False, "profile prefers LiteRT but the bundle has no edge.tflite"
        elif use_litert and not litert_available():
            use_litert, self.backend_note = False, "profile prefers LiteRT but ai-edge-litert is not installed"
        if use_litert and bundle.edge_path.suffix != ".tflite":
            bundle = open_edge_bundle(bundle.root, variant="tflite")
        self.bundle = bundle
        self.names = [i["name"] for i in bundle.inputs]
        self.dtypes = {i["name"]: np.dtype(i["dtype"]) for i in bundle.inputs}
        self.backend = "litert" if use_litert else "onnxruntime"
        self.per_row = not use_litert and runs_per_row(bundle.manifest, bundle.edge_path.name)
        self._run = self._litert_runner() if use_litert else self._ort_runner()

    def _apply_tune(self, bundle: EdgeBundle) -> tuple[EdgeBundle, bool]:
        """Swap the default graph (edge.onnx) for the one `devices tune` measured fastest on this device."""
        from mist_kit.devices.tune import tuned_choice

        default = bundle.manifest["edge"].get("file") or "edge.onnx"
        if not (self.settings.use_tune and self.settings.device) or bundle.edge_path.name != Path(default).name:
            return bundle, False
        rec = tuned_choice(bundle.root, bundle.manifest, self.settings.device)
        if rec is None:
            return bundle, False
        ms = rec.get("ms_per_image", {})
        timing = ", ".join(f"{v} {t:.3f} ms" for v, t in ms.items())
        self.tune_note = f"devices tune chose {rec['file']} for {self.settings.device} ({timing} per image)"
        if rec["variant"] == "tflite" and not litert_available():
            self.tune_note += "; ai-edge-litert is not installed, so edge.onnx runs"
            return bundle, True
        return (bundle if rec["variant"] == "int8" else open_edge_bundle(bundle.root, variant=rec["variant"])), True

    def _ort_runner(self) -> Any:


        try:
            with contextlib.redirect_stderr(io.StringIO()):
                sess = cpu_session(self.bundle.edge_path, self.threads,
                                   optimization=self.settings.graph_optimization,
                                   mem_arena=self.settings.cpu_mem_arena)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            if looks_like_oom(exc):
                raise  # a memory cap was hit (threads or buffers could not be mapped): the caller reports it
            raise MistError(f"{self.bundle.edge_path}: onnxruntime cannot load the edge graph "
                            f"({str(exc).splitlines()[0][:200]})") from None
        got = [i.name for i in sess.get_inputs()]
        if got != self.names:
            raise InputError(f"{self.bundle.edge_path}: graph inputs {got}, manifest edge.inputs {self.names}")
        out_names = [o.name for o in sess.get_outputs()]
        out = EMBEDDING if EMBEDDING in out_names else out_names[0]

        def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
            return sess.run([out], feeds)[0]

        return (lambda feeds: one_row_at_a_time(run, feeds)) if self.per_row else run

    def _litert_runner(self) -> Any:
        from ai_edge_litert.interpreter import Interpreter

        interp = Interpreter(model_path=str(self.bundle.edge_path), num_threads=self.threads)
        details = interp.get_input_details()
        if len(details) != len(self.names):
            raise InputError(f"{self.bundle.edge_path}: {len(details)} inputs, manifest edge.inputs {self.names}")
        out_index = interp.get_output_details()[0]["index"]
        state = {"batch": None}
        # litert-torch 0.10 cannot convert LayerNorm with a dynamic batch, and XNNPack refuses to reshape the
        # static graph: a batch-1 edge.tflite gets one row per invoke (results do not depend on the batch)
        fixed_one = all(int(d["shape"][0]) == 1 and int(d.get("shape_signature", d["shape"])[0]) == 1
                        for d in details)

        def run_batch(feeds: dict[str, np.ndarray]) -> np.ndarray:
            batch = next(iter(feeds.values())).shape[0]
            if state["batch"] != batch:
                for det, name in zip(details, self.names, strict=True):
                    interp.resize_tensor_input(det["index"], list(feeds[name].shape))
                interp.allocate_tensors()
                state["batch"] = batch
            for det, name in zip(details, self.names, strict=True):  # tflite names differ; order is the contract
                interp.set_tensor(det["index"], feeds[name])
            interp.invoke()
            return np.array(interp.get_tensor(out_index))

        return (lambda feeds: one_row_at_a_time(run_batch, feeds)) if fixed_one else run_batch

    def embed(self, tensors: Mapping[str, np.ndarray]) -> np.ndarray:
        """One batch of encoded features (names as manifest edge.inputs) -> embedding (B, E) float32."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise InputError(f"edge inputs {missing} missing (got {sorted(tensors)})")
        feeds = {n: np.ascontiguousarray(tensors[n], dtype=self.dtypes[n]) for n in self.names}
        return np.asarray(self._run(feeds), dtype=np.float32)

    def logits(self, tensors: Mapping[str, np.ndarray], head: Any = None) -> np.ndarray:
        """Embedding then the head in numpy: (B, C)."""
        return (head or self.bundle.head).logits(self.embed(tensors))

    def stream(self, batches: Iterable[Mapping[str, np.ndarray]]) -> Iterator[np.ndarray]:
        """Embeddings for a stream of batches (a features file, a network client), one batch in memory at a time."""
        for batch in batches:
            yield self.embed(batch)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "graph": self.bundle.edge_path.name, "threads": self.threads,
                "graph_optimization": self.settings.graph_optimization,
                "cpu_mem_arena": self.settings.cpu_mem_arena, "disabled_optimizers": list(DISABLED_OPTIMIZERS),
                **({"threads_note": self.threads_note} if self.threads_note else {}),
                **({"tune_note": self.tune_note} if self.tune_note else {}),
                **({"backend_note": self.backend_note} if self.backend_note else {})}


def require_litert() -> None:
    """For callers that insist on LiteRT (no fallback)."""
    if not litert_available():
        raise DependencyError("ai-edge-litert is not installed (pip install ai-edge-litert)")
