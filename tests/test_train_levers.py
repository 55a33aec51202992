"""Training levers that need no extra backbone pass (issues 14 and 17): successive halving of the k search, an
exponential moving average of the weights, feature mixup, and a step floor for the refit.

Each is checked against an independent reference: the halving rungs and ranking by hand, the moving average
against the warmup formula written out here (not timm's code), mixup against numpy, the refit floor by arithmetic.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mist_kit.edge import create_edge_method
from mist_kit.edge.lae import LowRankAttentionEdge
from mist_kit.errors import UsageError
from mist_kit.pipeline import choose_depth, refit_epochs
from mist_kit.runtime.plan import BackboneShape
from mist_kit.train import FitResult, TrainParams, fit, fit_candidates, halve, halving_rung, mix_batch

SHAPE = BackboneShape(8, 5, 1, 4)  # embed 8, 5 tokens, 1 prefix token, 4 blocks


def _data(seed: int = 0, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.standard_normal((n, 5, 8)).astype(np.float32) + y[:, None, None].astype(np.float32)
    return x, y


def _model(depth: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    return create_edge_method("mist", backbone=SHAPE, depth=depth, num_classes=3, params={})


def test_halving_rungs_double_from_prune_after() -> None:
    on = TrainParams(halving=True, prune_after=3)
    assert [e for e in range(1, 50) if halving_rung(e, on)] == [3, 6, 12, 24, 48]
    assert not any(halving_rung(e, TrainParams(halving=False, prune_after=3)) for e in range(1, 50))


def _res(top1: float | None, loss: float | None) -> FitResult:
    return FitResult(state={}, best_epoch=1, best_val_top1=top1, epochs_run=1, best_val_loss=loss)


def test_halve_keeps_the_better_half_ties_to_lower_loss() -> None:
    results = {4: _res(0.5, 1.0), 8: _res(0.7, 0.9), 12: _res(0.7, 0.8), 16: _res(0.2, 2.0), 20: _res(None, None)}
    assert halve(results, set(results)) == {12, 8, 4}  # 5 alive -> 3 kept: 0.7 (loss 0.8), 0.7 (0.9), 0.5
    assert halve(results, {4, 16}) == {4}
    assert halve(results, {16}) == {16}


def test_choose_depth_ties_go_to_the_cheaper_cloud_then_the_lower_val_loss() -> None:
    """A tie in val top-1 is settled by the blocks the cloud runs; where every plan runs the same blocks (the default
    cls token needs all N), by the lower val loss; only then by the shallower depth."""
    results = {1: _res(1.0, 0.30), 2: _res(1.0, 0.10), 3: _res(1.0, 0.20), 4: _res(0.9, 0.01)}

    def plans(cls_token: bool) -> dict:
        return {d: LowRankAttentionEdge.cloud_plan(SHAPE, d, {"cls_token": cls_token}) for d in results}

    assert {p.blocks for p in plans(True).values()} == {4}  # the final-norm cls token: every k runs 4 blocks
    assert choose_depth(results, plans(True)) == 2  # 100% everywhere but k = 4: lowest val loss among the tied
    assert choose_depth(results, plans(False)) == 1  # the k = 1 plan runs 1 block: the cheapest of the tied
    assert choose_depth({**results, 2: _res(1.0, 0.3), 3: _res(1.0, 0.3)}, plans(True)) == 1  # equal loss: shallower
    assert choose_depth({**results, 4: _res(1.0, 0.01)}, plans(True)) == 4  # no cost difference: loss decides
    assert choose_depth({1: _res(None, None), 2: _res(None, None)}, plans(True)) == 1  # no val at all


def test_fit_candidates_with_halving_stops_the_worse_half_at_the_rung() -> None:
    x, y = _data()
    models = {d: _model(d) for d in (1, 2, 3, 4)}
    rows = {d: x for d in models}
    params = TrainParams(epochs=5, batch_size=24, min_steps=0, patience=20, prune_margin=None, prune_after=1,
                         halving=True)
    res = fit_candidates(models, rows, y, params, {d: x[:24] for d in models}, y[:24])
    runs = {d: r.epochs_run for d, r in res.items()}
    assert sorted(runs.values()) == [1, 1, 2, 5]  # 4 candidates -> 2 after epoch 1 -> 1 after epoch 2
    after_one = {d: r.history[0]["val_top1"] for d, r in res.items()}
    survivors = [d for d, n in runs.items() if n > 1]
    assert min(after_one[d] for d in survivors) >= max(after_one[d] for d in runs if runs[d] == 1)
    no_halving = fit_candidates({d: _model(d) for d in (1, 2, 3, 4)}, rows, y,
                                TrainParams(epochs=5, batch_size=24, min_steps=0, patience=20, prune_margin=None,
                                            halving=False),
                                {d: x[:24] for d in models}, y[:24])
    assert all(r.epochs_run == 5 for r in no_halving.values())


def test_a_candidate_learns_the_same_whatever_trains_beside_it() -> None:
    """Dropout masks come from a stream per candidate: depth 3 in a search of three equals depth 3 alone, with
    dropout on (so the random stream matters)."""
    x, y = _data(4)
    params = TrainParams(epochs=4, batch_size=16, min_steps=0, patience=20, prune_margin=None, seed=2)

    def model(d: int):
        torch.manual_seed(d)
        return create_edge_method("mist", backbone=SHAPE, depth=d, num_classes=3, params={"dropout": 0.5})

    together = {d: model(d) for d in (1, 2, 3)}
    fit_candidates(together, {d: x for d in together}, y, params, {d: x[:16] for d in together}, y[:16])
    alone = {3: model(3)}
    fit_candidates(alone, {3: x}, y, params, {3: x[:16]}, y[:16])
    for k, v in alone[3].state_dict().items():
        torch.testing.assert_close(together[3].state_dict()[k], v, rtol=0, atol=0)


def test_ema_state_equals_the_warmup_average_of_the_raw_weights() -> None:
    """batch = all rows, so one step per epoch: record the raw weights after every step (ema off), then check the
    kept state with `ema` on (no val: the last state) against the average computed here."""
    x, y = _data(1, 16)
    decay, epochs = 0.9, 6
    raw = _model(seed=3)
    snaps = [{k: v.clone() for k, v in raw.state_dict().items()}]
    params = TrainParams(epochs=1, batch_size=16, min_steps=0, warmup_epochs=0, seed=5)
    trajectory = TrainParams(epochs=epochs, batch_size=16, min_steps=0, warmup_epochs=0, seed=5)

    def keep(epoch: int, rows: dict) -> None:
        snaps.append({k: v.clone() for k, v in raw.state_dict().items()})

    fit(raw, x, y, trajectory, on_epoch=keep)
    assert len(snaps) == epochs + 1 and params.epochs == 1
    averaged = _model(seed=3)
    fit(averaged, x, y, TrainParams(epochs=epochs, batch_size=16, min_steps=0, warmup_epochs=0, seed=5, ema=decay))
    expect = {k: v.double() for k, v in snaps[0].items()}
    for step in range(1, epochs + 1):
        t = step - 1  # timm's warmup: decay 0 on the first update, then 1 - (1 + t) ** (-2/3), capped at `ema`
        d = 0.0 if t <= 0 else min(decay, 1 - (1 + t) ** (-2 / 3))
        expect = {k: d * expect[k] + (1 - d) * snaps[step][k].double() for k in expect}
    got = averaged.state_dict()
    for k, v in expect.items():
        if v.is_floating_point():
            np.testing.assert_allclose(got[k].double().numpy(), v.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(not torch.equal(got[k], snaps[-1][k]) for k in got)  # the average, not the last raw weights


def test_mix_batch_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((6, 5, 8)), rng.standard_normal((6, 8))
    perm = rng.permutation(6)
    got = mix_batch({"g": torch.from_numpy(a), "c": torch.from_numpy(b)}, 0.3, torch.from_numpy(perm))
    np.testing.assert_allclose(got["g"].numpy(), 0.3 * a + 0.7 * a[perm])
    np.testing.assert_allclose(got["c"].numpy(), 0.3 * b + 0.7 * b[perm])


def test_mixup_is_seeded_and_changes_training() -> None:
    x, y = _data(2)

    def weights(**kw) -> np.ndarray:
        m = _model(seed=1)
        fit(m, x, y, TrainParams(epochs=2, batch_size=16, min_steps=0, **kw))
        return np.concatenate([v.detach().numpy().ravel() for v in m.state_dict().values()])

    base, mixed = weights(seed=0), weights(seed=0, mixup=0.4)
    np.testing.assert_array_equal(mixed, weights(seed=0, mixup=0.4))
    assert not np.allclose(base, mixed)
    np.testing.assert_array_equal(base, weights(seed=0, mixup=0.0))  # off: the batch order is untouched


@pytest.mark.parametrize(("best", "rows", "floor", "want"), [
    (8, 107, 500, 125),  # faces2: 4 steps per epoch -> 125 epochs for 500 steps
    (8, 107, 0, 8),
    (20, 1000, 500, 20),  # Caltech: 32 steps per epoch, the best epoch already gives 640 steps
    (9, 1000, 500, 16),
    (0, 10, 0, 1),
])
def test_refit_epochs_floor(best: int, rows: int, floor: int, want: int) -> None:
    assert refit_epochs(best, rows, TrainParams(refit_min_steps=floor)) == want
    assert refit_epochs(best, rows, TrainParams(min_steps=floor)) == want  # the default follows --min-steps
    assert want * math.ceil(rows / 32) >= floor


@pytest.mark.parametrize("bad", [{"ema": 1.0}, {"ema": -0.1}, {"mixup": -1.0}, {"refit_min_steps": -5}])
def test_lever_values_are_checked(bad: dict) -> None:
    with pytest.raises(UsageError):
        TrainParams(**bad)
