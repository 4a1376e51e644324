"""Recipe fidelity: score every step's predictions against the known answer (issue 8).

Why a separate, Dagster-free module: the quality report asset (``assets/quality.py``) and the
benchmark (``benchmarks/bench_fidelity.py``) must compute the same numbers from the same artifact
directories, and the unit tests must exercise the scoring on synthetic predictions without a
pipeline run.

The yardstick is the EXPECTED log-loss against the sample's true probabilities
(``truth.json``, :mod:`arena_assets.core.sample`): ``mean_i -sum_c t_ic log p_ic``. It has no label
noise, so 4k test rows separate models whose log-losses differ by a few thousandths. Every model is
scored only on rows it never trained on: fold models and teachers on their held-out fold (truth of
the train rows) and on the test rows; the averaged-and-merged model (which saw every train row
through four of five folds) only on the test rows. Without a truth file (real data) the held-out
numbers fall back to the hard labels and the test numbers are left out.

``gap_closed = (prior - x) / (prior - bayes)``: 0 is the class prior, 1 is Bayes-optimal.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from arena_assets.core import artifacts, metrics
from arena_assets.core.metrics import softmax
from arena_assets.core.settings import Settings

log = logging.getLogger(__name__)

PROB_COLS = ["p_a", "p_b", "p_tie"]
LOGIT_COLS = ["logit_a", "logit_b", "logit_tie"]
SUB_COLS = ["winner_model_a", "winner_model_b", "winner_tie"]
ENSEMBLE_MODES = ("folds_mean", "folds_cv_weighted", "merged", "blend")

# Extra predictions the report asset (or the benchmark) adds by running existing inference steps
# (names of the ``extra`` mapping of :func:`build_report`; each a predictions.parquet path).
EXTRA_BASELINE = "baseline_test_{k}"
"""The CE-only student of fold k on the test rows (TTA, no calibration), like the KD student's."""
EXTRA_MERGED_TTA = "merged_tta"
"""The averaged-and-merged fp model, before quantization, TTA (merged temperature)."""
EXTRA_MERGED_NO_TTA = "merged_no_tta"
EXTRA_QUANT_NO_TTA = "quantized_no_tta"

# Targets of issue 8.
TARGET_GAP_BEST_FOLD = 0.8
TARGET_GAP_FINAL = 0.75
TARGET_PRIOR_BAYES = 0.15
TARGET_QUANT_DIFF = 0.01
TARGET_AVG_DIFF = 0.02
TOL = 1e-6
"""Numerical slack for 'no worse' comparisons (float64 log-losses of the same rows)."""


# --------------------------------------------------------------------------------------------
# Scoring primitives
# --------------------------------------------------------------------------------------------
def load_truth(path: str | Path | None) -> dict[str, Any] | None:
    """``truth.json`` of a known-answer sample, or None when there is none (real data)."""
    if path is None or not Path(path).exists():
        return None
    return json.loads(Path(path).read_text())


def reference(truth_split: Mapping[str, Any], ids: Any) -> np.ndarray:
    """(n, 3) true probabilities of ``ids`` (strings) from one split of ``truth.json``.

    Raises KeyError naming the first missing id: scoring a row without its truth would silently
    shrink the evaluation set.
    """
    out = np.empty((len(ids), 3), dtype=np.float64)
    for i, rid in enumerate(ids):
        key = str(rid)
        if key not in truth_split:
            raise KeyError(f"id {key} has no true probabilities")
        out[i] = truth_split[key]
    return out


def frame_probs(df: Any, temperature: float | None = None) -> np.ndarray:
    """Probabilities of a prediction table or submission.

    ``temperature`` given: recomputed from the raw logits (the table keeps them uncalibrated), so
    one table gives both the before- and after-calibration predictions.
    """
    if temperature is not None:
        return softmax(df[LOGIT_COLS].to_numpy(dtype=np.float64), temperature)
    cols = PROB_COLS if PROB_COLS[0] in df.columns else SUB_COLS
    return df[cols].to_numpy(dtype=np.float64)


def score(df: Any, ref: Mapping[str, Any] | np.ndarray, temperature: float | None = None) -> float:
    """Expected log-loss of a prediction table against a reference (truth split or (n,3) array
    aligned with the table's rows)."""
    ids = df["id"].astype(str).tolist()
    t = ref if isinstance(ref, np.ndarray) else reference(ref, ids)
    return metrics.expected_log_loss(t, frame_probs(df, temperature))


def fit_temperature(logits: Any, labels: Any) -> float:
    """The temperature minimising the log-loss of ``softmax(logits / T)`` against ``labels``.

    Why here and not ``gpu.calibrate``: the CE-only student has no calibration asset, and the
    fair KD-vs-CE comparison post-processes both the same way (a temperature fitted on the fold's
    own validation rows). A bounded 1-D search over log T is exact enough and needs no torch.
    """
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    res = minimize_scalar(lambda lt: metrics.expected_log_loss(y, softmax(z, math.exp(lt))),
                          bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-5})
    return float(math.exp(res.x))


