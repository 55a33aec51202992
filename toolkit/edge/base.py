"""The contract every edge method fulfils: a cloud plan (what the cloud sends) and an edge network on it.

A method declares both halves in one class:
- cloud side (classmethods, no weights needed): `depth_candidates` (what `--k auto` searches: MIST's gather depth,
  ViT-Split's split point, ...) and `cloud_plan(backbone, depth, params)`: the named tensors the cloud sends;
- edge side (the module): `embed(inputs)` maps the plan's tensors (name -> [B, T, D], after the codec's round trip)
  to an embedding [B, E]; `head` is always an `nn.Linear` on it. `embed` becomes `edge.onnx`, the head becomes
  `head.safetensors`, which a device can retrain in numpy without the rest of the network;
- its cost (`cost()`: parameters, MACs and activation bytes per image), which the manifest records and the device
  budget uses as is;
- optionally `init_from_backbone(vit)` (a method that copies backbone blocks) and `param_groups` (learning-rate
  multipliers), which the trainer calls.
See docs/CONTRACTS.md for a worked example of adding a method.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mist_kit.runtime.plan import BackboneShape, CloudPlan, EdgeCost

InputShapes = Mapping[str, tuple[int, ...]]


class EdgeMethod(nn.Module):
    """Base class. Subclasses implement `cloud_plan`, `embed`, `macs_per_image` and `activation_bytes`."""

    method_name: ClassVar[str] = ""
    depth_name: ClassVar[str] = "k"  # what `depth` means for this method, in messages and reports
    needs_backbone_init: ClassVar[bool] = False  # True: `init_from_backbone` must run before training
    closed_form_head: ClassVar[bool] = False  # True: the trainer fits the head as a C-searched logistic regression
    # What `train` and `compare` pass when the user says nothing: the recommended setting where it differs from the
    # constructor's (which stays what older checkpoints were made with, so they load unchanged).
    train_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, *, backbone: BackboneShape, depth: int | None, inputs: InputShapes, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.depth = depth
        self.input_shapes = {name: tuple(int(x) for x in shape) for name, shape in inputs.items()}
        self.num_classes = num_classes

    # ---- cloud side --------------------------------------------------------------------------------------------
    @classmethod
    def depth_candidates(cls, backbone: BackboneShape, params: Mapping[str, Any]) -> tuple[int | None, ...]:
        """The depths `--k auto` chooses among on val; (None,) for a method without one."""
        return (None,)

    @classmethod
    def default_candidate_plans(cls, backbone: BackboneShape) -> list[CloudPlan]:
        """The cloud plan of every depth `train --k auto` searches, built as `train` does by default
        (`train_defaults`): what one backbone pass must cache for this method (compare, test fixtures)."""
        params = dict(cls.train_defaults)
        return [cls.cloud_plan(backbone, d, params) for d in cls.depth_candidates(backbone, params)]

    @classmethod
    def searches_depth(cls) -> bool:
        """Whether `--k auto` has anything to choose for this method (it declares depth candidates)."""
        return cls.depth_candidates.__func__ is not EdgeMethod.depth_candidates.__func__  # type: ignore[attr-defined]

    @classmethod
    def check_depth(cls, backbone: BackboneShape, depth: int | None) -> None:
        """Raise ValueError when `depth` is not valid for this backbone (fast, before any backbone work)."""
        if depth is not None:
            raise ValueError(f"method {cls.method_name!r} takes no depth ({cls.depth_name}); got {depth}")

    @classmethod
    def cloud_plan(cls, backbone: BackboneShape, depth: int | None,
                   params: Mapping[str, Any]) -> CloudPlan:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def probe_input(cls, params: Mapping[str, Any]) -> str | None:
        """The sent tensor whose row 0 the head also reads raw, in its last D columns (MIST's `cls_token`), or None.

        Where there is one, a linear probe on that row is a head of this network too (`init_head_from_probe`).
        """
        return None

    def init_head_from_probe(self, weight: np.ndarray, bias: np.ndarray) -> None:
        """Start from the linear probe (`train --probe-init`): the head's last D columns take the probe's raw-feature
        weights [C, D], its other columns start at zero, its bias takes the probe's [C].

        Why: in eval mode this network's logits then equal the probe's, so training starts from the best convex
        solution instead of a random head, and on a task too small to learn much more it stays near it.
        """
        name = self.probe_input(self.hparams())
        if name is None:
            raise ValueError(f"method {self.method_name!r} has no input its head reads raw (mist: --cls-token)")
        d = self.input_shapes[name][-1]
        if weight.shape != (self.num_classes, d) or bias.shape != (self.num_classes,):
            raise ValueError(f"probe head: expected weight ({self.num_classes}, {d}) and bias ({self.num_classes},), "
                             f"got {weight.shape} and {bias.shape}")
        head = self.head
        with torch.no_grad():
            head.weight.zero_()
            head.weight[:, -d:].copy_(torch.from_numpy(np.asarray(weight, np.float32)))
            head.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))

    def hparams_for_plan(self) -> dict[str, Any]:
        """The hyperparameters the plan depends on (default: all of `hparams`)."""
        return self.hparams()

    @property
    def plan(self) -> CloudPlan:
        return self.cloud_plan(self.backbone, self.depth, self.hparams_for_plan())

    # ---- edge side ---------------------------------------------------------------------------------------------
    @property
    def embedding_dim(self) -> int:
        return int(self.head.in_features)

    def embed(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.embed(inputs))

    def hparams(self) -> dict[str, Any]:
        """The constructor parameters beyond the shapes, recorded in the checkpoint's `method.params`."""
        return {}

    def init_from_backbone(self, vit: nn.Module) -> None:
        """Copy what the method needs from the frozen backbone (e.g. its last blocks); default: nothing."""

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW parameter groups: matrices decay, vectors (norms, biases) do not. `lr_scale` multiplies the lr."""
        decay = [p for p in self.parameters() if p.ndim >= 2 and p.requires_grad]
        no_decay = [p for p in self.parameters() if p.ndim < 2 and p.requires_grad]
        return [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0},
                {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]

    # ---- cost --------------------------------------------------------------------------------------------------
    def macs_per_image(self) -> int:  # pragma: no cover - abstract
        """Multiply-accumulates of `embed` + head for one image (codec decoders excluded)."""
        raise NotImplementedError

    def activation_bytes(self) -> int:  # pragma: no cover - abstract
        """float32 bytes live at the peak of `embed` for one image (inputs included, weights excluded)."""
        raise NotImplementedError

    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_params(self) -> int:
        """Parameters of the edge graph + head (what the device holds)."""
        return sum(p.numel() for p in self.parameters())

    def cost(self) -> EdgeCost:
        return EdgeCost(self.num_params(), int(self.macs_per_image()), int(self.activation_bytes()))

    def input_bytes(self) -> int:
        """float32 bytes of the decoded inputs per image."""
        total = 0
        for shape in self.input_shapes.values():
            n = 4
            for d in shape:
                n *= d
            total += n
        return total
