"""The README's commands, run as written: fenced bash blocks marked `<!-- readme-test: GROUP -->` are extracted
and run in the repository root.

Group `demo` runs on `make demo`'s outputs (demo-out/): `make readme-test` (after `make demo`) or
`pytest -m slow tests/test_readme_commands.py`. Group `shared` needs ../shared (the Caltech benchmark data).
The fast test here checks the marked blocks exist and parse, so a README edit cannot silently drop them.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
_MARKED = re.compile(r"<!-- readme-test: (\w+) -->\n```bash\n(.*?)\n```", re.S)


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(group, bash source) for each marked block, in README order."""
    return [(m.group(1), m.group(2)) for m in _MARKED.finditer(text)]


def _commands(src: str) -> list[str]:
    """Shell commands of a block, continuation lines joined (for counting and messages)."""
    return [c for c in src.replace("\\\n", " ").splitlines() if c.strip() and not c.lstrip().startswith("#")]


def test_readme_marks_the_demo_blocks() -> None:
    blocks = readme_blocks(README.read_text())
    groups = [g for g, _ in blocks]
    assert groups.count("demo") >= 2 and "shared" in groups
    demo_cmds = [c for g, src in blocks if g == "demo" for c in _commands(src)]
    assert any(c.startswith("mist-kit train ") for c in demo_cmds)
    assert any(c.startswith("mist-kit export ") for c in demo_cmds)
    # the DINOv2 weights the benchmark block uses are built by a command the block spells out
    shared = next(src for g, src in blocks if g == "shared")
    assert "python ../shared/tools/dinov2_small_weights.py bench/work/dinov2_vits14.safetensors" in shared


def run_group(group: str, env: dict[str, str] | None = None) -> list[tuple[str, subprocess.CompletedProcess]]:
    """Run every block of `group` with bash -e in the repository root, the venv's bin first on PATH."""
    env = {**os.environ, **(env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    out = []
    for g, src in readme_blocks(README.read_text()):
        if g == group:
            out.append((src, subprocess.run(["bash", "-euo", "pipefail", "-c", src], cwd=ROOT, env=env,
                                            capture_output=True, text=True, timeout=3600)))
    return out


@pytest.mark.slow
def test_readme_demo_commands_run_as_written() -> None:
    if not (ROOT / "demo-out" / "backbone.safetensors").exists():
        pytest.skip("needs `make demo`'s outputs in demo-out/")
    for src, proc in run_group("demo"):
        assert proc.returncode == 0, f"{src}\n--- stderr ---\n{proc.stderr[-3000:]}"


if __name__ == "__main__":  # `python tests/test_readme_commands.py demo`: the same, without pytest
    results = run_group(sys.argv[1] if len(sys.argv) > 1 else "demo")
    for src, proc in results:
        print(f"{'ok ' if proc.returncode == 0 else 'FAIL'} {_commands(src)[0][:100]}", file=sys.stderr)
    sys.exit(0 if results and all(p.returncode == 0 for _, p in results) else 1)