def gap(x: float | None, prior: float, bayes: float) -> float | None:
    if x is None or not math.isfinite(prior) or not math.isfinite(bayes) or prior == bayes:
        return None
    return metrics.gap_closed(x, prior, bayes)


def aligned(frames: list[Any], ids: list[str]) -> list[Any]:
    """Each table reindexed to ``ids`` (the ensembles need the same row order)."""
    return [f.assign(id=f["id"].astype(str)).set_index("id").loc[ids].reset_index() for f in frames]


def mix(frames: list[Any], weights: list[float], ids: list[str], temperatures: list[float | None] | None = None) -> np.ndarray:
    """Weighted mean of the tables' probabilities (renormalised), rows in ``ids`` order."""
    temps = temperatures or [None] * len(frames)
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    acc = np.zeros((len(ids), 3))
    for wk, f, t in zip(w, aligned(frames, ids), temps):
        acc += wk * frame_probs(f, t)
    return acc / acc.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------
@dataclass
class Target:
    """One target of issue 8: what was measured, the bound, whether it holds and by how much."""

    name: str
    value: float | None
    bound: str
    met: bool | None
    missed_by: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "bound": self.bound, "met": self.met,
                "missed_by": self.missed_by, "note": self.note}


def at_least(name: str, value: float | None, bound: float, note: str = "") -> Target:
    if value is None:
        return Target(name, None, f">= {bound:g}", None, None, note or "not measured")
    ok = value >= bound - TOL
    return Target(name, value, f">= {bound:g}", ok, None if ok else bound - value, note)


def at_most(name: str, value: float | None, bound: float, note: str = "") -> Target:
    if value is None:
        return Target(name, None, f"<= {bound:g}", None, None, note or "not measured")
    ok = value <= bound + TOL
    return Target(name, value, f"<= {bound:g}", ok, None if ok else value - bound, note)


# --------------------------------------------------------------------------------------------
# The report from an artifact root
# --------------------------------------------------------------------------------------------
def _latest(root: Path, key: str, partition: str | None = None) -> Path | None:
    return artifacts.latest(root, key, partition)


def _read_parquet(path: Path | None) -> Any:
    import pandas as pd

    if path is None or not Path(path).exists():
        return None
    return pd.read_parquet(path)


def _read_json(path: Path | None) -> dict[str, Any]:
    if path is None or not Path(path).exists():
        return {}
    return json.loads(Path(path).read_text())


def _mean(xs: list[float | None]) -> float | None:
    vals = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(vals)) if vals else None


