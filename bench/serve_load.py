"""Load benchmark for `mist-kit serve-cloud` on loopback, plus ORT cloud graph vs torch throughput.

Why both: the server's worth is requests/s and tail latency under many concurrent devices (dynamic batching should
turn 16 single-image clients into batched model calls), and exporting the cloud half to ONNX is only worth it if
onnxruntime runs it faster than the torch module it came from. Everything is bounded: the load phase stops after
--duration seconds (plus at most one request timeout), the server is a child process that is always stopped, and
all traffic goes to 127.0.0.1.

    python bench/serve_load.py --bundle BUNDLE --checkpoint CKPT [--images LIST] [--duration 30] [--clients 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
DEFAULT_BUNDLE = ROOT / "bench/work/caltech/bundle"
DEFAULT_CKPT = ROOT / "bench/work/caltech/mist/checkpoint"
DEFAULT_IMAGES = Path("/work/shared/data/caltech101-vtab1k/test.txt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, port: int, max_batch: int, threads: int, max_queue: int, log: Path
                 ) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from mist_kit.cli.app import main; main()", "serve-cloud", str(bundle),
           "--port", str(port), "--max-batch", str(max_batch), "--threads", str(threads),
           "--max-queue", str(max_queue), "--max-delay-ms", "5"]
    with open(log, "wb") as fh:  # a file, not a pipe: a chatty server must never block on a full pipe
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve-cloud exited early: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"serve-cloud not ready within {timeout_s} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def load(url: str, model: str, images: list[bytes], clients: int, duration_s: float,
               timeout_s: float) -> dict[str, Any]:
    """`clients` workers, each sending one image per request back to back until the deadline."""
    import httpx

    from mist_kit.runtime.v2_protocol import HEADER_LENGTH, Tensor, bytes_tensor, decode_response, encode_request

    bodies = []
    for data in images:
        body, hl = encode_request([Tensor("image", "BYTES", bytes_tensor([data]))], None)
        bodies.append((body, {HEADER_LENGTH: str(hl), "Content-Type": "application/octet-stream"}))
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as http:
        end = time.monotonic() + duration_s

        async def worker(w: int) -> None:
            i = w
            while time.monotonic() < end:
                body, headers = bodies[i % len(bodies)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await http.post(f"/v2/models/{model}/infer", content=body, headers=headers)
                    if r.status_code == 200:
                        decode_response(r.content, r.headers.get(HEADER_LENGTH))
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

        t0 = time.monotonic()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.monotonic() - t0
    lat = np.array(latencies) * 1000
    return {"requests": len(latencies), "wall_s": round(wall, 2), "rps": round(len(latencies) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "errors": sum(errors.values()), "error_kinds": errors}


def throughput(fn: Any, batch: np.ndarray, min_runs: int, min_s: float) -> float:
    """Images/s of fn(batch) after one warm-up call: at least min_runs calls and min_s seconds."""
    fn(batch)
    runs, t0 = 0, time.perf_counter()
    while runs < min_runs or time.perf_counter() - t0 < min_s:
        fn(batch)
        runs += 1
    return runs * len(batch) / (time.perf_counter() - t0)


def ort_vs_torch(bundle: Path, checkpoint: Path, pixels: np.ndarray, threads: int) -> dict[str, Any]:
    """Same cloud half, same images, same thread count: onnxruntime on cloud.onnx vs the torch CloudModule."""
    import onnxruntime as ort
    import torch

    from mist_kit.backbone import load_backbone_for
    from mist_kit.backbone_run import CloudModule
    from mist_kit.checkpoint import load_checkpoint
    from mist_kit.runtime.manifest import codec_names, manifest_codecs, manifest_plan, read_manifest

    manifest = read_manifest(bundle)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sess = ort.InferenceSession(str(bundle / "cloud.onnx"), opts, providers=["CPUExecutionProvider"])
    torch.set_num_threads(threads)
    config, method = load_checkpoint(checkpoint)
    plan = manifest_plan(manifest)
    sent = [(t.name, str(t.source)) for t in plan.tensors]
    if sent != [(t.name, str(t.source)) for t in method.plan.tensors]:
        raise SystemExit(f"bundle sends {sent} but the checkpoint's method sends "
                         f"{[(t.name, str(t.source)) for t in method.plan.tensors]}: not the same model")
    cloud = CloudModule(load_backbone_for(config.backbone), plan).eval()
    with torch.inference_mode():
        tref = [t.numpy() for t in cloud(torch.from_numpy(pixels[:2]))]
        oref = sess.run(None, {"pixel_values": pixels[:2]})
        ort_ips = throughput(lambda x: sess.run(None, {"pixel_values": x}), pixels, 3, 10.0)
        torch_ips = throughput(lambda x: cloud(torch.from_numpy(x)), pixels, 3, 10.0)
    fp32 = all(c.get("name", "fp32") == "fp32" for c in manifest_codecs(manifest).values())
    # with fp32 codecs the cloud outputs are the plan's tensors, in order; otherwise they are encoded
    err = max(float(np.abs(t.astype(np.float32) - o.astype(np.float32)).max())
              for t, o in zip(tref, oref, strict=True)) if fp32 else None
    return {"batch": len(pixels), "threads": threads, "ort_img_s": round(ort_ips, 2),
            "torch_img_s": round(torch_ips, 2), "ratio": round(ort_ips / torch_ips, 2), "max_abs_err": err,
            "codec": codec_names(manifest)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CKPT, help="the checkpoint the bundle came from")
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="list file or ImageFolder of JPEG/PNG")
    ap.add_argument("--n-images", type=int, default=64)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--timeout", type=float, default=60.0, help="per-request client timeout")
    ap.add_argument("--note", default="", help="a line added under the table (e.g. which bundle and why)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()

    from mist_kit.data import load_image_list, load_pixels
    from mist_kit.runtime.manifest import read_manifest

    manifest = read_manifest(args.bundle)  # a format-1 bundle is refused here with a one-line error
    if not (args.checkpoint / "config.json").is_file():
        raise SystemExit(f"--checkpoint {args.checkpoint}: no config.json; the torch comparison needs the checkpoint")
    data = load_image_list(args.images)
    paths = list(data.paths[: args.n_images])
    images = [p.read_bytes() for p in paths]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    loadavg = round(os.getloadavg()[0], 1)
    log = ROOT / "bench/work/serve_load.server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = start_server(args.bundle, port, args.max_batch, args.threads, 4 * args.clients, log)
    try:
        wait_ready(url, proc, log)
        asyncio.run(load(url, manifest["model_name"], images[:4], 2, 2.0, args.timeout))  # warm-up
        result = asyncio.run(load(url, manifest["model_name"], images, args.clients, args.duration, args.timeout))
        import httpx

        stats = httpx.get(f"{url}/v2/models/{manifest['model_name']}/stats", timeout=10).json()["model_stats"][0]
    finally:
        stop_server(proc)
    result["mean_batch"] = round(stats["inference_count"] / max(1, stats["execution_count"]), 2)
    print(json.dumps({"load": result}), flush=True)
    size = manifest["input"]["size"]
    pixels = np.stack([load_pixels(p, size, manifest["input"]["mean"], manifest["input"]["std"])
                       for p in (paths * args.max_batch)[: args.max_batch]])
    cmp = ort_vs_torch(args.bundle, args.checkpoint, pixels, args.threads)
    report = {"bundle": str(args.bundle), "images": str(args.images), "loadavg": loadavg,
              "model": manifest["model_name"], "backbone": manifest["backbone"]["name"],
              "k": manifest["k"], "img_size": size, "clients": args.clients, "duration_s": args.duration,
              "max_batch": args.max_batch, "threads": args.threads, "load": result, "ort_vs_torch": cmp}
    print(json.dumps(report, indent=1))
    if not args.no_write:
        write_section(report, args)


def write_section(r: dict[str, Any], args: argparse.Namespace) -> None:
    from _report import markdown_table, update_section

    ld, c = r["load"], r["ort_vs_torch"]
    load_table = markdown_table(
        ["model", "clients x duration", "requests", "requests/s", "p50 ms", "p99 ms", "errors", "mean model batch"],
        [[f"{r['backbone']} k={r['k']} @{r['img_size']}", f"{r['clients']} x {r['duration_s']:g} s", ld["requests"],
          ld["rps"], ld["p50_ms"], ld["p99_ms"], f"{ld['errors']} {ld['error_kinds'] or ''}".strip(),
          ld["mean_batch"]]])
    cmp_table = markdown_table(
        ["cloud half", "batch", "threads", "images/s", "vs torch"],
        [["onnxruntime (cloud.onnx)", c["batch"], c["threads"], c["ort_img_s"], f"{c['ratio']}x"],
         ["torch (CloudModule)", c["batch"], c["threads"], c["torch_img_s"], "1.0x"]])
    body = (f"`serve-cloud` on loopback, one image per request (real files from {r['images']}, sent as they are), "
            f"server --max-batch {r['max_batch']} --threads {r['threads']}; the load generator shares the machine "
            f"(1-minute load average {r['loadavg']} at the start of the run).\n\n"
            f"{load_table}\n\nThroughput of the cloud half on the same preprocessed images (goal >= 2x; codec "
            f"{c['codec']}; max abs diff ORT vs torch {c['max_abs_err']}):\n\n{cmp_table}\n")
    if args.note:
        body += f"\n{args.note}\n"
    bundle = args.bundle.relative_to(ROOT) if args.bundle.is_relative_to(ROOT) else args.bundle
    cmd = f"python bench/serve_load.py --bundle {bundle} --duration {args.duration:g} --clients {args.clients}"
    update_section("serve", "Cloud service (serve-cloud, KServe v2)", body, cmd)


if __name__ == "__main__":
    main()
