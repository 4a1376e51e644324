"""Fidelity scoring (core/quality.py) on synthetic predictions with known answers.

The report is built from a synthetic artifact tree laid out exactly like the pipeline's (latest
symlinks, the step contract's file names), with predictions whose quality is known by
construction: exact truth logits score the Bayes log-loss, the class prior scores the prior, a
noisy copy scores in between. No model, no Dagster run: the whole file takes seconds.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arena_assets.core import artifacts, contract, metrics, quality
from arena_assets.core.settings import Settings

N_TRAIN, N_TEST, N_FOLDS = 300, 400, 2


def truth_probs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Sharp-ish truths (like the sample's: softmax of a marker score and a tie logit)."""
    d = rng.normal(0.0, 2.0, n)
    z = np.stack([d / 2, -d / 2, np.full(n, 0.3)], axis=1)
    return quality.softmax(z)


def pred_frame(ids: list[str], logits: np.ndarray, temperature: float = 1.0) -> pd.DataFrame:
    p = quality.softmax(logits, temperature)
    return pd.DataFrame({"id": ids, "p_a": p[:, 0], "p_b": p[:, 1], "p_tie": p[:, 2],
                         "logit_a": logits[:, 0], "logit_b": logits[:, 1], "logit_tie": logits[:, 2]})


def put(root: Path, key: str, part: str | None, files: dict[str, object]) -> Path:
    """One committed version of an asset partition (files: name -> DataFrame | dict | str)."""
    v = artifacts.new_version_dir(root, key, part)
    v.mkdir(parents=True)
    for name, obj in files.items():
        if isinstance(obj, pd.DataFrame):
            if name.endswith(".csv"):
                obj.to_csv(v / name, index=False)
            else:
                obj.to_parquet(v / name, index=False)
        elif isinstance(obj, dict):
            (v / name).write_text(json.dumps(obj))
        else:
            (v / name).write_text(str(obj))
    artifacts.set_latest(v)
    return v


CV_LOGLOSS = [0.95 - 0.01 * k for k in range(5)]
"""The fold submissions' CV log-losses: the last fold looks best by CV (not by the test rows)."""