def build_report(settings: Settings, truth: dict[str, Any] | None = None,
                 extra: Mapping[str, str | Path] | None = None) -> dict[str, Any]:
    """Every fidelity number of issue 8 from the latest artifacts under ``settings.root``.

    ``truth``: the sample's ``truth.json`` (None: real data, labels only, no test scores).
    ``extra``: predictions.parquet paths of inference runs the pipeline itself does not make
    (names ``EXTRA_*``). Missing artifacts leave their numbers out (None) instead of failing, so a
    partly materialized pipeline still gets a report.
    """
    import pandas as pd

    from arena_assets.core import contract, ensemble

    root = settings.root
    n = settings.folds.n_folds
    folds = [str(k) for k in range(n)]
    extra = {k: Path(v) for k, v in (extra or {}).items()}
    tt = _latest(root, "train_table")
    if tt is None:
        raise FileNotFoundError(f"no train_table under {root}: materialize the pipeline first")
    train = contract.read_table(tt / "table.parquet")
    train_ids = train["id"].astype(str).tolist()
    labels = train[contract.LABEL_COLS].to_numpy(dtype=np.float64)
    has_truth = truth is not None
    if has_truth:
        train_ref: Mapping[str, Any] | None = truth["train"]  # type: ignore[index]
        test_ref: Mapping[str, Any] | None = truth["test"]  # type: ignore[index]
    else:
        train_ref = {i: row for i, row in zip(train_ids, labels.tolist())}
        test_ref = None
    label_frame = train.assign(id=train["id"].astype(str)).set_index("id")[contract.LABEL_COLS]
    prior_vec = labels.mean(axis=0)
    ref_train = reference(train_ref, train_ids)
    prior_train = metrics.expected_log_loss(ref_train, np.tile(prior_vec, (len(ref_train), 1)))
    bayes_train = metrics.entropy(ref_train) if has_truth else None

    rep: dict[str, Any] = {"reference": "truth" if has_truth else "labels", "n_folds": n,
                           "rows": {"train": len(train_ids)}}
    test_ids: list[str] = []
    te = _latest(root, "test_table")
    if te is not None:
        test_ids = contract.read_table(te / "table.parquet")["id"].astype(str).tolist()
    rep["rows"]["test"] = len(test_ids) if test_ref is not None else 0
    if test_ref is not None:
        ref_test = reference(test_ref, test_ids)
        prior = metrics.expected_log_loss(ref_test, np.tile(prior_vec, (len(ref_test), 1)))
        bayes: float | None = metrics.entropy(ref_test)
    else:
        prior, bayes = prior_train, None
    rep.update(prior=prior, bayes=bayes, prior_train=prior_train, bayes_train=bayes_train,
               prior_minus_bayes=(prior - bayes) if bayes is not None else None)

    def test_score(df: Any, temperature: float | None = None) -> float | None:
        if df is None or test_ref is None:
            return None
        return score(df, test_ref, temperature)

    def held_out(frames: dict[str, Any]) -> dict[str, Any]:
        """Per-fold and pooled expected log-loss of held-out predictions (train rows)."""
        per = {k: score(f, train_ref) for k, f in frames.items() if f is not None}
        pooled = None
        if per and len(per) == n:
            pooled = score(pd.concat(list(frames.values()), ignore_index=True), train_ref)
        return {"folds": per, "pooled": pooled}

    # ---- teachers: their OOF probabilities (held-out fold) --------------------------------
    rep["teacher"] = {}
    for fam in settings.teacher_families:
        frames = {k: _read_parquet(_p(_latest(root, f"{fam}/teacher_oof_probs", k), "oof.parquet")) for k in folds}
        rep["teacher"][fam] = held_out(frames)

    # ---- students: KD vs CE-only -----------------------------------------------------------
    kd_valid = {k: _read_parquet(_p(_latest(root, "student_model", k), "valid_predictions.parquet")) for k in folds}
    ce_valid = {k: _read_parquet(_p(_latest(root, "baseline_student", k), "valid_predictions.parquet")) for k in folds}
    fold_dirs = {k: _latest(root, "student_fold_submission", k) for k in folds}
    fold_pred = {k: _read_parquet(_p(d, "predictions.parquet")) for k, d in fold_dirs.items()}
    fold_res = {k: _read_json(_p(d, "result.json")) for k, d in fold_dirs.items()}
    ce_test = {k: _read_parquet(extra.get(EXTRA_BASELINE.format(k=k))) for k in folds}
    kd_test = {k: test_score(fold_pred[k], 1.0) for k in folds}
    ce_test_s = {k: test_score(ce_test[k], 1.0) for k in folds}
    # Calibrated comparison: the KD student with its calibration asset's temperature, the CE-only
    # student with one fitted the same way here (on its own validation fold's labels).
    kd_t = {k: _read_json(_p(_latest(root, "student_calibration", k), "calibration.json")).get("temperature")
            for k in folds}
    ce_t = {k: (fit_temperature(f[LOGIT_COLS], label_frame.loc[f["id"].astype(str).tolist()]) if f is not None else None)
            for k, f in ce_valid.items()}
    kd_cal = {k: test_score(fold_pred[k], kd_t[k]) if kd_t[k] is not None else None for k in folds}
    ce_cal = {k: test_score(ce_test[k], ce_t[k]) if ce_t[k] is not None else None for k in folds}
    rep["kd"] = {"held_out": held_out(kd_valid), "temperature": kd_t,
                 "test": {"folds": kd_test, "mean": _mean(list(kd_test.values())),
                          "calibrated_folds": kd_cal, "calibrated_mean": _mean(list(kd_cal.values()))}}
    rep["ce_only"] = {"held_out": held_out(ce_valid), "temperature": ce_t,
                      "test": {"folds": ce_test_s, "mean": _mean(list(ce_test_s.values())),
                               "calibrated_folds": ce_cal, "calibrated_mean": _mean(list(ce_cal.values()))}}

    # ---- calibration: before/after on the fitted fold and on the test rows ---------------
    cal: dict[str, Any] = {}
    for k in folds:
        c = _read_json(_p(_latest(root, "student_calibration", k), "calibration.json"))
        t = c.get("temperature")
        # the logits T was fitted on: the calibration's TTA oof.parquet (issue 15); a calibration
        # without it (older versions) was fitted on the student's valid_predictions
        fitted = _read_parquet(_p(_latest(root, "student_calibration", k), "oof.parquet"))
        v = fitted if fitted is not None else kd_valid[k]
        row: dict[str, Any] = {"temperature": t, "fitted_on": "tta_oof" if fitted is not None else "valid_predictions"}
        if t is not None and v is not None:
            vids = v["id"].astype(str).tolist()
            lab = label_frame.loc[vids].to_numpy(dtype=np.float64)
            row["fitted_labels_before"] = metrics.log_loss(lab, frame_probs(v, 1.0))
            row["fitted_labels_after"] = metrics.log_loss(lab, frame_probs(v, t))
            row["fitted_labels_se"] = ensemble.log_loss_se(lab, frame_probs(v, t))
            row["fitted_truth_before"] = score(v, train_ref, 1.0)
            row["fitted_truth_after"] = score(v, train_ref, t)
        if t is not None and fold_pred[k] is not None and test_ref is not None:
            row["test_before"] = test_score(fold_pred[k], 1.0)
            row["test_after"] = test_score(fold_pred[k], t)
        cal[k] = row
    rep["calibration"] = {
        "folds": cal,
        "test_mean_before": _mean([r.get("test_before") for r in cal.values()]),
        "test_mean_after": _mean([r.get("test_after") for r in cal.values()]),
    }

    # ---- fold models on the test rows (calibrated, TTA): the best fold ------------------
    fold_test = {k: test_score(fold_pred[k]) for k in folds}
    rep["fold_test"] = fold_test
    # The best fold is the one a competitor could pick: the lowest CV log-loss on its own held-out
    # rows (the calibration's, else the fold submission's), never the lowest score on the test
    # rows, which no one sees before submitting; that oracle pick is kept, labelled, beside it.
    fold_cv = {k: _fold_cv(root, k) for k in folds}
    scored = {k: v for k, v in fold_test.items() if v is not None}
    by_cv = {k: fold_cv[k] for k in scored if fold_cv[k] is not None}
    if by_cv:
        bk = min(by_cv, key=lambda k: by_cv[k])
        rep["best_fold"] = {"fold": int(bk), "logloss": scored[bk], "chosen_by": "cv_logloss",
                            "cv_logloss": by_cv[bk]}
    else:
        rep["best_fold"] = None
    if scored:
        ok = min(scored, key=lambda k: scored[k])
        rep["best_fold_by_test"] = {"fold": int(ok), "logloss": scored[ok],
                                    "note": "oracle: chosen by the test rows' truth (not a choice a user can make)"}
    # CV against the test rows, per fold: the students' KD targets come from teachers that trained
    # on the student's own validation rows (teacher j never saw fold j, but it saw fold k, whose
    # rows student k validates on, and student k trains on fold j's rows with teacher j's
    # targets) -- the 1st place's own optimism. Measured as test minus CV, both calibrated and
    # both expected log-losses against the truth.
    rep["cv_vs_test"] = {
        k: {"cv_logloss_labels": fold_cv[k], "cv_truth": cal[k].get("fitted_truth_after"),
            "test_truth": cal[k].get("test_after", fold_test[k]),
            "optimism": (None if cal[k].get("fitted_truth_after") is None or cal[k].get("test_after") is None
                         else cal[k]["test_after"] - cal[k]["fitted_truth_after"])}
        for k in folds
    }
    opt = [v["optimism"] for v in rep["cv_vs_test"].values() if v["optimism"] is not None]
    rep["cv_optimism_mean"] = _mean(opt) if opt else None

    # ---- merged / quantized / TTA ------------------------------------------------------------
    q_dir = _latest(root, "quantized_model")
    qinfo = _read_json(_p(q_dir, "quantization.json"))
    tta_pred = _read_parquet(_p(_latest(root, "tta_submission"), "predictions.parquet"))
    merged_t = _read_json(_p(_latest(root, "merged_model"), "calibration.json")).get("temperature")
    quant_tta = test_score(tta_pred)
    merged_tta = test_score(_read_parquet(extra.get(EXTRA_MERGED_TTA)))
    rep["merged_temperature"] = merged_t
    rep["quantized"] = {"method": qinfo.get("method"), "fallback_reason": qinfo.get("fallback_reason"),
                        "quantized_tta": quant_tta, "merged_tta": merged_tta,
                        "diff": None if quant_tta is None or merged_tta is None else quant_tta - merged_tta}
    rep["tta"] = {
        "quantized_tta": quant_tta,
        "quantized_no_tta": test_score(_read_parquet(extra.get(EXTRA_QUANT_NO_TTA))),
        "merged_tta": merged_tta,
        "merged_no_tta": test_score(_read_parquet(extra.get(EXTRA_MERGED_NO_TTA))),
    }

    # ---- final_ensemble modes (recomputed from the same sources build_ensemble uses) ---------
    modes: dict[str, float | None] = {m: None for m in ENSEMBLE_MODES}
    if test_ref is not None and all(fold_pred[k] is not None for k in folds) and test_ids:
        frames = [fold_pred[k] for k in folds]
        # CV log-losses and their standard errors as build_ensemble reads them (the calibration's
        # metrics), else the fold submissions' and the fitted fold's per-row spread
        cal_m = {k: _read_json(_p(_latest(root, "student_calibration", k), "result.json")).get("metrics", {})
                 for k in folds}
        cv = [float(cal_m[k].get("cv_logloss", fold_res[k].get("metrics", {}).get("cv_logloss", float("nan"))))
              for k in folds]
        se = [float(cal_m[k].get("cv_logloss_se", cal[k].get("fitted_labels_se", float("nan")))) for k in folds]
        ref_test = reference(test_ref, test_ids)
        fm = mix(frames, [1.0] * n, test_ids)
        modes["folds_mean"] = metrics.expected_log_loss(ref_test, fm)
        if all(math.isfinite(x) for x in cv) and all(math.isfinite(x) and x > 0 for x in se):
            w = ensemble.cv_weights(cv, se, z=settings.ensemble.cv_weight_z,
                                    max_ratio=settings.ensemble.cv_weight_max_ratio)
            modes["folds_cv_weighted"] = metrics.expected_log_loss(ref_test, mix(frames, w, test_ids))
        if tta_pred is not None:
            bw = float(settings.ensemble.blend_weight)
            modes["merged"] = quant_tta
            blend = mix([tta_pred, *frames], [bw] + [(1 - bw) / n] * n, test_ids)
            modes["blend"] = metrics.expected_log_loss(ref_test, blend)
    rep["ensembles"] = modes
    merged_ref = merged_tta if merged_tta is not None else quant_tta
    rep["averaging"] = {"merged": merged_ref, "merged_is_quantized": merged_tta is None,
                        "folds_mean": modes["folds_mean"],
                        "diff": None if merged_ref is None or modes["folds_mean"] is None else merged_ref - modes["folds_mean"]}

    # ---- the submission the pipeline wrote ------------------------------------------------
    fe = _latest(root, "final_ensemble")
    final_ll = None
    if fe is not None and test_ref is not None and (fe / "submission.csv").exists():
        final_ll = score(pd.read_csv(fe / "submission.csv", dtype={"id": str}), test_ref)
    rep["final"] = {"mode": settings.ensemble.mode, "logloss": final_ll}
    if bayes is not None:
        rep["gap_closed_best_fold"] = gap(rep["best_fold"]["logloss"], prior, bayes) if rep["best_fold"] else None
        rep["gap_closed"] = gap(final_ll, prior, bayes)
        rep["gap_closed_modes"] = {m: gap(v, prior, bayes) for m, v in modes.items()}
    else:
        rep["gap_closed_best_fold"] = rep["gap_closed"] = None
    rep["targets"] = [t.to_dict() for t in evaluate_targets(rep)]
    return rep


