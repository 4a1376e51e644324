"""Metrics against scikit-learn and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss

from arena_assets.core.metrics import accuracy, entropy, expected_log_loss, gap_closed, log_loss, prior_log_loss


@pytest.fixture()
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    p = rng.dirichlet([1, 1, 1], 200)
    return y, p


def test_log_loss_matches_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = data
    want = sk_log_loss(y, p, labels=[0, 1, 2])
    assert log_loss(y, p) == pytest.approx(want, rel=1e-12)
    assert log_loss(np.eye(3)[y], p) == pytest.approx(want, rel=1e-12)
    assert expected_log_loss(np.eye(3)[y], p) == pytest.approx(want, rel=1e-12)


def test_clipping_like_sklearn() -> None:
    y = np.array([0, 1])
    p = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # a certain, wrong first row
    got = log_loss(y, p)
    assert math.isfinite(got)
    assert got == pytest.approx(sk_log_loss(y, p, labels=[0, 1, 2]))
    assert got == pytest.approx(-math.log(np.finfo(np.float64).eps) / 2, rel=1e-6)


def test_soft_targets_entropy_and_prior() -> None:
    t = np.array([[0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3]])
    assert entropy(np.full((4, 3), 1 / 3)) == pytest.approx(math.log(3))
    assert entropy(np.eye(3)) == pytest.approx(0.0)
    manual = -np.mean(np.sum(t * np.log(t), axis=1))
    assert entropy(t) == pytest.approx(manual)
    assert expected_log_loss(t, t) == pytest.approx(entropy(t))
    assert expected_log_loss(t, np.full((2, 3), 1 / 3)) > entropy(t)  # Gibbs' inequality
    assert log_loss(t, t) == pytest.approx(entropy(t))
    labels = np.array([0, 0, 1, 2])
    prior = np.array([0.5, 0.25, 0.25])
    assert prior_log_loss(labels, labels) == pytest.approx(-np.mean(np.log(prior[labels])))
    assert prior_log_loss(labels, t) == pytest.approx(expected_log_loss(t, np.tile(prior, (2, 1))))
    assert gap_closed(0.9, prior=1.1, bayes=0.86) == pytest.approx(0.2 / 0.24)


def test_accuracy_and_shape_errors(data: tuple[np.ndarray, np.ndarray]) -> None:
    y, p = data
    assert accuracy(y, p) == pytest.approx(np.mean(p.argmax(1) == y))
    assert accuracy(np.eye(3)[y], np.eye(3)[y]) == 1.0
    with pytest.raises(ValueError):
        log_loss(y[:5], p)
    with pytest.raises(ValueError):
        log_loss(np.array([0, 3]), p[:2])
    with pytest.raises(ValueError):
        log_loss(y, p[:, :2])
