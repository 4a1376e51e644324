"""Step 9: submissions (write, read, validate) and combining fold submissions.

Weights from fold CV log-loss (``cv_weights``)::

    w_k = exp(-(L_k - min_j L_j) / tau) / sum_i exp(-(L_i - min_j L_j) / tau)

a softmax of the negated, shifted losses. ``tau`` sets how sharply better folds dominate: as
``tau -> inf`` every fold gets 1/K (the seed's equal mean), as ``tau -> 0`` only the best fold
counts. With the default ``tau = 0.01`` a fold 0.01 nats worse weighs ``e^-1`` = 0.37 of the best.
Subtracting the minimum changes nothing mathematically but avoids overflow.

The combined probabilities are the weighted mean of the submissions' rows, renormalized to sum
to 1 (the mean of distributions already sums to 1; renormalizing removes float drift).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from arena_assets.core.artifacts import atomic_path
from arena_assets.core.contract import LABEL_COLS, LABEL_SUM_TOL, ContractError

SUBMISSION_COLS = ["id", *LABEL_COLS]


def validate_submission(df: pd.DataFrame, test_ids: Iterable[str] | None = None, name: str = "submission") -> None:
    """Raise ContractError naming the first problem: columns, NaN, range, row sums, ids.

    With ``test_ids``, the submission's ids must be exactly the test ids (as strings), each once.
    """
    cols = list(map(str, df.columns))
    if cols != SUBMISSION_COLS:
        missing = [c for c in SUBMISSION_COLS if c not in cols]
        extra = [c for c in cols if c not in SUBMISSION_COLS]
        what = f"missing {missing}" if missing else (f"unexpected {extra}" if extra else "wrong order")
        raise ContractError(f"{name}: columns must be {SUBMISSION_COLS} ({what}; found {cols})")
    ids = df["id"].astype(str).tolist()
    p = df[LABEL_COLS].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    problems: list[tuple[int, str]] = []
    nan_rows = np.flatnonzero(np.isnan(p).any(axis=1))
    if nan_rows.size:
        i = int(nan_rows[0])
        c = LABEL_COLS[int(np.flatnonzero(np.isnan(p[i]))[0])]
        problems.append((i, f"{c} is NaN or not a number"))
    with np.errstate(invalid="ignore"):
        out_rows = np.flatnonzero(((p < 0) | (p > 1)).any(axis=1))
        sums = p.sum(axis=1)
        off_rows = np.flatnonzero(np.abs(sums - 1.0) > LABEL_SUM_TOL)
    if out_rows.size:
        i = int(out_rows[0])
        problems.append((i, f"probabilities {p[i].tolist()} must be in [0, 1]"))
    if off_rows.size:
        i = int(off_rows[0])
        if not np.isnan(sums[i]):
            problems.append((i, f"{'+'.join(LABEL_COLS)} = {sums[i]:.10g}, must be 1"))
    if problems:
        i, msg = min(problems, key=lambda x: x[0])
        raise ContractError(f"{name} row {i + 1} (id {ids[i]}): {msg}")
    seen: dict[str, int] = {}
    for i, v in enumerate(ids):
        if v in seen:
            raise ContractError(f"{name} row {i + 1}: id {v} duplicates row {seen[v] + 1}")
        seen[v] = i
    if test_ids is not None:
        want = [str(t) for t in test_ids]
        want_set = set(want)
        extra_ids = [v for v in ids if v not in want_set]
        if extra_ids:
            raise ContractError(f"{name}: id {extra_ids[0]} is not a test id ({len(extra_ids)} such)")
        missing_ids = [v for v in want if v not in seen]
        if missing_ids:
            raise ContractError(f"{name}: test id {missing_ids[0]} is missing ({len(missing_ids)} missing)")


def write_submission(df: pd.DataFrame, path: str | os.PathLike[str], test_ids: Iterable[str] | None = None) -> Path:
    """Validate, then write the submission CSV atomically (ids written exactly, as strings)."""
    path = Path(path)
    validate_submission(df, test_ids, name=path.name)
    out = df.assign(id=df["id"].astype(str))
    with atomic_path(path) as tmp:
        out.to_csv(tmp, index=False, lineterminator="\n", float_format="%.10g")
    return path


def read_submission(path: str | os.PathLike[str], test_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Read and validate a submission CSV; ids stay strings, probabilities float64."""
    path = Path(path)
    df = pd.read_csv(path, dtype={"id": str}, keep_default_na=False, na_values=[""])
    if len(df.columns) and str(df.columns[0]).startswith("Unnamed"):
        df = df.drop(columns=[df.columns[0]])
    validate_submission(df, test_ids, name=path.name)
    return df.astype({c: np.float64 for c in LABEL_COLS})


def cv_weights(cv_losses: Sequence[float], tau: float = 0.01) -> list[float]:
    """Fold weights from CV log-losses: softmax of ``-(L_k - min L) / tau`` (module docstring)."""
    losses = np.asarray(cv_losses, dtype=np.float64)
    if losses.ndim != 1 or len(losses) == 0:
        raise ValueError("cv_losses must be a non-empty list")
    if not np.isfinite(losses).all():
        raise ValueError(f"cv_losses must be finite: {losses.tolist()}")
    if tau <= 0:
        raise ValueError("tau must be > 0")
    z = np.exp(-(losses - losses.min()) / tau)
    return (z / z.sum()).tolist()


def combine_submissions(subs: Sequence[pd.DataFrame], weights: Sequence[float] | None = None) -> pd.DataFrame:
    """Weighted mean of submissions (equal mean when ``weights`` is None), aligned by id.

    Every submission must hold the same ids; the result keeps the first one's row order.
    """
    if not subs:
        raise ValueError("no submissions to combine")
    w = np.full(len(subs), 1.0 / len(subs)) if weights is None else np.asarray(weights, dtype=np.float64)
    if len(w) != len(subs):
        raise ValueError(f"{len(subs)} submissions but {len(w)} weights")
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum: {w.tolist()}")
    w = w / w.sum()
    first_ids = subs[0]["id"].astype(str)
    acc = np.zeros((len(first_ids), len(LABEL_COLS)), dtype=np.float64)
    for k, s in enumerate(subs):
        validate_submission(s, first_ids.tolist(), name=f"submission {k}")
        aligned = s.assign(id=s["id"].astype(str)).set_index("id").loc[first_ids, LABEL_COLS]
        acc += w[k] * aligned.to_numpy(dtype=np.float64)
    acc /= acc.sum(axis=1, keepdims=True)
    out = pd.DataFrame(acc, columns=LABEL_COLS)
    out.insert(0, "id", first_ids.to_numpy())
    return out
