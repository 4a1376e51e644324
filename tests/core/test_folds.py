"""Step 2: stratified folds, grouping by prompt, determinism, splitting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from arena_assets.core.contract import LABEL_COLS, ContractError, read_train
from arena_assets.core.folds import folds_filename, make_folds, read_folds, split_fold, stratify_key, write_folds


@pytest.fixture(scope="module")
def train(sample_dir: Path) -> pd.DataFrame:
    return read_train(sample_dir / "train.csv")


def test_every_id_once_and_stratified(train: pd.DataFrame) -> None:
    folds = make_folds(train)
    assert set(folds) == set(train["id"]) and set(folds.values()) == set(range(5))
    sizes = np.bincount(list(folds.values()))
    assert sizes.max() - sizes.min() <= 1
    y = stratify_key(train)
    k = train["id"].map(folds).to_numpy()
    for c in range(3):
        per_fold = np.bincount(k[y == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)


def test_byte_identical_and_order_independent(train: pd.DataFrame, tmp_path: Path) -> None:
    a = write_folds(make_folds(train), tmp_path / folds_filename(5, 42))
    shuffled = train.sample(frac=1.0, random_state=1)
    b = write_folds(make_folds(shuffled), tmp_path / "again.json")
    assert a.name == "folds_5_seed42.json"
    assert a.read_bytes() == b.read_bytes()
    assert read_folds(a) == make_folds(train)
    assert all(isinstance(k, str) for k in read_folds(a))
    assert make_folds(train, seed=43) != make_folds(train)


def test_stratify_key_is_argmax_first_on_ties() -> None:
    df = pd.DataFrame([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5], [0.0, 1.0, 0.0]], columns=LABEL_COLS)
    assert stratify_key(df).tolist() == [0, 2, 1]


def test_group_by_prompt_keeps_a_prompt_in_one_fold() -> None:
    rng = np.random.default_rng(0)
    n = 300
    prompts = [[f"prompt {i % 40}"] for i in range(n)]  # 40 prompts, repeated
    y = np.eye(3)[rng.integers(0, 3, n)]
    df = pd.DataFrame({"id": [str(10**12 + i) for i in range(n)], "prompt": prompts, **{c: y[:, j] for j, c in enumerate(LABEL_COLS)}})
    key = df["prompt"].map(lambda p: p[0])

    def spans(folds: dict[str, int]) -> int:
        return int(df.assign(k=df["id"].map(folds), g=key).groupby("g")["k"].nunique().max())

    assert spans(make_folds(df)) > 1  # plain stratified folds do split prompts
    grouped = make_folds(df, group_by_prompt=True)
    assert spans(grouped) == 1
    assert set(grouped.values()) == set(range(5))


def test_split_fold(train: pd.DataFrame) -> None:
    folds = make_folds(train)
    seen: set[str] = set()
    for k in range(5):
        tr, va = split_fold(train, folds, k)
        assert len(tr) + len(va) == len(train)
        assert not set(tr["id"]) & set(va["id"])
        assert {folds[i] for i in va["id"]} == {k}
        seen |= set(va["id"])
    assert seen == set(train["id"])
    with pytest.raises(ContractError, match="has no fold"):
        split_fold(train, {i: f for i, f in list(folds.items())[1:]}, 0)
    with pytest.raises(ValueError, match="fold 7 does not exist"):
        split_fold(train, folds, 7)