def _p(d: Path | None, name: str) -> Path | None:
    return None if d is None else d / name


def _fold_cv(root: Path, k: str) -> float | None:
    """A fold's calibrated CV log-loss on its held-out labels: the calibration step's, else the
    fold submission's (None when neither ran)."""
    for key in ("student_calibration", "student_fold_submission"):
        m = _read_json(_p(_latest(root, key, k), "result.json")).get("metrics", {})
        if m.get("cv_logloss") is not None:
            return float(m["cv_logloss"])
    return None


# --------------------------------------------------------------------------------------------
# Issue 17: KD vs CE-only students over several seeds, on the held-out folds' truth
# --------------------------------------------------------------------------------------------
TARGET_KD_VS_TEACHER = 0.01
"""The KD student within this of its teachers on the held-out truth, or better."""


def heldout_students(settings: Settings, truth: dict[str, Any]) -> dict[str, Any]:
    """KD and CE-only students of one run (the latest ``student_model`` / ``baseline_student``
    of every fold under ``settings.root``) scored on their held-out folds' truth.

    Raw: the training step's ``valid_predictions.parquet`` (the fold's own validation rows, one
    orientation). Calibrated: each fold's logits divided by a temperature fitted on the same
    rows' LABELS (:func:`fit_temperature`), the same post-processing for both students, then
    scored against those rows' TRUTH (the labels are draws, the truth is not: the fit cannot see
    it). Pooled over the folds (every train row once).
    """
    import pandas as pd

    from arena_assets.core import contract

    root = settings.root
    folds = [str(k) for k in range(settings.folds.n_folds)]
    tt = _latest(root, "train_table")
    if tt is None:
        raise FileNotFoundError(f"no train_table under {root}")
    train = contract.read_table(tt / "table.parquet")
    label_frame = train.assign(id=train["id"].astype(str)).set_index("id")[contract.LABEL_COLS]
    ref = truth["train"]
    out: dict[str, Any] = {}
    for name, key in (("kd", "student_model"), ("ce_only", "baseline_student")):
        frames = {k: _read_parquet(_p(_latest(root, key, k), "valid_predictions.parquet")) for k in folds}
        if any(f is None for f in frames.values()):
            out[name] = None
            continue
        temps = {k: fit_temperature(f[LOGIT_COLS], label_frame.loc[f["id"].astype(str).tolist()])
                 for k, f in frames.items()}
        allf = pd.concat(list(frames.values()), ignore_index=True)
        probs_cal = np.concatenate([frame_probs(frames[k], temps[k]) for k in folds])
        t_all = reference(ref, allf["id"].astype(str).tolist())
        out[name] = {"raw": score(allf, ref), "calibrated": metrics.expected_log_loss(t_all, probs_cal),
                     "temperature": temps,
                     "folds_raw": {k: score(f, ref) for k, f in frames.items()}}
    return out


