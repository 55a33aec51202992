"""aarch64 proof: run mist_kit.runtime on x86 (host .venv) and under qemu-aarch64 (-cpu cortex-a72, Debian arm64
root with the aarch64 wheels) on the same bundle + features file, and compare.

    .venv/bin/python bench/aarch64/check.py [smoke|prepare|runtime|all] [--no-report]

Run `bench/aarch64/setup_root.sh` first (bench/aarch64/run_aarch64.sh does both). Everything is written under
bench/work/aarch64/ (gitignored). `all` = smoke + prepare + runtime and writes BENCHMARKS.md section "aarch64".
Emulated timings mean nothing (qemu translates every instruction): only correctness is reported.
Exit code 0 only if every prediction agrees.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tomllib

REPO = Path(__file__).resolve().parents[2]
WORK = Path(os.environ.get("MIST_AARCH64_WORK", REPO / "bench" / "work" / "aarch64"))
ROOT = WORK / "root"
SITE = ROOT / "opt" / "site"
SRC = ROOT / "opt" / "src"  # the repo's packages arranged as the installed mist_kit layout
GUEST = Path(__file__).resolve().parent / "guest.py"
HOST_PY = Path(os.environ.get("MIST_HOST_PYTHON", REPO / ".venv" / "bin" / "python"))
MIST = HOST_PY.parent / "mist-kit"
QEMU = shutil.which("qemu-aarch64-static") or "qemu-aarch64-static"
DATA = WORK / "data"
OUT = WORK / "out"
TINY_BACKBONE, TINY_IMG = "test_vit", 32  # as tests/conftest.py: 5 tokens of width 64
COMMAND = "bench/aarch64/run_aarch64.sh"


def log(msg: str) -> None:
    print(f"[aarch64] {msg}", file=sys.stderr, flush=True)


def root_ready() -> str | None:
    """None when qemu and the arm64 root are usable, else why not."""
    if not shutil.which("qemu-aarch64-static"):
        return "qemu-aarch64-static not installed (run bench/aarch64/setup_root.sh)"
    for need in (ROOT / "usr/bin/python3.11", SITE / "numpy", SITE / "onnxruntime", ROOT / "proc/cpuinfo"):
        if not need.exists():
            return f"{need} missing (run bench/aarch64/setup_root.sh)"
    return None


def stage_sources() -> None:
    """Copy toolkit/ runtime/ devices/ ... into SRC as the mist_kit package layout from pyproject's package-dir."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dir: dict[str, str] = cfg["tool"]["setuptools"]["package-dir"]
    if SRC.exists():
        shutil.rmtree(SRC)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in sorted(package_dir, key=lambda p: p.count(".")):  # parents first
        src = REPO / package_dir[pkg]
        if src.is_dir():
            shutil.copytree(src, SRC / pkg.replace(".", "/"), ignore=ignore, dirs_exist_ok=True)


def _env(pythonpath: list[Path]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "OMP_", "VIRTUAL_ENV"))}
    env.update(PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath), PYTHONHASHSEED="0", PYTHONNOUSERSITE="1")
    return env


def run_guest(where: str, args: list[str], timeout: int = 3000) -> dict[str, Any]:
    """Run guest.py on 'x86' (host .venv, mist_kit from SRC) or 'aarch64' (qemu, root python, site + SRC only)."""
    if where == "x86":
        cmd = [str(HOST_PY), str(GUEST), *args]
        env = _env([SRC])
    else:
        # -S: no site module, so no dist-packages path the -L fallback could resolve to the host's x86 packages.
        cmd = [QEMU, "-cpu", "cortex-a72", "-L", str(ROOT), str(ROOT / "usr/bin/python3.11"), "-S", str(GUEST),
               *args]
        env = _env([SRC, SITE])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"[aarch64] {where} run failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                         f"{proc.stdout[-3000:]}{proc.stderr[-5000:]}")
    log(f"{where}: {args[0]} done in {wall:.1f} s")
    return {"wall_s": round(wall, 1)}


