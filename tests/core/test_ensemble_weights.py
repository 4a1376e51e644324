"""Issue 15, second defect: step 9's CV weighting, its fallback and what ``merged`` reads.

* ``folds_cv_weighted`` must not reward the folds that drew easy held-out rows: on the 1st
  place's student CVs (0.862/0.876/0.858/0.872/0.868, standard error ~0.005 each at 11.5k rows)
  the seed's ``softmax(-(L - min L) / 0.01)`` put 0.41 on one fold; the weighting now measures
  differences in noise units and caps a fold at 1.25/K (core/ensemble.py). A truly broken fold
  still gets (almost) nothing.
* The seed's fallback: a fold mode whose fold submissions are missing uses the TTA submission
  alone and records it.
* ``merged`` reads no fold submission; the per-fold CV table comes from the calibration step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arena_assets.assets.ensemble import build_ensemble
from arena_assets.core import ensemble
from arena_assets.core.results import StepResult
from arena_assets.core.settings import EnsembleSettings

FIRST_PLACE_CV = [0.862, 0.876, 0.858, 0.872, 0.868]
"""The 1st place's distilled Gemma-2-9B, CV log-loss per fold (recipe-facts.md)."""
FIRST_PLACE_SE = [0.005] * 5
"""~ std of the per-row log-loss (about 0.55) / sqrt(11.5k rows per fold)."""
IDS = [str(i) for i in range(10, 16)]


def _weights(cv: list[float], se: list[float], cfg: EnsembleSettings | None = None) -> list[float]:
    cfg = cfg or EnsembleSettings(mode="folds_cv_weighted")
    return ensemble.cv_weights(cv, se, z=cfg.cv_weight_z, max_ratio=cfg.cv_weight_max_ratio)


def test_first_place_cvs_put_no_fold_above_a_quarter() -> None:
    w = _weights(FIRST_PLACE_CV, FIRST_PLACE_SE)
    assert sum(w) == pytest.approx(1.0)
    assert max(w) <= 0.25 + 1e-12, w
    assert min(w) >= 0.14, w  # the worst fold is 2.5 noise units behind: it keeps most of its weight
    # the order still follows the CVs (better fold, no less weight)
    order = np.argsort(FIRST_PLACE_CV)
    assert all(w[order[i]] >= w[order[i + 1]] - 1e-12 for i in range(4))
    # the seed's fixed temperature, for the record: 0.41 on fold 2
    z = np.exp(-(np.array(FIRST_PLACE_CV) - min(FIRST_PLACE_CV)) / 0.01)
    assert (z / z.sum()).max() == pytest.approx(0.408, abs=1e-3)


def test_even_without_the_cap_differences_within_noise_barely_move_the_weights() -> None:
    w = ensemble.cv_weights(FIRST_PLACE_CV, FIRST_PLACE_SE, z=4.5, max_ratio=5.0)  # cap inactive
    assert max(w) < 0.27 and min(w) > 0.14, w
    # one noise unit (the SE of a difference of two folds' CVs) costs a fold 20 % of its weight
    sigma = math.sqrt(2) * 0.005
    a, b = ensemble.cv_weights([0.86, 0.86 + sigma], [0.005, 0.005], z=4.5, max_ratio=2.0)
    assert b / a == pytest.approx(math.exp(-1 / 4.5))


def test_a_broken_fold_gets_almost_nothing() -> None:
    cv = [0.862, 0.876, 1.0986, 0.872, 0.868]  # fold 2 stuck at the uniform guess (ln 3)
    w = _weights(cv, FIRST_PLACE_SE)
    assert w[2] < 1e-3, w
    assert sum(w) == pytest.approx(1.0) and max(w) <= 0.25 + 1e-12
    # a fold 0.1 nats worse (14 noise units): a small share, well below the others
    w = _weights([0.862, 0.876, 0.962, 0.872, 0.868], FIRST_PLACE_SE)
    assert w[2] < 0.05 and min(w[k] for k in (0, 1, 3, 4)) > 0.2, w


def test_small_validation_folds_are_weighted_more_equally() -> None:
    """The same CV spread is noise on 400 rows (SE ~0.03) and a real difference on 100k."""
    small = _weights(FIRST_PLACE_CV, [0.03] * 5)
    large = ensemble.cv_weights(FIRST_PLACE_CV, [0.0005] * 5, z=4.5, max_ratio=5.0)
    assert max(small) - min(small) < 0.03
    assert max(large) > 0.5


def test_pure_noise_buys_little_weight() -> None:
    """Identical models, fold CVs differing only by the rows held out: the luckiest fold gets
    close to 1/K on average, never above the cap."""
    rng = np.random.default_rng(0)
    best = [max(_weights(list(0.867 + rng.normal(0, 0.005, 5)), FIRST_PLACE_SE)) for _ in range(2000)]
    assert np.mean(best) < 0.245 and max(best) <= 0.25 + 1e-12