def seed_summary(per_seed: list[dict[str, Any]], teacher_heldout: float | None) -> dict[str, Any]:
    """Mean, standard deviation and standard error over seeds of KD - CE-only (held-out truth,
    raw and calibrated), whether KD wins in every seed, and the issue 17 targets on them.

    ``per_seed``: one :func:`heldout_students` result per seed (teachers fixed)."""
    rows = [r for r in per_seed if r.get("kd") and r.get("ce_only")]
    out: dict[str, Any] = {"n_seeds": len(rows)}
    for which in ("raw", "calibrated"):
        kd = np.array([r["kd"][which] for r in rows], dtype=np.float64)
        ce = np.array([r["ce_only"][which] for r in rows], dtype=np.float64)
        diff = kd - ce
        sd = float(diff.std(ddof=1)) if len(diff) > 1 else None
        se = sd / math.sqrt(len(diff)) if sd is not None else None
        out[which] = {"kd_mean": float(kd.mean()) if len(kd) else None,
                      "ce_only_mean": float(ce.mean()) if len(ce) else None,
                      "kd_minus_ce": diff.tolist(), "kd_minus_ce_mean": float(diff.mean()) if len(diff) else None,
                      "kd_minus_ce_sd": sd, "kd_minus_ce_se": se,
                      "kd_wins_every_seed": bool(len(diff) and (diff < 0).all()),
                      "mean_over_2se": (None if se is None or se == 0 else float(-diff.mean() / (2 * se)))}
    out["teacher_heldout"] = teacher_heldout
    tg: list[Target] = []
    ce_raw = out["raw"]["ce_only_mean"]
    if teacher_heldout is not None and ce_raw is not None:
        tg.append(at_most("teachers - CE-only student (held-out truth, raw, mean over seeds)",
                          teacher_heldout - ce_raw, 0.0, "teachers better than the label-only student"))
    for which in ("raw", "calibrated"):
        o = out[which]
        worst = max(o["kd_minus_ce"]) if o["kd_minus_ce"] else None
        tg.append(at_most(f"KD - CE-only, worst seed (held-out truth, {which})", worst, 0.0,
                          f"{len(rows)} seeds; KD must win in every seed"))
        ratio = o["mean_over_2se"]
        tg.append(at_least(f"-(mean KD - CE) / (2 SE) ({which})", ratio, 1.0,
                           "the mean gap more than twice its standard error over seeds"))
    kd_cal = out["calibrated"]["kd_mean"]
    if teacher_heldout is not None and kd_cal is not None:
        tg.append(at_most("KD student - teachers (held-out truth, calibrated student, mean over seeds)",
                          kd_cal - teacher_heldout, TARGET_KD_VS_TEACHER,
                          "teachers' OOF probabilities as the recipe distils them (TTA, uncalibrated)"))
    out["targets"] = [t.to_dict() for t in tg]
    return out


