"""Stage: final. Average the fold adapters (step 6a), merge (6b), quantize to 8 bits (7), TTA
inference (8) and the ensemble that is the submission (9)."""

import math
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    asset,
)

from arena_assets.assets import checks as chk
from arena_assets.assets.common import (
    Materialization,
    dir_size_mb,
    md_table,
    other_python,
    read_json,
    step_code_version,
)
from arena_assets.assets.ensemble import needs_fold_submissions
from arena_assets.assets.folds import fold_table
from arena_assets.assets.keys import (
    AVERAGED_LORA,
    FINAL_ENSEMBLE,
    MERGED_MODEL,
    QUANTIZED_MODEL,
    STUDENT_CALIBRATION,
    STUDENT_FOLD_SUBMISSION,
    STUDENT_MODEL,
    TEST_TABLE,
    TRAIN_TABLE,
    TTA_SUBMISSION,
    base_key,
)
from arena_assets.assets.pools import gpu_pool
from arena_assets.core.results import StepResult
from arena_assets.core.settings import Settings
from arena_assets.resources.compute import ComputeResource
from arena_assets.resources.settings import SettingsResource


def averaged_output(res: StepResult) -> Path:
    """What averaging produced: ``adapter/`` (``mean_adapters``) or a merged ``model/``
    (``mean_deltas``); ``merge_adapter`` takes either."""
    return res.path("adapter") if "adapter" in res.paths else res.path("model")


def temperature_method(rule: str, fold_fitted_on: list[Any]) -> str:
    """How the merged model's temperature was obtained, in words (metadata of merged_model and
    tta_submission). The merged model has no held-out rows of its own, so its temperature is a
    rule over the fold temperatures; what makes it fit the TTA submission is that each fold
    temperature was fitted on the kind of logits that submission divides (gpu/calibrate.py)."""
    if rule not in ("mean", "median"):
        return f"T=1 ({rule})"
    kinds = sorted({str(f.get("logits")) if isinstance(f, dict) else "non-TTA (a legacy calibration)"
                    for f in fold_fitted_on})
    lengths = sorted({int(f["max_length"]) for f in fold_fitted_on if isinstance(f, dict) and "max_length" in f})
    at = f" at max_length {'/'.join(map(str, lengths))}" if lengths else ""
    return (f"{rule} of the {len(fold_fitted_on)} fold temperatures, each fitted on the fold model's "
            f"{'/'.join(kinds)} logits of its held-out fold{at}")


