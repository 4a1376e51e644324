"""Step 2: the stratified K-fold split (scikit-learn), persisted as ``folds_<n>_seed<seed>.json``.

Decisions (all deterministic, so the same input and seed give a byte-identical file):

- Rows are sorted by ``id`` before splitting, so the folds depend on the SET of rows, not on the
  order a CSV happened to list them in.
- Stratification key: the argmax of the label row (``[a, b, tie]``; the first maximum on ties such
  as ``[0.5, 0.5, 0]``). For one-hot labels this is the class; for probability labels it is the
  most likely class, which keeps each fold's class balance close to the whole table's.
- ``group_by_prompt``: ``StratifiedGroupKFold`` with the prompt's turns as the group, so one prompt
  (the competition has many repeated prompts) never spans two folds and validation never sees a
  prompt the model trained on.
- Both splitters use ``shuffle=True, random_state=seed`` (1st place: 5 folds, seed 42).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from arena_assets.core.artifacts import atomic_write_text
from arena_assets.core.contract import LABEL_COLS, ContractError


def folds_filename(n_folds: int = 5, seed: int = 42) -> str:
    """The seed's file name convention, e.g. ``folds_5_seed42.json``."""
    return f"folds_{n_folds}_seed{seed}.json"


def stratify_key(df: pd.DataFrame) -> np.ndarray:
    """The class used for stratification: argmax of the three label columns."""
    return df[LABEL_COLS].to_numpy(dtype=np.float64).argmax(axis=1)


def make_folds(
    df: pd.DataFrame, n_folds: int = 5, seed: int = 42, group_by_prompt: bool = False
) -> dict[str, int]:
    """Assign every id of a normalized train table to a fold in ``0..n_folds-1``."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    if n_folds < 2:
        raise ValueError("n_folds must be at least 2")
    if len(df) < n_folds:
        raise ValueError(f"{len(df)} rows cannot make {n_folds} folds")
    d = df.assign(id=df["id"].astype(str)).sort_values("id", kind="stable").reset_index(drop=True)
    if d["id"].duplicated().any():
        raise ContractError(f"duplicate id {d.loc[d['id'].duplicated(), 'id'].iloc[0]} in the train table")
    y = stratify_key(d)
    fold = np.full(len(d), -1, dtype=np.int64)
    if group_by_prompt:
        groups = np.array([json.dumps(list(p), ensure_ascii=False) for p in d["prompt"]], dtype=object)
        n_groups = len(set(groups))
        if n_groups < n_folds:
            raise ValueError(f"{n_groups} distinct prompts cannot make {n_folds} grouped folds")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(d)), y, groups)
    else:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(d)), y)
    for k, (_, valid_idx) in enumerate(splits):
        fold[valid_idx] = k
    assert (fold >= 0).all(), "every row must land in exactly one validation fold"
    return {i: int(k) for i, k in zip(d["id"].tolist(), fold.tolist())}


def write_folds(folds: dict[str, int], path: str | os.PathLike[str]) -> Path:
    """Write ``{id: fold}`` as JSON with sorted keys, atomically; same folds -> same bytes."""
    text = json.dumps({str(k): int(v) for k, v in folds.items()}, sort_keys=True, indent=0)
    return atomic_write_text(path, text + "\n")


def read_folds(path: str | os.PathLike[str]) -> dict[str, int]:
    """Read a folds file; ids stay strings, folds become ints."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ContractError(f"{Path(path).name}: expected a JSON object mapping id -> fold")
    return {str(k): int(v) for k, v in data.items()}


def split_fold(df: pd.DataFrame, folds: dict[str, int], k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows, validation rows) of fold ``k``: validation = the ids assigned to ``k``.

    Every id of ``df`` must be in ``folds`` (a table that changed after the split is an error,
    not a silent leak).
    """
    if k not in set(folds.values()):
        raise ValueError(f"fold {k} does not exist (folds: {sorted(set(folds.values()))})")
    ids = df["id"].astype(str)
    assigned = ids.map(folds)
    if assigned.isna().any():
        missing = ids[assigned.isna()].iloc[0]
        raise ContractError(f"id {missing} has no fold: the table changed after the split")
    is_valid = (assigned == k).to_numpy()
    return df[~is_valid].reset_index(drop=True), df[is_valid].reset_index(drop=True)
