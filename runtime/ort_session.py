"""One place that builds onnxruntime CPU sessions: the exporter's checks, the cloud server, `extract` and the
device runtime all get the same options, so a graph is measured where it is judged the way it runs where it ships.

Why one factory: session options change numbers (graph fusions) and speed (threads, spinning, arenas); four copies
drifted apart before. Torch-free.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any

from mist_kit.errors import DependencyError

OPT_LEVELS = ("disable", "basic", "extended", "all")
# Fusions measured slower than what they replace on CPU: SkipLayerNormalization (residual Add + LayerNorm in one
# node) took ~500 us against ~110 us for Add + LayerNorm on the MIST edge graph (BENCHMARKS.md, speed section).
DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def session_options(threads: int = 1, *, optimization: str = "all", mem_arena: bool = True,
                    optimized_model_path: str | None = None) -> Any:
    """CPU session options: `threads` intra-op threads (0 = all cores), one inter-op thread, sequential."""
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - core dependency
        raise DependencyError(f"onnxruntime is not installed ({exc})") from None
    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads if threads > 0 else (os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = mem_arena
    opts.enable_mem_pattern = mem_arena
    opts.graph_optimization_level = levels[optimization]
    opts.log_severity_level = 3
    if opts.intra_op_num_threads == 1:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("optimization.disable_specified_optimizers", ",".join(DISABLED_OPTIMIZERS))
    if optimized_model_path is not None:
        opts.optimized_model_filepath = optimized_model_path
    return opts


def cpu_session(src: str | os.PathLike[str] | bytes, threads: int = 1, **options: Any) -> Any:
    """An onnxruntime InferenceSession on the CPU provider (`options`: see `session_options`).

    onnxruntime print()s "EP Error ... Falling back" on some load failures: stdout stays clean (--json).
    Load failures propagate as onnxruntime's own exceptions; callers name the file in their one-line error.
    """
    import onnxruntime as ort

    opts = session_options(threads, **options)
    model = src if isinstance(src, bytes) else str(Path(src))
    with contextlib.redirect_stdout(io.StringIO()):
        return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
