#!/usr/bin/env bash
# aarch64 proof, one command: set up (cached) the Debian arm64 root + qemu, then run mist_kit.runtime on x86 and
# under `qemu-aarch64-static -cpu cortex-a72` on the same bundle + features, compare, and write BENCHMARKS.md
# section "aarch64". Not part of `make test` (minutes). Needs root for the first set-up (apt, debootstrap).
#
#   bench/aarch64/run_aarch64.sh [check.py args: smoke|prepare|runtime|all, --no-report, --rebuild, --no-finetune]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$REPO"
test -x .venv/bin/python || make install
bench/aarch64/setup_root.sh
exec nice -n 10 .venv/bin/python bench/aarch64/check.py "$@"
