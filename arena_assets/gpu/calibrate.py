"""Per-fold temperature scaling (Guo et al. 2017), fitted on the logits the submission applies it to.

One scalar ``T`` divides the logits before the softmax; it changes confidence, never the argmax.
``log T`` is optimised (so T stays positive) with LBFGS on the validation NLL, starting at T=1.
If the optimiser ends anywhere worse than T=1 (it should not) T=1 is kept, so calibration never
raises the NLL on the data it was fitted on.

**What is fitted on what** (issue 15). The fold's submission (``gpu.predict.fold_submission``)
and the TTA submission of the merged model (``gpu.predict.tta_submission``) divide **TTA logits**
by the temperature: the mean of the original and the A/B-swapped-back logits, at
``infer.max_length``, through ``predict._tta_runner``. So :func:`calibrate` runs the fold model
on its held-out rows through that same runner (same ``fmt``/``infer``: TTA, length, FP8, sharding)
and fits ``T`` on those logits. The training step's ``valid_predictions.parquet`` (one
orientation, at the training length) is NOT what is calibrated any more: a temperature fitted
on those and applied to TTA logits is not the minimiser of anything the submission computes;
on 849 real rows it raised the log-loss of two folds on their own rows.

The step writes those TTA validation logits (``oof.parquet``: raw ``logit_*``, calibrated
``p_*``) and the fold's CV numbers on them (``cv_logloss_raw``, ``cv_logloss``, ``cv_accuracy``,
``cv_logloss_se``: the standard error of the mean per-row log-loss, which step 9's CV weighting
uses). The merged model has no held-out rows of its own: its temperature is the mean of these
fold temperatures (``gpu.average.merged_temperature``), each fitted on TTA logits of its held-out
fold, i.e. of the same kind of logits the TTA submission divides.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from arena_assets.core.artifacts import atomic_write_json
from arena_assets.core.ensemble import log_loss_se
from arena_assets.core.results import StepResult, step_output
from arena_assets.core.settings import CalibrationSettings, FormatSettings, InferSettings
from arena_assets.gpu.data import read_table
from arena_assets.gpu.formatting import labels_of
from arena_assets.gpu.predict import _tta_runner, prediction_frame, scores, write_parquet

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


def calibrate(
    model_dir: Any,
    fmt: FormatSettings,
    infer: InferSettings,
    valid_table: Any,
    cfg: CalibrationSettings,
    *,
    out_dir: Any,
) -> StepResult:
    """Fit T on the fold model's TTA logits of its held-out rows -> ``calibration.json``
    {temperature, nll_before, nll_after, fitted_on} and ``oof.parquet`` (those logits).

    The logits come from ``predict._tta_runner`` with the same ``fmt``/``infer`` as the fold and
    TTA submissions, so T minimises the log-loss of exactly what it is applied to (module doc).
    ``infer.apply_calibration`` is not read: it decides whether the submissions apply T, not
    what T is."""
    valid = read_table(valid_table)
    labels = labels_of(valid)
    run, record, n_gpus = _tta_runner(model_dir, fmt, infer)
    kind = "tta" if infer.tta else "original"
    with step_output(out_dir, "calibration") as (tmp, res):
        logits = run(valid_table, "calibration valid")
        if cfg.enabled:
            t, before, after = fit_temperature(logits, labels, cfg.max_iter)
        else:
            t, before = 1.0, nll(logits, labels)
            after = before
            res.notes.append("calibration disabled: T=1")
        oof = prediction_frame(valid["id"], logits, t)
        write_parquet(oof, tmp / "oof.parquet")
        raw, cal = scores(prediction_frame(valid["id"], logits), valid), scores(oof, valid)
        se = log_loss_se(labels, oof[["p_a", "p_b", "p_tie"]].to_numpy(dtype=np.float64))
        fitted_on = {"logits": kind, "max_length": int(infer.max_length), "rows": len(valid),
                     "file": "oof.parquet"}
        atomic_write_json(tmp / "calibration.json", {"temperature": t, "nll_before": before, "nll_after": after,
                                                      "fitted_on": fitted_on})
        res.metrics.update(temperature=t, nll_before=before, nll_after=after, cv_logloss_raw=raw["logloss"],
                           cv_logloss=cal["logloss"], cv_accuracy=cal["accuracy"], cv_logloss_se=se)
        res.paths.update(calibration="calibration.json", oof="oof.parquet")
        devices = record.pop("devices", [])
        res.info.update(rows=len(valid), fitted_on=fitted_on, tta=bool(infer.tta), model=record, gpus=n_gpus,
                        devices=devices)
        log.info("calibration on %s logits of %d held-out rows: T=%.4f, NLL %.5f -> %.5f", kind, len(valid), t,
                 before, after)
    return StepResult.read(out_dir)
