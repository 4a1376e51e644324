"""Stage: students. Per fold: the distilled student (step 5), the CE-only baseline, the
temperature calibration (fitted on the fold model's TTA logits of its held-out rows, so it runs
the model: a GPU-pool step, ``compute.needs.calibration``; it also gives the fold's CV log-loss
table that ``final_ensemble`` reads) and the fold's test submission with its CV log-loss."""

from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
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
    fold_of,
    fold_tables,
    read_json,
    step_code_version,
)
from arena_assets.assets.keys import (
    BASELINE_STUDENT,
    FOLD_BACKFILL,
    FOLD_DATA,
    STUDENT_CALIBRATION,
    STUDENT_FOLD_SUBMISSION,
    STUDENT_MODEL,
    TEACHER_OOF,
    TEST_TABLE,
    base_key,
    fold_partitions,
)
from arena_assets.assets.pools import gpu_pool
from arena_assets.core.settings import Settings
from arena_assets.resources.compute import ComputeResource
from arena_assets.resources.settings import SettingsResource


def build(settings: Settings, auto: dict[str, Any]) -> list[Any]:
    """students assets for these settings (``auto``: the automation conditions by role)."""
    parts = fold_partitions(settings)
    cron = auto.get("cron")
    student = settings.student_family
    pool = gpu_pool(settings)
    out: list[Any] = []

    # ------------------------------------------------------------------ student per fold
    cv_s = step_code_version(settings, "student")
    cv_b = step_code_version(settings, "baseline")
    cv_c = step_code_version(settings, "calibration")
    cv_p = step_code_version(settings, "predict")

    @asset(key=STUDENT_MODEL, deps=[FOLD_DATA, TEACHER_OOF, base_key(student)], partitions_def=parts, backfill_policy=FOLD_BACKFILL,
           code_version=cv_s, group_name="student", pool=pool, automation_condition=cron, kinds={"pytorch"},
           description="Step 5: the student (LoRA) distilled from the teachers' OOF probabilities, one fold.")
    def student_model(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.train import train_student

        s = settings.get()
        k = fold_of(context)
        m = Materialization.begin(context, s, STUDENT_MODEL, str(k), step="student")
        tr, va = fold_tables(m, k)
        base = m.read(base_key(s.student_family)) / "model"
        toof = m.read(TEACHER_OOF) / "teacher_oof.parquet"
        res = compute.run(context, "student", train_student, base, s.student, s.fmt, tr, va, toof, out_dir=m.out_dir,
                          checkpoint_dir=m.checkpoint_dir("student"))
        m.commit()
        return m.result(m.metadata(
            res, fold=k, kd_alpha=s.student.kd.alpha, kd_temperature=s.student.kd.temperature,
            adapter_size_mb=dir_size_mb(res.path("model"))))

    @asset(key=BASELINE_STUDENT, deps=[FOLD_DATA, base_key(student)], partitions_def=parts, backfill_policy=FOLD_BACKFILL, code_version=cv_b,
           group_name="student", pool=pool, automation_condition=cron, kinds={"pytorch"},
           description="The CE-only student (the seed's job.sh): the same training without distillation.")
    def baseline_student(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.train import train_student

        s = settings.get()
        k = fold_of(context)
        m = Materialization.begin(context, s, BASELINE_STUDENT, str(k), step="baseline")
        tr, va = fold_tables(m, k)
        base = m.read(base_key(s.student_family)) / "model"
        res = compute.run(context, "student", train_student, base, s.baseline, s.fmt, tr, va, None, out_dir=m.out_dir,
                          checkpoint_dir=m.checkpoint_dir("baseline"))
        m.commit()
        return m.result(m.metadata(res, fold=k, adapter_size_mb=dir_size_mb(res.path("model"))))

    @asset(key=STUDENT_CALIBRATION, deps=[STUDENT_MODEL, FOLD_DATA], partitions_def=parts, backfill_policy=FOLD_BACKFILL, code_version=cv_c,
           group_name="student", pool=pool, automation_condition=cron, kinds={"pytorch", "json"},
           description="Temperature scaling (LBFGS) fitted on the fold model's TTA logits of its held-out rows "
                       "(the logits the submissions divide by it); the fold's CV log-loss on them.")
    def student_calibration(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.calibrate import calibrate

        s = settings.get()
        k = fold_of(context)
        m = Materialization.begin(context, s, STUDENT_CALIBRATION, str(k), step="calibration")
        _, va = fold_tables(m, k)
        model = m.read(STUDENT_MODEL, str(k)) / "model"
        # runs the fold model (TTA over the held-out rows, as the submissions do): a GPU step
        res = compute.run(context, "calibration", calibrate, model, s.fmt, s.infer, va, s.calibration, out_dir=m.out_dir)
        m.commit()
        cal = read_json(m.out_dir / "calibration.json")
        fitted = cal.get("fitted_on", {})
        # --- plots (assets/plots.py): this fold's reliability diagram, before/after the temperature
        from arena_assets.assets.plots import reliability_metadata

        rel = reliability_metadata(res.path("oof"), va, float(cal.get("temperature", 1.0)), title=f"student fold {k}")
        # --- end plots
        return m.result(m.metadata(
            res, fold=k, temperature=float(cal.get("temperature", 1.0)),
            nll_before=float(cal.get("nll_before", float("nan"))), nll_after=float(cal.get("nll_after", float("nan"))),
            fitted_on=MetadataValue.text(
                f"{fitted.get('logits', '?')} logits of the {fitted.get('rows', '?')} held-out rows at "
                f"max_length {fitted.get('max_length', '?')} (the logits the fold and TTA submissions divide by T)"),
            **rel))

    @asset(key=STUDENT_FOLD_SUBMISSION, deps=[STUDENT_MODEL, STUDENT_CALIBRATION, FOLD_DATA, TEST_TABLE],
           partitions_def=parts, backfill_policy=FOLD_BACKFILL, code_version=cv_p, group_name="student", pool=pool,
           automation_condition=cron, kinds={"csv"},
           check_specs=[
               AssetCheckSpec("submission_valid", asset=STUDENT_FOLD_SUBMISSION, blocking=True, partitions_def=parts,
                              description="Columns, ids equal the test ids, rows sum to 1, no NaN."),
               AssetCheckSpec("beats_class_prior", asset=STUDENT_FOLD_SUBMISSION, blocking=False, partitions_def=parts,
                              description="Calibrated fold log-loss below the class-prior log-loss (warning)."),
           ],
           description="One fold's test predictions, OOF predictions and CV log-loss (before/after calibration).")
    def student_fold_submission(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.core import contract
        from arena_assets.gpu.predict import fold_submission

        s = settings.get()
        k = fold_of(context)
        m = Materialization.begin(context, s, STUDENT_FOLD_SUBMISSION, str(k), step="predict")
        tr, va = fold_tables(m, k)
        model = m.read(STUDENT_MODEL, str(k)) / "model"
        cal = m.read(STUDENT_CALIBRATION, str(k)) / "calibration.json"
        test = m.read(TEST_TABLE) / "table.parquet"
        res = compute.run(context, "predict", fold_submission, model, cal, s.fmt, s.infer, va, test, out_dir=m.out_dir)
        sub = m.out_dir / "submission.csv"
        test_ids = contract.read_table(test)["id"].tolist()
        ok, d = chk.submission_valid(sub, test_ids)
        prior = chk.class_prior_logloss(contract.read_table(tr), contract.read_table(va))
        cv = float(res.metrics.get("cv_logloss", float("nan")))
        checks = [
            AssetCheckResult(check_name="submission_valid", passed=ok, metadata=d),
            AssetCheckResult(check_name="beats_class_prior", passed=bool(cv < prior),
                             severity=AssetCheckSeverity.WARN,
                             metadata={"cv_logloss": cv, "class_prior_logloss": prior}),
        ]
        m.commit(checks=checks)
        return m.result(
            m.metadata(res, fold=k, class_prior_logloss=prior, submission=MetadataValue.path(str(sub))), checks)

    out += [student_model, baseline_student, student_calibration, student_fold_submission]
    return out
