"""Device profiles: registry, variants, validation, CLI, memory caps."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mist_kit.cli.app import app
from mist_kit.devices import get_device, list_devices, register_device
from mist_kit.devices.caps import device_caps, looks_like_oom
from mist_kit.devices.profiles import parse_profile
from mist_kit.errors import InputError

REQUIRED = {"rpi4", "rpi4-1gb", "rpi4-4gb", "rpi4-8gb", "rpi5", "rpi-zero-2w", "jetson-nano-cpu", "generic-x86"}


def test_required_profiles_registered_with_paper_defaults():
    names = {p.name for p in list_devices()}
    assert names >= REQUIRED
    rpi4 = get_device("rpi4")
    assert (rpi4.arch, rpi4.cpu, rpi4.cores, rpi4.clock_ghz, rpi4.memory_mb) == ("aarch64", "Cortex-A72", 4, 1.5,
                                                                                 2048)
    assert get_device("rpi4-8gb").memory_mb == 8192 and get_device("rpi4-8gb").cpu == "Cortex-A72"
    assert get_device("rpi-zero-2w").memory_mb == 512
    assert get_device("generic-x86").arch == "x86_64"
    assert get_device("rpi4", memory_mb=4096).budget_mb == 4096 - rpi4.os_reserve_mb


def test_every_profile_is_consistent():
    for p in list_devices():
        assert 0 < p.budget_mb < p.memory_mb
        assert p.threads >= 1 and p.backend in ("onnxruntime", "litert")
        assert p.to_dict()["name"] == p.name


def test_unknown_device_is_one_line_input_error():
    with pytest.raises(InputError, match=r"unknown device 'pi9'; known: .*rpi4"):
        get_device("pi9")


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="registered twice"):
        register_device(get_device("rpi5"))


@pytest.mark.parametrize(("patch", "message"), [
    ({"backend": "tensorrt"}, "backend: expected one of"),
    ({"threads": 0}, "cores/threads"),
    ({"os_reserve_mb": 4096}, "must exceed os_reserve_mb"),
    ({"color": "red"}, "unknown fields"),
    ({"ort": {"graph_optimization": "max"}}, "graph_optimization"),
])
def test_bad_profile_data_names_the_field(patch, message):
    data = {k: v for k, v in get_device("rpi4").to_dict().items() if k != "budget_mb"}
    data.update(patch)
    with pytest.raises(InputError, match=message):
        parse_profile(data, "x.json")


def test_cli_list_show_and_unknown():
    runner = CliRunner()
    res = runner.invoke(app, ["devices", "list", "--json"])
    assert res.exit_code == 0 and {p["name"] for p in json.loads(res.stdout)} >= REQUIRED
    res = runner.invoke(app, ["devices", "show", "rpi4-1gb", "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["memory_mb"] == 1024
    res = runner.invoke(app, ["devices", "show", "pi9"])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and "unknown device 'pi9'" in res.output


def _fresh_python(code: str) -> str:
    """stdout of `code` run in a new interpreter (caps must never bite the test runner itself)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_memory_cap_is_applied_and_restored():
    # in a fresh torch-free process, as `run-edge` runs: the test runner itself maps far more than 412 MB
    code = ("import resource\nfrom mist_kit.devices import get_device\n"
            "from mist_kit.devices.caps import device_caps, host_arch, peak_rss_mb\n"
            "before = resource.getrlimit(resource.RLIMIT_AS)\n"
            "with device_caps(get_device('rpi-zero-2w')) as emu:\n"
            "    assert resource.getrlimit(resource.RLIMIT_AS)[0] == 412 * 1024 * 1024\n"
            "    assert emu.memory_cap_mb == 412 and not emu.cap_skipped\n"
            "    assert ('caps are emulated' in emu.note()) == (host_arch() != 'aarch64')\n"
            "assert resource.getrlimit(resource.RLIMIT_AS) == before and peak_rss_mb() > 0\n"
            "print('ok')\n")
    assert _fresh_python(code) == "ok"


def test_memory_cap_below_what_is_mapped_is_skipped_not_applied():
    """A cap under the process's current address space would make every mmap fail (onnxruntime can then block
    for good starting its threads): it is skipped, the limit stays, and the report says why."""
    before = resource.getrlimit(resource.RLIMIT_AS)
    with device_caps(get_device("rpi4"), memory_cap_mb=1) as emu:
        assert resource.getrlimit(resource.RLIMIT_AS) == before
        assert emu.memory_cap_mb is None and "1 MB cap was not applied" in emu.note()
    assert resource.getrlimit(resource.RLIMIT_AS) == before


def test_memory_cap_turns_a_big_allocation_into_memory_error():
    # in a subprocess: the cap must never bite the test runner itself
    code = ("import numpy as np\nfrom mist_kit.devices import get_device\n"
            "from mist_kit.devices.caps import device_caps\n"
            "with device_caps(get_device('rpi4'), memory_cap_mb=600):\n"
            "    try:\n        np.ones(200_000_000)\n    except MemoryError:\n        print('capped')\n")
    assert _fresh_python(code) == "capped"


def test_oom_text_recognised():
    assert looks_like_oom(MemoryError())
    assert looks_like_oom(RuntimeError("onnxruntime: bad_alloc"))
    assert not looks_like_oom(RuntimeError("invalid graph"))


def test_onnxruntime_is_loaded_before_the_memory_cap() -> None:
    """onnxruntime's static initialisers allocate when its library loads; loaded under the cap they printed
    "Schema error: std::bad_alloc" or crashed (OMP_NUM_THREADS=1, 200 MB cap) instead of the one-line error."""
    import subprocess
    import sys

    code = ("import resource, sys\n"
            "from mist_kit.devices import get_device\n"
            "from mist_kit.devices.caps import device_caps\n"
            "with device_caps(get_device('rpi4'), memory_cap_mb=4000) as emu:\n"
            "    print(emu.memory_cap_mb, 'onnxruntime' in sys.modules,\n"
            "          resource.getrlimit(resource.RLIMIT_AS)[0] == 4000 * 1024 * 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["4000", "True", "True"], out.stdout + out.stderr
