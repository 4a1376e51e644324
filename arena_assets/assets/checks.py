"""The logic of the asset checks, as plain functions of tables (tested without Dagster runs).

Each returns ``(passed, metadata)``; the asset bodies wrap them in ``AssetCheckResult`` so a
partitioned asset gets one result per partition (the check runs inside the partition's step).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LABELS = ["winner_model_a", "winner_model_b", "winner_tie"]
STRATIFY_TOL = 0.05


def fold_of_ids(folds: Mapping[str, int]) -> dict[str, int]:
    """``{id: fold}`` with string ids and int folds (what ``core.folds.read_folds`` returns)."""
    return {str(i): int(f) for i, f in folds.items()}


def fold_sizes(fold_of: Mapping[str, int]) -> dict[int, int]:
    return dict(Counter(fold_of.values()))


def folds_disjoint_and_cover(fold_of: Mapping[str, int], train_ids: Sequence[str], n_folds: int) -> tuple[bool, dict[str, Any]]:
    """Every train id in exactly one fold (a mapping is disjoint by construction), none extra,
    and every fold non-empty."""
    ids = {str(i) for i in train_ids}
    missing = ids - set(fold_of)
    extra = set(fold_of) - ids
    sizes = fold_sizes(fold_of)
    bad_folds = [k for k in range(n_folds) if sizes.get(k, 0) == 0]
    out_of_range = sorted({f for f in fold_of.values() if not 0 <= f < n_folds})
    ok = not missing and not extra and not bad_folds and not out_of_range and len(train_ids) == len(ids)
    return ok, {"missing_ids": len(missing), "extra_ids": len(extra), "empty_folds": str(bad_folds),
                "out_of_range_folds": str(out_of_range), "duplicate_train_ids": len(train_ids) - len(ids)}


def folds_stratified(fold_of: Mapping[str, int], train: Any, tol: float = STRATIFY_TOL) -> tuple[bool, dict[str, Any]]:
    """Each fold's argmax-label shares within ``tol`` of the whole table's (StratifiedKFold)."""
    import numpy as np

    y = train[LABELS].to_numpy(dtype=float).argmax(axis=1)
    folds = np.array([fold_of.get(str(i), -1) for i in train["id"]])
    overall = np.bincount(y, minlength=3) / max(len(y), 1)
    worst = 0.0
    for k in sorted(set(folds.tolist())):
        yk = y[folds == k]
        share = np.bincount(yk, minlength=3) / max(len(yk), 1)
        worst = max(worst, float(np.abs(share - overall).max()))
    return worst <= tol, {"max_share_deviation": worst, "tolerance": tol,
                          "overall_shares": [round(float(x), 4) for x in overall]}


def oof_covers_once_per_family(oof: Any, train_ids: Sequence[str], families: Sequence[str]) -> tuple[bool, dict[str, Any]]:
    """The teacher OOF table has each train id exactly once per family (and nothing else)."""
    ids = {str(i) for i in train_ids}
    per: dict[str, dict[str, int]] = {}
    ok = True
    covered = 0
    for fam in families:
        sub = oof[oof["family"] == fam]
        counts = Counter(str(i) for i in sub["id"])
        dup = sum(1 for c in counts.values() if c > 1)
        missing = len(ids - set(counts))
        extra = len(set(counts) - ids)
        covered += len(ids & set(counts))
        per[fam] = {"rows": int(len(sub)), "duplicates": dup, "missing": missing, "extra": extra}
        ok &= dup == 0 and missing == 0 and extra == 0
    unknown = sorted(set(map(str, oof["family"])) - set(families))
    ok &= not unknown
    coverage = covered / max(len(ids) * max(len(families), 1), 1)
    return bool(ok), {"per_family": per, "unknown_families": str(unknown), "coverage": float(coverage)}


def teacher_oof_metrics(oof: Any, train: Any) -> dict[str, float]:
    """Per-family OOF log-loss of the teachers against the train labels (metadata)."""
    from arena_assets.core.metrics import accuracy, log_loss

    lab = train.set_index("id")[LABELS]
    out: dict[str, float] = {}
    for fam, sub in oof.groupby("family"):
        y = lab.loc[sub["id"]].to_numpy(dtype=float)
        p = sub[["p_a", "p_b", "p_tie"]].to_numpy(dtype=float)
        out[f"oof_logloss_{fam}"] = log_loss(y, p)
        out[f"oof_accuracy_{fam}"] = accuracy(y, p)
    return out


def submission_valid(path: str | Path, test_ids: Sequence[str]) -> tuple[bool, dict[str, Any]]:
    """The data contract's validator (core.ensemble): columns, ids equal to the test ids (each
    once), probabilities in [0, 1] summing to 1, no NaN."""
    import pandas as pd

    from arena_assets.core.contract import ContractError
    from arena_assets.core.ensemble import validate_submission

    p = Path(path)
    if not p.exists():
        return False, {"problem": f"{p} does not exist"}
    df = pd.read_csv(p, dtype={"id": str}, keep_default_na=False, na_values=[""])
    try:
        validate_submission(df, [str(i) for i in test_ids], name=p.name)
    except ContractError as e:
        return False, {"rows": int(len(df)), "problem": str(e), "path": str(p)}
    return True, {"rows": int(len(df)), "problem": "none", "path": str(p)}


def class_prior_logloss(train: Any, valid: Any) -> float:
    """Log-loss on the validation fold of the constant model fitted on the fold's train labels."""
    from arena_assets.core.metrics import prior_log_loss

    return float(prior_log_loss(train[LABELS].to_numpy(dtype=float), valid[LABELS].to_numpy(dtype=float)))
