"""Step 9: submissions (write, read, validate) and combining fold submissions.

Weights from fold CV log-losses (``cv_weights``, mode ``folds_cv_weighted``)::

    sigma = sqrt(2 * mean_k SE_k^2)        SE_k: standard error of fold k's mean per-row log-loss
    tau   = z * sigma                      (z = ``EnsembleSettings.cv_weight_z``, default 4.5)
    w_k   = exp(-(L_k - min_j L_j) / tau) / sum_i exp(-(L_i - min_j L_j) / tau)
    then no weight above ``max_ratio / K`` (``cv_weight_max_ratio``, default 1.25), the excess
    handed to the other folds in proportion to their weights (water-filling, repeated)

**Why not a fixed temperature.** Each fold's CV log-loss ``L_k`` is measured on different rows
(the fold it held out; random fold assignment), so ``L_k - L_j`` mixes two things: how good the
models are and how hard the rows each one happened to hold out were. The second part is sampling
noise of about the standard error of a fold's mean per-row loss: ``SE = std(per-row loss) /
sqrt(n)``, ~0.005 for the 1st place's 11.5k rows per fold, ~0.007 (``sigma``) for the difference
of two folds. The seed's ``softmax(-(L - min L) / 0.01)`` treats those differences as model
quality: on the 1st place's student CVs 0.862/0.876/0.858/0.872/0.868 (a spread of 2.5 sigma) it
puts 0.27/0.07/0.41/0.10/0.15 on the folds, i.e. mostly rewards the folds that drew easy rows,
and an easy fold is no better on the test set.

**The choice.** The temperature is measured in noise units: a fold ``d`` sigma worse than the best
keeps ``exp(-d / z)`` of its weight. With ``z = 4.5``: 1 sigma -> 0.80, 2 sigma -> 0.64
(differences within noise barely move the weights), 10 sigma -> 0.11, and a broken fold (a
failed or diverged training, 0.2+ nats worse: about 30 sigma) -> about 0.001, which is what a CV
weighting is for. On the 1st place's numbers (SE 0.005) this gives 0.23/0.15/0.26/0.17/0.19
before the cap, 0.23/0.15/0.25/0.17/0.19 after it; with fold 2 at ln 3 (broken) it gets
0.0002 and the other four 0.25 each. Simulated pure noise (5 folds, identical models, SE
0.005) puts 0.24 on the luckiest fold on average (0.27 at the 95th percentile) before the cap;
the cap (1.25/K: 0.25 of 5 folds) bounds what luck can buy whatever the SEs say. The SEs are the
folds' own (``log_loss_se`` of the calibrated TTA predictions the CV log-loss is computed on), so a
small validation fold (the demo's 400 rows: SE ~0.03) is weighted more equally than a large one.
As ``n`` grows the noise shrinks and real quality differences decide, as they should. Why not
simply equal weights (``folds_mean``)? This mode still drops a fold that is clearly worse, which
equal weights cannot.

The combined probabilities are the weighted mean of the submissions' rows, renormalized to sum
to 1 (the mean of distributions already sums to 1; renormalizing removes float drift).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

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


CV_WEIGHT_Z = 4.5
"""Default noise units per e-fold of weight (module doc); ``EnsembleSettings.cv_weight_z``."""
CV_WEIGHT_MAX_RATIO = 1.25
"""Default cap: no fold above this times 1/K; ``EnsembleSettings.cv_weight_max_ratio``."""


def cv_weights(cv_losses: Sequence[float], standard_errors: Sequence[float], *, z: float = CV_WEIGHT_Z,
               max_ratio: float = CV_WEIGHT_MAX_RATIO) -> list[float]:
    """Fold weights from CV log-losses and their standard errors (module docstring): a softmax
    of ``-(L_k - min L) / tau`` with ``tau = z * sqrt(2 * mean SE^2)``, capped at ``max_ratio / K``."""
    losses = np.asarray(cv_losses, dtype=np.float64)
    se = np.asarray(standard_errors, dtype=np.float64)
    if losses.ndim != 1 or len(losses) == 0:
        raise ValueError("cv_losses must be a non-empty list")
    if se.shape != losses.shape:
        raise ValueError(f"{len(losses)} CV log-losses but {se.size} standard errors")
    if not np.isfinite(losses).all():
        raise ValueError(f"cv_losses must be finite: {losses.tolist()}")
    if not (np.isfinite(se).all() and (se > 0).all()):
        raise ValueError(f"standard errors must be finite and > 0: {se.tolist()}")
    if z <= 0:
        raise ValueError("z must be > 0")
    if max_ratio < 1:
        raise ValueError("max_ratio must be >= 1 (1: equal weights)")
    tau = z * float(np.sqrt(2.0 * np.mean(se**2)))
    w = np.exp(-(losses - losses.min()) / tau)
    return cap_weights(w / w.sum(), max_ratio / len(w)).tolist()


def log_loss_se(y_true: Any, probs: Any, eps: float = 1e-15) -> float:
    """Standard error of a mean log-loss: the sample std of the per-row losses / sqrt(n) (rows
    clipped to ``[eps, 1]`` like ``core.metrics.log_loss``). How far a fold's CV log-loss moves
    with which rows the fold happened to hold out; NaN below two rows."""
    y = np.asarray(y_true, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1.0)
    loss = -(y * np.log(p)).sum(axis=1)
    n = len(loss)
    return float(loss.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")


def cap_weights(weights: Sequence[float] | np.ndarray, cap: float) -> np.ndarray:
    """Weights (summing to 1) with none above ``cap`` (>= 1/K): the excess of capped ones goes
    to the uncapped ones in proportion to their weights, repeated until none exceeds the cap."""
    w = np.asarray(weights, dtype=np.float64).copy()
    if cap * len(w) < 1 - 1e-12:
        raise ValueError(f"a cap of {cap} cannot hold {len(w)} weights summing to 1")
    capped = np.zeros(len(w), dtype=bool)
    for _ in range(len(w)):
        over = (w > cap + 1e-15) & ~capped
        if not over.any():
            break
        capped |= over
        free = 1.0 - cap * capped.sum()
        rest = w[~capped].sum()
        w[capped] = cap
        if rest > 0:
            w[~capped] *= free / rest
        else:  # everything else had weight 0: share what is left equally
            w[~capped] = free / max(1, (~capped).sum())
    return w / w.sum()


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
