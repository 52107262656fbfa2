"""Streaming metrics against brute force on small data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from model.metrics import AUC, UAUC, LogLoss, MultiTaskMetrics, WindowAUC, auc_exact, logloss, uauc_exact


def brute_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.3).astype(float)
    p = np.round(rng.random(300) * 0.5 + 0.4 * y, 2)  # rounding makes ties
    exact = brute_auc(y, p)
    assert auc_exact(y, p) == pytest.approx(exact, abs=1e-12)
    streaming = AUC()
    for chunk in np.array_split(np.arange(300), 7):
        streaming.update(y[chunk], p[chunk])
    assert streaming.get() == pytest.approx(exact, abs=2e-3)  # histogram: approximate


def test_window_auc_only_sees_the_window() -> None:
    w = WindowAUC(window=4)
    w.update([1, 0, 1, 0], [0.1, 0.9, 0.2, 0.8])  # perfectly wrong
    w.update([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2])  # pushes the old ones out: perfectly right
    assert w.get() == 1.0


def test_uauc_is_the_mean_over_users_with_both_classes() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(float)
    p = rng.random(400)
    user = rng.integers(0, 20, 400)
    expected = np.mean([brute_auc(y[user == u], p[user == u]) for u in np.unique(user)
                        if 0 < y[user == u].sum() < (user == u).sum()])
    m = UAUC()
    m.update(y, p, user=user)
    assert m.get() == pytest.approx(expected)
    assert uauc_exact(y, p, user) == pytest.approx(expected)


def test_logloss_and_undefined_values() -> None:
    ll = LogLoss()
    ll.update([1, 0, 1], [0.9, 0.2, 0.6])
    assert ll.get() == pytest.approx(-(np.log(0.9) + np.log(0.8) + np.log(0.6)) / 3)
    assert logloss(np.array([1.0]), np.array([1.0])) < 1e-5  # clipped, finite
    assert np.isnan(AUC().get()) and np.isnan(auc_exact(np.ones(3), np.random.rand(3)))


def test_multitask_metrics_report() -> None:
    m = MultiTaskMetrics(["a", "b"], window=50)
    rng = np.random.default_rng(1)
    labels = (rng.random((100, 2)) < 0.4).astype(np.float32)
    m.update(labels, rng.random((100, 2)), rng.integers(0, 5, 100))
    out = m.get()
    assert set(out) == {"a", "b"} and out["a"]["n"] == 100
    assert {"auc", "uauc", "logloss", "window_auc", "window_uauc", "window_logloss"} <= set(out["a"])
