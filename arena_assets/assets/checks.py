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
SUB_COLS = ["id", *LABELS]
STRATIFY_TOL = 0.05


def fold_of_ids(folds: Any) -> dict[str, int]:
    """Normalize a fold assignment (what ``core.folds.read_folds`` returns) to ``{id: fold}``.

    Accepts ``{id: fold}``, ``{fold: [ids]}``, an object with ``.fold_of`` / ``.folds`` / ``.ids``,
    or a DataFrame with ``id`` and ``fold`` columns.
    """
    if hasattr(folds, "columns") and "id" in folds.columns and "fold" in folds.columns:
        return {str(i): int(f) for i, f in zip(folds["id"], folds["fold"])}
    for attr in ("fold_of", "assignment"):
        if hasattr(folds, attr):
            return fold_of_ids(getattr(folds, attr))
    if isinstance(folds, Mapping):
        if "fold_of" in folds:
            return fold_of_ids(folds["fold_of"])
        if "ids" in folds and "folds" in folds:
            return {str(i): int(f) for i, f in zip(folds["ids"], folds["folds"])}
        if "folds" in folds:
            return fold_of_ids(folds["folds"])
        vals = list(folds.values())
        if vals and isinstance(vals[0], (list, tuple)):
            out: dict[str, int] = {}
            dup: list[str] = []
            for f, ids in folds.items():
                for i in ids:
                    if str(i) in out:
                        dup.append(str(i))
                    out[str(i)] = int(f)
            if dup:
                raise ValueError(f"{len(dup)} ids in more than one fold, e.g. {dup[:3]}")
            return out
        return {str(i): int(f) for i, f in folds.items()}
    if isinstance(folds, (list, tuple)):  # list of id lists, index = fold
        return fold_of_ids({k: ids for k, ids in enumerate(folds)})
    raise TypeError(f"cannot read a fold assignment from {type(folds).__name__}")


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
    """Columns, ids equal to the test ids (each once), rows sum to 1, no NaN, probabilities in [0, 1]."""
    import numpy as np
    import pandas as pd

    p = Path(path)
    if not p.exists():
        return False, {"error": f"{p} does not exist"}
    df = pd.read_csv(p, dtype={"id": str})
    problems: list[str] = []
    if list(df.columns) != SUB_COLS:
        problems.append(f"columns {list(df.columns)} != {SUB_COLS}")
    else:
        ids = df["id"].astype(str).tolist()
        if len(ids) != len(set(ids)):
            problems.append("duplicate ids")
        if set(ids) != {str(i) for i in test_ids}:
            problems.append(f"ids differ from the test ids ({len(set(ids) ^ {str(i) for i in test_ids})} differ)")
        v = df[LABELS].to_numpy(dtype=float)
        if np.isnan(v).any():
            problems.append("NaN probabilities")
        elif (v < 0).any() or (v > 1).any():
            problems.append("probabilities outside [0, 1]")
        elif not np.allclose(v.sum(axis=1), 1.0, atol=1e-4):
            problems.append(f"rows do not sum to 1 (max deviation {float(np.abs(v.sum(axis=1) - 1).max()):.2e})")
    try:  # the data contract's own validator, when it has one, must agree
        from arena_assets.core import ensemble as core_ensemble

        errs = core_ensemble.validate_submission(df, list(test_ids))
        if errs:
            problems += [str(e) for e in (errs if isinstance(errs, (list, tuple)) else [errs])]
    except (ImportError, AttributeError):
        pass
    except (ValueError, AssertionError) as e:
        problems.append(str(e))
    return not problems, {"rows": int(len(df)), "problems": "; ".join(problems) or "none", "path": str(p)}


def class_prior_logloss(train: Any, valid: Any) -> float:
    """Log-loss on the validation fold of the constant model fitted on the fold's train labels."""
    from arena_assets.core.metrics import prior_log_loss

    return float(prior_log_loss(train[LABELS].to_numpy(dtype=float), valid[LABELS].to_numpy(dtype=float)))
