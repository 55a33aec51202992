"""`mist-kit compare`: which method, at which depth and codec, fits a device and a link, under one protocol.

Protocol (what makes the rows comparable):
- one feature cache: the union of every candidate plan's tensors, filled by one backbone pass per image;
- per method, its own depth search on val (`train --k auto`) with plain fp32 features;
- per (method, codec): the edge network trained at that depth on the codec's round trip (what the device will
  receive), early-stopped on val; val top-1 chooses, test (when given) is reported and never used to choose;
- per row: the exported bundle (cloud.onnx + int8 edge.onnx, validated by the exporter's gate), its edge graph
  timed on this host with the profile's threads (capped at this host's cores; a host timing, flagged), its recorded
  parameters and MACs, bytes per image on the wire (plain and zstd), and the peak RSS of `run-edge` and of
  `finetune-edge` on val features, each measured in a fresh process, against the profile's memory budget.
Rows are appended to `OUT/rows.jsonl` as they finish: a rerun skips finished rows, Ctrl-C keeps them. Each row
records the settings it was made under (backbone, weights, data, epochs, seed, precision, depth); a rerun with other
settings redoes that row instead of reusing it, and a rerun for another device only re-judges kept rows (and
re-times their edge graph when the device's thread count differs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.errors import MistError, UsageError

Log = Callable[[str], None]
ROWS_FILE = "rows.jsonl"
# The keys of one row, documented for `--json` consumers (README, compare section).
ROW_KEYS = ("method", "codec", "k", "val_top1", "test_top1", "bytes_per_image", "bytes_per_image_zstd",
            "edge_params", "edge_macs_per_image", "edge_ms", "edge_ms_threads", "host_timing", "inference_rss_mb",
            "finetune_rss_mb", "fits", "why_not", "train_seconds", "checkpoint", "bundle", "settings", "error")


@dataclass(frozen=True)
class CompareRequest:
    """Everything `mist-kit compare` needs; contradictory settings are rejected at construction."""

    backbone: str
    train: str
    val: str
    out: Path
    methods: tuple[str, ...]
    codecs: tuple[str, ...]
    device: str = "rpi4"
    weights: str | None = None
    img_size: int | None = None
    test: str | None = None
    max_bytes: int | None = None
    max_latency_ms: float | None = None
    epochs: int = 30
    seed: int = 0
    cache_dir: Path | None = None
    backbone_precision: str = "fp32"
    train_precision: str = "fp32"
    depths: dict[str, int] = field(default_factory=dict)  # a method's fixed depth instead of its search on val
    kept_only: bool = False  # re-judge the finished rows in OUT; build nothing (a missing row is reported as such)
    progress: bool = True

    def __post_init__(self) -> None:
        from mist_kit.edge import get_edge_method
        from mist_kit.runtime.codec import codec_params, parse_codec_name

        if not self.methods:
            raise UsageError("--methods: name at least one edge method (see `mist-kit methods`)")
        if not self.codecs:
            raise UsageError("--codecs: name at least one codec (see `mist-kit codec list`)")
        for m in self.methods:
            get_edge_method(m)  # unknown names: one line listing the registered ones
        for c in self.codecs:
            codec_params(parse_codec_name(c)[0])
        for m in self.depths:
            if m not in self.methods:
                raise UsageError(f"--k {m}=...: {m!r} is not one of --methods ({', '.join(self.methods)})")
        if self.backbone_precision not in ("fp32", "bf16"):
            raise UsageError(f"--backbone-precision must be fp32 or bf16, got {self.backbone_precision!r}")
        from mist_kit.train import TrainParams

        TrainParams(precision=self.train_precision)  # bf16 on a CPU without it: one line, before any work
        if self.max_bytes is not None and self.max_bytes < 1:
            raise UsageError(f"--max-bytes must be >= 1, got {self.max_bytes}")
        if self.max_latency_ms is not None and not self.max_latency_ms > 0:
            raise UsageError(f"--max-latency-ms must be > 0, got {self.max_latency_ms}")


def parse_depths(text: str | None) -> dict[str, int]:
    """'mist=4,vitsplit=9' -> {'mist': 4, 'vitsplit': 9} (what --k takes)."""
    depths: dict[str, int] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            depths[name.strip()] = int(value)
        except ValueError:
            raise UsageError(f"--k {text!r}: expected METHOD=INT pairs, e.g. mist=4,vitsplit=9") from None
    return depths


def parse_bytes(text: str | None) -> int | None:
    """'16KB' -> 16000, '2MiB' -> 2097152, '500' -> 500 (what --max-bytes takes)."""
    if text is None:
        return None
    units = {"": 1, "B": 1, "KB": 1000, "MB": 1000 ** 2, "KIB": 1024, "MIB": 1024 ** 2}
    t = text.strip().upper().replace(" ", "")
    num = t.rstrip("KMIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise UsageError(f"--max-bytes {text!r}: expected a size like 500, 16KB or 1.5MB") from None
    if unit not in units:
        raise UsageError(f"--max-bytes {text!r}: unit must be B, KB, MB, KiB or MiB")
    return int(value * units[unit])


# ---- one row -------------------------------------------------------------------------------------------------
def _row_id(method: str, codec: str) -> str:
    return f"{method}@{codec}"


def _settings(req: CompareRequest, method: str) -> dict[str, Any]:
    """What a row's numbers depend on besides its (method, codec): a kept row is reused only under equal settings.
    The device and the limits are not in it: they only judge a row (and set the threads it is timed with)."""
    weights = None
    if req.weights:
        st = Path(req.weights).stat()
        weights = f"{Path(req.weights).resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return {"backbone": req.backbone, "weights": weights, "img_size": req.img_size, "train": req.train,
            "val": req.val, "test": req.test, "epochs": req.epochs, "seed": req.seed,
            "backbone_precision": req.backbone_precision, "train_precision": req.train_precision,
            "depth": req.depths.get(method)}


def _load_rows(path: Path) -> dict[str, dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            rows[_row_id(row["method"], row["codec"])] = row  # a later line (a redone row) wins
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by a crash: that row is simply redone
    return rows


def _changed(kept: dict[str, Any], now: dict[str, Any]) -> str | None:
    """None when a kept row was made under `now`'s settings, else what differs (for the log line)."""
    then = kept.get("settings") or {}
    defaults = {"train_precision": "fp32"}  # a setting added later: rows made before it used its default
    diff = [f"{k} {then.get(k, defaults.get(k))!r} -> {v!r}" for k, v in now.items()
            if then.get(k, defaults.get(k)) != v]
    return ", ".join(diff) or None


