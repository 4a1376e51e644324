"""Per-fold temperature scaling (Guo et al. 2017), fitted on the fold's validation logits.

One scalar ``T`` divides the logits before the softmax; it changes confidence, never the argmax.
``log T`` is optimised (so T stays positive) with LBFGS on the validation NLL, starting at T=1.
If the optimiser ends anywhere worse than T=1 (it should not) T=1 is kept, so calibration never
raises the NLL on the data it was fitted on.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from arena_assets.core.artifacts import atomic_write_json
from arena_assets.core.results import StepResult, step_output
from arena_assets.core.settings import CalibrationSettings
from arena_assets.gpu.data import read_table
from arena_assets.gpu.formatting import labels_of

log = logging.getLogger(__name__)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of (soft) ``labels`` under softmax(logits / T)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-(labels * logp).sum(axis=1).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100) -> tuple[float, float, float]:
    """(T, nll_before, nll_after) with nll_after <= nll_before."""
    import torch

    z = torch.tensor(np.asarray(logits, dtype=np.float64))
    y = torch.tensor(np.asarray(labels, dtype=np.float64))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = -(y * torch.log_softmax(z / log_t.exp(), dim=1)).sum(1).mean()
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    before, after = nll(logits, labels, 1.0), nll(logits, labels, t)
    if not np.isfinite(after) or after > before:
        log.warning("temperature fit ended worse than T=1 (%.5f > %.5f): keeping T=1", after, before)
        t, after = 1.0, before
    return t, before, after


def calibrate(valid_predictions: Any, valid_table: Any, cfg: CalibrationSettings, *, out_dir: Any) -> StepResult:
    """Fit T on a fold's validation logits -> ``calibration.json`` {temperature, nll_before, nll_after}."""
    pred = read_table(valid_predictions).copy()
    valid = read_table(valid_table).copy()
    pred["id"], valid["id"] = pred["id"].astype(str), valid["id"].astype(str)
    valid = valid.set_index("id").loc[pred["id"]].reset_index()
    logits = pred[["logit_a", "logit_b", "logit_tie"]].to_numpy(dtype=np.float64)
    labels = labels_of(valid)
    with step_output(out_dir, "calibration") as (tmp, res):
        if cfg.enabled:
            t, before, after = fit_temperature(logits, labels, cfg.max_iter)
        else:
            t, before = 1.0, nll(logits, labels)
            after = before
            res.notes.append("calibration disabled: T=1")
        atomic_write_json(tmp / "calibration.json", {"temperature": t, "nll_before": before, "nll_after": after})
        res.metrics.update(temperature=t, nll_before=before, nll_after=after)
        res.paths["calibration"] = "calibration.json"
        res.info["rows"] = len(pred)
        log.info("calibration: T=%.4f, NLL %.5f -> %.5f", t, before, after)
    return StepResult.read(out_dir)
