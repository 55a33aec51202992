#!/usr/bin/env bash
# Build (once, cached) a Debian bookworm arm64 root that qemu-aarch64-static can run mist_kit.runtime in.
#
#   bench/aarch64/setup_root.sh [WORK]        WORK defaults to bench/work/aarch64 (gitignored)
#
# Layout under WORK:
#   root/                   debootstrap --foreign minbase + python3.11 (.debs extracted: the 2nd stage cannot run)
#   root/proc/cpuinfo       a 4-core Cortex-A72 cpuinfo (qemu -L redirects the guest's read of /proc/cpuinfo here;
#                           onnxruntime segfaults under qemu when it parses the host's x86 one)
#   root/opt/site/          aarch64 cp311 wheels unzipped (numpy, onnxruntime, safetensors, zstandard, ...)
#   wheels/                 the downloaded wheels
# Each step is skipped when its stamp file exists; delete WORK to start over. Needs root (apt, debootstrap).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="${1:-$REPO/bench/work/aarch64}"
ROOT="$WORK/root"
SITE="$ROOT/opt/site"
PIP="${PIP:-$REPO/.venv/bin/pip}"
NICE="nice -n 10"
# The host .venv's versions, so x86 and aarch64 run the same releases (override with AARCH64_WHEELS=...).
DEFAULT_WHEELS="numpy onnxruntime safetensors zstandard typer rich pillow httpx"
# Bookworm has glibc 2.36; wheels are tagged with several manylinux levels.
PLATFORMS="--platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64
    --platform manylinux_2_28_aarch64"
mkdir -p "$WORK"
log() { echo "[aarch64-setup] $*" >&2; }

if ! command -v qemu-aarch64-static >/dev/null || ! command -v debootstrap >/dev/null; then
    log "installing qemu-user-static debootstrap (apt)"
    $NICE apt-get update -q >"$WORK/apt.log" 2>&1
    $NICE apt-get install -y -q qemu-user-static debootstrap >>"$WORK/apt.log" 2>&1
fi

if [ ! -e "$WORK/.root-done" ]; then
    log "debootstrap --foreign arm64 bookworm into $ROOT (several minutes)"
    rm -rf "$ROOT"
    $NICE debootstrap --foreign --arch=arm64 --variant=minbase \
        --include=python3.11-minimal,libpython3.11-stdlib,libstdc++6 bookworm "$ROOT" >"$WORK/debootstrap.log" 2>&1
    log "extracting $(ls "$ROOT"/var/cache/apt/archives/*.deb | wc -l) .debs into the root"
    for deb in "$ROOT"/var/cache/apt/archives/*.deb; do dpkg-deb -x "$deb" "$ROOT"; done
    test -x "$ROOT/usr/bin/python3.11"
    touch "$WORK/.root-done"
fi

# A Raspberry Pi 4 (4x Cortex-A72, ARMv8.0: no dotprod/fp16 features, matching `-cpu cortex-a72`).
mkdir -p "$ROOT/proc"
{
    for i in 0 1 2 3; do
        printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n' "$i"
        printf 'CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n'
        printf 'CPU revision\t: 3\n\n'
    done
    printf 'Hardware\t: BCM2835\nRevision\t: b03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n'
} >"$ROOT/proc/cpuinfo"

if [ ! -e "$WORK/.wheels-done" ]; then
    if [ -n "${AARCH64_WHEELS:-}" ]; then
        specs="$AARCH64_WHEELS"
    else
        specs=""
        for pkg in $DEFAULT_WHEELS; do
            ver="$("$REPO/.venv/bin/python" -c "import importlib.metadata as m; print(m.version('$pkg'))" 2>/dev/null || true)"
            specs="$specs ${pkg}${ver:+==$ver}"
        done
    fi
    log "pip download (aarch64, cp311):$specs"
    rm -rf "$WORK/wheels" "$SITE"
    # One --platform alone finds only old releases: list every manylinux tag the wheels use.
    $NICE "$PIP" download -q --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
        $PLATFORMS \
        --platform any -d "$WORK/wheels" $specs 2>&1 | { grep -v "^WARNING: Location" || true; } >&2
    # LiteRT (optional backend) and its deps, without re-resolving numpy.
    $NICE "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
        $PLATFORMS \
        -d "$WORK/wheels" ai-edge-litert backports.strenum tqdm ml_dtypes 2>&1 | { grep -v "^WARNING: Location" || true; } >&2 \
        || log "no aarch64 ai-edge-litert wheel (LiteRT left out)"
    mkdir -p "$SITE"
    for whl in "$WORK"/wheels/*.whl; do python3 -m zipfile -e "$whl" "$SITE"; done
    test -d "$SITE/numpy" && test -d "$SITE/onnxruntime"
    touch "$WORK/.wheels-done"
fi
log "ready: $ROOT ($(ls "$WORK"/wheels | wc -l) wheels in $SITE)"