def test_cap_weights_water_fills() -> None:
    np.testing.assert_allclose(ensemble.cap_weights([0.9, 0.05, 0.05], 0.5), [0.5, 0.25, 0.25])
    np.testing.assert_allclose(ensemble.cap_weights([0.6, 0.35, 0.05], 0.4), [0.4, 0.4, 0.2])
    np.testing.assert_allclose(ensemble.cap_weights([1.0, 0.0, 0.0], 1 / 3), [1 / 3] * 3)
    with pytest.raises(ValueError):
        ensemble.cap_weights([0.5, 0.5], 0.4)


def test_log_loss_se() -> None:
    y = np.eye(3)[[0, 1, 2, 0]]
    p = np.array([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    loss = -np.log([0.5, 0.5, 0.6, 0.7])
    assert ensemble.log_loss_se(y, p) == pytest.approx(loss.std(ddof=1) / 2)


# ------------------------------------------------------------------------------ build_ensemble
def _sub(path: Path, p: list[float]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame({"id": IDS, "winner_model_a": p[0], "winner_model_b": p[1], "winner_tie": p[2]})
    ensemble.write_submission(df, path / "submission.csv")
    return path


def _result(path: Path, step: str, metrics: dict[str, float]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "result.json").write_text(json.dumps(StepResult(step=step, metrics=metrics).to_dict()))
    return path


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, object]:
    cal = {k: _result(tmp_path / f"cal{k}", "calibration",
                      {"cv_logloss": cv, "cv_logloss_raw": cv + 0.01, "cv_accuracy": 0.5, "cv_logloss_se": se})
           for k, (cv, se) in enumerate(zip(FIRST_PLACE_CV, FIRST_PLACE_SE))}
    folds = {k: _sub(tmp_path / f"fold{k}", [0.2 + 0.1 * k, 0.6 - 0.1 * k, 0.2]) for k in range(5)}
    tta = _sub(tmp_path / "tta", [0.3, 0.3, 0.4])
    return {"cal": cal, "folds": folds, "tta": tta, "train": tmp_path / "no_train_needed.parquet", "root": tmp_path}


def test_build_ensemble_cv_weighted_on_first_place_numbers(dirs: dict) -> None:
    cfg = EnsembleSettings(mode="folds_cv_weighted")
    info = build_ensemble(cfg, dirs["cal"], dirs["folds"], dirs["tta"], dirs["train"], dirs["root"] / "out")
    assert max(info["weights"]) <= 0.25 + 1e-12 and info["fallback"] is None
    assert info["fold_logloss_se"] == {k: 0.005 for k in range(5)}
    assert info["fold_logloss"] == dict(enumerate(FIRST_PLACE_CV))
    sub = pd.read_csv(dirs["root"] / "out" / "submission.csv", dtype={"id": str})
    want = sum(w * (0.2 + 0.1 * k) for k, w in enumerate(info["weights"]))
    assert sub["winner_model_a"].to_numpy() == pytest.approx([want] * len(IDS))


@pytest.mark.parametrize("mode", ["folds_mean", "folds_cv_weighted", "blend"])
def test_missing_fold_submissions_fall_back_to_the_tta_submission(dirs: dict, mode: str) -> None:
    folds = dict(dirs["folds"])
    folds[3] = None  # never materialized
    (Path(folds[1]) / "submission.csv").unlink()  # a version without its file
    out = dirs["root"] / f"out-{mode}"
    info = build_ensemble(EnsembleSettings(mode=mode), dirs["cal"], folds, dirs["tta"], dirs["train"], out)
    assert info["sources"] == ["tta_submission"] and info["weights"] == [1.0]
    assert "[1, 3]" in info["fallback"] and "tta_submission" in info["fallback"]
    assert json.loads((out / "ensemble.json").read_text())["fallback"] == info["fallback"]
    got = pd.read_csv(out / "submission.csv", dtype={"id": str})
    want = pd.read_csv(Path(dirs["tta"]) / "submission.csv", dtype={"id": str})
    pd.testing.assert_frame_equal(got, want)


def test_merged_reads_no_fold_submission_and_takes_the_cv_table_from_calibration(dirs: dict) -> None:
    from arena_assets.assets.ensemble import needs_fold_submissions

    assert not needs_fold_submissions(EnsembleSettings(mode="merged"))
    assert all(needs_fold_submissions(EnsembleSettings(mode=m)) for m in ("folds_mean", "folds_cv_weighted", "blend"))
    info = build_ensemble(EnsembleSettings(mode="merged"), dirs["cal"], None, dirs["tta"], dirs["train"],
                          dirs["root"] / "out")
    assert info["sources"] == ["tta_submission"] and info["fallback"] is None
    assert info["fold_logloss"] == dict(enumerate(FIRST_PLACE_CV))
    assert info["mean_cv_logloss"] == pytest.approx(sum(FIRST_PLACE_CV) / 5)
