"""Teachers -> OOF -> KD student -> calibration -> fold submission -> TTA, on the known-answer sample."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from tests.gpu.conftest import FMT, INFER, STUDENT, TEACHER

from arena_assets.core.contract import read_table, write_table
from arena_assets.core.metrics import expected_log_loss, gap_closed, prior_log_loss
from arena_assets.core.settings import CalibrationSettings, KDSettings
from arena_assets.gpu.calibrate import calibrate, fit_temperature, nll
from arena_assets.gpu.formatting import labels_of, swap_ab
from arena_assets.gpu.predict import fold_submission, softmax, teacher_oof, tta_submission
from arena_assets.gpu.train import train_student, train_teacher


@pytest.fixture(scope="module")
def oof(data: dict[str, Any], base: Any, teacher: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Teacher OOF over every train id: teacher fold 0 (conftest) + teacher fold 1."""
    root = tmp_path_factory.mktemp("oof")
    t1 = train_teacher(base.path("model"), TEACHER, FMT, data["train1"], data["valid1"], None, out_dir=root / "t1")
    parts = []
    for k, t in ((0, teacher), (1, t1)):
        r = teacher_oof(t.path("model"), FMT, INFER, data[f"valid{k}"], k, "llama", out_dir=root / f"oof{k}")
        parts.append(pd.read_parquet(r.path("oof")))
    table = pd.concat(parts, ignore_index=True)
    table.to_parquet(root / "teacher_oof.parquet", index=False)
    return root / "teacher_oof.parquet"


@pytest.fixture(scope="module")
def student(data: dict[str, Any], base: Any, oof: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("student") / "v1"
    return train_student(base.path("model"), STUDENT, FMT, data["train0"], data["valid0"], oof, out_dir=out)


def test_teacher_learns_beyond_the_prior(data: dict[str, Any], teacher: Any) -> None:
    train, valid = read_table(data["train0"]), read_table(data["valid0"])
    prior = prior_log_loss(labels_of(train), labels_of(valid))
    assert teacher.metrics["valid_logloss"] < prior - 0.05, (teacher.metrics, prior)
    hist = json.loads(teacher.path("history").read_text())
    assert any("loss" in h for h in hist) and any("eval_loss" in h for h in hist)
    cfg = json.loads((teacher.path("model") / "adapter_config.json").read_text())
    assert cfg["r"] == TEACHER.lora.r


def test_oof_covers_every_train_id_once(data: dict[str, Any], oof: Path) -> None:
    t = pd.read_parquet(oof)
    train = read_table(data["train"])
    assert sorted(t["id"]) == sorted(train["id"].astype(str))
    assert set(t.columns) >= {"id", "fold", "family", "p_a", "p_b", "p_tie", "logit_a", "logit_b", "logit_tie"}
    np.testing.assert_allclose(t[["p_a", "p_b", "p_tie"]].sum(axis=1), 1.0, atol=1e-9)


def test_student_distils_and_ce_baseline(data: dict[str, Any], base: Any, student: Any, tmp_path: Path) -> None:
    assert student.info["kd"] is True and student.info["teacher_families"] == ["llama"]
    train, valid = read_table(data["train0"]), read_table(data["valid0"])
    prior = prior_log_loss(labels_of(train), labels_of(valid))
    assert student.metrics["valid_logloss"] < prior - 0.05
    base_cfg = STUDENT.model_copy(update={"kd": KDSettings(alpha=0.0)})
    ce = train_student(base.path("model"), base_cfg, FMT, data["train0"], data["valid0"], None, out_dir=tmp_path / "ce")
    assert ce.info["kd"] is False
    assert ce.metrics["valid_logloss"] < prior - 0.05


def test_packed_student_trains_like_the_padded_one(data: dict[str, Any], base: Any, oof: Path, student: Any, tmp_path: Path) -> None:
    """TrainSettings.packing through the whole Trainer run (collator, KD loss, evaluation): the same
    batches without padding give the same model up to float rounding."""
    cfg = STUDENT.model_copy(update={"train": STUDENT.train.model_copy(update={"packing": True})})
    packed = train_student(base.path("model"), cfg, FMT, data["train0"], data["valid0"], oof, out_dir=tmp_path / "p")
    assert abs(packed.metrics["train_loss"] - student.metrics["train_loss"]) < 1e-3
    assert abs(packed.metrics["valid_logloss"] - student.metrics["valid_logloss"]) < 1e-3


def test_sharded_tta_equals_one_process(data: dict[str, Any], student: Any) -> None:
    """The several-GPU path's plumbing with real processes: two shards on CPU (device "") give
    the one-process logits, in row order."""
    from arena_assets.gpu.predict import _load, inference_devices, sharded_tta_logits, tta_logits

    assert inference_devices(INFER) == []  # no GPUs here: TTA steps stay in one process
    model, tok = _load(student.path("model"))
    ref = tta_logits(model, tok, read_table(data["valid0"]), FMT, INFER)
    z, rec = sharded_tta_logits(student.path("model"), data["valid0"], FMT, INFER, ["", ""])
    np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)
    assert rec["tta_devices"] == ["cpu", "cpu"]