def _append_row(path: Path, row: dict[str, Any]) -> None:
    """One JSON line per finished row, flushed and fsynced: an interrupted run keeps every finished row."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, allow_nan=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _fresh_process_rss(args: list[str]) -> float:
    """Peak RSS (MB) that `mist-kit ARGS --json` reports, run in a fresh interpreter (no torch loaded)."""
    cmd = [sys.executable, "-c", "from mist_kit.cli.app import main; main()", *args, "--json", "--no-cap"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise MistError(f"`mist-kit {args[0]}` failed in a fresh process: {last[:200]}")
    return float(json.loads(done.stdout)["peak_rss_mb"])


def _wire_bytes(codecs: dict[str, Any], inputs: dict[str, np.ndarray]) -> tuple[int, float]:
    """(plain bytes per image, zstd-3 bytes per image) of these float inputs through their codecs."""
    from mist_kit.runtime.codec import encode_payload
    from mist_kit.runtime.codec.plan_codecs import bytes_per_image

    n = len(next(iter(inputs.values())))
    zstd = 0
    for name, codec in codecs.items():
        enc = codec.encode(inputs[name])
        zstd += len(encode_payload(codec, enc, zstd_level=3))
    return bytes_per_image(codecs), round(zstd / n, 1)


def _encoded_features(manifest: dict[str, Any], codecs: dict[str, Any], inputs: dict[str, np.ndarray],
                      labels: np.ndarray, path: Path) -> Path:
    """A features file of val rows, encoded by the numpy codecs (what cloud.onnx emits, up to export parity)."""
    from mist_kit.runtime.codec.plan_codecs import encode_all
    from mist_kit.runtime.features_file import write_features

    encoded = encode_all(codecs, inputs)
    n = len(labels)
    return write_features(path, manifest, encoded, [f"val/{i}" for i in range(n)], labels)


def _edge_ms(bundle: Path, profile: Any, encoded: dict[str, np.ndarray], repeats: int = 30) -> tuple[float, int]:
    """Median ms per image at batch 1 of the bundle's edge graph with the profile's threads (capped at the cores
    this process may use); returns (ms, threads used)."""
    from mist_kit.runtime.bundle import open_edge_bundle
    from mist_kit.runtime.edge_session import EdgeSession, SessionSettings
    from mist_kit.runtime.metrics import median_ms

    session = EdgeSession(open_edge_bundle(bundle), SessionSettings.from_profile(profile))
    threads = session.threads  # the profile's threads, capped at the cores this process may use
    n = len(next(iter(encoded.values())))
    rows = [{k: v[i:i + 1] for k, v in encoded.items()} for i in range(min(n, repeats))]
    it = iter(range(10 ** 9))
    return round(median_ms(lambda: session.embed(rows[next(it) % len(rows)]), repeats), 3), threads


def _verdict(row: dict[str, Any], profile: Any, req: CompareRequest) -> tuple[bool, str | None]:
    why = []
    peak = max(row.get("inference_rss_mb") or 0.0, row.get("finetune_rss_mb") or 0.0)
    if peak > profile.budget_mb:
        why.append(f"peak RSS {peak:.0f} MB > {profile.name}'s {profile.budget_mb} MB budget")
    if req.max_bytes is not None and row["bytes_per_image"] > req.max_bytes:
        why.append(f"{row['bytes_per_image']:,} B/image > --max-bytes {req.max_bytes:,}")
    if req.max_latency_ms is not None and row["edge_ms"] > req.max_latency_ms:
        why.append(f"edge {row['edge_ms']} ms > --max-latency-ms {req.max_latency_ms}")
    return (not why), ("; ".join(why) or None)


def _reproduce(req: CompareRequest, row: dict[str, Any]) -> list[str]:
    """The `train` / `export` commands that rebuild a row's model and bundle."""
    from mist_kit.train import TrainParams

    weights = f" --weights {req.weights}" if req.weights else ""
    size = f" --img-size {req.img_size}" if req.img_size else ""
    k = "" if row["k"] is None else f" --k {row['k']}"
    test = f" --test {req.test}" if req.test else ""
    out = f"runs/{row['method']}-{row['codec']}"
    if req.backbone_precision != "fp32":
        test += f" --backbone-precision {req.backbone_precision}"
    if req.train_precision != "fp32":
        test += f" --train-precision {req.train_precision}"
    return [f"mist-kit train --backbone {req.backbone}{weights}{size} --train {req.train} --val {req.val}{test} "
            f"--method {row['method']}{k} --codec {row['codec']} --epochs {req.epochs} --min-steps "
            f"{TrainParams().min_steps} --no-refit --seed {req.seed} --out {out}",
            f"mist-kit export {out} --out bundles/{row['method']}-{row['codec']} --split --quantize int8"]


