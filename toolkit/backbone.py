"""The frozen cloud backbone: create a timm ViT (VisionTransformer, Eva, Beit families) and load its weights.

Running it (the tensors a cloud plan asks for) lives in `mist_kit.backbone_run`.
"""

from __future__ import annotations

import difflib
import os
import socket
import threading
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mist_kit.config import BackboneSpec
from mist_kit.errors import CheckpointError, DependencyError, InputError, UsageError
from mist_kit.runtime.manifest import sha256_file


def _timm():
    try:
        import timm
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise DependencyError(f"timm is not installed ({exc}); install the training extra: pip install "
                              "'mist-kit[train]'") from None
    return timm


def _check_name(name: str) -> None:
    timm = _timm()
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models("vit*") + timm.list_models("deit*"), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models('vit_*')"
        raise UsageError(f"unknown backbone {name!r}{hint}")


def _is_vit_family(name: str) -> bool:
    """Whether timm builds `name` with one of the supported ViT classes (checked from the registry, no build)."""
    _timm()
    from timm.models import model_entrypoint

    try:
        fn = model_entrypoint(name)
    except Exception:  # unknown names are reported by _check_name
        return True
    return fn.__module__.rsplit(".", 1)[-1] in ("vision_transformer", "eva", "beit")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub answers a TCP connect within `timeout` seconds (DNS included).

    Offline, huggingface_hub retries every download with backoff for over a minute before giving up; probing
    first turns that into one clear error in a few seconds. The probe runs in a daemon thread because name
    resolution itself has no timeout.
    """
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme != "http" else 80)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(ok)


def _pretrained_in_local_cache(name: str) -> bool:
    """Whether timm's hub weights for `name` are already in the local Hugging Face cache (usable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not repo:
            return False
        return any(isinstance(try_to_load_from_cache(repo, f), str)
                   for f in ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin"))
    except Exception:  # any failure here only means "not known to be cached"
        return False


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot read weights ({type(exc).__name__}: {str(exc)[:160]})") from None
    for key in ("model", "state_dict", "model_state"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    return sd


def _checkpoint_filter(model: nn.Module):
    """timm's own state-dict converter for the model's family (position-embedding resampling, key renames)."""
    import importlib

    module = importlib.import_module(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", lambda state, _model: state)


def create_vit(name: str, img_size: int | None = None, weights: str | Path | None = None,
               pretrained: bool = False, seed: int | None = None) -> nn.Module:
    """Create a timm VisionTransformer in eval mode with frozen parameters.

    Exactly one weight source: `weights` (safetensors, or .pth/.pt read with `weights_only=True`), `pretrained`
    (timm's model hub: fails with one line offline) or neither with a `seed` (a seeded random init, for demos).
    """
    if weights is not None and pretrained:
        raise UsageError("cannot use both --weights and --pretrained; pick one weight source")
    _check_name(name)
    timm = _timm()
    from mist_kit.backbone_run import family

    kwargs: dict[str, Any] = {"num_classes": 0}
    if img_size is not None:
        kwargs["img_size"] = img_size
    if not _is_vit_family(name):
        raise UsageError(f"backbone {name!r} is not a Vision Transformer (timm ViT, DeiT, DINOv2, EVA-02 or BEiT); "
                         "separated tuning needs a token-sequence backbone")
    if seed is not None:
        torch.manual_seed(seed)
    if pretrained and not _pretrained_in_local_cache(name) and not _hub_reachable():
        raise DependencyError(f"--pretrained needs the model hub, which is unreachable (offline?); pass --weights "
                              f"FILE with {name!r} weights (safetensors) instead")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        if pretrained:
            raise DependencyError(f"cannot fetch pretrained weights for {name!r} from the model hub "
                                  f"({type(exc).__name__}); offline, pass --weights FILE instead") from None
        raise UsageError(f"cannot create backbone {name!r}: {str(exc)[:200]}") from None
    family(model)  # a one-line error for anything but the supported ViT families
    patch = tuple(getattr(model.patch_embed, "patch_size", (1, 1)))
    size = tuple(getattr(model.patch_embed, "img_size", None) or (img_size, img_size))
    if img_size is not None and any(int(s) % int(p) for s, p in zip(size, patch, strict=False)):
        lo, hi = max(patch[0], img_size // patch[0] * patch[0]), (img_size // patch[0] + 1) * patch[0]
        raise UsageError(f"--img-size {img_size} is not a multiple of {name}'s patch size {patch[0]} "
                         f"(try {lo} or {hi})")
    if weights is not None:
        path = Path(weights)
        filter_fn = _checkpoint_filter(model)
        state = filter_fn(_read_state_dict(path), model)  # resamples pos_embed to img_size, etc.
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith("head.")]
        if missing or result.unexpected_keys:
            raise CheckpointError(f"{path}: weights do not fit backbone {name!r} (missing {missing[:3]}, "
                                  f"unexpected {result.unexpected_keys[:3]})")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def spec_for(model: nn.Module, name: str, weights: str | Path | None, weights_sha256: str, pretrained: bool,
             mean: tuple[float, float, float] | None = None,
             std: tuple[float, float, float] | None = None) -> BackboneSpec:
    """Describe a created model: shapes, preprocessing (mean/std from its pretrained config unless given)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    img_size = model.patch_embed.img_size[0]
    return BackboneSpec(
        name=name,
        weights=str(Path(weights).resolve()) if weights is not None else None,
        weights_sha256=weights_sha256,
        source="pretrained" if pretrained else "file",
        img_size=int(img_size),
        mean=tuple(float(x) for x in (mean or cfg.get("mean", (0.485, 0.456, 0.406)))),  # type: ignore[arg-type]
        std=tuple(float(x) for x in (std or cfg.get("std", (0.229, 0.224, 0.225)))),  # type: ignore[arg-type]
        num_blocks=len(model.blocks),
        num_tokens=int(model.patch_embed.num_patches + model.num_prefix_tokens),
        embed_dim=int(model.embed_dim),
        num_prefix_tokens=int(model.num_prefix_tokens),
    )


def load_backbone(name: str, *, img_size: int | None = None, weights: str | Path | None = None,
                  pretrained: bool = False, mean: tuple[float, float, float] | None = None,
                  std: tuple[float, float, float] | None = None) -> tuple[nn.Module, BackboneSpec]:
    """Create the frozen backbone from a weights file or the hub and describe it (hash, shapes, preprocessing)."""
    if weights is None and not pretrained:
        raise UsageError("no backbone weights: pass --weights FILE (safetensors) or --pretrained (needs the hub)")
    model = create_vit(name, img_size=img_size, weights=weights, pretrained=pretrained)
    digest = sha256_file(weights) if weights is not None else f"pretrained:{name}"
    return model, spec_for(model, name, weights, digest, pretrained, mean, std)


def load_backbone_for(spec: BackboneSpec, weights_override: str | Path | None = None) -> nn.Module:
    """Recreate the exact backbone a checkpoint was trained on, refusing weights with another sha256."""
    weights = weights_override if weights_override is not None else spec.weights
    if spec.source == "pretrained" and weights_override is None:
        return create_vit(spec.name, img_size=spec.img_size, pretrained=True)
    if weights is None or not Path(weights).is_file():
        raise CheckpointError(f"backbone weights {weights} not found; pass --weights FILE (sha256 "
                              f"{spec.weights_sha256[:12]}...)")
    digest = sha256_file(weights)
    if digest != spec.weights_sha256:
        raise CheckpointError(f"{weights}: sha256 {digest[:12]}... differs from the checkpoint's backbone "
                              f"({spec.weights_sha256[:12]}...): these are other weights")
    return create_vit(spec.name, img_size=spec.img_size, weights=weights)


def save_random_backbone(name: str, path: str | Path, img_size: int | None = None, seed: int = 0) -> Path:
    """Write a seeded random-init backbone to a safetensors file (the offline demo's stand-in for real weights)."""
    from safetensors.torch import save_file

    from mist_kit.atomic import atomic_path

    model = create_vit(name, img_size=img_size, seed=seed)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"source": f"random-init seed={seed}", "backbone": name})
    return Path(path)
