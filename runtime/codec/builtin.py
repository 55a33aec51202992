"""The built-in codecs, cheapest loss first. Each factory names one recipe; the registry is the list users see.

Choices follow the measurements in issue 6 on the Caltech-101 DINOv2 model: per-channel int8 is near lossless;
int4 needs a 99.99th-percentile scale (absmax wastes its 16 levels on rare outliers); PCA loses the
low-variance directions that carry class information; pooling patch tokens 2x2 (the edge network retrained on
them) keeps accuracy while cutting tokens 4x. At k = N (all blocks in the cloud) the cls token has already
attended to every patch: sending it alone (`cls-int8`, the edge network retrained on it) cross-validated as well as
4x4 pooling + int4 at 1/8.5 of its bytes (BENCHMARKS.md, codec section); at smaller k it has seen less.
"""

from __future__ import annotations

from mist_kit.runtime.codec.params import CodecParams, Quant
from mist_kit.runtime.codec.registry import register_codec

P9999 = 99.99


@register_codec("fp32")
def fp32() -> CodecParams:
    """Lossless reference: the gather as float32."""
    return CodecParams(quant=Quant.FP32)


@register_codec("fp16")
def fp16() -> CodecParams:
    """Half precision cast: 2x smaller, no measurable loss."""
    return CodecParams(quant=Quant.FP16)


@register_codec("int8-channel")
def int8_channel() -> CodecParams:
    """int8, one absmax scale per channel calibrated on training features: 4x smaller."""
    return CodecParams(quant=Quant.INT8)


@register_codec("int8-channel-p9999")
def int8_channel_p9999() -> CodecParams:
    """int8, per-channel scale at the 99.99th percentile of |x| (outliers clip, the bulk gets finer steps)."""
    return CodecParams(quant=Quant.INT8, percentile=P9999)


@register_codec("int8-token")
def int8_token() -> CodecParams:
    """int8 with one absmax scale per token computed per image and sent along (no calibration needed)."""
    return CodecParams(quant=Quant.INT8_TOKEN)


@register_codec("int4-channel")
def int4_channel() -> CodecParams:
    """int4 per channel (99.99th-percentile scales), two values per byte: 8x smaller."""
    return CodecParams(quant=Quant.INT4, percentile=P9999)


@register_codec("pca128-int8")
def pca128_int8() -> CodecParams:
    """Projection to the top 128 principal directions of the calibration features, then int8."""
    return CodecParams(quant=Quant.PCA_INT8, rank=128)


@register_codec("pca64-int8")
def pca64_int8() -> CodecParams:
    """Projection to the top 64 principal directions, then int8."""
    return CodecParams(quant=Quant.PCA_INT8, rank=64)


@register_codec("pool2-fp16")
def pool2_fp16() -> CodecParams:
    """2x2 average pooling of patch tokens (prefix kept), float16."""
    return CodecParams(quant=Quant.FP16, pool=2)


@register_codec("pool2-int8")
def pool2_int8() -> CodecParams:
    """2x2 pooling, then int8 per channel (prefix tokens get their own scales)."""
    return CodecParams(quant=Quant.INT8, pool=2, prefix_scales=True)


@register_codec("pool2-int4")
def pool2_int4() -> CodecParams:
    """2x2 pooling, then int4 per channel (99.99th-percentile scales, prefix scaled separately)."""
    return CodecParams(quant=Quant.INT4, pool=2, percentile=P9999, prefix_scales=True)


@register_codec("pool4-int8")
def pool4_int8() -> CodecParams:
    """4x4 pooling, then int8 per channel (prefix scaled separately)."""
    return CodecParams(quant=Quant.INT8, pool=4, prefix_scales=True)


@register_codec("pool4-int4")
def pool4_int4() -> CodecParams:
    """4x4 pooling, then int4 per channel: 1/100 of fp32 territory."""
    return CodecParams(quant=Quant.INT4, pool=4, percentile=P9999, prefix_scales=True)


@register_codec("cls-fp16")
def cls_fp16() -> CodecParams:
    """The prefix (cls) tokens alone, float16: 768 B for ViT-S (1/514 of fp32); the edge net reads the cls token."""
    return CodecParams(quant=Quant.FP16, prefix_only=True)


@register_codec("cls-int8")
def cls_int8() -> CodecParams:
    """The prefix (cls) tokens alone, int8 per channel (absmax scales): 384 B for ViT-S (1/1028 of fp32)."""
    return CodecParams(quant=Quant.INT8, prefix_only=True)
