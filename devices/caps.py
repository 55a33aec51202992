"""Emulating a device's resource caps on the current host: a memory cap (RLIMIT_AS) and peak-RSS accounting.

Why RLIMIT_AS: it is the one portable per-process memory cap that needs no privileges. It limits address space,
not resident memory, so glibc's per-thread malloc arenas (64 MB of reserved address space each) would exhaust it
without using RAM; the cap therefore also limits the arena count, as a small device's runtime should. On a host
that is not the device's architecture only the caps are emulated, never the speed: the report says so. Torch-free.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import os
import platform
import resource
from collections.abc import Iterator
from dataclasses import dataclass

from mist_kit.devices.profiles import DeviceProfile
from mist_kit.errors import ResourceLimitError

_M_ARENA_MAX = -8  # glibc mallopt parameter


def _proc_status_mb(field: str) -> float | None:
    """A size field (e.g. VmRSS, VmHWM) of /proc/self/status in MB; None where /proc is missing."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB.

    Linux: VmHWM from /proc/self/status. Not ru_maxrss: the kernel carries ru_maxrss across execve (it records
    the pre-exec image's high-water mark), so a command started from a large parent would report the parent's
    size. Elsewhere ru_maxrss (bytes on macOS, KiB on other Unixes).
    """
    hwm = _proc_status_mb("VmHWM")
    if hwm is not None:
        return hwm
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / (1024 * 1024) if platform.system() == "Darwin" else kib / 1024, 1)


def current_rss_mb() -> float:
    """Resident set size right now (VmRSS), in MB; 0.0 where /proc is missing."""
    rss = _proc_status_mb("VmRSS")
    return 0.0 if rss is None else rss


def host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


@dataclass(frozen=True)
class Emulation:
    """What was applied for a device on this host, for the report."""

    device: str
    host_arch: str
    native: bool
    memory_cap_mb: int | None
    threads: int
    cap_skipped: str = ""  # why a requested cap was not applied

    def note(self) -> str:
        cap = f"memory cap {self.memory_cap_mb} MB (RLIMIT_AS)" if self.memory_cap_mb else \
            (f"no memory cap ({self.cap_skipped})" if self.cap_skipped else "no memory cap")
        if self.native:
            return f"{self.device}: {cap}, {self.threads} threads on a matching {self.host_arch} host"
        return (f"{self.device}: {cap}, {self.threads} threads; host is {self.host_arch}, so caps are emulated, "
                "not speed (timings are this host's)")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: containers and taskset shrink it below os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def capped_threads(wanted: int, cores: int | None = None) -> tuple[int, str]:
    """A profile's thread count is a maximum: more intra-op threads than usable cores oversubscribe them (rpi4's 4
    threads on a 2-core host ran 10x slower than 1). Returns (threads, note; empty when nothing was capped)."""
    cores = usable_cores() if cores is None else cores
    if wanted <= cores:
        return wanted, ""
    return cores, f"threads capped at {cores} (the cores this process may use), profile asks {wanted}"


def _limit_malloc_arenas(count: int = 2) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_ARENA_MAX, count)


def _warm_blas() -> None:
    """Let OpenBLAS allocate its per-thread buffers before the cap: it retries and aborts (no MemoryError) when
    they cannot be mapped later, which would bypass the one-line error."""
    import numpy as np

    a = np.ones((512, 512), np.float32)
    _ = a @ a


def _load_onnxruntime() -> None:
    """Load onnxruntime's library before the cap: its static initialisers (operator schema registration) allocate
    on load, and a failed allocation there prints "Schema error: std::bad_alloc" or crashes the process (seen
    with OMP_NUM_THREADS=1 under a 200 MB cap), bypassing the one-line error. A no-op where it is not installed."""
    with contextlib.suppress(ImportError):
        import onnxruntime  # noqa: F401


@contextlib.contextmanager
def device_caps(profile: DeviceProfile, memory_cap_mb: int | None = None,
                apply_cap: bool = True) -> Iterator[Emulation]:
    """Apply the profile's memory cap (its budget, or `memory_cap_mb`) for the duration; restore it after.

    Only the soft limit is lowered, so the cap can be lifted again (tests run commands in-process). An
    allocation beyond it surfaces as MemoryError (numpy, Python) or an onnxruntime allocation failure; the
    caller maps both through `memory_exceeded`.
    """
    cap = (memory_cap_mb or profile.budget_mb) if apply_cap else None
    emu = Emulation(device=profile.name, host_arch=host_arch(), native=host_arch() == profile.arch,
                    memory_cap_mb=cap, threads=capped_threads(profile.threads)[0])
    if cap is None:
        yield emu
        return
    mapped = _proc_status_mb("VmSize")
    if mapped is not None and mapped >= cap:
        # every later mmap (thread stacks, onnxruntime's arena) would fail, and onnxruntime can block for good
        # when it cannot start its threads: skip the cap and say so, rather than hang
        yield dataclasses.replace(emu, memory_cap_mb=None, cap_skipped=(
            f"the {cap} MB cap was not applied: this process already maps {mapped:.0f} MB, e.g. torch loaded "
            "in-process; `mist-kit run-edge` in a fresh process applies it"))
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = cap * 1024 * 1024
    if hard != resource.RLIM_INFINITY and limit > hard:
        limit = hard
    _limit_malloc_arenas()
    _warm_blas()
    _load_onnxruntime()
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield emu
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def memory_exceeded(emu: Emulation, what: str) -> ResourceLimitError:
    """The one-line error for an allocation that failed under the cap."""
    return ResourceLimitError(f"{what}: memory cap of {emu.memory_cap_mb} MB for device {emu.device} exceeded "
                              "(use a smaller --batch, a device with more memory, or --memory)")


def looks_like_oom(exc: BaseException) -> bool:
    """onnxruntime reports a failed allocation as a generic RuntimeError/Fail; recognise it by its text.

    "failed to map segment" is the dynamic loader failing to map a shared library (onnxruntime's) under the cap.
    """
    text = str(exc).lower()
    needles = ("bad_alloc", "failed to allocate", "out of memory", "cannot allocate memory", "unable to allocate",
               "resource temporarily unavailable", "pthread_create", "failed to create thread", "posixthread",
               "failed to map segment")
    return isinstance(exc, MemoryError) or any(s in text for s in needles)
