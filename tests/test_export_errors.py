"""Export failures: bad checkpoints give one-line errors with exit code 2, and never a half-written bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mist_kit.cli.app import app


def _copy_checkpoint(tiny_checkpoint: dict, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint["checkpoint"], dst)
    return dst


def _export_with_config(tiny_checkpoint: dict, tmp_path: Path, edit) -> tuple:
    """Export a copy of the checkpoint whose config.json went through `edit(cfg)`, over an old bundle."""
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path)
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out = _old_bundle(tmp_path)
    return CliRunner().invoke(app, ["export", str(ckpt), "--out", str(out)]), out


def _old_bundle(tmp_path: Path) -> Path:
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "manifest.json").write_text('{"old": true}')
    return out


def _assert_clean_failure(result, out: Path, needle: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}, "the previous bundle was touched"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".bundle.")], "temporary bundle left behind"


def test_corrupted_safetensors(tiny_checkpoint: dict, tmp_path: Path) -> None:
    ckpt = _copy_checkpoint(tiny_checkpoint, tmp_path)
    data = (ckpt / "edge.safetensors").read_bytes()
    (ckpt / "edge.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    out = _old_bundle(tmp_path)
    result = CliRunner().invoke(app, ["export", str(ckpt), "--out", str(out)])
    _assert_clean_failure(result, out, "edge.safetensors")


def test_missing_config_field(tiny_checkpoint: dict, tmp_path: Path) -> None:
    result, out = _export_with_config(tiny_checkpoint, tmp_path, lambda cfg: cfg["backbone"].pop("embed_dim"))
    _assert_clean_failure(result, out, "backbone.embed_dim")


def test_checkpoint_from_another_backbone_weights(tiny_checkpoint: dict, tmp_path: Path) -> None:
    """The config names weights whose sha256 is not the one the edge network was trained on."""
    from mist_kit.backbone import save_random_backbone

    other = save_random_backbone("test_vit", tmp_path / "other.safetensors", img_size=32, seed=1)
    result, out = _export_with_config(tiny_checkpoint, tmp_path,
                                      lambda cfg: cfg["backbone"].update(weights=str(other)))
    _assert_clean_failure(result, out, "other weights")


def test_checkpoint_from_another_backbone_width(tiny_checkpoint: dict, tmp_path: Path) -> None:
    """Edge weights trained for width 64 under a config claiming a width-128 backbone."""
    result, out = _export_with_config(tiny_checkpoint, tmp_path, lambda cfg: cfg["backbone"].update(embed_dim=128))
    _assert_clean_failure(result, out, "do not fit")


@pytest.mark.parametrize(("args", "needle"), [
    (["--tflite", "--quantize", "none"], "cannot set both --tflite and --quantize none"),
    (["--mode", "fancy"], "--mode 'fancy'"),
    (["--min-agreement", "1.5"], "--min-agreement"),
    (["--model-name", "team/model"], "--model-name 'team/model': expected a printable name"),
])
def test_contradictory_options(tiny_checkpoint: dict, tmp_path: Path, args: list[str], needle: str) -> None:
    out = _old_bundle(tmp_path)
    result = CliRunner().invoke(app, ["export", str(tiny_checkpoint["checkpoint"]), "--out", str(out), *args])
    _assert_clean_failure(result, out, needle)


def test_failed_validation_leaves_previous_bundle(tmp_path: Path, tiny_bundle: Path) -> None:
    """write_bundle validates the written files before publishing; problems discard the temporary directory."""
    import onnx

    from mist_kit.edge import create_edge_method
    from mist_kit.exporters.bundle import Artifacts, ValidationFailed, write_bundle

    manifest = json.loads((tiny_bundle / "manifest.json").read_text())
    from mist_kit.runtime.plan import BackboneShape

    method = create_edge_method("mist", backbone=BackboneShape(64, 5, 1, 6), depth=2, num_classes=10)
    art = Artifacts(onnx.load(str(tiny_bundle / "cloud.onnx")), onnx.load(str(tiny_bundle / "edge.fp32.onnx")),
                    onnx.load(str(tiny_bundle / "edge.onnx")), method)
    out = _old_bundle(tmp_path)
    seen: list[Path] = []

    def validate(tmp: Path, final: dict) -> list[str]:
        seen.append(tmp)
        assert (tmp / "edge.onnx").is_file() and "edge.onnx" in final["files"]
        return ["synthetic parity failure"]

    with pytest.raises(ValidationFailed, match="synthetic parity failure"):
        write_bundle(out, art, {k: v for k, v in manifest.items() if k != "files"}, validate)
    assert seen and not seen[0].exists()
    assert json.loads((out / "manifest.json").read_text()) == {"old": True}
