"""Step 9, the final submission, from the fold submissions and the TTA submission.

CPU-only and cheap, so it runs in the orchestrator (never a Slurm job). Modes (settings
``ensemble.mode``): ``folds_mean`` (the seed's step 9), ``folds_cv_weighted`` (weights from the
folds' CV log-losses and their standard errors, core/ensemble.py), ``merged`` (the
averaged-merged-quantized model's TTA submission, the 1st place's final) and ``blend``. The
returned info names the sources and weights (metadata).

* **The per-fold CV table** (``fold_logloss``, ``fold_logloss_raw``, ``fold_accuracy``,
  ``fold_logloss_se``, pooled ``oof_logloss``) comes from ``student_calibration``
  (``cv_dirs``): its step computes the fold model's TTA logits of the held-out rows, the logits
  the submissions use, and scores them. So ``merged`` mode reads no fold submission at all, and
  ``final_ensemble`` depends on ``student_fold_submission`` only in the modes that combine them
  (assets/final.py builds its deps from the settings).
* **The seed's fallback**: in a fold mode, when a fold's submission is missing (``fold_dirs``
  maps it to None or its ``submission.csv`` is absent), the TTA submission is used alone and
  ``fallback`` says so (info, ``ensemble.json``, metadata).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from arena_assets.core.settings import EnsembleSettings

FOLD_MODES = ("folds_mean", "folds_cv_weighted", "blend")
"""Modes that combine the fold submissions (``merged`` reads none)."""


def needs_fold_submissions(cfg: EnsembleSettings) -> bool:
    """Does this mode combine the per-fold test submissions (final_ensemble's deps follow it)?"""
    return cfg.mode in FOLD_MODES


def build_ensemble(cfg: EnsembleSettings, cv_dirs: Mapping[int, Path], fold_dirs: Mapping[int, Path | None] | None,
                   tta_dir: Path | None, train_table: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``submission.csv`` (+ ``ensemble.json``) into the new version ``out_dir`` (staged).

    ``cv_dirs``: each fold's ``student_calibration`` version (its result metrics and TTA
    ``oof.parquet``); ``fold_dirs``: each fold's ``student_fold_submission`` version (None:
    missing; not read in ``merged`` mode); ``tta_dir``: the ``tta_submission`` version (needed by
    ``merged``/``blend`` and by the fallback)."""
    import pandas as pd

    from arena_assets.core import contract, ensemble, metrics
    from arena_assets.core.artifacts import atomic_write_json, staged_dir
    from arena_assets.core.results import StepResult

    folds = sorted(cv_dirs)
    results = {k: StepResult.read(cv_dirs[k]) for k in folds}

    def metric(k: int, name: str) -> float:
        return float(results[k].metrics.get(name, float("nan")))

    ll = {k: metric(k, "cv_logloss") for k in folds}
    ll_raw = {k: metric(k, "cv_logloss_raw") for k in folds}
    acc = {k: metric(k, "cv_accuracy") for k in folds}
    se = {k: metric(k, "cv_logloss_se") for k in folds}
    fold_names = [f"student_fold_submission[{k}]" for k in folds]

    def tta_sub() -> Any:
        if tta_dir is None or not (Path(tta_dir) / "submission.csv").exists():
            raise FileNotFoundError(f"mode {cfg.mode}: the TTA submission is missing ({tta_dir})")
        return ensemble.read_submission(Path(tta_dir) / "submission.csv")

    fallback = None
    fold_subs: list[Any] = []
    if needs_fold_submissions(cfg):
        fd = dict(fold_dirs or {})
        missing = [k for k in folds if fd.get(k) is None or not (Path(fd[k]) / "submission.csv").exists()]
        if missing:
            fallback = (f"fold submissions missing for folds {missing}: the TTA submission (tta_submission) "
                        f"is used alone instead of {cfg.mode} (the seed's step-9 fallback)")
        else:
            fold_subs = [ensemble.read_submission(Path(fd[k]) / "submission.csv") for k in folds]

    if fallback is not None or cfg.mode == "merged":
        sources, weights = ["tta_submission"], [1.0]
        sub = tta_sub()
    elif cfg.mode == "folds_mean":
        sources, weights = fold_names, [1.0 / len(folds)] * len(folds)
        sub = ensemble.combine_submissions(fold_subs, weights)
    elif cfg.mode == "folds_cv_weighted":
        sources = fold_names
        weights = ensemble.cv_weights([ll[k] for k in folds], [se[k] for k in folds], z=cfg.cv_weight_z,
                                      max_ratio=cfg.cv_weight_max_ratio)
        sub = ensemble.combine_submissions(fold_subs, weights)
    elif cfg.mode == "blend":
        bw = float(cfg.blend_weight)
        sources = ["tta_submission", *fold_names]
        weights = [bw] + [(1.0 - bw) / len(folds)] * len(folds)
        sub = ensemble.combine_submissions([tta_sub(), *fold_subs], weights)
    else:  # pragma: no cover - pydantic validates the mode
        raise ValueError(f"unknown ensemble mode {cfg.mode!r}")

    # The folds' pooled out-of-fold predictions (calibrated TTA, from the calibration step),
    # scored against the train labels: one CV number for the fold models as a whole (the merged
    # model has no out-of-fold predictions).
    oof_ll = None
    oof_paths = [Path(cv_dirs[k]) / "oof.parquet" for k in folds]
    if all(p.exists() for p in oof_paths):
        oof = pd.concat([pd.read_parquet(p) for p in oof_paths], ignore_index=True)
        train = contract.read_table(train_table).set_index("id")
        y = train.loc[oof["id"].astype(str), contract.LABEL_COLS].to_numpy(dtype=float)
        oof_ll = metrics.log_loss(y, oof[["p_a", "p_b", "p_tie"]].to_numpy(dtype=float))

    info: dict[str, Any] = {
        "mode": cfg.mode, "sources": sources, "weights": [float(w) for w in weights], "fallback": fallback,
        "cv_source": "student_calibration (TTA logits of each fold's held-out rows)",
        "fold_logloss": ll, "fold_logloss_raw": ll_raw, "fold_accuracy": acc, "fold_logloss_se": se,
        "mean_cv_logloss": float(sum(ll.values()) / len(ll)), "oof_logloss": oof_ll,
    }
    with staged_dir(out_dir) as tmp:
        ensemble.write_submission(sub, tmp / "submission.csv")
        atomic_write_json(tmp / "ensemble.json", json.loads(json.dumps(info, default=str)))
    return info
