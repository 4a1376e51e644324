"""Submissions (validate/write/read) and fold ensembles."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arena_assets.core.contract import ContractError
from arena_assets.core.ensemble import (
    SUBMISSION_COLS,
    combine_submissions,
    cv_weights,
    read_submission,
    validate_submission,
    write_submission,
)

IDS = ["0123", "98765432109876543", "42"]


def sub(p: list[list[float]], ids: list[str] = IDS) -> pd.DataFrame:
    return pd.DataFrame({"id": ids, **{c: [r[j] for r in p] for j, c in enumerate(SUBMISSION_COLS[1:])}})


GOOD = [[0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3], [0.9, 0.05, 0.05]]


def test_roundtrip_keeps_ids_exactly(tmp_path: Path) -> None:
    path = write_submission(sub(GOOD), tmp_path / "submission.csv", test_ids=IDS)
    back = read_submission(path, test_ids=IDS)
    assert back["id"].tolist() == IDS
    np.testing.assert_allclose(back[SUBMISSION_COLS[1:]].to_numpy(), GOOD, atol=1e-9)
    assert path.read_text().splitlines()[0] == ",".join(SUBMISSION_COLS)


@pytest.mark.parametrize(
    "df, fragment",
    [
        (sub(GOOD).drop(columns=["winner_tie"]), "missing ['winner_tie']"),
        (sub(GOOD).assign(extra=1), "unexpected ['extra']"),
        (sub([[0.2, 0.5, float("nan")], *GOOD[1:]]), "row 1 (id 0123): winner_tie is NaN"),
        (sub([GOOD[0], [0.5, 0.5, 0.5], GOOD[2]]), "row 2 (id 98765432109876543): winner_model_a+winner_model_b+winner_tie = 1.5"),
        (sub([GOOD[0], GOOD[1], [1.2, -0.1, -0.1]]), "row 3 (id 42): probabilities"),
        (sub(GOOD, ids=["0123", "0123", "42"]), "row 2: id 0123 duplicates row 1"),
        (sub(GOOD, ids=["0123", "98765432109876543", "43"]), "id 43 is not a test id"),
        (sub(GOOD[:2], ids=IDS[:2]), "test id 42 is missing"),
    ],
)
def test_validate_names_the_problem(df: pd.DataFrame, fragment: str) -> None:
    with pytest.raises(ContractError) as ei:
        validate_submission(df, IDS)
    assert fragment in str(ei.value)


def test_invalid_write_leaves_existing_file(tmp_path: Path) -> None:
    path = write_submission(sub(GOOD), tmp_path / "submission.csv")
    before = path.read_bytes()
    with pytest.raises(ContractError):
        write_submission(sub([[0.5, 0.5, 0.5]] * 3), path)
    assert path.read_bytes() == before


def test_cv_weights_formula() -> None:
    se = [0.005, 0.005]
    assert cv_weights([0.9, 0.9, 0.9], [0.01] * 3) == pytest.approx([1 / 3] * 3)
    # tau = z * sqrt(2 * mean SE^2): a fold d noise units worse keeps exp(-d / z) of the weight
    sigma = math.sqrt(2) * 0.005
    w = cv_weights([0.90, 0.90 + sigma], se, z=4.5, max_ratio=2.0)
    assert w[1] / w[0] == pytest.approx(math.exp(-1 / 4.5))
    assert sum(w) == pytest.approx(1)
    assert cv_weights([0.9, 1.0], se, z=1e9) == pytest.approx([0.5, 0.5])
    assert cv_weights([0.9, 1.0], se, z=1e-3, max_ratio=2.0)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        cv_weights([0.9, float("nan")], se)
    with pytest.raises(ValueError):
        cv_weights([0.9, 0.91], [0.005, 0.0])
    with pytest.raises(ValueError):
        cv_weights([0.9, 0.91], [0.005])


def test_combine() -> None:
    a = sub(GOOD)
    b = sub([[0.4, 0.3, 0.3], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
    mean = combine_submissions([a, b])
    np.testing.assert_allclose(mean[SUBMISSION_COLS[1:]].to_numpy(), (np.array(GOOD) + b.iloc[:, 1:].to_numpy()) / 2)
    # rows are aligned by id, not by position
    shuffled = b.iloc[[2, 0, 1]].reset_index(drop=True)
    np.testing.assert_allclose(combine_submissions([a, shuffled]).iloc[:, 1:].to_numpy(), mean.iloc[:, 1:].to_numpy())
    weighted = combine_submissions([a, b], weights=[3, 1])
    np.testing.assert_allclose(weighted.iloc[:, 1:].to_numpy(), 0.75 * np.array(GOOD) + 0.25 * b.iloc[:, 1:].to_numpy())
    assert weighted["id"].tolist() == IDS
    validate_submission(weighted, IDS)
    with pytest.raises(ContractError, match="not a test id"):
        combine_submissions([a, sub(GOOD, ids=["1", "2", "3"])])