def test_student_refuses_oof_missing_ids(data: dict[str, Any], base: Any, oof: Path, tmp_path: Path) -> None:
    t = pd.read_parquet(oof)
    drop = set(read_table(data["train0"])["id"].head(3))  # three of the student's own train rows
    t = t[~t["id"].isin(drop)]
    t.to_parquet(tmp_path / "partial.parquet")
    with pytest.raises(ValueError, match="lacks"):
        train_student(base.path("model"), STUDENT, FMT, data["train0"], data["valid0"], tmp_path / "partial.parquet", out_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_calibration_never_raises_nll_and_recovers_temperature(data: dict[str, Any], student: Any, tmp_path: Path) -> None:
    r = calibrate(student.path("model"), FMT, INFER, data["valid0"], CalibrationSettings(), out_dir=tmp_path / "cal")
    cal = json.loads(r.path("calibration").read_text())
    assert cal["nll_after"] <= cal["nll_before"] + 1e-12
    assert cal["temperature"] == r.metrics["temperature"] > 0
    # known answer: logits of a calibrated model blown up 3x are fixed by T close to 3
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4000, 3))
    y = np.array([rng.multinomial(1, p) for p in softmax(z)])
    t, before, after = fit_temperature(3.0 * z, y)
    assert t == pytest.approx(3.0, rel=0.1) and after < before
    assert nll(3.0 * z, y, t) == pytest.approx(after)


def test_fold_submission_applies_temperature(data: dict[str, Any], student: Any, tmp_path: Path) -> None:
    cal = tmp_path / "calibration.json"
    cal.write_text(json.dumps({"temperature": 1.7, "nll_before": 0, "nll_after": 0}))
    r = fold_submission(student.path("model"), cal, FMT, INFER, data["valid0"], data["test"], out_dir=tmp_path / "fs")
    pred = pd.read_parquet(r.path("predictions"))
    z = pred[["logit_a", "logit_b", "logit_tie"]].to_numpy()
    np.testing.assert_allclose(pred[["p_a", "p_b", "p_tie"]].to_numpy(), softmax(z, 1.7), atol=1e-12)
    sub = pd.read_csv(r.path("submission"), dtype={"id": str})
    assert list(sub.columns) == ["id", "winner_model_a", "winner_model_b", "winner_tie"]
    assert sorted(sub["id"]) == sorted(read_table(data["test"])["id"])
    assert {"cv_logloss_raw", "cv_logloss", "cv_accuracy"} <= set(r.metrics)


def test_tta_mirrors_swapped_inputs_and_closes_the_gap(data: dict[str, Any], student: Any, tmp_path: Path) -> None:
    test = read_table(data["test"])
    swapped = tmp_path / "swapped.parquet"
    write_table(swap_ab(test), swapped)
    a = tta_submission(student.path("model"), None, FMT, INFER, data["test"], out_dir=tmp_path / "a")
    b = tta_submission(student.path("model"), None, FMT, INFER, swapped, out_dir=tmp_path / "b")
    pa, pb = pd.read_parquet(a.path("predictions")), pd.read_parquet(b.path("predictions"))
    p = pa[["p_a", "p_b", "p_tie"]].to_numpy()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(p, pb[["p_b", "p_a", "p_tie"]].to_numpy(), atol=1e-5)
    sub = pd.read_csv(a.path("submission"))
    np.testing.assert_allclose(sub[["winner_model_a", "winner_model_b", "winner_tie"]].sum(axis=1), 1.0, atol=1e-6)
    # quality against the known answer (small sample, 250 train rows per fold: a loose bar)
    truth = json.loads(Path(data["summary"]["truth"]).read_text())["test"]
    t = np.array([truth[i] for i in pa["id"]])
    g = gap_closed(expected_log_loss(t, p), data["summary"]["prior_logloss_test"], data["summary"]["bayes_logloss_test"])
    assert g > 0.25, g


def test_tta_on_a_symmetric_row_gives_equal_a_and_b(data: dict[str, Any], student: Any, tmp_path: Path) -> None:
    test = read_table(data["test"]).head(8).copy()
    test["response_b"] = test["response_a"]
    write_table(test, tmp_path / "sym.parquet")
    r = tta_submission(student.path("model"), None, FMT, INFER, tmp_path / "sym.parquet", out_dir=tmp_path / "o")
    p = pd.read_parquet(r.path("predictions"))
    np.testing.assert_allclose(p["p_a"], p["p_b"], atol=1e-5)