def seed_markdown(summary: dict[str, Any], per_seed: list[dict[str, Any]], labels: list[str]) -> str:
    """The seed comparison as markdown (benchmark report)."""
    lines = [(f"### KD vs CE-only students over {summary['n_seeds']} seeds (held-out folds' truth, pooled; "
              f"teachers trained once: {_f(summary['teacher_heldout'])})"), "",
             "| seed | KD raw | CE-only raw | KD − CE raw | KD calibrated | CE-only calibrated | KD − CE calibrated |",
             "|---|---|---|---|---|---|---|"]
    for lab, r in zip(labels, per_seed):
        if not r.get("kd") or not r.get("ce_only"):
            lines.append(f"| {lab} | – | – | – | – | – | – |")
            continue
        kr, cr, kc, cc = r["kd"]["raw"], r["ce_only"]["raw"], r["kd"]["calibrated"], r["ce_only"]["calibrated"]
        lines.append(f"| {lab} | {_f(kr)} | {_f(cr)} | {_f(kr - cr)} | {_f(kc)} | {_f(cc)} | {_f(kc - cc)} |")
    ra, ca = summary["raw"], summary["calibrated"]
    lines.append(f"| mean | {_f(ra['kd_mean'])} | {_f(ra['ce_only_mean'])} | {_f(ra['kd_minus_ce_mean'])} | "
                 f"{_f(ca['kd_mean'])} | {_f(ca['ce_only_mean'])} | {_f(ca['kd_minus_ce_mean'])} |")
    lines.append(f"| sd (se) | | | {_f(ra['kd_minus_ce_sd'])} ({_f(ra['kd_minus_ce_se'])}) | | | "
                 f"{_f(ca['kd_minus_ce_sd'])} ({_f(ca['kd_minus_ce_se'])}) |")
    lines += ["", "| target (issue 17) | value | bound | met | missed by | note |", "|---|---|---|---|---|---|"]
    for tg in summary["targets"]:
        met = "–" if tg["met"] is None else ("yes" if tg["met"] else "**no**")
        lines.append(f"| {tg['name']} | {_f(tg['value'])} | {tg['bound']} | {met} | {_f(tg['missed_by'])} | {tg['note']} |")
    return "\n".join(lines) + "\n"


