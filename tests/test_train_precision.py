"""`--train-precision bf16`: the training step under CPU bf16 autocast, parameters and evaluation in fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mist_kit.edge import create_edge_method
from mist_kit.errors import UsageError
from mist_kit.runtime.plan import BackboneShape
from mist_kit.train import TrainParams, cpu_has_bf16, fit

SHAPE = BackboneShape(embed_dim=32, num_tokens=17, num_prefix_tokens=1, num_blocks=4)


def _data(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, 17, 32)).astype(np.float32)
    x[:, :, :3] += 2.0 * np.eye(3, dtype=np.float32)[y][:, None, :]  # a learnable signal on every token
    return {"gather": x}, y


def test_unknown_precision_is_one_line() -> None:
    with pytest.raises(UsageError, match="--train-precision must be fp32 or bf16"):
        TrainParams(precision="fp8")


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
def test_bf16_training_keeps_fp32_weights_and_learns_like_fp32() -> None:
    x, y = _data(192, 0)
    vx, vy = _data(96, 1)
    out = {}
    for precision in ("fp32", "bf16"):
        model = create_edge_method("mist", backbone=SHAPE, depth=2, num_classes=3, seed=0)
        res = fit(model, x, y, TrainParams(epochs=6, batch_size=32, seed=0, precision=precision), vx, vy)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        out[precision] = (res.best_val_top1, model)
    assert out["fp32"][0] > 0.9 and out["bf16"][0] > 0.9  # both learn the signal
    assert abs(out["fp32"][0] - out["bf16"][0]) <= 0.05
    # the weights moved differently (autocast really ran), but stay close: bf16 rounds products, not parameters
    a = torch.cat([p.flatten() for p in out["fp32"][1].parameters()])
    b = torch.cat([p.flatten() for p in out["bf16"][1].parameters()])
    assert 0 < (a - b).norm() / a.norm() < 0.2


def test_bf16_without_cpu_support_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.raises(UsageError, match="no bf16 instructions"):
        TrainParams(precision="bf16")
