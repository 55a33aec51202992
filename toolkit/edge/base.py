"""The contract every edge method fulfils: features -> embedding (the exported edge graph) -> linear head.

The split between `embed` and `head` is the deployment boundary: `embed` becomes `edge.onnx`, the head becomes
`head.safetensors`, which a device can retrain in numpy without the rest of the network.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn


class EdgeMethod(nn.Module):
    """Base class. Subclasses set `input_kind` and implement `embed`; `head` is always a `nn.Linear`.

    `input_kind` says what the cloud sends: "gather" = MIST's g_k [B, T, D]; "final_cls" = the backbone's
    final-norm cls token [B, D] (the linear-probe baseline, which needs the whole backbone in the cloud).
    """

    method_name: ClassVar[str] = ""
    input_kind: ClassVar[str] = "gather"

    def __init__(self, *, embed_dim: int, num_tokens: int, num_prefix_tokens: int, num_classes: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_tokens = num_tokens
        self.num_prefix_tokens = num_prefix_tokens
        self.num_classes = num_classes

    @property
    def embedding_dim(self) -> int:
        return int(self.head.in_features)

    def embed(self, features: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(features))

    def hparams(self) -> dict[str, Any]:
        """The constructor parameters beyond the shapes, recorded in the checkpoint's `method.params`."""
        return {}

    def macs_per_image(self, num_tokens: int | None = None) -> int:
        """Multiply-accumulates of `embed` + head for one image (for device budgets and reports)."""
        return 0

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
