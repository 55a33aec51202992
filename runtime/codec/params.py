"""What a codec is made of: optional token pooling, then one quantizer, with a calibration statistic.

Frozen dataclasses reject contradictory settings at construction (a PCA rank on a non-PCA quantizer, a
percentile outside (0, 100], a pooling factor below 1), so a registered codec cannot be half-valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mist_kit.errors import UsageError


class Quant(str, Enum):
    """How each (pooled) value is represented on the wire."""

    FP32 = "fp32"  # float32, lossless reference
    FP16 = "fp16"  # float16 cast
    INT8 = "int8"  # one scale per channel, calibrated
    INT8_TOKEN = "int8-token"  # one scale per token, computed per image and sent along (float32)
    INT4 = "int4"  # one scale per channel, values in [-8, 7], two per byte
    PCA_INT8 = "pca-int8"  # projection to `rank` dims (basis fitted on calibration data), then int8 per component


QMAX = {Quant.INT8: 127, Quant.INT8_TOKEN: 127, Quant.INT4: 7, Quant.PCA_INT8: 127}
QRANGE = {Quant.INT8: (-128, 127), Quant.INT8_TOKEN: (-128, 127), Quant.INT4: (-8, 7), Quant.PCA_INT8: (-128, 127)}


@dataclass(frozen=True)
class CodecParams:
    """A codec's fixed recipe (the calibrated numbers live in the fitted spec, not here).

    pool: average p x p patch tokens (prefix/cls tokens kept), 1 = no pooling; the device then sees fewer tokens,
        so its edge network must be trained on pooled features.
    percentile: per-channel clipping statistic of |x| for calibrated scales (100 = absmax).
    prefix_scales: give prefix (cls/register) tokens their own per-channel scales; their range differs from the
        patch tokens' and there are only a few of them, so sharing one scale wastes the patch tokens' precision.
    prefix_only: send the prefix tokens (cls and any registers) alone and drop every patch token; like pooling it
        changes what the device sees (its edge network must be trained on it, with cls pooling).
    """

    quant: Quant
    pool: int = 1
    percentile: float = 100.0
    rank: int | None = None
    prefix_scales: bool = False
    prefix_only: bool = False

    def __post_init__(self) -> None:
        if self.pool < 1:
            raise UsageError(f"codec pool factor must be >= 1, got {self.pool}")
        if not 0.0 < self.percentile <= 100.0:
            raise UsageError(f"codec percentile must be in (0, 100], got {self.percentile}")
        if (self.rank is not None) != (self.quant is Quant.PCA_INT8):
            raise UsageError("codec rank is set exactly when the quantizer is pca-int8")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"codec PCA rank must be >= 1, got {self.rank}")
        if self.prefix_scales and self.quant not in (Quant.INT8, Quant.INT4):
            raise UsageError("prefix_scales applies to per-channel int8/int4 codecs only")
        if self.prefix_only and (self.pool > 1 or self.prefix_scales):
            raise UsageError("prefix_only sends the prefix tokens alone: no pooling, no separate prefix scales")

    @property
    def changes_tokens(self) -> bool:
        """Whether the device sees other tokens than the gather's (its edge network must be trained on them)."""
        return self.pool > 1 or self.prefix_only

    def geometry_only(self) -> CodecParams:
        """The same token selection (pooling / prefix only) with a lossless float32 quantizer."""
        return CodecParams(quant=Quant.FP32, pool=self.pool, prefix_only=self.prefix_only)

    @property
    def calibrated(self) -> bool:
        """Whether encode needs numbers fitted on calibration features (scales, PCA basis)."""
        return self.quant in (Quant.INT8, Quant.INT4, Quant.PCA_INT8)