# ---- the run -------------------------------------------------------------------------------------------------
@dataclass
class CompareResult:
    rows: list[dict[str, Any]]
    device: str
    budget_mb: int
    jpeg_q90_bytes: float | None
    best: dict[str, Any] | None
    reproduce: list[str]
    notes: list[str]
    interrupted: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "budget_mb": self.budget_mb, "jpeg_q90_bytes": self.jpeg_q90_bytes,
                "rows": self.rows, "best": self.best, "reproduce": self.reproduce, "notes": self.notes,
                "interrupted": self.interrupted}


def run_compare(req: CompareRequest, log: Log = print) -> CompareResult:
    """Fill the shared cache once, then build, export and measure every (method, codec) row (see module doc)."""
    from mist_kit.codec_bench import jpeg_q90_bytes
    from mist_kit.data import load_image_list
    from mist_kit.devices.profiles import get_device
    from mist_kit.edge import get_edge_method
    from mist_kit.pipeline import TrainRequest
    from mist_kit.train import TrainParams

    profile = get_device(req.device)
    out = Path(req.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = req.cache_dir or out / "cache"
    rows_path = out / ROWS_FILE
    done = _load_rows(rows_path)
    if done:
        log(f"resuming: {len(done)} finished rows in {rows_path}")
    base = TrainRequest(backbone=req.backbone, weights=req.weights, img_size=req.img_size, train=req.train,
                        val=req.val, test=req.test, out=out / "runs" / "_", cache_dir=cache_dir,
                        params=TrainParams(epochs=req.epochs, seed=req.seed, precision=req.train_precision),
                        progress=req.progress, backbone_precision=req.backbone_precision,
                        refit=False)  # each row's export gates int8 on val: it must stay held out
    if not req.kept_only:
        _fill_cache(base, req.methods, log)
    notes = [f"host timings: the edge graph ran here ({_host()}) with {profile.name}'s threads capped at this "
             "host's cores; they rank the rows, they are not the device's milliseconds"]
    rows: list[dict[str, Any]] = []
    interrupted = False
    total = len(req.methods) * len(req.codecs)
    try:
        for m_i, method in enumerate(req.methods):
            chosen_k: int | None = None
            for c_i, codec in enumerate(req.codecs):
                rid = _row_id(method, codec)
                n = m_i * len(req.codecs) + c_i + 1
                settings = _settings(req, method)
                if chosen_k is None:
                    chosen_k = req.depths.get(method)
                kept = done.get(rid)
                if kept is not None and (why := _changed(kept, settings)) is not None:
                    log(f"[{n}/{total}] {rid}: the kept row was made with other settings ({why}): redoing it")
                elif kept is not None and kept.get("error") and not req.kept_only:
                    log(f"[{n}/{total}] {rid}: the kept row failed ({kept['error'][:80]}): trying it again")
                elif kept is not None:
                    rows.append(_retimed(kept, profile, log))
                    chosen_k = kept.get("k") if chosen_k is None else chosen_k
                    continue
                if req.kept_only:
                    rows.append({"method": method, "codec": codec, "k": chosen_k,
                                 "error": "not run yet (--kept-only: nothing is built)"})
                    continue
                searches = chosen_k is None and get_edge_method(method).searches_depth()
                log(f"[{n}/{total}] {rid}: training{' (depth search on val)' if searches else ''}")
                t0 = time.perf_counter()
                try:
                    row = _one_row(req, base, profile, method, codec, chosen_k, out, log)
                except MistError as exc:
                    row = {"method": method, "codec": codec, "k": chosen_k, "error": str(exc)}
                    log(f"[{n}/{total}] {rid}: skipped ({exc})")
                row["settings"] = settings
                if chosen_k is None and row.get("k") is not None:
                    chosen_k = row["k"]  # the method's depth, searched once on val, serves its other codecs
                row["seconds"] = round(time.perf_counter() - t0, 1)
                _append_row(rows_path, row)
                rows.append(row)
    except KeyboardInterrupt:
        interrupted = True
        log(f"interrupted: {len(rows)} finished rows kept in {rows_path}; rerun the same command to resume")
    for row in rows:  # kept rows are judged against this run's device and limits, not the ones they ran under
        if not row.get("error"):
            row["fits"], row["why_not"] = _verdict(row, profile, req)
    images = load_image_list(req.val)
    size = req.img_size or int(next((r["input_size"] for r in rows if r.get("input_size")), 224))
    jpeg = jpeg_q90_bytes(list(images.paths), size)
    best = _best(rows)
    return CompareResult(rows, profile.name, profile.budget_mb, jpeg, best,
                         _reproduce(req, best) if best else [], notes, interrupted)


def _retimed(row: dict[str, Any], profile: Any, log: Log) -> dict[str, Any]:
    """A kept row, its edge graph re-timed when this device's (capped) thread count differs from the one it was
    timed with; its bundle and features file are reused, nothing is retrained."""
    from mist_kit.devices.caps import capped_threads
    from mist_kit.runtime.features_file import read_features

    threads = capped_threads(profile.threads)[0]
    feats = Path(row.get("features") or "")
    if row.get("error") or threads == row.get("edge_ms_threads") or not feats.is_file():
        return row
    encoded = read_features(feats).read(0, 30)
    ms, used = _edge_ms(Path(row["bundle"]), profile, encoded)
    log(f"{row['method']}/{row['codec']}: re-timed at {used} threads ({row['edge_ms']} ms at "
        f"{row['edge_ms_threads']} -> {ms} ms)")
    return {**row, "edge_ms": ms, "edge_ms_threads": used}


def _host() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores"


def _fill_cache(base: Any, methods: Sequence[str], log: Log) -> None:
    """One backbone pass for every method's candidate tensors (the union), before any training."""
    from mist_kit.backbone import load_backbone
    from mist_kit.data import load_image_list
    from mist_kit.edge import get_edge_method
    from mist_kit.featurize import cache_features
    from mist_kit.runtime.plan import union_sources

    model, spec = load_backbone(base.backbone, img_size=base.img_size, weights=base.weights,
                                pretrained=base.pretrained)
    sources = union_sources([plan for m in methods for plan in get_edge_method(m).default_candidate_plans(spec.shape)])
    log(f"feature cache: {len(sources)} tensors for {len(methods)} methods ({', '.join(sorted(map(str, sources)))})")
    for src in (base.train, base.val, base.test):
        if src is not None:
            cache_features(model, spec, load_image_list(src), base.cache_dir, sources, progress=base.progress,
                           log=log, precision=base.backbone_precision)


def _one_row(req: CompareRequest, base: Any, profile: Any, method: str, codec: str, k: int | None, out: Path,
             log: Log) -> dict[str, Any]:
    """Train, export and measure one (method, codec) pair at depth `k` (None: search it on val)."""
    from mist_kit.calibration.features import find_cached_split
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.edge import get_edge_method
    from mist_kit.exporters.export import export_bundle
    from mist_kit.pipeline import run_training
    from mist_kit.runtime.codec.plan_codecs import encode_all, plan_codecs
    from mist_kit.runtime.manifest import open_bundle

    name = f"{method}-{codec}"
    train_req = replace(base, method=method, k=k, out=out / "runs" / name,
                        method_params=dict(get_edge_method(method).train_defaults))  # = `train` as typed
    report = run_training(train_req, log=lambda _m: None, codec={"name": codec})
    config, model = load_checkpoint(report["checkpoint"])
    bundle = out / "bundles" / name
    exported = export_bundle(report["checkpoint"], bundle, codec=codec, log=lambda _m: None)
    if not exported.ok:
        raise MistError(f"export failed: {'; '.join(exported.problems)[:200]}")
    manifest = open_bundle(bundle)
    plan = model.plan
    codecs = plan_codecs(plan, config.codecs, config.backbone.num_prefix_tokens)
    split = find_cached_split(config, req.val, plan, base.cache_dir, base.backbone_precision)
    if split is None:
        raise MistError(f"{req.val}: its cache does not hold {list(plan.names)}")
    rows = split.inputs({t.name: str(t.source) for t in plan.tensors})
    take = np.arange(min(len(rows), 256))
    inputs = rows.batch(take)
    labels = np.asarray(split.labels())[split.valid()][take]
    plain, zstd = _wire_bytes(codecs, inputs)
    encoded = encode_all(codecs, inputs)
    ms, threads = _edge_ms(bundle, profile, encoded)
    feats = _encoded_features(manifest, codecs, inputs, labels, out / "features" / f"{name}.safetensors")
    inf_rss = _fresh_process_rss(["run-edge", "--device", profile.name, "--bundle", str(bundle), "--features",
                                  str(feats)])
    ft_rss = _fresh_process_rss(["finetune-edge", "--device", profile.name, "--bundle", str(bundle), "--features",
                                 str(feats), "--epochs", "5", "--state", str(out / "state" / name)])
    row: dict[str, Any] = {
        "method": method, "codec": codec, "k": report["k"], "val_top1": report["val_top1"],
        "test_top1": report.get("test_top1"), "bytes_per_image": plain, "bytes_per_image_zstd": zstd,
        "edge_params": manifest["edge"]["params"], "edge_macs_per_image": manifest["edge"]["macs_per_image"],
        "edge_ms": ms, "edge_ms_threads": threads, "host_timing": True, "inference_rss_mb": inf_rss,
        "finetune_rss_mb": ft_rss, "train_seconds": report["train_seconds"], "checkpoint": report["checkpoint"],
        "bundle": str(bundle), "features": str(feats), "input_size": int(manifest["input"]["size"]),
    }
    row["fits"], row["why_not"] = _verdict(row, profile, req)
    log(f"{name}: val {row['val_top1']:.3f}, {plain:,} B/img, {ms} ms, RSS {max(inf_rss, ft_rss):.0f} MB"
        f"{'' if row['fits'] else ' (does not fit: ' + str(row['why_not']) + ')'}")
    return row


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fitting row with the best val top-1 (never test); ties go to fewer bytes, then fewer edge ms."""
    fits = [r for r in rows if r.get("fits") and not r.get("error")]
    if not fits:
        return None
    return min(fits, key=lambda r: (-r["val_top1"], r["bytes_per_image"], r["edge_ms"]))


def write_plot(result: CompareResult, path: Path) -> Path:
    """Two panels: val top-1 against bytes per image (log x, the input's JPEG-q90 size marked) and against edge
    ms; every (method, codec) row is a point, labelled; rows that do not fit are hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mist_kit.atomic import atomic_path

    rows = [r for r in result.rows if not r.get("error")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    methods = sorted({r["method"] for r in rows})
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for ax, key, label in ((axes[0], "bytes_per_image", "bytes per image (log)"),
                           (axes[1], "edge_ms", f"edge ms per image (host timing, {result.device} threads)")):
        for r in rows:
            ax.scatter(r[key], 100 * r["val_top1"], s=50, color=colors[r["method"]],
                       facecolors=colors[r["method"]] if r["fits"] else "none", label=r["method"])
            ax.annotate(f"{r['method']}/{r['codec']}", (r[key], 100 * r["val_top1"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel("val top-1 %")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    if result.jpeg_q90_bytes:
        axes[0].axvline(result.jpeg_q90_bytes, color="grey", linestyle="--", linewidth=1)
        axes[0].annotate("input JPEG q90", (result.jpeg_q90_bytes, axes[0].get_ylim()[0]), fontsize=7,
                         rotation=90, xytext=(2, 4), textcoords="offset points")
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=False))
    axes[1].legend(uniq.values(), uniq.keys(), fontsize=8, loc="lower right")
    fig.suptitle(f"mist-kit compare on {result.device} (hollow: does not fit)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    Path(path).chmod(0o644)  # the temp file was owner-only; a plot is meant to be shared
    return Path(path)
