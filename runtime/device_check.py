"""Does a bundle fit a device? Edge MACs per image, model + activation memory at a batch size, and a verdict.

Why both an estimate and a measurement: the estimate (from the manifest's recorded cost) explains where memory goes
and scales to batch sizes not tried; the measurement (this process's peak RSS after running one batch of zeros
through the edge graph with the profile's settings) is what the verdict uses, because it includes Python, numpy
and onnxruntime themselves. On a host of another architecture the measured number is this host's, which is close
(same code, same allocations) but not the device's: the report says so. Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from mist_kit.devices.budget import activation_bytes_per_image, edge_cost
from mist_kit.devices.caps import current_rss_mb, host_arch, peak_rss_mb
from mist_kit.devices.profiles import DeviceProfile
from mist_kit.errors import InputError

MB = 1024 * 1024


def _zeros_batch(manifest: dict[str, Any], batch: int) -> dict[str, np.ndarray]:
    return {o["name"]: np.zeros((batch, *[int(x) for x in o["shape"][1:]]), dtype=o["dtype"])
            for o in manifest["edge"]["inputs"]}


def check_bundle(bundle_dir: str | os.PathLike[str], profile: DeviceProfile, batch: int = 1,
                 measure: bool = True) -> dict[str, Any]:
    """The `devices check` report; `fits` is True when the measured (or estimated) peak is within the budget."""
    from mist_kit.runtime.bundle import open_edge_bundle
    from mist_kit.runtime.edge_session import EdgeSession, SessionSettings

    if batch < 1:
        raise InputError(f"--batch: expected >= 1, got {batch}")
    bundle = open_edge_bundle(bundle_dir, variant="int8")
    manifest = bundle.manifest
    head_rel = manifest["head"].get("file") or "head.safetensors"
    model_bytes = bundle.edge_path.stat().st_size + (Path(bundle_dir) / head_rel).stat().st_size
    act = activation_bytes_per_image(manifest) * batch
    baseline = current_rss_mb()
    estimate_mb = round(baseline + 2 * model_bytes / MB + act / MB, 1)  # graph bytes + its in-memory copy
    params, macs, _act = edge_cost(manifest)
    report: dict[str, Any] = {
        "device": profile.name, "arch": profile.arch, "host_arch": host_arch(), "memory_mb": profile.memory_mb,
        "budget_mb": profile.budget_mb, "batch": batch, "edge_file": bundle.edge_path.name,
        "model_mb": round(model_bytes / MB, 3), "activations_mb_estimate": round(act / MB, 2),
        "process_baseline_mb": baseline, "peak_mb_estimate": estimate_mb,
        "edge_params": params, "edge_macs_per_image": macs, "edge_gmacs_per_image": round(macs / 1e9, 4)}
    session = EdgeSession(bundle, SessionSettings.from_profile(profile))
    report.update(backend=session.backend, **({"backend_note": session.backend_note} if session.backend_note
                                              else {}))
    peak = estimate_mb
    if measure:
        session.embed(_zeros_batch(manifest, batch))
        peak = report["peak_rss_mb_measured"] = peak_rss_mb()
    report["fits"] = bool(peak <= profile.budget_mb)
    report["headroom_mb"] = round(profile.budget_mb - peak, 1)
    basis = "measured" if measure else "estimated"
    report["verdict"] = (f"fits: {basis} peak {peak} MB of a {profile.budget_mb} MB budget at batch {batch}"
                         if report["fits"] else
                         f"does not fit: {basis} peak {peak} MB exceeds the {profile.budget_mb} MB budget at batch "
                         f"{batch}; lower --batch")
    if host_arch() != profile.arch:
        report["note"] = f"measured on a {host_arch()} host: memory is representative, speed is not"
    return report
