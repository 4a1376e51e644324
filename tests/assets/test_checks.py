"""The asset checks' logic on hand-made tables: each check catches the fault it exists for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arena_assets.assets import checks as chk
from arena_assets.core.folds import make_folds

LABELS = chk.LABELS


def _train(n: int = 100, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    df = pd.DataFrame({"id": [f"r{i}" for i in range(n)]})
    for j, c in enumerate(LABELS):
        df[c] = (y == j).astype(float)
    return df


def test_folds_from_make_folds_pass_both_checks() -> None:
    train = _train()
    fold_of = chk.fold_of_ids(make_folds(train, 5, 42))
    ok, d = chk.folds_disjoint_and_cover(fold_of, train["id"].tolist(), 5)
    assert ok, d
    ok, d = chk.folds_stratified(fold_of, train)
    assert ok and d["max_share_deviation"] <= chk.STRATIFY_TOL


def test_folds_missing_extra_and_empty_fold_are_caught() -> None:
    train = _train()
    fold_of = chk.fold_of_ids(make_folds(train, 5, 42))
    del fold_of["r0"]
    fold_of["stranger"] = 1
    ok, d = chk.folds_disjoint_and_cover(fold_of, train["id"].tolist(), 5)
    assert not ok and d["missing_ids"] == 1 and d["extra_ids"] == 1
    only_four = {i: k % 4 for k, i in enumerate(train["id"])}
    ok, d = chk.folds_disjoint_and_cover(only_four, train["id"].tolist(), 5)
    assert not ok and d["empty_folds"] == "[4]"


def test_unstratified_folds_are_caught() -> None:
    train = _train(300)
    y = train[LABELS].to_numpy().argmax(axis=1)
    fold_of = {i: int(c) for i, c in zip(train["id"], y)}  # fold = class: maximally skewed
    ok, d = chk.folds_stratified(fold_of, train)
    assert not ok and d["max_share_deviation"] > 0.5


def _oof(ids: list[str], families: list[str]) -> pd.DataFrame:
    rows = [{"id": i, "family": f, "fold": 0, "p_a": 0.4, "p_b": 0.4, "p_tie": 0.2} for f in families for i in ids]
    return pd.DataFrame(rows)


def test_oof_coverage_once_per_family() -> None:
    ids = [f"r{i}" for i in range(10)]
    ok, d = chk.oof_covers_once_per_family(_oof(ids, ["llama", "qwen"]), ids, ["llama", "qwen"])
    assert ok and d["coverage"] == 1.0
    dup = pd.concat([_oof(ids, ["llama"]), _oof(ids[:1], ["llama"])])
    ok, d = chk.oof_covers_once_per_family(dup, ids, ["llama"])
    assert not ok and d["per_family"]["llama"]["duplicates"] == 1
    ok, d = chk.oof_covers_once_per_family(_oof(ids[:8], ["llama"]), ids, ["llama"])
    assert not ok and d["coverage"] == pytest.approx(0.8)


def _write_sub(path: Path, ids: list[str], p: np.ndarray) -> Path:
    df = pd.DataFrame(p, columns=LABELS)
    df.insert(0, "id", ids)
    df.to_csv(path, index=False)
    return path


def test_submission_validity(tmp_path: Path) -> None:
    ids = ["a", "b", "c"]
    good = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    ok, d = chk.submission_valid(_write_sub(tmp_path / "ok.csv", ids, good), ids)
    assert ok, d
    bad_sum = good.copy()
    bad_sum[1, 0] = 0.5
    ok, d = chk.submission_valid(_write_sub(tmp_path / "sum.csv", ids, bad_sum), ids)
    assert not ok and "must be 1" in d["problem"]
    nan = good.copy()
    nan[2, 2] = np.nan
    ok, d = chk.submission_valid(_write_sub(tmp_path / "nan.csv", ids, nan), ids)
    assert not ok and "NaN" in d["problem"]
    ok, d = chk.submission_valid(_write_sub(tmp_path / "ids.csv", ["a", "b", "x"], good), ids)
    assert not ok and "x" in d["problem"]
    ok, d = chk.submission_valid(tmp_path / "absent.csv", ids)
    assert not ok


def test_class_prior_logloss_is_the_constant_models_loss() -> None:
    train = _train(300, seed=1)
    valid = _train(60, seed=2)
    prior = train[LABELS].to_numpy().mean(axis=0)
    y = valid[LABELS].to_numpy().argmax(axis=1)
    expected = float(-np.mean(np.log(prior[y])))
    assert chk.class_prior_logloss(train, valid) == pytest.approx(expected, rel=1e-9)
