"""The competition metric (multi-class log-loss) and the known-answer yardsticks.

Why these exact definitions: the leaderboard used scikit-learn's ``log_loss``, which clips
predictions to ``[eps, 1 - eps]`` (``eps`` = machine epsilon of the prediction dtype) and does NOT
renormalize. Hard labels go straight to ``sklearn.metrics.log_loss``; soft labels (probabilities,
e.g. teacher targets or the sample's truth) use the same clipping and the same cross-entropy
``-sum_c y_c log p_c``, so for one-hot targets both paths give the same number.

Classes are always ``[a wins, b wins, tie]`` (``contract.LABEL_COLS`` order).
"""

from __future__ import annotations

from typing import Any

import numpy as np

N_CLASSES = 3


def _as_targets(y_true: Any) -> np.ndarray:
    """Class ids (n,) or one-hot/probabilities (n, 3) -> float64 (n, 3) targets."""
    y = np.asarray(y_true)
    if y.ndim == 1:
        ids = y.astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= N_CLASSES):
            raise ValueError(f"class ids must be in 0..{N_CLASSES - 1}")
        out = np.zeros((len(ids), N_CLASSES), dtype=np.float64)
        out[np.arange(len(ids)), ids] = 1.0
        return out
    if y.ndim != 2 or y.shape[1] != N_CLASSES:
        raise ValueError(f"targets must be class ids (n,) or (n, {N_CLASSES}); got shape {y.shape}")
    return y.astype(np.float64)


def _as_pred(y_pred: Any) -> np.ndarray:
    p = np.asarray(y_pred, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != N_CLASSES:
        raise ValueError(f"predictions must have shape (n, {N_CLASSES}); got {p.shape}")
    return p


def _is_hard(t: np.ndarray) -> bool:
    return bool(np.all((t == 0.0) | (t == 1.0)))


def log_loss(y_true: Any, y_pred: Any) -> float:
    """Mean multi-class log-loss, clipped exactly like ``sklearn.metrics.log_loss``."""
    t = _as_targets(y_true)
    p = _as_pred(y_pred)
    if len(t) != len(p):
        raise ValueError(f"{len(t)} targets but {len(p)} predictions")
    if _is_hard(t):
        from sklearn.metrics import log_loss as sk_log_loss

        return float(sk_log_loss(t.argmax(axis=1), p, labels=list(range(N_CLASSES))))
    return expected_log_loss(t, p)


def expected_log_loss(true_probs: Any, pred: Any) -> float:
    """Cross-entropy of predictions to target probabilities: ``mean_i -sum_c t_ic log p_ic``.

    Against the sample's TRUE probabilities this is the expected log-loss over the label draw,
    the low-variance way to score a model on known-answer data.
    """
    t = _as_targets(true_probs)
    p = _as_pred(pred)
    eps = np.finfo(p.dtype).eps
    p = np.clip(p, eps, 1 - eps)
    from scipy.special import xlogy

    return float(np.mean(-np.sum(xlogy(t, p), axis=1)))


def entropy(true_probs: Any) -> float:
    """Mean entropy of the true probabilities: the Bayes-optimal expected log-loss."""
    t = _as_targets(true_probs)
    from scipy.special import entr

    return float(np.mean(np.sum(entr(t), axis=1)))


def accuracy(y_true: Any, y_pred: Any) -> float:
    """Share of rows whose argmax prediction matches the argmax target (first max on ties)."""
    t = _as_targets(y_true)
    p = _as_pred(y_pred)
    return float(np.mean(t.argmax(axis=1) == p.argmax(axis=1)))


def prior_log_loss(train_labels: Any, eval_labels_or_truth: Any) -> float:
    """Log-loss of the best constant model fitted on train (the train label frequencies).

    ``eval_labels_or_truth`` may be class ids, one-hot labels or true probabilities (then the
    expected log-loss). ``gap_closed = (prior - model) / (prior - bayes)`` builds on this.
    """
    prior = _as_targets(train_labels).mean(axis=0)
    t = _as_targets(eval_labels_or_truth)
    return log_loss(t, np.tile(prior, (len(t), 1)))


def gap_closed(model: float, prior: float, bayes: float) -> float:
    """Share of the prior-to-Bayes log-loss gap a model closes (1 = Bayes-optimal, 0 = prior)."""
    return float((prior - model) / (prior - bayes))


def softmax(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of ``logits / temperature`` in float64 (the one numpy softmax: predictions,
    calibration plots and the quality report all use it)."""
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)