def evaluate_targets(rep: dict[str, Any]) -> list[Target]:
    """The targets of issue 8 on a report (None values: not measured, ``met`` None)."""
    out: list[Target] = []
    out.append(at_least("prior - bayes (nats)", rep.get("prior_minus_bayes"), TARGET_PRIOR_BAYES))
    out.append(at_least("gap_closed best fold", rep.get("gap_closed_best_fold"), TARGET_GAP_BEST_FOLD))
    out.append(at_least("gap_closed final", rep.get("gap_closed"), TARGET_GAP_FINAL))
    kd, ce, where = kd_vs_ce(rep)
    out.append(at_most("KD - CE-only", None if kd is None or ce is None else kd - ce, 0.0, where))
    kr, cr = rep["kd"]["test"]["mean"], rep["ce_only"]["test"]["mean"]
    out.append(at_most("KD - CE-only (raw, no calibration)", None if kr is None or cr is None else kr - cr, 0.0,
                       "test rows, mean of fold models"))
    cal = rep["calibration"]["folds"]
    worst = [r["fitted_labels_after"] - r["fitted_labels_before"] for r in cal.values() if "fitted_labels_after" in r]
    out.append(at_most("calibration on its fitted fold: max(after - before)", max(worst) if worst else None, 0.0,
                       "labels of the fold it was fitted on (its objective)"))
    b, a = rep["calibration"]["test_mean_before"], rep["calibration"]["test_mean_after"]
    out.append(at_most("calibration held-out: mean(after - before)", None if a is None or b is None else a - b, 0.0,
                       "test rows, mean of fold models"))
    t = rep["tta"]
    pairs = [(t["quantized_tta"], t["quantized_no_tta"]), (t["merged_tta"], t["merged_no_tta"])]
    diffs = [x - y for x, y in pairs if x is not None and y is not None]
    out.append(at_most("TTA - no TTA", max(diffs) if diffs else None, 0.0, "quantized and merged models"))
    qd = rep["quantized"]["diff"]
    out.append(at_most("|quantized - merged|", None if qd is None else abs(qd), TARGET_QUANT_DIFF,
                       f"method {rep['quantized'].get('method')}"))
    ad = rep["averaging"]["diff"]
    out.append(at_most("|merged - folds_mean|", None if ad is None else abs(ad), TARGET_AVG_DIFF,
                       "quantized merged model" if rep["averaging"]["merged_is_quantized"] else "fp merged model"))
    return out


# --------------------------------------------------------------------------------------------
# Presentation
# --------------------------------------------------------------------------------------------
def _f(x: Any, nd: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, np.integer)):
        return str(x)
    return f"{x:.{nd}f}"


