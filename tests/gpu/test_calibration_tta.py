"""Issue 15, first defect: the fold temperature is fitted on the logits it is applied to.

The submission applies a fold's temperature to TTA logits (original + A/B-swapped, averaged, at
``infer.max_length``): ``student_fold_submission``'s ``oof.parquet`` keeps them raw. Temperature
scaling fitted on exactly those logits minimises their log-loss, so the calibrated CV log-loss
of a fold can never be worse than the uncalibrated one, and no nearby temperature does better.
Fitted on other logits (the training step's non-TTA ``valid_predictions.parquet`` at the
training length, as before), it can be: on 849 real rows folds 1 and 4 got worse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from arena_assets.core import artifacts, contract
from arena_assets.core.metrics import log_loss, softmax
from arena_assets.core.results import StepResult
from arena_assets.core.settings import load_settings

LOGITS = ["logit_a", "logit_b", "logit_tie"]


def _nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    return log_loss(y, softmax(z, t))


def _fold_tta_logits(root: Path, fold: str, train: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """The raw TTA logits of the fold's held-out rows, as the fold submission computed them."""
    sub = artifacts.latest(root, "student_fold_submission", fold)
    assert sub is not None
    oof = pd.read_parquet(sub / "oof.parquet")
    z = oof[LOGITS].to_numpy(np.float64)
    y = train.loc[oof["id"].astype(str), contract.LABEL_COLS].to_numpy(np.float64)
    return z, y


def test_fold_temperature_minimises_the_cv_loss_of_the_submissions_tta_logits(pipeline: Any) -> None:
    s = load_settings(str(pipeline.settings_path))
    assert s.infer.tta and s.infer.apply_calibration and s.calibration.enabled
    train = contract.read_table(artifacts.latest(pipeline.artifacts, "train_table") / "table.parquet").set_index("id")
    for k in range(s.folds.n_folds):
        fold = str(k)
        cal = json.loads((artifacts.latest(pipeline.artifacts, "student_calibration", fold) / "calibration.json")
                         .read_text())
        t = float(cal["temperature"])
        z, y = _fold_tta_logits(pipeline.artifacts, fold, train)
        raw, calibrated = _nll(z, y, 1.0), _nll(z, y, t)
        # calibration never raises the CV log-loss of the logits it is applied to
        assert calibrated <= raw + 1e-9, (fold, t, raw, calibrated)
        # the fitted temperature is the minimiser on these logits: no nearby one does better
        for f in (0.8, 0.95, 1.05, 1.25):
            assert calibrated <= _nll(z, y, t * f) + 1e-7, (fold, t, f, calibrated, _nll(z, y, t * f))
        # the fold submission's own metrics (the same logits) agree
        r = StepResult.read(artifacts.latest(pipeline.artifacts, "student_fold_submission", fold))
        assert r.metrics["cv_logloss"] <= r.metrics["cv_logloss_raw"] + 1e-9, (fold, r.metrics)


def test_calibration_step_fits_on_the_tta_runners_logits(pipeline: Any, tmp_path: Path) -> None:
    """The step itself, on a fold model of the session: its ``oof.parquet`` holds exactly the TTA
    logits ``tta_logits`` gives for the held-out rows, T is their minimiser, its CV numbers are
    the fold submission's, and ``fitted_on`` says what it was fitted on."""
    from arena_assets.gpu.calibrate import calibrate, fit_temperature
    from arena_assets.gpu.predict import _load, tta_logits

    s = load_settings(str(pipeline.settings_path))
    fold = "1"
    model = artifacts.latest(pipeline.artifacts, "student_model", fold) / "model"
    valid = artifacts.latest(pipeline.artifacts, "fold_data", fold) / "valid.parquet"
    r = calibrate(model, s.fmt, s.infer, valid, s.calibration, out_dir=tmp_path / "cal")
    cal = json.loads(r.path("calibration").read_text())
    assert cal["fitted_on"] == {"logits": "tta", "max_length": s.infer.max_length, "rows": r.info["rows"],
                                "file": "oof.parquet"}
    oof = pd.read_parquet(r.path("oof"))
    m, tok = _load(model)
    ref = tta_logits(m, tok, contract.read_table(valid), s.fmt, s.infer)
    np.testing.assert_allclose(oof[LOGITS].to_numpy(), ref, rtol=1e-5, atol=1e-6)
    y = contract.read_table(valid)[contract.LABEL_COLS].to_numpy(np.float64)
    t_ref = fit_temperature(ref, y)[0]
    assert cal["temperature"] == pytest.approx(t_ref, rel=1e-3)
    assert r.metrics["cv_logloss"] <= r.metrics["cv_logloss_raw"] + 1e-12 and r.metrics["cv_logloss_se"] > 0
    # the session's fold submission scored the same logits with the session's calibration
    sub = StepResult.read(artifacts.latest(pipeline.artifacts, "student_fold_submission", fold))
    assert sub.metrics["cv_logloss"] == pytest.approx(r.metrics["cv_logloss"], abs=1e-6)
    assert sub.metrics["temperature"] == pytest.approx(cal["temperature"], rel=1e-6)
    # without TTA the step fits the one-orientation logits it would then be applied to
    no_tta = s.infer.model_copy(update={"tta": False})
    r2 = calibrate(model, s.fmt, no_tta, valid, s.calibration, out_dir=tmp_path / "cal_no_tta")
    assert json.loads(r2.path("calibration").read_text())["fitted_on"]["logits"] == "original"
    assert r2.metrics["temperature"] != pytest.approx(r.metrics["temperature"], rel=1e-3)


def test_metadata_names_what_each_temperature_was_fitted_on(pipeline: Any) -> None:
    """The fold calibration says which logits it was fitted on; the merged model and the TTA
    submission name the rule of their temperature (they have no held-out rows of their own)."""
    from dagster import AssetKey

    def md(key: str, partition: str | None = None) -> dict[str, Any]:
        recs = [r for r in pipeline.instance.fetch_materializations(AssetKey.from_user_string(key), limit=100).records
                if r.partition_key == partition]
        mat = max(recs, key=lambda r: r.storage_id).event_log_entry.asset_materialization
        return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}

    s = load_settings(str(pipeline.settings_path))
    cal = md("student_calibration", "2")
    assert cal["fitted_on"].startswith("tta logits of the ") and f"max_length {s.infer.max_length}" in cal["fitted_on"]
    assert cal["cv_logloss"] <= cal["cv_logloss_raw"] + 1e-12 and cal["cv_logloss_se"] > 0
    want = (f"mean of the {s.folds.n_folds} fold temperatures, each fitted on the fold model's tta logits of its "
            f"held-out fold at max_length {s.infer.max_length}")
    assert md("merged_model")["temperature_method"] == want
    assert md("tta_submission")["temperature_method"] == want
    fin = md("final_ensemble")
    assert fin["fallback"] == "none" and "student_calibration" in fin["per_fold"]
