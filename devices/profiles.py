"""Device profiles: data files in `profiles/*.json`, registered by name (`rpi4`, `rpi4-1gb`, `rpi-zero-2w`, ...).

Why data files: a profile is a fact sheet (cores, clock, memory, what the OS keeps) plus runtime settings
(threads, backend, onnxruntime options); users can read and diff them without reading code. Each memory variant
of a board is registered as `<name>-<N>gb` (or `-<N>mb`), so `rpi4-8gb` is an address like `rpi4`. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from mist_kit.errors import InputError

ARCHES = ("aarch64", "x86_64", "armv7l")
BACKENDS = ("onnxruntime", "litert")
GRAPH_OPT_LEVELS = ("disable", "basic", "extended", "all")


class UnknownDeviceError(InputError):
    """A device name that no profile registers."""


@dataclass(frozen=True)
class OrtSettings:
    """onnxruntime session settings a profile fixes (threads come from the profile itself)."""

    graph_optimization: str = "all"
    cpu_mem_arena: bool = False  # the arena trades memory for speed; small devices keep it off

    def __post_init__(self) -> None:
        if self.graph_optimization not in GRAPH_OPT_LEVELS:
            raise ValueError(f"ort.graph_optimization: expected one of {GRAPH_OPT_LEVELS}, "
                             f"got {self.graph_optimization!r}")


@dataclass(frozen=True)
class DeviceProfile:
    """One device: hardware facts plus how the runtime should run on it."""

    name: str
    description: str
    arch: str
    cpu: str
    cores: int
    clock_ghz: float
    memory_mb: int
    os_reserve_mb: int
    backend: str
    threads: int
    memory_variants_mb: tuple[int, ...] = ()
    ort: OrtSettings = field(default_factory=OrtSettings)
    base: str = ""  # the profile file a variant was derived from ("" = itself)

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"arch: expected one of {ARCHES}, got {self.arch!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {self.backend!r}")
        if self.cores < 1 or not 1 <= self.threads <= 4 * self.cores:
            raise ValueError(f"cores/threads: expected cores >= 1 and 1 <= threads <= 4*cores, got "
                             f"{self.cores}/{self.threads}")
        if self.memory_mb <= self.os_reserve_mb or self.os_reserve_mb < 0:
            raise ValueError(f"memory_mb ({self.memory_mb}) must exceed os_reserve_mb ({self.os_reserve_mb})")

    @property
    def budget_mb(self) -> int:
        """Memory an application may use: RAM minus what the OS keeps resident."""
        return self.memory_mb - self.os_reserve_mb

    def with_memory(self, memory_mb: int) -> DeviceProfile:
        """The same board with another RAM size (the --memory option, and the registered variants)."""
        if memory_mb <= self.os_reserve_mb:
            raise InputError(f"--memory {memory_mb}: must exceed the {self.os_reserve_mb} MB the OS keeps on "
                             f"{self.name}")
        return replace(self, memory_mb=memory_mb)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "arch": self.arch, "cpu": self.cpu,
                "cores": self.cores, "clock_ghz": self.clock_ghz, "memory_mb": self.memory_mb,
                "os_reserve_mb": self.os_reserve_mb, "budget_mb": self.budget_mb, "backend": self.backend,
                "threads": self.threads, "memory_variants_mb": list(self.memory_variants_mb),
                "ort": {"graph_optimization": self.ort.graph_optimization,
                        "cpu_mem_arena": self.ort.cpu_mem_arena}}


def _variant_name(base: str, memory_mb: int) -> str:
    return f"{base}-{memory_mb // 1024}gb" if memory_mb % 1024 == 0 else f"{base}-{memory_mb}mb"


def parse_profile(data: dict[str, Any], source: str) -> DeviceProfile:
    """Build a profile from its JSON; one-line InputError naming the file and field otherwise."""
    known = set(DeviceProfile.__dataclass_fields__) - {"base"}
    unknown = set(data) - known
    if unknown:
        raise InputError(f"{source}: unknown fields {sorted(unknown)} (expected {sorted(known)})")
    try:
        kwargs = dict(data)
        kwargs["ort"] = OrtSettings(**kwargs.get("ort", {}))
        kwargs["memory_variants_mb"] = tuple(int(m) for m in kwargs.get("memory_variants_mb", ()))
        return DeviceProfile(**kwargs)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source}: {exc}") from None


_REGISTRY: dict[str, DeviceProfile] = {}


def register_device(profile: DeviceProfile) -> DeviceProfile:
    """Register a profile and its memory variants; a duplicate name is an error (as in timm's registry)."""
    entries = [profile]
    for mem in profile.memory_variants_mb:
        if mem != profile.memory_mb:
            entries.append(replace(profile.with_memory(mem), name=_variant_name(profile.name, mem),
                                   base=profile.name))
    for entry in entries:
        if entry.name in _REGISTRY:
            raise ValueError(f"device {entry.name!r} is registered twice")
    for entry in entries:
        _REGISTRY[entry.name] = entry
    return profile


def _load_builtin() -> None:
    if _REGISTRY:
        return
    folder = resources.files("mist_kit.devices") / "profiles"
    for item in sorted(folder.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".json"):
            source = f"devices/profiles/{item.name}"
            try:
                data = json.loads(item.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise InputError(f"{source}: not valid JSON ({exc})") from None
            register_device(parse_profile(data, source))


def list_devices(include_variants: bool = True) -> list[DeviceProfile]:
    """All registered profiles, base boards first in name order, each followed by its variants."""
    _load_builtin()
    profiles = sorted(_REGISTRY.values(), key=lambda p: (p.base or p.name, p.base != "", p.memory_mb))
    return [p for p in profiles if include_variants or not p.base]


def get_device(name: str, memory_mb: int | None = None) -> DeviceProfile:
    """The profile registered as `name` (optionally with another RAM size); UnknownDeviceError otherwise."""
    _load_builtin()
    if name not in _REGISTRY:
        bases = ", ".join(p.name for p in list_devices(include_variants=False))
        raise UnknownDeviceError(f"unknown device {name!r}; known: {bases} (and memory variants, see "
                                 "`mist-kit devices list`)")
    profile = _REGISTRY[name]
    return profile.with_memory(memory_mb) if memory_mb is not None else profile
