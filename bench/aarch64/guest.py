"""The half of the aarch64 check that runs twice: under the host's x86 Python and under qemu-aarch64 (Cortex-A72).

Needs only the device stack (numpy, onnxruntime, safetensors, zstandard + the mist_kit sources on PYTHONPATH);
stdlib-only otherwise, so it runs on the bare Debian arm64 root. Writes an .npz of results and a .json of facts
(platform, versions, where every package was imported from) that `check.py` compares across the two runs.

    python guest.py smoke   --model M.onnx [--model M2.onnx ...] --input X.npy --out OUT
    python guest.py runtime --bundle B --features F.safetensors --out OUT [--finetune] [--device rpi4]
    python guest.py litert                                      --out OUT   (imports ai_edge_litert only)
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

FORBIDDEN = ("torch", "timm", "onnx", "torchvision")  # the device stack must not need these


def _origin(mod: str) -> str | None:
    m = sys.modules.get(mod)
    return getattr(m, "__file__", None) if m is not None else None


def _facts(t0: float) -> dict[str, Any]:
    import numpy as np

    facts: dict[str, Any] = {
        "machine": platform.machine(), "python": sys.version.split()[0], "numpy": np.__version__,
        "numpy_file": _origin("numpy"), "seconds": round(time.perf_counter() - t0, 2),
        "forbidden_imported": sorted(m for m in FORBIDDEN if m in sys.modules)}
    if "onnxruntime" in sys.modules:
        ort = sys.modules["onnxruntime"]
        facts.update(onnxruntime=ort.__version__, onnxruntime_file=_origin("onnxruntime"))
    if "mist_kit" in sys.modules:
        facts["mist_kit_file"] = _origin("mist_kit")
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            info = fh.read()
        facts["cpuinfo_parts"] = sorted({ln.split(":")[1].strip() for ln in info.splitlines()
                                         if ln.startswith("CPU part")})
        facts["cpuinfo_model"] = next((ln.split(":", 1)[1].strip() for ln in info.splitlines()
                                       if ln.startswith(("model name", "Model"))), None)
    except OSError:
        pass
    return facts


def _write(out: Path, arrays: dict[str, Any], facts: dict[str, Any]) -> None:
    import numpy as np

    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(str(out.with_suffix(".npz")), **arrays)
    out.with_suffix(".json").write_text(json.dumps(facts, indent=1, default=str) + "\n")


def smoke(args: argparse.Namespace, t0: float) -> None:
    """Plain numpy + onnxruntime on tiny graphs (fp32 and int8), no mist_kit: does the stack run at all?"""
    import numpy as np
    import onnxruntime as ort

    x = np.load(args.input)
    arrays: dict[str, Any] = {"numpy_check": (x.astype(np.float64) @ x.T.astype(np.float64)).sum(axis=1)}
    for i, model in enumerate(args.model):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
        arrays[f"out{i}"] = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    facts = _facts(t0)
    facts.update(mode="smoke", models=[Path(m).name for m in args.model], providers=ort.get_available_providers())
    _write(Path(args.out), arrays, facts)


def runtime(args: argparse.Namespace, t0: float) -> None:
    """The device path through mist_kit.runtime: verified bundle -> features file -> int8 edge -> numpy head."""
    import numpy as np

    from mist_kit.runtime.bundle import open_edge_bundle
    from mist_kit.runtime.edge_run import features_batches, run_edge
    from mist_kit.runtime.edge_session import EdgeSession, SessionSettings

    report = run_edge(args.bundle, args.features, device=args.device, batch=args.batch,
                      state_dir=Path(args.out).parent / "no-heads")
    preds = report.pop("predictions")
    arrays: dict[str, Any] = {"pred": np.array([p["index"] for p in preds], np.int64),
                              "prob": np.array([p["prob"] for p in preds], np.float64)}
    # Embeddings and logits of every sample through the same session settings (the run-edge report has only
    # the argmax), for the numeric comparison.
    bundle = open_edge_bundle(args.bundle)
    from mist_kit.devices.profiles import get_device

    session = EdgeSession(bundle, SessionSettings.from_profile(get_device(args.device)))
    _, batches = features_batches(args.features, bundle.manifest, args.batch)
    emb = np.concatenate([session.embed(b.tensors) for b in batches])
    arrays["embedding"] = emb
    arrays["logits"] = bundle.head.logits(emb)
    facts = _facts(t0)
    facts.update(mode="runtime", report=report, ids=[p["id"] for p in preds])
    if args.finetune:
        from mist_kit.runtime.edge_run import finetune_edge

        state = Path(args.out).parent / "heads"
        if state.exists():
            import shutil

            shutil.rmtree(state)
        t1 = time.perf_counter()
        ft = finetune_edge(args.bundle, args.finetune, device=args.device, state_dir=state)
        ft["wall_s"] = round(time.perf_counter() - t1, 2)
        from mist_kit.runtime.head_store import HeadStore

        head = HeadStore(bundle, state).load()
        arrays["ft_weight"], arrays["ft_bias"] = head.weight, head.bias
        ft.pop("history", None)
        facts["finetune"] = ft
        # Predictions with the fine-tuned head on the inference features.
        arrays["ft_pred"] = head.logits(emb).argmax(axis=1)
    facts["seconds"] = round(time.perf_counter() - t0, 2)
    _write(Path(args.out), arrays, facts)


def litert(args: argparse.Namespace, t0: float) -> None:
    """LiteRT's interpreter imports (and loads its native library) on this platform."""
    from ai_edge_litert import interpreter

    facts = _facts(t0)
    facts.update(mode="litert", litert_file=getattr(interpreter, "__file__", None),
                 interpreter=hasattr(interpreter, "Interpreter"))
    _write(Path(args.out), {}, facts)


def main(argv: list[str] | None = None) -> None:
    t0 = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("smoke")
    s.add_argument("--model", action="append", required=True)
    s.add_argument("--input", required=True)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--out", required=True)
    r = sub.add_parser("runtime")
    r.add_argument("--bundle", required=True)
    r.add_argument("--features", required=True)
    r.add_argument("--finetune", help="labelled features file to fine-tune the head on")
    r.add_argument("--device", default="rpi4")
    r.add_argument("--batch", type=int, default=32)
    r.add_argument("--out", required=True)
    lt = sub.add_parser("litert")
    lt.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    {"smoke": smoke, "runtime": runtime, "litert": litert}[args.mode](args, t0)
    print(json.dumps({"mode": args.mode, "machine": platform.machine(), "out": args.out,
                      "seconds": round(time.perf_counter() - t0, 2)}))


if __name__ == "__main__":
    main()
