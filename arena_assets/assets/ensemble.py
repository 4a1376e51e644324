"""Step 9, the final submission, from the fold submissions and the TTA submission.

CPU-only and cheap, so it runs in the orchestrator (never a Slurm job). Modes (settings
``ensemble.mode``): ``folds_mean`` (the seed's step 9), ``folds_cv_weighted`` (weights from the
folds' CV log-losses), ``merged`` (the averaged-merged-quantized model's TTA submission, the 1st
place's final) and ``blend``. The returned info names the sources and weights (metadata).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from arena_assets.core.settings import EnsembleSettings


def build_ensemble(cfg: EnsembleSettings, fold_dirs: dict[int, Path], tta_dir: Path, train_table: Path,
                   out_dir: Path) -> dict[str, Any]:
    """Write ``submission.csv`` (+ ``ensemble.json``) into the new version ``out_dir`` (staged)."""
    import pandas as pd

    from arena_assets.core import contract, ensemble, metrics
    from arena_assets.core.artifacts import atomic_write_json, staged_dir
    from arena_assets.core.results import StepResult

    folds = sorted(fold_dirs)
    results = {k: StepResult.read(fold_dirs[k]) for k in folds}
    ll = {k: float(results[k].metrics.get("cv_logloss", float("nan"))) for k in folds}
    ll_raw = {k: float(results[k].metrics.get("cv_logloss_raw", float("nan"))) for k in folds}
    acc = {k: float(results[k].metrics.get("cv_accuracy", float("nan"))) for k in folds}
    fold_subs = [ensemble.read_submission(fold_dirs[k] / "submission.csv") for k in folds]
    tta_sub = ensemble.read_submission(Path(tta_dir) / "submission.csv")
    fold_names = [f"student_fold_submission[{k}]" for k in folds]

    if cfg.mode == "folds_mean":
        sources, weights = fold_names, [1.0 / len(folds)] * len(folds)
        sub = ensemble.combine_submissions(fold_subs, weights)
    elif cfg.mode == "folds_cv_weighted":
        sources, weights = fold_names, ensemble.cv_weights([ll[k] for k in folds], cfg.cv_weight_tau)
        sub = ensemble.combine_submissions(fold_subs, weights)
    elif cfg.mode == "merged":
        sources, weights = ["tta_submission"], [1.0]
        sub = tta_sub
    elif cfg.mode == "blend":
        bw = float(cfg.blend_weight)
        sources = ["tta_submission", *fold_names]
        weights = [bw] + [(1.0 - bw) / len(folds)] * len(folds)
        sub = ensemble.combine_submissions([tta_sub, *fold_subs], weights)
    else:  # pragma: no cover - pydantic validates the mode
        raise ValueError(f"unknown ensemble mode {cfg.mode!r}")

    # The folds' pooled out-of-fold predictions, scored against the train labels: one CV number
    # for the fold models as a whole (the merged model has no out-of-fold predictions).
    oof_ll = None
    oof_paths = [fold_dirs[k] / "oof.parquet" for k in folds]
    if all(p.exists() for p in oof_paths):
        oof = pd.concat([pd.read_parquet(p) for p in oof_paths], ignore_index=True)
        train = contract.read_table(train_table).set_index("id")
        y = train.loc[oof["id"].astype(str), contract.LABEL_COLS].to_numpy(dtype=float)
        oof_ll = metrics.log_loss(y, oof[["p_a", "p_b", "p_tie"]].to_numpy(dtype=float))

    info: dict[str, Any] = {
        "mode": cfg.mode, "sources": sources, "weights": [float(w) for w in weights],
        "fold_logloss": ll, "fold_logloss_raw": ll_raw, "fold_accuracy": acc,
        "mean_cv_logloss": float(sum(ll.values()) / len(ll)), "oof_logloss": oof_ll,
    }
    with staged_dir(out_dir) as tmp:
        ensemble.write_submission(sub, tmp / "submission.csv")
        atomic_write_json(tmp / "ensemble.json", json.loads(json.dumps(info, default=str)))
    return info