def build(settings: Settings, auto: dict[str, Any]) -> list[Any]:
    """final assets for these settings (``auto``: the automation conditions by role)."""
    eager = auto.get("eager")
    cron = auto.get("cron")
    student = settings.student_family
    pool = gpu_pool(settings)
    out: list[Any] = []

    # ------------------------------------------------------------------ average, merge, quantize, TTA
    cv_avg = step_code_version(settings, "average")
    cv_merge = step_code_version(settings, "merge")
    cv_q = step_code_version(settings, "quantize")
    cv_tta = step_code_version(settings, "tta")
    cv_ens = step_code_version(settings, "ensemble")

    @asset(key=AVERAGED_LORA, deps=[STUDENT_MODEL], code_version=cv_avg, group_name="final", pool=pool,
           automation_condition=cron, kinds={"pytorch"},
           description="Step 6a: the fold students' LoRA adapters (and heads) averaged into one adapter.")
    def averaged_lora(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.average import average_adapters

        s = settings.get()
        m = Materialization.begin(context, s, AVERAGED_LORA, None, step="average")
        adapters = [m.read(STUDENT_MODEL, str(k)) / "model" for k in range(s.folds.n_folds)]
        res = compute.run(context, "average", average_adapters, adapters, s.average, out_dir=m.out_dir)
        m.commit()
        return m.result(m.metadata(res, n_adapters=len(adapters), method=s.average.method,
                                   adapter_size_mb=dir_size_mb(averaged_output(res))))

    @asset(key=MERGED_MODEL, deps=[AVERAGED_LORA, base_key(student), STUDENT_CALIBRATION], code_version=cv_merge,
           group_name="final", pool=pool, automation_condition=cron, kinds={"pytorch"},
           description="Step 6b: the averaged adapter merged into the student base (merge_and_unload).")
    def merged_model(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.average import merge_adapter

        s = settings.get()
        m = Materialization.begin(context, s, MERGED_MODEL, None, step="merge")
        m.read(base_key(s.student_family))
        adapter = averaged_output(StepResult.read(m.read(AVERAGED_LORA)))
        fold_cal = [read_json(m.read(STUDENT_CALIBRATION, str(k)) / "calibration.json") for k in range(s.folds.n_folds)]
        temps = [float(c.get("temperature", 1.0)) for c in fold_cal]
        fitted = [c.get("fitted_on") for c in fold_cal]
        res = compute.run(context, "merge", merge_adapter, adapter, temps, s.calibration, out_dir=m.out_dir)
        m.commit()
        cal = read_json(m.out_dir / "calibration.json")
        return m.result(m.metadata(
            res, temperature=float(cal.get("temperature", 1.0)), fold_temperatures=MetadataValue.json(temps),
            temperature_method=MetadataValue.text(temperature_method(str(cal.get("rule", "?")), fitted)),
            model_size_mb=dir_size_mb(res.path("model"))))

    @asset(key=QUANTIZED_MODEL, deps=[MERGED_MODEL, TRAIN_TABLE], code_version=cv_q, group_name="final",
           pool=pool, automation_condition=cron, kinds={"pytorch"},
           description="Step 7: 8-bit quantization, GPTQ first, bitsandbytes int8 as the recorded fallback.")
    def quantized_model(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.quantize import quant_python, quantize

        s = settings.get()
        m = Materialization.begin(context, s, QUANTIZED_MODEL, None, step="quantize")
        model = m.read(MERGED_MODEL) / "model"
        calib = m.read(TRAIN_TABLE) / "table.parquet"
        py = other_python(quant_python(s.quant)) if "gptq" in s.quant.methods else None
        res = compute.run(context, "quantize", quantize, model, s.quant, s.fmt, calib, out_dir=m.out_dir, python=py)
        m.commit()
        q = read_json(m.out_dir / "quantization.json")
        return m.result(m.metadata(
            res, method=str(q.get("method")), fallback_reason=str(q.get("fallback_reason") or ""),
            quant_python=py or "this interpreter",
            quantized_path=MetadataValue.path(str(res.path("model"))),
            model_size_mb=dir_size_mb(res.path("model"))))

    @asset(key=TTA_SUBMISSION, deps=[QUANTIZED_MODEL, MERGED_MODEL, TEST_TABLE, STUDENT_CALIBRATION],
           code_version=cv_tta, group_name="final", pool=pool, automation_condition=cron, kinds={"csv"},
           check_specs=[AssetCheckSpec("submission_valid", asset=TTA_SUBMISSION, blocking=True,
                                       description="Columns, ids equal the test ids, rows sum to 1, no NaN.")],
           description="Step 8: test predictions of the quantized model, original + A/B-swapped (TTA).")
    def tta_submission(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.core import contract
        from arena_assets.gpu.predict import tta_submission as tta
        from arena_assets.gpu.quantize import quant_python

        s = settings.get()
        m = Materialization.begin(context, s, TTA_SUBMISSION, None, step="tta")
        qdir = m.read(QUANTIZED_MODEL)
        cal = m.read(MERGED_MODEL) / "calibration.json"
        fitted = [read_json(m.read(STUDENT_CALIBRATION, str(k)) / "calibration.json").get("fitted_on")
                  for k in range(s.folds.n_folds)]
        test = m.read(TEST_TABLE) / "table.parquet"
        method = str(read_json(qdir / "quantization.json").get("method"))
        py = other_python(quant_python(s.quant)) if method == "gptq" else None
        res = compute.run(context, "tta", tta, qdir / "model", cal, s.fmt, s.infer, test, out_dir=m.out_dir, python=py)
        sub = m.out_dir / "submission.csv"
        ok, d = chk.submission_valid(sub, contract.read_table(test)["id"].tolist())
        checks = [AssetCheckResult(check_name="submission_valid", passed=ok, metadata=d)]
        m.commit(checks=checks)
        cal_json = read_json(cal)
        return m.result(
            m.metadata(res, quant_method=method, tta=s.infer.tta, submission=MetadataValue.path(str(sub)),
                       temperature_method=MetadataValue.text(
                           temperature_method(str(cal_json.get("rule", "?")), fitted)
                           + ("" if s.infer.apply_calibration else " (not applied: infer.apply_calibration is false)"))),
            checks)

    # The deps follow ensemble.mode (the graph is built from the settings when definitions load):
    # `merged` needs no fold submission, so it never waits for five full-test fold inferences;
    # the per-fold CV table comes from student_calibration in every mode; the TTA submission is
    # the merged/blend source and the fold modes' fallback (the seed's step 9).
    ens_deps = [TTA_SUBMISSION, STUDENT_CALIBRATION, TEST_TABLE, TRAIN_TABLE]
    if needs_fold_submissions(settings.ensemble):
        ens_deps.insert(1, STUDENT_FOLD_SUBMISSION)

    @asset(key=FINAL_ENSEMBLE, deps=ens_deps,
           code_version=cv_ens, group_name="final", automation_condition=eager, kinds={"csv"},
           check_specs=[AssetCheckSpec("submission_valid", asset=FINAL_ENSEMBLE, blocking=True,
                                       description="Columns, ids equal the test ids, rows sum to 1, no NaN.")],
           description="Step 9: the submission (folds_mean | folds_cv_weighted | merged | blend); per-fold CV "
                       "from student_calibration; the fold modes fall back to the TTA submission when fold "
                       "submissions are missing.")
    def final_ensemble(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
        from dagster import Failure

        from arena_assets.assets.ensemble import build_ensemble
        from arena_assets.core import contract

        s = settings.get()
        m = Materialization.begin(context, s, FINAL_ENSEMBLE, None, step="ensemble")
        cv_dirs = {k: m.read(STUDENT_CALIBRATION, str(k)) for k in range(s.folds.n_folds)}

        def read_or_none(key: Any, partition: str | None = None) -> Path | None:
            try:
                return m.read(key, partition)
            except Failure as e:  # not materialized: the fallback decides (build_ensemble)
                context.log.warning(f"{key.to_user_string()}{'' if partition is None else f'[{partition}]'}: "
                                    f"{e.description}")
                return None

        folds: dict[int, Path | None] = {}
        if needs_fold_submissions(s.ensemble):
            folds = {k: read_or_none(STUDENT_FOLD_SUBMISSION, str(k)) for k in range(s.folds.n_folds)}
        tta_dir = read_or_none(TTA_SUBMISSION)
        test = m.read(TEST_TABLE) / "table.parquet"
        train = m.read(TRAIN_TABLE) / "table.parquet"
        info = build_ensemble(s.ensemble, cv_dirs, folds, tta_dir, train, m.out_dir)
        if info.get("fallback"):
            context.log.warning(info["fallback"])
        sub = m.out_dir / "submission.csv"
        ok, d = chk.submission_valid(sub, contract.read_table(test)["id"].tolist())
        checks = [AssetCheckResult(check_name="submission_valid", passed=ok, metadata=d)]
        m.commit({"sources": info["sources"], "weights": info["weights"], "fallback": info.get("fallback")},
                 checks=checks)
        rows = [(k, info["fold_logloss_raw"].get(k, float("nan")), info["fold_logloss"].get(k, float("nan")),
                 info["fold_accuracy"].get(k, float("nan"))) for k in sorted(info["fold_logloss"])]
        table = md_table(["fold", "cv_logloss_raw", "cv_logloss", "accuracy"], rows)
        table += "\n\nCV log-losses: student_calibration (TTA logits of each fold's held-out rows)."
        src = md_table(["source", "weight"], [(a, float(w)) for a, w in zip(info["sources"], info["weights"])])
        md = m.metadata(
            mode=s.ensemble.mode, submission=MetadataValue.path(str(sub)),
            per_fold=MetadataValue.md(f"### Per-fold CV log-loss\n\n{table}\n\n### Sources\n\n{src}"),
            sources=MetadataValue.json(info["sources"]), weights=MetadataValue.json(info["weights"]),
            mean_cv_logloss=float(info["mean_cv_logloss"]),
            fold_logloss_se=MetadataValue.json({str(k): (None if math.isnan(v) else v)  # no SE recorded: null
                                                for k, v in info["fold_logloss_se"].items()}),
            fallback=MetadataValue.text(info.get("fallback") or "none"),
            per_fold_table=fold_table(
                [("cv_logloss_raw", "float"), ("cv_logloss", "float"), ("accuracy", "float")],
                {int(k): (float(a), float(b), float(c)) for k, a, b, c in rows}),
        )
        if d.get("rows") is not None:
            md["dagster/row_count"] = int(d["rows"])  # the submission's rows (one per test id)
        if info.get("oof_logloss") is not None:
            md["oof_logloss"] = float(info["oof_logloss"])
        # --- plots (assets/plots.py): per-fold CV log-loss chart and inline text bars
        from arena_assets.assets.plots import cv_logloss_metadata

        md.update(cv_logloss_metadata(info["fold_logloss"], info.get("fold_logloss_raw")))
        # --- end plots
        return m.result(md, checks)

    out += [averaged_lora, merged_model, quantized_model, tta_submission, final_ensemble]
    return out
