"""Checkpoints: `config.json` + `edge.safetensors` in one directory, written atomically, never pickled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mist_kit import __version__
from mist_kit.atomic import atomic_dir, write_json
from mist_kit.config import CONFIG_FILE, WEIGHTS_FILE, CheckpointConfig, load_config
from mist_kit.edge import EdgeMethod, create_edge_method
from mist_kit.errors import CheckpointError, UsageError
from mist_kit.runtime.plan import BackboneShape


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept the checkpoint directory itself or a `train --out` directory holding `checkpoint/`."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p
    if (p / "checkpoint" / CONFIG_FILE).is_file():
        return p / "checkpoint"
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    raise CheckpointError(f"{p}: not a checkpoint (no {CONFIG_FILE}); expected the directory `mist-kit train` wrote")


def new_method(name: str, backbone: BackboneShape, depth: int | None, num_classes: int, params: dict[str, Any],
               seed: int | None, inputs: dict[str, tuple[int, int]] | None = None) -> EdgeMethod:
    """A seeded edge method for training (bad parameters are one UsageError line)."""
    try:
        return create_edge_method(name, backbone=backbone, depth=depth, num_classes=num_classes, params=params,
                                  inputs=inputs, seed=seed)
    except ValueError as exc:
        raise UsageError(f"method {name!r}: {exc}") from None


def build_method(config: CheckpointConfig) -> EdgeMethod:
    """Instantiate the checkpoint's edge method with its recorded hyperparameters, depth and codecs' shapes."""
    from mist_kit.edge import get_edge_method
    from mist_kit.runtime.codec.plan_codecs import decoded_shapes

    b, m = config.backbone, config.method
    try:
        plan = get_edge_method(m.name).cloud_plan(b.shape, m.k, m.params)
        return create_edge_method(m.name, backbone=b.shape, depth=m.k, num_classes=len(config.classes),
                                  params=m.params, inputs=decoded_shapes(plan, config.codecs))
    except (TypeError, ValueError, UsageError) as exc:
        raise CheckpointError(f"{CONFIG_FILE}: method {m.name!r} with k={m.k} and params {m.params} cannot be "
                              f"built ({exc})") from None


def save_checkpoint(out_dir: str | Path, config: CheckpointConfig, model: EdgeMethod) -> Path:
    """Write the checkpoint directory whole (temp dir + rename): a crash leaves any previous one intact."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "method": config.method.name,
                                                             "mist_kit": __version__})
        write_json(tmp / CONFIG_FILE, config.to_dict())
    return Path(out_dir)


def load_checkpoint(path: str | Path) -> tuple[CheckpointConfig, EdgeMethod]:
    """Read config and weights; a corrupt or mismatched weights file is a one-line CheckpointError."""
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint_dir(path)
    config = load_config(ckpt)
    weights = ckpt / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing")
    try:
        state = load_file(str(weights))
    except Exception as exc:
        raise CheckpointError(f"{weights}: corrupt safetensors file ({str(exc)[:120]})") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(v.isfinite().all())]
    if bad:
        raise CheckpointError(f"{weights}: tensors {bad[:3]} hold NaN/Inf (training diverged or the file is corrupt)")
    model = build_method(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{weights}: tensors do not fit {config.method.name!r} as configured ({first[:160]})") \
            from None
    model.eval()
    return config, model