class World:
    """A synthetic pipeline output: truth, labels, and every artifact the report reads."""

    def __init__(self, root: Path, ce_noise: float = 1.0, kd_noise: float = 0.3, quant_shift: float = 0.0,
                 seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.root = root
        self.train_ids = [str(2**33 + i) for i in range(N_TRAIN)]
        self.test_ids = [str(2**35 + i) for i in range(N_TEST)]
        t_train, t_test = truth_probs(rng, N_TRAIN), truth_probs(rng, N_TEST)
        self.truth = {"train": dict(zip(self.train_ids, t_train.tolist())),
                      "test": dict(zip(self.test_ids, t_test.tolist()))}
        y = np.array([rng.choice(3, p=p) for p in t_train])
        onehot = np.eye(3)[y]
        train = pd.DataFrame({"id": self.train_ids, "prompt": [["p"]] * N_TRAIN, "response_a": [["a"]] * N_TRAIN,
                              "response_b": [["b"]] * N_TRAIN, "model_a": None, "model_b": None,
                              **{c: onehot[:, j] for j, c in enumerate(contract.LABEL_COLS)}})
        test = pd.DataFrame({"id": self.test_ids, "prompt": [["p"]] * N_TEST, "response_a": [["a"]] * N_TEST,
                             "response_b": [["b"]] * N_TEST})
        v = put(root, "train_table", None, {})
        contract.write_table(train, v / "table.parquet")
        v = put(root, "test_table", None, {})
        contract.write_table(test, v / "table.parquet")
        lt_train, lt_test = np.log(t_train), np.log(t_test)

        def noisy(z: np.ndarray, s: float) -> np.ndarray:
            return z + rng.normal(0.0, s, z.shape)

        folds = np.arange(N_TRAIN) % N_FOLDS
        self.temps = {}
        fold_test = []
        for k in range(N_FOLDS):
            ids = [i for i, f in zip(self.train_ids, folds) if f == k]
            sel = folds == k
            put(root, "llama/teacher_oof_probs", str(k), {"oof.parquet": pred_frame(ids, noisy(lt_train[sel], 1.5))})
            # the KD student is underconfident (logits halved): its temperature sharpens it
            kd_valid = noisy(lt_train[sel], kd_noise) * 0.5
            put(root, "student_model", str(k), {"valid_predictions.parquet": pred_frame(ids, kd_valid)})
            put(root, "baseline_student", str(k), {"valid_predictions.parquet": pred_frame(ids, noisy(lt_train[sel], ce_noise))})
            t = quality.fit_temperature(kd_valid, onehot[sel])
            self.temps[k] = t
            put(root, "student_calibration", str(k), {"calibration.json": {"temperature": t}})
            zt = noisy(lt_test, kd_noise) * 0.5
            fold_test.append(pred_frame(self.test_ids, zt, t))
            put(root, "student_fold_submission", str(k), {"predictions.parquet": fold_test[-1],
                                                          "result.json": {"metrics": {"cv_logloss": CV_LOGLOSS[k]}}})
        mt = float(np.mean(list(self.temps.values())))
        put(root, "merged_model", None, {"calibration.json": {"temperature": mt}})
        zm = noisy(lt_test, kd_noise) * 0.5
        self.extra_dir = root / "extra"
        self.extra_dir.mkdir()
        self.extra: dict[str, Path] = {}

        def extra(name: str, df: pd.DataFrame) -> None:
            df.to_parquet(self.extra_dir / f"{name}.parquet", index=False)
            self.extra[name] = self.extra_dir / f"{name}.parquet"

        extra(quality.EXTRA_MERGED_TTA, pred_frame(self.test_ids, zm, mt))
        extra(quality.EXTRA_MERGED_NO_TTA, pred_frame(self.test_ids, noisy(zm, 0.5), mt))
        extra(quality.EXTRA_QUANT_NO_TTA, pred_frame(self.test_ids, noisy(zm, 0.5), mt))
        for k in range(N_FOLDS):
            extra(quality.EXTRA_BASELINE.format(k=k), pred_frame(self.test_ids, noisy(lt_test, ce_noise)))
        put(root, "quantized_model", None, {"quantization.json": {"method": "bnb8", "fallback_reason": "test"}})
        put(root, "tta_submission", None, {"predictions.parquet": pred_frame(self.test_ids, zm + quant_shift, mt)})
        fm = quality.mix(fold_test, [1.0] * N_FOLDS, self.test_ids)
        sub = pd.DataFrame({"id": self.test_ids, **{c: fm[:, j] for j, c in enumerate(quality.SUB_COLS)}})
        put(root, "final_ensemble", None, {"submission.csv": sub})
        self.test_truth = t_test
        self.fold_test = fold_test

    def settings(self, mode: str = "folds_mean") -> Settings:
        return Settings.model_validate({"artifact_root": str(self.root), "folds": {"n_folds": N_FOLDS},
                                        "ensemble": {"mode": mode}, "base_dir": str(self.root)})


# ------------------------------------------------------------------------------ primitives
def test_truth_itself_scores_bayes_and_the_prior_scores_prior() -> None:
    rng = np.random.default_rng(1)
    t = truth_probs(rng, 2000)
    ids = [str(i) for i in range(len(t))]
    ref = dict(zip(ids, t.tolist()))
    perfect = pred_frame(ids, np.log(t))
    bayes = metrics.entropy(t)
    assert quality.score(perfect, ref) == pytest.approx(bayes, abs=1e-9)
    prior_vec = t.mean(axis=0)
    const = pd.DataFrame({"id": ids, **{c: np.full(len(t), prior_vec[j]) for j, c in enumerate(quality.PROB_COLS)}})
    prior = quality.score(const, ref)
    assert prior > bayes + 0.1
    assert quality.gap(bayes, prior, bayes) == pytest.approx(1.0)
    assert quality.gap(prior, prior, bayes) == pytest.approx(0.0)
    assert quality.gap(0.5 * (prior + bayes), prior, bayes) == pytest.approx(0.5)
    assert quality.gap(1.0, 1.0, 1.0) is None  # no gap to close: undefined, not a division error


def test_reference_refuses_rows_without_truth() -> None:
    with pytest.raises(KeyError, match="id 7"):
        quality.reference({"1": [0.2, 0.3, 0.5]}, ["1", "7"])


def test_temperature_recomputes_from_raw_logits() -> None:
    z = np.array([[2.0, -1.0, 0.0], [0.1, 0.3, -0.2]])
    df = pred_frame(["a", "b"], z, temperature=0.5)  # stored probabilities are calibrated
    np.testing.assert_allclose(quality.frame_probs(df), quality.softmax(z / 0.5))
    np.testing.assert_allclose(quality.frame_probs(df, 1.0), quality.softmax(z))
    # a submission (winner_* columns) is read as it is
    sub = pd.DataFrame({"id": ["a"], "winner_model_a": [0.5], "winner_model_b": [0.25], "winner_tie": [0.25]})
    np.testing.assert_allclose(quality.frame_probs(sub), [[0.5, 0.25, 0.25]])


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_true_temperature(t_true: float) -> None:
    """Against the expected labels softmax(z / T), cross-entropy is minimised exactly at T."""
    rng = np.random.default_rng(2)
    z = rng.normal(0, 2, (500, 3))
    assert quality.fit_temperature(z, quality.softmax(z, t_true)) == pytest.approx(t_true, rel=1e-3)


def test_mix_aligns_rows_by_id() -> None:
    a = pd.DataFrame({"id": ["1", "2"], "p_a": [1.0, 0.0], "p_b": [0.0, 1.0], "p_tie": [0.0, 0.0]})
    b = a.iloc[::-1].reset_index(drop=True)  # same predictions, other row order
    np.testing.assert_allclose(quality.mix([a, b], [0.3, 0.7], ["1", "2"]), [[1, 0, 0], [0, 1, 0]])


def test_targets_say_by_how_much_they_are_missed() -> None:
    assert quality.at_least("g", 0.7, 0.8).met is False
    assert quality.at_least("g", 0.7, 0.8).missed_by == pytest.approx(0.1)
    assert quality.at_least("g", 0.85, 0.8).missed_by is None
    t = quality.at_most("q", 0.013, 0.01)
    assert (t.met, round(t.missed_by, 6)) == (False, 0.003)
    assert quality.at_most("x", None, 0.0).met is None  # not measured is not "met"


# ------------------------------------------------------------------------------ the report
def test_report_on_synthetic_artifacts(tmp_path: Path) -> None:
    w = World(tmp_path / "a", ce_noise=1.0, kd_noise=0.3)
    rep = quality.build_report(w.settings(), w.truth, w.extra)
    bayes = metrics.entropy(w.test_truth)
    assert rep["reference"] == "truth" and rep["rows"] == {"train": N_TRAIN, "test": N_TEST}
    assert rep["bayes"] == pytest.approx(bayes)
    assert rep["prior"] > rep["bayes"]
    # the teacher (noise 1.5) is worse than the KD student (0.3); both between prior and Bayes
    t = rep["teacher"]["llama"]["pooled"]
    assert rep["bayes_train"] < rep["kd"]["held_out"]["pooled"] < t < rep["prior_train"] + 0.5
    # KD (noise 0.3) beats CE-only (noise 1.0) once both are calibrated, on every fold
    for k in ("0", "1"):
        assert rep["kd"]["test"]["calibrated_folds"][k] < rep["ce_only"]["test"]["calibrated_folds"][k]
    # the underconfident KD students: calibration helps on the fitted fold and on test
    for c in rep["calibration"]["folds"].values():
        assert c["temperature"] < 1.0
        assert c["fitted_labels_after"] <= c["fitted_labels_before"]
        assert c["test_after"] < c["test_before"]
    # best fold = the fold with the lowest CV log-loss (what a user can choose by), scored on the
    # test rows; the fold best on the test rows is only the labelled oracle beside it (issue 17)
    direct = [metrics.expected_log_loss(w.test_truth, quality.frame_probs(f)) for f in w.fold_test]
    bk = int(np.argmin(CV_LOGLOSS[:N_FOLDS]))
    assert bk != int(np.argmin(direct))  # this world separates the two choices
    assert rep["best_fold"] == {"fold": bk, "logloss": pytest.approx(direct[bk]), "chosen_by": "cv_logloss",
                                "cv_logloss": pytest.approx(CV_LOGLOSS[bk])}
    assert rep["best_fold_by_test"]["fold"] == int(np.argmin(direct))
    assert rep["best_fold_by_test"]["logloss"] == pytest.approx(min(direct))
    # CV vs test per fold: both against the truth, after calibration
    for k, v in rep["cv_vs_test"].items():
        c = rep["calibration"]["folds"][k]
        assert v["optimism"] == pytest.approx(c["test_after"] - c["fitted_truth_after"])
    # the final submission (folds_mean written by the fixture) equals the recomputed folds_mean mode
    assert rep["final"]["logloss"] == pytest.approx(rep["ensembles"]["folds_mean"])
    assert rep["gap_closed"] == pytest.approx((rep["prior"] - rep["final"]["logloss"]) / (rep["prior"] - bayes))
    assert set(rep["ensembles"]) == set(quality.ENSEMBLE_MODES) and all(v is not None for v in rep["ensembles"].values())
    # quantized == merged here; TTA (no extra noise) beats no TTA (extra noise)
    assert rep["quantized"]["diff"] == pytest.approx(0.0, abs=1e-12)
    assert rep["tta"]["merged_tta"] < rep["tta"]["merged_no_tta"]
    met = {t["name"]: t["met"] for t in rep["targets"]}
    assert met["KD - CE-only"] is True
    assert met["|quantized - merged|"] is True
    assert met["TTA - no TTA"] is True
    assert met["calibration held-out: mean(after - before)"] is True
    head = quality.summary_fields(rep)
    for key in ("prior", "bayes", "best_fold", "final", "gap_closed_best_fold", "gap_closed", "kd", "ce_only"):
        assert isinstance(head[key], float) and math.isfinite(head[key]), key
    md = quality.markdown(rep)
    assert "| class prior |" in md and "### Targets (issue 8)" in md and "**no**" not in md.split("### Targets")[0]
    # one row per fold in the per-fold table and one in the CV-vs-test table
    assert md.count("\n| 0 |") == 2 and md.count("\n| 1 |") == 2 and "CV vs test per fold" in md


def test_report_flags_missed_targets(tmp_path: Path) -> None:
    """A CE-only student better than the KD one and a quantized model 0.05 nats off are misses."""
    w = World(tmp_path / "b", ce_noise=0.05, kd_noise=0.8, quant_shift=0.0)
    # replace the quantized model's predictions with a visibly worse copy
    tta = pd.read_parquet(artifacts.latest(w.root, "tta_submission") / "predictions.parquet")
    z = tta[quality.LOGIT_COLS].to_numpy() + np.random.default_rng(5).normal(0, 1.0, (N_TEST, 3))
    put(w.root, "tta_submission", None, {"predictions.parquet": pred_frame(w.test_ids, z)})
    rep = quality.build_report(w.settings("merged"), w.truth, w.extra)
    by = {t["name"]: t for t in rep["targets"]}
    assert by["KD - CE-only"]["met"] is False and by["KD - CE-only"]["missed_by"] > 0
    assert by["|quantized - merged|"]["met"] is False
    assert by["|quantized - merged|"]["missed_by"] == pytest.approx(abs(rep["quantized"]["diff"]) - 0.01)
    assert rep["ensembles"]["merged"] == pytest.approx(rep["tta"]["quantized_tta"])
    assert "**no**" in quality.markdown(rep)


def test_report_without_truth_uses_labels_and_skips_test_scores(tmp_path: Path) -> None:
    w = World(tmp_path / "c")
    rep = quality.build_report(w.settings(), None, {})
    assert rep["reference"] == "labels" and rep["bayes"] is None and rep["rows"]["test"] == 0
    assert rep["final"]["logloss"] is None and rep["gap_closed"] is None and rep["best_fold"] is None
    # held-out numbers are hard-label log-losses: recompute one independently with sklearn's metric
    v = pd.read_parquet(artifacts.latest(w.root, "student_model", "0") / "valid_predictions.parquet")
    train = contract.read_table(artifacts.latest(w.root, "train_table") / "table.parquet").set_index("id")
    y = train.loc[v["id"], contract.LABEL_COLS].to_numpy()
    assert rep["kd"]["held_out"]["folds"]["0"] == pytest.approx(metrics.log_loss(y, quality.frame_probs(v)))
    kd, ce, where = quality.kd_vs_ce(rep)
    assert where.startswith("held-out") and kd == rep["kd"]["held_out"]["pooled"] and ce == rep["ce_only"]["held_out"]["pooled"]
    assert "no truth" in quality.markdown(rep)


def test_missing_artifacts_leave_numbers_out(tmp_path: Path) -> None:
    w = World(tmp_path / "d")
    (artifacts.asset_dir(w.root, "tta_submission") / "latest").unlink()
    rep = quality.build_report(w.settings(), w.truth, {})
    assert rep["tta"]["quantized_tta"] is None and rep["ensembles"]["merged"] is None
    assert rep["ce_only"]["test"]["mean"] is None  # no extra inference given
    assert rep["best_fold"] is not None  # the fold submissions are still there
    with pytest.raises(FileNotFoundError):
        quality.build_report(w.settings().model_copy(update={"artifact_root": str(tmp_path / "empty")}), w.truth)
