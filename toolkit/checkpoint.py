"""Checkpoints: `config.json` + `edge.safetensors` in one directory, written atomically, never pickled."""

from __future__ import annotations

from pathlib import Path

from mist_kit import __version__
from mist_kit.atomic import atomic_dir, write_json
from mist_kit.config import CONFIG_FILE, WEIGHTS_FILE, CheckpointConfig, load_config
from mist_kit.edge import EdgeMethod, create_edge_method
from mist_kit.errors import CheckpointError


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


def build_method(config: CheckpointConfig, num_tokens: int | None = None) -> EdgeMethod:
    """Instantiate the checkpoint's edge method with its recorded hyperparameters."""
    b = config.backbone
    try:
        return create_edge_method(config.method.name, embed_dim=b.embed_dim, num_tokens=num_tokens or b.num_tokens,
                                  num_prefix_tokens=b.num_prefix_tokens, num_classes=len(config.classes),
                                  **config.method.params)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{CONFIG_FILE}: method.params do not fit method {config.method.name!r} ({exc})") \
            from None


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
    model = build_method(config, num_tokens=config.codec.get("num_tokens"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise CheckpointError(f"{weights}: tensors do not fit {config.method.name!r} as configured ({first[:160]})") \
            from None
    model.eval()
    return config, model
