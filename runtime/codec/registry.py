"""The codec registry: every codec is a named factory, `@register_codec("int8-channel")`, like timm's models.

A factory returns the codec's `CodecParams` (pooling, quantizer, calibration statistic). The name is the address a
user types (`train --codec`, `export --codec`, `codec bench --codecs`) and the key recorded in checkpoints and
manifests; registering a name twice is an error so a plugin can never silently replace a built-in codec.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from mist_kit.errors import CodecError, UsageError
from mist_kit.runtime.codec.params import CodecParams, Quant

CodecFactory = Callable[[], CodecParams]
_REGISTRY: dict[str, CodecFactory] = {}
_PCA_NAME = re.compile(r"^pca([1-9][0-9]{0,3})-int8$")


def register_codec(name: str) -> Callable[[CodecFactory], CodecFactory]:
    """Decorator: register `fn` (returning CodecParams) under `name`; a duplicate name raises UsageError."""

    def deco(fn: CodecFactory) -> CodecFactory:
        if name in _REGISTRY:
            raise UsageError(f"codec {name!r} is already registered; codec names must be unique")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_codecs() -> list[str]:
    """Registered codec names, in registration order (cheapest loss first)."""
    return list(_REGISTRY)


def codec_params(name: str) -> CodecParams:
    """The parameters of a codec by name; `pca<r>-int8` works for any rank r, registered or not."""
    if name in _REGISTRY:
        return _REGISTRY[name]()
    m = _PCA_NAME.match(name)
    if m:
        return CodecParams(quant=Quant.PCA_INT8, rank=int(m.group(1)))
    raise CodecError(f"unknown codec {name!r}; valid: {', '.join(list_codecs())} (or pca<r>-int8)")


def same_tokens_codec(name: str) -> str:
    """The registered codec with `name`'s quantizer that keeps every token: what a token-changing codec (pooling,
    prefix only) means for a one-token tensor such as the final cls, which has no patch grid to pool or drop
    (pool2-int4 -> int4-channel, cls-int8 -> int8-channel, cls-fp16 -> fp16). Other names are returned as given."""
    params = codec_params(name)
    if not params.changes_tokens:
        return name
    want = CodecParams(quant=params.quant, percentile=params.percentile)
    for other in _REGISTRY:
        if _REGISTRY[other]() == want:
            return other
    raise CodecError(f"codec {name!r}: no registered codec quantizes like it without changing tokens")