def load(out: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy as np

    with np.load(out.with_suffix(".npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads(out.with_suffix(".json").read_text())


# ---------------------------------------------------------------- smoke: numpy + onnxruntime on a tiny graph


def make_smoke_models(d: Path) -> tuple[list[Path], Path]:
    """A tiny MLP as fp32 ONNX, plus int8 QDQ (static) and int8 dynamic quantisations of it, and an input."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (16, 64)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 64).astype(np.float32)
    w2 = rng.normal(0, 0.3, (64, 10)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 10).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["y"])]
    graph = helper.make_graph(
        nodes, "smoke", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    fp32, qdq, dyn = d / "smoke.fp32.onnx", d / "smoke.int8-qdq.onnx", d / "smoke.int8-dynamic.onnx"
    onnx.save(model, fp32)
    x = rng.normal(0, 1, (256, 16)).astype(np.float32)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter([{"x": x[i:i + 32]} for i in range(0, 128, 32)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    quantize_static(str(fp32), str(qdq), Reader(), activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    quantize_dynamic(str(fp32), str(dyn), weight_type=QuantType.QInt8)
    xin = d / "smoke_input.npy"
    np.save(xin, x)
    return [fp32, qdq, dyn], xin


def smoke(rerun: bool = True) -> dict[str, Any]:
    import numpy as np

    d = OUT / "smoke"
    models = [d / "smoke.fp32.onnx", d / "smoke.int8-qdq.onnx", d / "smoke.int8-dynamic.onnx"]
    res: dict[str, Any] = {}
    if rerun:
        models, xin = make_smoke_models(d)
        args = ["smoke", *[a for m in models for a in ("--model", str(m))], "--input", str(xin)]
        for where in ("x86", "aarch64"):
            res[f"{where}_wall_s"] = run_guest(where, [*args, "--out", str(d / where)])["wall_s"]
    (xa, xf), (aa, af) = load(d / "x86"), load(d / "aarch64")
    res.update(x86=xf, aarch64=af, models=[m.name for m in models])
    rows = []
    for i, m in enumerate(models):
        a, b = xa[f"out{i}"], aa[f"out{i}"]
        rows.append({"model": m.name, "argmax_equal": int((a.argmax(1) == b.argmax(1)).sum()), "n": len(a),
                     "max_abs_diff": float(np.abs(a - b).max()), "max_abs": float(np.abs(a).max())})
    res["graphs"] = rows
    res["numpy_max_abs_diff"] = float(np.abs(xa["numpy_check"] - aa["numpy_check"]).max())
    res["ok"] = all(r["argmax_equal"] == r["n"] for r in rows) and af["machine"] == "aarch64"
    for r in rows:
        log(f"smoke {r['model']}: argmax equal {r['argmax_equal']}/{r['n']}, max |diff| {r['max_abs_diff']:.3g}")
    return res


def litert_smoke() -> dict[str, Any]:
    if not (SITE / "ai_edge_litert").is_dir():
        return {"ok": False, "why": "no aarch64 ai-edge-litert wheel in the root"}
    try:
        run_guest("aarch64", ["litert", "--out", str(OUT / "litert" / "aarch64")])
    except SystemExit as exc:
        return {"ok": False, "why": str(exc).splitlines()[-1][:300]}
    _, facts = load(OUT / "litert" / "aarch64")
    return {"ok": bool(facts.get("interpreter")), "facts": facts}


# ---------------------------------------------------------------- prepare: tiny checkpoint -> bundle -> features


def _mist(*args: str, timeout: int = 3000) -> subprocess.CompletedProcess[str]:
    cmd = [str(MIST), *args]  # run_aarch64.sh already runs everything at nice 10
    log("$ mist-kit " + " ".join(args))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"[aarch64] mist-kit {args[0]} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc


def _has_command(name: str) -> bool:
    proc = subprocess.run([str(MIST), name, "--help"], capture_output=True, text=True, check=False, cwd=REPO)
    return proc.returncode == 0


def prepare(force: bool = False) -> dict[str, Any]:
    """Digits demo data + random test_vit -> `mist-kit train` -> `export` -> `extract` (test: infer, val: fine-tune).

    Each step is skipped when its output exists (so training can run before `export` is available).
    """
    bundle, feats, tune = DATA / "bundle", DATA / "test.features.safetensors", DATA / "val.features.safetensors"
    if force and DATA.exists():
        shutil.rmtree(DATA)
    sys.path.insert(0, str(REPO))
    from mist_kit.backbone import save_random_backbone
    from mist_kit.demo_data import write_digits

    DATA.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lists = write_digits(DATA / "digits", size=16)
    weights = DATA / "tiny.safetensors"
    if not weights.exists():
        save_random_backbone(TINY_BACKBONE, weights, img_size=TINY_IMG, seed=0)
    run = DATA / "run"
    ckpt = run / "checkpoint"
    if not (ckpt / "config.json").is_file():
        _mist("train", "--train", str(lists["train"]), "--val", str(lists["val"]), "--test", str(lists["test"]),
              "--out", str(run), "--backbone", TINY_BACKBONE, "--weights", str(weights), "--img-size",
              str(TINY_IMG), "--k", "2", "--epochs", "15", "--lr", "0.01", "--seed", "0")
    missing = [c for c in ("export", "extract") if not _has_command(c)]
    if missing:
        raise SystemExit(f"[aarch64] `mist-kit {'/'.join(missing)}` not available yet: cannot build the bundle")
    if (bundle / "manifest.json").is_file() and \
            json.loads((bundle / "manifest.json").read_text()).get("schema") != "mist-kit/bundle/2":
        log(f"{bundle}: an older bundle format; re-exporting it (and its features files)")
        shutil.rmtree(bundle)
        feats.unlink(missing_ok=True)
        tune.unlink(missing_ok=True)
    if not (bundle / "manifest.json").is_file():
        _mist("export", str(ckpt), "--out", str(bundle))
    for split, path in (("test", feats), ("val", tune)):
        if not path.is_file():
            _mist("extract", str(bundle), str(lists[split]), "--out", str(path))
    return {"bundle": str(bundle), "features": str(feats), "finetune_features": str(tune),
            "manifest": json.loads((bundle / "manifest.json").read_text()), "seconds": round(time.perf_counter() - t0)}


# ---------------------------------------------------------------- runtime: the device path, x86 vs aarch64


def _codecs(manifest: dict[str, Any]) -> str:
    """The codec of every sent tensor of a format-2 manifest (`cloud.plan.tensors[].codec`), as one label."""
    rows = manifest.get("cloud", {}).get("plan", {}).get("tensors", [])
    names = [(r.get("name"), (r.get("codec") or {}).get("name", "fp32")) for r in rows]
    if len({c for _, c in names}) == 1:
        return names[0][1]
    return ", ".join(f"{t}: {c}" for t, c in names) or "not recorded"


def runtime(info: dict[str, Any] | None, finetune: bool = True) -> dict[str, Any]:
    """Run both sides on `info`'s bundle (None: compare the last saved run) and compare."""
    import numpy as np

    d = OUT / "runtime"
    res: dict[str, Any] = {}
    if info is not None:
        args = ["runtime", "--bundle", info["bundle"], "--features", info["features"], "--device", "rpi4"]
        if finetune and info.get("finetune_features"):
            args += ["--finetune", info["finetune_features"]]
        for p in (d / "x86", d / "aarch64"):
            if p.exists():
                shutil.rmtree(p)
        for where in ("x86", "aarch64"):
            res[f"{where}_wall_s"] = run_guest(where, [*args, "--out", str(d / where / "result")])["wall_s"]
        m = info["manifest"]
        res["manifest_summary"] = {
            "what": f"`{m.get('model_name')}` ({m.get('backbone', {}).get('name')}, k={m.get('k')}, codec "
                    f"{_codecs(m)}, {len(m.get('classes', []))} classes, int8 recipe "
                    f"{(m.get('edge', {}).get('quantization') or {}).get('name', 'not recorded')})",
            "bundle": info["bundle"], "features": info["features"], "finetune_features": info.get("finetune_features")}
        (d / "info.json").write_text(json.dumps(res, indent=1) + "\n")
    else:
        res.update(json.loads((d / "info.json").read_text()))
    (xa, xf), (aa, af) = load(d / "x86" / "result"), load(d / "aarch64" / "result")
    n = len(xa["pred"])
    emb_x, emb_a = xa["embedding"].astype(np.float64), aa["embedding"].astype(np.float64)
    res.update(
        x86=xf, aarch64=af, n=n, ids_equal=xf["ids"] == af["ids"],
        pred_equal=int((xa["pred"] == aa["pred"]).sum()),
        embedding_max_abs_diff=float(np.abs(emb_x - emb_a).max()),
        embedding_max_abs=float(np.abs(emb_x).max()),
        embedding_rel_l2=float(np.linalg.norm(emb_x - emb_a) / max(np.linalg.norm(emb_x), 1e-30)),
        embeddings_bitwise_equal=bool(np.array_equal(xa["embedding"], aa["embedding"])),
        logits_max_abs_diff=float(np.abs(xa["logits"] - aa["logits"]).max()),
        prob_max_abs_diff=float(np.abs(xa["prob"] - aa["prob"]).max()),
        top1_x86=xf["report"].get("top1"), top1_aarch64=af["report"].get("top1"))
    # The embedding pass and run-edge agree on each platform (same session settings).
    res["runedge_vs_embed_x86"] = int((xa["logits"].argmax(1) == xa["pred"]).sum())
    res["runedge_vs_embed_aarch64"] = int((aa["logits"].argmax(1) == aa["pred"]).sum())
    ok = res["pred_equal"] == n and res["ids_equal"] and af["machine"] == "aarch64" and not af["forbidden_imported"]
    if "ft_weight" in xa and "ft_weight" in aa:
        fx, fa = xf["finetune"], af["finetune"]
        res["finetune"] = {
            "x86": fx, "aarch64": fa,
            "weight_max_abs_diff": float(np.abs(xa["ft_weight"] - aa["ft_weight"]).max()),
            "weight_max_abs": float(np.abs(xa["ft_weight"]).max()),
            "bias_max_abs_diff": float(np.abs(xa["ft_bias"] - aa["ft_bias"]).max()),
            "pred_equal": int((xa["ft_pred"] == aa["ft_pred"]).sum()), "n": len(xa["ft_pred"])}
        ft = res["finetune"]
        ok = ok and ft["pred_equal"] == ft["n"]
    res["ok"] = bool(ok)
    log(f"runtime: predictions equal {res['pred_equal']}/{n}, max |emb diff| {res['embedding_max_abs_diff']:.3g}")
    return res


# ---------------------------------------------------------------- report


def _fmt(x: Any, spec: str = ".3g") -> str:
    return "n/a" if x is None else format(x, spec)


def report_body(sm: dict[str, Any] | None, rt: dict[str, Any] | None, lt: dict[str, Any] | None,
                total_s: float, note: str = "") -> str:
    from _report import markdown_table  # bench/_report.py

    lines = ["**Correctness only.** x86 = this host's .venv; aarch64 = the same code under "
             "`qemu-aarch64-static -cpu cortex-a72` on a Debian bookworm arm64 root (python3.11 from the .debs, "
             "aarch64 cp311 wheels, a Raspberry Pi 4 /proc/cpuinfo). qemu translates every instruction, so "
             "emulated timings say nothing about a Pi and none are reported; wall times below are the cost of "
             "the check itself."]
    if note:
        lines += ["", note]
    if rt:
        a, x = rt["aarch64"], rt["x86"]
        m = rt.get("manifest_summary", {})
        lines += ["", f"Manifest: {m.get('what', 'tiny test bundle')}; features file of {rt['n']} samples; device "
                  f"profile `rpi4` ({a['report'].get('threads')} threads, backend {a['report'].get('backend')}, "
                  f"graph `{a['report'].get('graph')}`), batch 32.", ""]
        rows = [["predictions (run-edge) equal", f"{rt['pred_equal']}/{rt['n']}"],
                ["embedding max abs diff", f"{_fmt(rt['embedding_max_abs_diff'])} (max abs embedding "
                 f"{_fmt(rt['embedding_max_abs'])}; relative L2 {_fmt(rt['embedding_rel_l2'])}; bitwise equal: "
                 f"{rt['embeddings_bitwise_equal']})"],
                ["logits max abs diff", _fmt(rt["logits_max_abs_diff"])],
                ["softmax prob max abs diff (run-edge rounds to 5 decimals)", _fmt(rt["prob_max_abs_diff"])],
                ["top-1 x86 / aarch64", f"{_fmt(rt['top1_x86'], '.4f')} / {_fmt(rt['top1_aarch64'], '.4f')}"]]
        ft = rt.get("finetune")
        if ft:
            fx, fa = ft["x86"], ft["aarch64"]
            rows += [["fine-tuned head (finetune-edge) weight max abs diff",
                      f"{_fmt(ft['weight_max_abs_diff'])} (max abs weight {_fmt(ft['weight_max_abs'])}); bias "
                      f"{_fmt(ft['bias_max_abs_diff'])}"],
                     ["fine-tuning epochs run x86 / aarch64", f"{fx.get('epochs_run')} / {fa.get('epochs_run')}"],
                     ["fine-tune top-1 before -> after (held-out) x86",
                      f"{_fmt(fx.get('top1_before'), '.4f')} -> {_fmt(fx.get('top1_after'), '.4f')}"],
                     ["fine-tune top-1 before -> after (held-out) aarch64",
                      f"{_fmt(fa.get('top1_before'), '.4f')} -> {_fmt(fa.get('top1_after'), '.4f')}"],
                     ["predictions with the fine-tuned heads equal", f"{ft['pred_equal']}/{ft['n']}"]]
        rows += [["torch/timm/onnx imported on aarch64", ", ".join(a["forbidden_imported"]) or "none"],
                 ["versions x86", f"Python {x['python']}, numpy {x['numpy']}, onnxruntime {x.get('onnxruntime')}"],
                 ["versions aarch64", f"Python {a['python']}, numpy {a['numpy']}, onnxruntime {a.get('onnxruntime')}"
                  f" (machine {a['machine']}, cpuinfo CPU part {', '.join(a.get('cpuinfo_parts', []))})"]]
        lines += [markdown_table(["runtime check (x86 vs aarch64)", "result"], rows)]
    else:
        lines += ["", "Runtime check: not run (no bundle could be built; see the script's output)."]
    if sm:
        lines += ["", "Smoke check (numpy + onnxruntime alone, a 16-64-10 MLP, 256 rows):", ""]
        lines += [markdown_table(["graph", "argmax equal", "max abs diff (max abs output)"],
                                 [[g["model"], f"{g['argmax_equal']}/{g['n']}",
                                   f"{_fmt(g['max_abs_diff'])} ({_fmt(g['max_abs'])})"] for g in sm["graphs"]])]
    if lt is not None:
        lines += ["", "LiteRT (ai-edge-litert) on aarch64: " + (
            f"interpreter imports ({lt['facts'].get('litert_file')}); no edge.tflite in the bundle, so no LiteRT "
            "inference compared" if lt.get("ok") else f"not proven: {lt.get('why')}")]
    verdict = "PASS" if (rt or {}).get("ok") and (sm or {}).get("ok", True) else "FAIL"
    walls = [f"{name} x86 {r['x86_wall_s']:.0f} s / aarch64 {r['aarch64_wall_s']:.0f} s"
             for name, r in (("smoke", sm), ("runtime", rt)) if r and "x86_wall_s" in r]
    lines += ["", f"Verdict: **{verdict}**. Wall time of the runs (set-up cached; on a shared, heavily loaded "
              f"2-core host, emulated, so not a Pi timing): {'; '.join(walls) or 'n/a'}"
              + (f"; whole check {total_s:.0f} s." if total_s else ".")]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("step", nargs="?", default="all", choices=("smoke", "prepare", "runtime", "all", "report"),
                    help="report: compare the saved outputs again and write BENCHMARKS.md, without re-running")
    ap.add_argument("--no-report", action="store_true", help="do not write BENCHMARKS.md")
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the bundle and features files")
    ap.add_argument("--bundle", help="use this bundle instead of building one (with --features)")
    ap.add_argument("--features", help="features file for --bundle")
    ap.add_argument("--finetune-features", help="labelled features file to fine-tune on (with --bundle)")
    ap.add_argument("--note", default="", help="a line added to the BENCHMARKS.md section (e.g. which bundle)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    why = root_ready()
    if why:
        log(why)
        return 2
    stage_sources()
    sm = rt = lt = None
    summary: dict[str, Any] = {}
    if args.step == "report":
        sm = smoke(rerun=False) if (OUT / "smoke" / "aarch64.json").is_file() else None
        lt_facts = OUT / "litert" / "aarch64.json"
        lt = {"ok": True, "facts": json.loads(lt_facts.read_text())} if lt_facts.is_file() else None
        rt = runtime(None)
    if args.step in ("smoke", "all"):
        sm = smoke()
        lt = litert_smoke()
    if args.step in ("prepare", "runtime", "all"):
        if args.bundle:
            if not args.features:
                ap.error("--bundle needs --features")
            info = {"bundle": args.bundle, "features": args.features, "finetune_features": args.finetune_features,
                    "manifest": json.loads((Path(args.bundle) / "manifest.json").read_text())}
        else:
            info = prepare(force=args.rebuild)
        summary["prepare_seconds"] = info.get("seconds")
        if args.step != "prepare":
            rt = runtime(info, finetune=not args.no_finetune)
    if sm:
        summary["smoke"] = {k: v for k, v in sm.items() if k not in ("x86", "aarch64")}
    if lt is not None:
        summary["litert"] = lt
    if rt:
        summary["runtime"] = {k: v for k, v in rt.items() if k not in ("x86", "aarch64")}
        summary["runtime"]["aarch64_facts"] = {k: v for k, v in rt["aarch64"].items() if k != "ids"}
    total = time.perf_counter() - t0
    summary["total_s"] = round(total, 1)
    (OUT / "summary.json").parent.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    print(json.dumps(summary, indent=1, default=str))
    if args.step in ("all", "report") and not args.no_report:
        sys.path.insert(0, str(REPO / "bench"))
        from _report import update_section

        update_section("aarch64", "aarch64 (Raspberry Pi 4 class) correctness under qemu",
                       report_body(sm, rt, lt, 0.0 if args.step == "report" else total, args.note), COMMAND)
        log("BENCHMARKS.md section 'aarch64' written")
    ok = (sm is None or sm["ok"]) and (rt is None or rt["ok"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