def markdown(rep: dict[str, Any]) -> str:
    """The report as markdown tables (the asset's UI view and docs/fidelity.md's source)."""
    prior, bayes = rep["prior"], rep.get("bayes")

    def g(x: float | None) -> str:
        return _f(gap(x, prior, bayes) if bayes is not None else None, 3)

    ref = "expected log-loss vs truth.json" if rep["reference"] == "truth" else "log-loss vs labels (no truth)"
    lines = [f"### Fidelity ({ref}; {rep['rows']['test']} test rows, {rep['rows']['train']} train rows)", "",
             "| quantity | log-loss | gap closed |", "|---|---|---|",
             f"| class prior | {_f(prior)} | 0 |", f"| Bayes (truth entropy) | {_f(bayes)} | 1 |"]
    bf = rep.get("best_fold")
    if bf:
        lines.append(f"| best fold student by its CV (fold {bf['fold']}, calibrated, TTA) | {_f(bf['logloss'])} | {g(bf['logloss'])} |")
    bt = rep.get("best_fold_by_test")
    if bt:
        lines.append(f"| *oracle: best fold by the test rows (fold {bt['fold']})* | {_f(bt['logloss'])} | {g(bt['logloss'])} |")
    for m, v in rep["ensembles"].items():
        lines.append(f"| final_ensemble mode `{m}` | {_f(v)} | {g(v)} |")
    fin = rep["final"]
    lines.append(f"| **final submission** (`{fin['mode']}`) | **{_f(fin['logloss'])}** | **{g(fin['logloss'])}** |")
    q, t = rep["quantized"], rep["tta"]
    lines += [f"| merged fp model, TTA | {_f(t['merged_tta'])} | {g(t['merged_tta'])} |",
              f"| merged fp model, no TTA | {_f(t['merged_no_tta'])} | {g(t['merged_no_tta'])} |",
              f"| quantized ({q.get('method')}), TTA | {_f(t['quantized_tta'])} | {g(t['quantized_tta'])} |",
              f"| quantized ({q.get('method')}), no TTA | {_f(t['quantized_no_tta'])} | {g(t['quantized_no_tta'])} |",
              f"| KD students, mean over folds (test, raw, TTA) | {_f(rep['kd']['test']['mean'])} | {g(rep['kd']['test']['mean'])} |",
              f"| CE-only students, mean over folds (test, raw, TTA) | {_f(rep['ce_only']['test']['mean'])} | {g(rep['ce_only']['test']['mean'])} |",
              f"| KD students, calibrated, mean over folds | {_f(rep['kd']['test']['calibrated_mean'])} | {g(rep['kd']['test']['calibrated_mean'])} |",
              f"| CE-only students, calibrated, mean over folds | {_f(rep['ce_only']['test']['calibrated_mean'])} | {g(rep['ce_only']['test']['calibrated_mean'])} |",
              "", (f"### Per fold (held-out = the fold's validation rows; prior there {_f(rep['prior_train'])}, "
              f"Bayes {_f(rep.get('bayes_train'))})"), ""]
    fams = list(rep["teacher"])
    head = ["fold", *[f"teacher {f} held-out" for f in fams], "KD held-out", "CE-only held-out", "KD test",
            "CE-only test", "T", "fitted fold before→after (labels)", "fitted fold before→after (truth)",
            "test before→after", "test calibrated"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in [str(i) for i in range(rep["n_folds"])]:
        c = rep["calibration"]["folds"].get(k, {})
        cells = [k, *[_f(rep["teacher"][f]["folds"].get(k)) for f in fams],
                 _f(rep["kd"]["held_out"]["folds"].get(k)), _f(rep["ce_only"]["held_out"]["folds"].get(k)),
                 _f(rep["kd"]["test"]["folds"].get(k)), _f(rep["ce_only"]["test"]["folds"].get(k)),
                 _f(c.get("temperature"), 3),
                 f"{_f(c.get('fitted_labels_before'))}→{_f(c.get('fitted_labels_after'))}",
                 f"{_f(c.get('fitted_truth_before'))}→{_f(c.get('fitted_truth_after'))}",
                 f"{_f(c.get('test_before'))}→{_f(c.get('test_after'))}", _f(rep["fold_test"].get(k))]
        lines.append("| " + " | ".join(cells) + " |")
    pooled = ["pooled", *[_f(rep["teacher"][f]["pooled"]) for f in fams], _f(rep["kd"]["held_out"]["pooled"]),
              _f(rep["ce_only"]["held_out"]["pooled"]), _f(rep["kd"]["test"]["mean"]), _f(rep["ce_only"]["test"]["mean"]),
              "", "", "", f"{_f(rep['calibration']['test_mean_before'])}→{_f(rep['calibration']['test_mean_after'])}", ""]
    lines.append("| " + " | ".join(pooled) + " |")
    cvt = rep.get("cv_vs_test") or {}
    if cvt:
        lines += ["", ("### CV vs test per fold (the students' KD targets come from teachers that trained on "
                       "the student's validation rows: the recipe's own optimism)"), "",
                  "| fold | CV (labels) | CV (truth) | test (truth) | test − CV (truth) |", "|---|---|---|---|---|"]
        for k, v in cvt.items():
            lines.append(f"| {k} | {_f(v['cv_logloss_labels'])} | {_f(v['cv_truth'])} | {_f(v['test_truth'])} | "
                         f"{_f(v['optimism'])} |")
        lines.append(f"| mean | | | | {_f(rep.get('cv_optimism_mean'))} |")
    lines += ["", "### Targets (issue 8)", "", "| target | value | bound | met | missed by | note |", "|---|---|---|---|---|---|"]
    for tg in rep["targets"]:
        met = "–" if tg["met"] is None else ("yes" if tg["met"] else "**no**")
        lines.append(f"| {tg['name']} | {_f(tg['value'])} | {tg['bound']} | {met} | {_f(tg['missed_by'])} | {tg['note']} |")
    return "\n".join(lines) + "\n"


def summary_fields(rep: dict[str, Any]) -> dict[str, Any]:
    """The headline fields fidelity.json must carry (issue 8) from a full report."""
    return {
        "prior": rep["prior"],
        "bayes": rep.get("bayes"),
        "best_fold": rep["best_fold"]["logloss"] if rep.get("best_fold") else None,
        "best_fold_index": rep["best_fold"]["fold"] if rep.get("best_fold") else None,
        "final": rep["final"]["logloss"],
        "final_mode": rep["final"]["mode"],
        "gap_closed_best_fold": rep.get("gap_closed_best_fold"),
        "gap_closed": rep.get("gap_closed"),
        "kd": kd_vs_ce(rep)[0],
        "ce_only": kd_vs_ce(rep)[1],
        "kd_vs_ce_on": kd_vs_ce(rep)[2],
        "kd_raw": rep["kd"]["test"]["mean"],
        "ce_only_raw": rep["ce_only"]["test"]["mean"],
        "teacher_heldout": _mean([v["pooled"] for v in rep["teacher"].values()]) if rep.get("teacher") else None,
        "kd_heldout": rep["kd"]["held_out"]["pooled"],
        "ce_only_heldout": rep["ce_only"]["held_out"]["pooled"],
        "targets_met": sum(bool(t["met"]) for t in rep["targets"] if t["met"] is not None),
        "targets_measured": sum(t["met"] is not None for t in rep["targets"]),
    }


def kd_vs_ce(rep: dict[str, Any]) -> tuple[float | None, float | None, str]:
    """(KD, CE-only, where): both students calibrated on the test rows when the CE-only students'
    test predictions exist, else both raw on the pooled held-out folds (never mixed)."""
    kd, ce = rep["kd"]["test"]["calibrated_mean"], rep["ce_only"]["test"]["calibrated_mean"]
    if kd is not None and ce is not None:
        return kd, ce, "test rows, mean of fold models, each calibrated on its fold"
    return rep["kd"]["held_out"]["pooled"], rep["ce_only"]["held_out"]["pooled"], "held-out folds, pooled, raw"
