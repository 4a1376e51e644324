"""The recipe as software-defined assets, built from the settings read when definitions load.

Model families come from the settings: each teacher family gets ``<family>/teacher_model`` and
``<family>/teacher_oof_probs``, every family its ``<family>/post_pretrained_base``; the student's
assets have no prefix. Per-fold assets share one static partitions definition (``"0".."n-1"``).
Each asset body is thin: read upstream ``latest`` versions, call a step through the compute
resource (or core/ for tables, folds and ensembles), commit the version, return metadata.
Heavy modules (torch, transformers, peft, pandas) are imported inside the bodies only, so loading
the code location stays fast.
"""

import warnings
from pathlib import Path
from typing import Any

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AssetsDefinition,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    ObserveResult,
    SourceAsset,
    StaticPartitionsDefinition,
    asset,
    observable_source_asset,
)

from arena_assets.assets import checks as chk
from arena_assets.assets.common import Materialization, dir_size_mb, md_table, step_code_version
from arena_assets.core.settings import Settings, settings_hash
from arena_assets.resources.compute import ComputeResource
from arena_assets.resources.settings import SettingsResource

# Beta/preview APIs used on purpose: observable sources (file hash = data version) and
# partitioned check specs (one check result per fold).
warnings.filterwarnings("ignore", message=".*observable_source_asset.*")
warnings.filterwarnings("ignore", message=".*partitions_def on an AssetCheckSpec.*")

GPU_POOL = "gpu"
TABLES_VERSION = settings_hash({"step": "tables", "contract": 1})

RAW_TRAIN = AssetKey("raw_train_csv")
RAW_TEST = AssetKey("raw_test_csv")
RAW_EXTERNAL = AssetKey("raw_external")
TRAIN_TABLE = AssetKey("train_table")
TEST_TABLE = AssetKey("test_table")
EXTERNAL_PAIRS = AssetKey("external_pairs")
FOLD_ASSIGNMENTS = AssetKey("fold_assignments")
FOLD_DATA = AssetKey("fold_data")
TEACHER_OOF = AssetKey("teacher_oof")
STUDENT_MODEL = AssetKey("student_model")
BASELINE_STUDENT = AssetKey("baseline_student")
STUDENT_CALIBRATION = AssetKey("student_calibration")
STUDENT_FOLD_SUBMISSION = AssetKey("student_fold_submission")
AVERAGED_LORA = AssetKey("averaged_lora")
MERGED_MODEL = AssetKey("merged_model")
QUANTIZED_MODEL = AssetKey("quantized_model")
TTA_SUBMISSION = AssetKey("tta_submission")
FINAL_ENSEMBLE = AssetKey("final_ensemble")


def base_key(family: str) -> AssetKey:
    return AssetKey([family, "post_pretrained_base"])


def teacher_key(family: str) -> AssetKey:
    return AssetKey([family, "teacher_model"])


def teacher_probs_key(family: str) -> AssetKey:
    return AssetKey([family, "teacher_oof_probs"])


def fold_partitions(settings: Settings) -> StaticPartitionsDefinition:
    """The one partitions definition of every per-fold asset."""
    return StaticPartitionsDefinition([str(k) for k in range(settings.folds.n_folds)])


def _fold(context: AssetExecutionContext) -> int:
    return int(context.partition_key)


def _fold_tables(m: Materialization, fold: int) -> tuple[Path, Path]:
    v = m.read(FOLD_DATA, str(fold))
    return v / "train.parquet", v / "valid.parquet"


def build_recipe_assets(settings: Settings, automation: dict[str, Any] | None = None) -> list[AssetsDefinition | SourceAsset]:
    """Every asset of the recipe for these settings (families, folds, code versions)."""
    parts = fold_partitions(settings)
    auto = automation or {}
    student = settings.student_family
    out: list[AssetsDefinition | SourceAsset] = []

    # ------------------------------------------------------------------ raw sources
    def raw_source(key: AssetKey, attr: str, description: str) -> SourceAsset:

        @observable_source_asset(key=key, description=description, group_name="inputs",
                                 automation_condition=auto.get("observe"))
        def _observe(context, settings: SettingsResource) -> ObserveResult:  # type: ignore[no-untyped-def]
            from arena_assets.core.artifacts import file_sha256

            s = settings.get()
            path = s.resolve(getattr(s.data, attr))
            if path is None or not path.exists():
                return ObserveResult(data_version=DataVersion("absent"),
                                     metadata={"path": str(path), "exists": False})
            return ObserveResult(
                data_version=DataVersion(file_sha256(path)),
                metadata={"path": MetadataValue.path(str(path)), "exists": True,
                          "size_bytes": path.stat().st_size},
            )

        return _observe

    out += [
        raw_source(RAW_TRAIN, "train_csv", "The competition's train.csv (data version = file hash)."),
        raw_source(RAW_TEST, "test_csv", "The competition's test.csv (data version = file hash)."),
        raw_source(RAW_EXTERNAL, "external", "External preference pairs for post-pretraining and teachers."),
    ]
    eager = auto.get("eager")
    cron = auto.get("cron")

    # ------------------------------------------------------------------ tables
    def table_asset(key: AssetKey, raw: AssetKey, attr: str, reader: str, check_name: str) -> AssetsDefinition:
        @asset(key=key, deps=[raw], code_version=TABLES_VERSION, group_name="data", kinds={"parquet"},
               automation_condition=eager,
               description=f"The normalized {attr} table (data contract, parquet).")
        def _table(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
            import pandas as pd

            from arena_assets.core import contract
            from arena_assets.core.artifacts import file_sha256, staged_dir

            s = settings.get()
            m = Materialization.begin(s, key, None, TABLES_VERSION)
            src = s.resolve(getattr(s.data, attr))
            if src is not None and src.exists():
                df = getattr(contract, reader)(src)
                m.inputs[raw.to_user_string()] = str(src)
                src_hash = file_sha256(src)
            elif reader == "read_external":
                df = pd.DataFrame({c: pd.Series(dtype=object) for c in contract.EXTERNAL_COLS})
                src_hash = "absent"
            else:
                from dagster import Failure

                raise Failure(description=f"input file {src} does not exist")
            with staged_dir(m.out_dir) as tmp:
                contract.write_table(df, tmp / "table.parquet")
            summ = contract.summarize(df)
            m.commit({"source_sha256": src_hash})
            md = m.metadata(
                rows=int(len(df)), source_sha256=src_hash,
                path=MetadataValue.path(str(m.out_dir / "table.parquet")),
                summary=MetadataValue.json(summ),
            )
            for c, v in (summ.get("label_mean") or {}).items():
                md[f"label_mean_{c}"] = float(v)
            return MaterializeResult(metadata=md)

        return _table

    out += [
        table_asset(TRAIN_TABLE, RAW_TRAIN, "train_csv", "read_train", "train"),
        table_asset(TEST_TABLE, RAW_TEST, "test_csv", "read_test", "test"),
        table_asset(EXTERNAL_PAIRS, RAW_EXTERNAL, "external", "read_external", "external"),
    ]

    # ------------------------------------------------------------------ folds
    folds_cv = step_code_version(settings, "folds")

    @asset(key=FOLD_ASSIGNMENTS, deps=[TRAIN_TABLE], code_version=folds_cv, group_name="data",
           automation_condition=eager, kinds={"json"},
           check_specs=[AssetCheckSpec("folds_disjoint_and_cover", asset=FOLD_ASSIGNMENTS, blocking=True,
                                       description="Every train id in exactly one fold."),
                        AssetCheckSpec("folds_stratified", asset=FOLD_ASSIGNMENTS, blocking=True,
                                       description="Each fold's label balance is within 5 points of the whole.")],
           description="Stratified K-fold assignment (scikit-learn), the seed's folds_<n>_seed<s>.json.")
    def fold_assignments(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
        from arena_assets.core import contract, folds
        from arena_assets.core.artifacts import staged_dir

        s = settings.get()
        m = Materialization.begin(s, FOLD_ASSIGNMENTS, None, folds_cv)
        train = contract.read_table(m.read(TRAIN_TABLE) / "table.parquet")
        assignment = folds.make_folds(train, s.folds.n_folds, s.folds.seed, s.folds.group_by_prompt)
        name = folds.folds_filename(s.folds.n_folds, s.folds.seed)
        with staged_dir(m.out_dir) as tmp:
            folds.write_folds(assignment, tmp / name)
        m.commit()
        fold_of = chk.fold_of_ids(folds.read_folds(m.out_dir / name))
        ok1, d1 = chk.folds_disjoint_and_cover(fold_of, train["id"].tolist(), s.folds.n_folds)
        ok2, d2 = chk.folds_stratified(fold_of, train)
        sizes = {str(k): int(v) for k, v in sorted(chk.fold_sizes(fold_of).items())}
        return MaterializeResult(
            metadata=m.metadata(path=MetadataValue.path(str(m.out_dir / name)), n_folds=s.folds.n_folds,
                                rows=len(fold_of), fold_sizes=MetadataValue.json(sizes)),
            check_results=[
                AssetCheckResult(check_name="folds_disjoint_and_cover", passed=ok1, metadata=d1),
                AssetCheckResult(check_name="folds_stratified", passed=ok2, metadata=d2),
            ],
        )

    @asset(key=FOLD_DATA, deps=[TRAIN_TABLE, FOLD_ASSIGNMENTS], partitions_def=parts, code_version=folds_cv,
           group_name="data", automation_condition=eager, kinds={"parquet"},
           description="One fold's train and validation tables.")
    def fold_data(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
        from arena_assets.core import contract, folds
        from arena_assets.core.artifacts import staged_dir

        s = settings.get()
        k = _fold(context)
        m = Materialization.begin(s, FOLD_DATA, str(k), folds_cv)
        train = contract.read_table(m.read(TRAIN_TABLE) / "table.parquet")
        fa = m.read(FOLD_ASSIGNMENTS)
        assignment = folds.read_folds(fa / folds.folds_filename(s.folds.n_folds, s.folds.seed))
        tr, va = folds.split_fold(train, assignment, k)
        with staged_dir(m.out_dir) as tmp:
            contract.write_table(tr, tmp / "train.parquet")
            contract.write_table(va, tmp / "valid.parquet")
        m.commit()
        return MaterializeResult(metadata=m.metadata(
            fold=k, train_rows=int(len(tr)), valid_rows=int(len(va)),
            valid_label_mean=MetadataValue.json(contract.summarize(va).get("label_mean", {})),
            train_path=MetadataValue.path(str(m.out_dir / "train.parquet")),
            valid_path=MetadataValue.path(str(m.out_dir / "valid.parquet")),
        ))

    out += [fold_assignments, fold_data]

    # ------------------------------------------------------------------ per family: base, teachers
    def base_asset(family: str) -> AssetsDefinition:
        cv = step_code_version(settings, "post_pretrain", family)
        key = base_key(family)

        @asset(key=key, deps=[EXTERNAL_PAIRS, TRAIN_TABLE, TEST_TABLE], code_version=cv, group_name=family,
               pool=GPU_POOL, automation_condition=cron, kinds={"pytorch"},
               description=f"Step 1: {family}'s base post-pretrained on external pairs "
                           "(passed through when post_pretrain.enabled is false).")
        def _base(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
            from arena_assets.gpu.pretrain import post_pretrain

            s = settings.get()
            m = Materialization.begin(s, key, None, cv)
            external = m.read(EXTERNAL_PAIRS) / "table.parquet"
            corpus = [m.read(TRAIN_TABLE) / "table.parquet", m.read(TEST_TABLE) / "table.parquet", external]
            res = compute.run(context, "post_pretrain", post_pretrain, s.families[family], s.post_pretrain,
                              s.fmt, external, corpus, out_dir=m.out_dir)
            m.commit()
            return MaterializeResult(metadata=m.metadata(
                res, family=family, model_size_mb=dir_size_mb(res.path("model")),
                post_pretrain_enabled=s.post_pretrain.enabled))

        return _base

    def teacher_assets(family: str) -> list[AssetsDefinition]:
        cv_t = step_code_version(settings, "teacher", family)
        cv_o = step_code_version(settings, "teacher_oof", family)
        tkey, okey = teacher_key(family), teacher_probs_key(family)

        @asset(key=tkey, deps=[FOLD_DATA, base_key(family), EXTERNAL_PAIRS], partitions_def=parts,
               code_version=cv_t, group_name=family, pool=GPU_POOL, automation_condition=cron,
               kinds={"pytorch"}, description=f"Step 3: {family} teacher (LoRA) trained on one fold.")
        def _teacher(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
            from arena_assets.gpu.train import train_teacher

            s = settings.get()
            k = _fold(context)
            m = Materialization.begin(s, tkey, str(k), cv_t)
            tr, va = _fold_tables(m, k)
            base = m.read(base_key(family)) / "model"
            external = m.read(EXTERNAL_PAIRS) / "table.parquet"
            res = compute.run(context, "teacher", train_teacher, base, s.teacher, s.fmt, tr, va, external,
                              out_dir=m.out_dir, checkpoint_dir=m.checkpoint_dir("teacher"))
            m.commit()
            return MaterializeResult(metadata=m.metadata(
                res, fold=k, family=family, adapter_size_mb=dir_size_mb(res.path("model"))))

        @asset(key=okey, deps=[tkey, FOLD_DATA], partitions_def=parts, code_version=cv_o, group_name=family,
               pool=GPU_POOL, automation_condition=cron, kinds={"parquet"},
               description=f"Step 4: {family} teacher's out-of-fold probabilities on its validation fold.")
        def _probs(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
            from arena_assets.gpu.predict import teacher_oof

            s = settings.get()
            k = _fold(context)
            m = Materialization.begin(s, okey, str(k), cv_o)
            _, va = _fold_tables(m, k)
            model = m.read(tkey, str(k)) / "model"
            res = compute.run(context, "teacher_oof", teacher_oof, model, s.fmt, s.infer, va, k, family,
                              out_dir=m.out_dir)
            m.commit()
            return MaterializeResult(metadata=m.metadata(res, fold=k, family=family))

        return [_teacher, _probs]

    for fam in settings.families:
        out.append(base_asset(fam))
    for fam in settings.teacher_families:
        out += teacher_assets(fam)

    # ------------------------------------------------------------------ teacher OOF (all families)
    cv_toof = settings_hash({"teacher_families": list(settings.teacher_families), "n_folds": settings.folds.n_folds})

    @asset(key=TEACHER_OOF, deps=[teacher_probs_key(f) for f in settings.teacher_families] + [TRAIN_TABLE],
           code_version=cv_toof, group_name="teachers", automation_condition=eager, kinds={"parquet"},
           check_specs=[AssetCheckSpec("oof_covers_train_once_per_family", asset=TEACHER_OOF, blocking=True,
                                       description="Every train id appears exactly once per teacher family.")],
           description="All teacher families' out-of-fold probabilities in one table (the KD targets).")
    def teacher_oof(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
        import pandas as pd

        from arena_assets.core import contract
        from arena_assets.core.artifacts import staged_dir

        s = settings.get()
        m = Materialization.begin(s, TEACHER_OOF, None, cv_toof)
        train = contract.read_table(m.read(TRAIN_TABLE) / "table.parquet")
        frames = []
        for fam in s.teacher_families:
            for k in range(s.folds.n_folds):
                frames.append(pd.read_parquet(m.read(teacher_probs_key(fam), str(k)) / "oof.parquet"))
        oof = pd.concat(frames, ignore_index=True)
        with staged_dir(m.out_dir) as tmp:
            oof.to_parquet(tmp / "teacher_oof.parquet", index=False)
        m.commit()
        ok, details = chk.oof_covers_once_per_family(oof, train["id"].tolist(), list(s.teacher_families))
        md = m.metadata(rows=int(len(oof)), families=", ".join(s.teacher_families),
                        path=MetadataValue.path(str(m.out_dir / "teacher_oof.parquet")),
                        oof_coverage=float(details["coverage"]))
        md.update(chk.teacher_oof_metrics(oof, train))
        return MaterializeResult(metadata=md, check_results=[
            AssetCheckResult(check_name="oof_covers_train_once_per_family", passed=ok, metadata=details)])

    out.append(teacher_oof)

    # ------------------------------------------------------------------ student per fold
    cv_s = step_code_version(settings, "student")
    cv_b = step_code_version(settings, "baseline")
    cv_c = step_code_version(settings, "calibration")
    cv_p = step_code_version(settings, "predict")

    @asset(key=STUDENT_MODEL, deps=[FOLD_DATA, TEACHER_OOF, base_key(student)], partitions_def=parts,
           code_version=cv_s, group_name="student", pool=GPU_POOL, automation_condition=cron, kinds={"pytorch"},
           description="Step 5: the student (LoRA) distilled from the teachers' OOF probabilities, one fold.")
    def student_model(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.train import train_student

        s = settings.get()
        k = _fold(context)
        m = Materialization.begin(s, STUDENT_MODEL, str(k), cv_s)
        tr, va = _fold_tables(m, k)
        base = m.read(base_key(s.student_family)) / "model"
        toof = m.read(TEACHER_OOF) / "teacher_oof.parquet"
        res = compute.run(context, "student", train_student, base, s.student, s.fmt, tr, va, toof, out_dir=m.out_dir,
                          checkpoint_dir=m.checkpoint_dir("student"))
        m.commit()
        return MaterializeResult(metadata=m.metadata(
            res, fold=k, kd_alpha=s.student.kd.alpha, kd_temperature=s.student.kd.temperature,
            adapter_size_mb=dir_size_mb(res.path("model"))))

    @asset(key=BASELINE_STUDENT, deps=[FOLD_DATA, base_key(student)], partitions_def=parts, code_version=cv_b,
           group_name="student", pool=GPU_POOL, automation_condition=cron, kinds={"pytorch"},
           description="The CE-only student (the seed's job.sh): the same training without distillation.")
    def baseline_student(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.train import train_student

        s = settings.get()
        k = _fold(context)
        m = Materialization.begin(s, BASELINE_STUDENT, str(k), cv_b)
        tr, va = _fold_tables(m, k)
        base = m.read(base_key(s.student_family)) / "model"
        res = compute.run(context, "student", train_student, base, s.baseline, s.fmt, tr, va, None, out_dir=m.out_dir,
                          checkpoint_dir=m.checkpoint_dir("baseline"))
        m.commit()
        return MaterializeResult(metadata=m.metadata(res, fold=k, adapter_size_mb=dir_size_mb(res.path("model"))))

    @asset(key=STUDENT_CALIBRATION, deps=[STUDENT_MODEL, FOLD_DATA], partitions_def=parts, code_version=cv_c,
           group_name="student", automation_condition=cron, kinds={"json"},
           description="Temperature scaling fitted on the fold's validation logits (LBFGS).")
    def student_calibration(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.calibrate import calibrate

        s = settings.get()
        k = _fold(context)
        m = Materialization.begin(s, STUDENT_CALIBRATION, str(k), cv_c)
        _, va = _fold_tables(m, k)
        preds = m.read(STUDENT_MODEL, str(k)) / "valid_predictions.parquet"
        res = compute.run(context, "calibration", calibrate, preds, va, s.calibration, out_dir=m.out_dir)
        m.commit()
        cal = _read_json(m.out_dir / "calibration.json")
        # --- plots (assets/plots.py): this fold's reliability diagram, before/after the temperature
        from arena_assets.assets.plots import reliability_metadata

        rel = reliability_metadata(preds, va, float(cal.get("temperature", 1.0)), title=f"student fold {k}")
        # --- end plots
        return MaterializeResult(metadata=m.metadata(
            res, fold=k, temperature=float(cal.get("temperature", 1.0)),
            nll_before=float(cal.get("nll_before", float("nan"))), nll_after=float(cal.get("nll_after", float("nan"))),
            **rel))

    @asset(key=STUDENT_FOLD_SUBMISSION, deps=[STUDENT_MODEL, STUDENT_CALIBRATION, FOLD_DATA, TEST_TABLE],
           partitions_def=parts, code_version=cv_p, group_name="student", pool=GPU_POOL,
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
        k = _fold(context)
        m = Materialization.begin(s, STUDENT_FOLD_SUBMISSION, str(k), cv_p)
        tr, va = _fold_tables(m, k)
        model = m.read(STUDENT_MODEL, str(k)) / "model"
        cal = m.read(STUDENT_CALIBRATION, str(k)) / "calibration.json"
        test = m.read(TEST_TABLE) / "table.parquet"
        res = compute.run(context, "predict", fold_submission, model, cal, s.fmt, s.infer, va, test, out_dir=m.out_dir)
        m.commit()
        sub = m.out_dir / "submission.csv"
        test_ids = contract.read_table(test)["id"].tolist()
        ok, d = chk.submission_valid(sub, test_ids)
        prior = chk.class_prior_logloss(contract.read_table(tr), contract.read_table(va))
        cv = float(res.metrics.get("cv_logloss", float("nan")))
        return MaterializeResult(
            metadata=m.metadata(res, fold=k, class_prior_logloss=prior, submission=MetadataValue.path(str(sub))),
            check_results=[
                AssetCheckResult(check_name="submission_valid", passed=ok, metadata=d),
                AssetCheckResult(check_name="beats_class_prior", passed=bool(cv < prior),
                                 severity=AssetCheckSeverity.WARN,
                                 metadata={"cv_logloss": cv, "class_prior_logloss": prior}),
            ],
        )

    out += [student_model, baseline_student, student_calibration, student_fold_submission]

    # ------------------------------------------------------------------ average, merge, quantize, TTA
    cv_avg = step_code_version(settings, "average")
    cv_q = step_code_version(settings, "quantize")
    cv_tta = step_code_version(settings, "tta")
    cv_ens = step_code_version(settings, "ensemble")

    @asset(key=AVERAGED_LORA, deps=[STUDENT_MODEL], code_version=cv_avg, group_name="final", pool=GPU_POOL,
           automation_condition=cron, kinds={"pytorch"},
           description="Step 6a: the fold students' LoRA adapters (and heads) averaged into one adapter.")
    def averaged_lora(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.average import average_adapters

        s = settings.get()
        m = Materialization.begin(s, AVERAGED_LORA, None, cv_avg)
        adapters = [m.read(STUDENT_MODEL, str(k)) / "model" for k in range(s.folds.n_folds)]
        res = compute.run(context, "average", average_adapters, adapters, s.average, out_dir=m.out_dir)
        m.commit()
        return MaterializeResult(metadata=m.metadata(res, n_adapters=len(adapters), method=s.average.method,
                                                     adapter_size_mb=dir_size_mb(res.path("adapter"))))

    @asset(key=MERGED_MODEL, deps=[AVERAGED_LORA, base_key(student), STUDENT_CALIBRATION], code_version=cv_avg,
           group_name="final", pool=GPU_POOL, automation_condition=cron, kinds={"pytorch"},
           description="Step 6b: the averaged adapter merged into the student base (merge_and_unload).")
    def merged_model(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.average import merge_adapter

        s = settings.get()
        m = Materialization.begin(s, MERGED_MODEL, None, cv_avg)
        m.read(base_key(s.student_family))
        adapter = m.read(AVERAGED_LORA) / "adapter"
        temps = [float(_read_json(m.read(STUDENT_CALIBRATION, str(k)) / "calibration.json").get("temperature", 1.0))
                 for k in range(s.folds.n_folds)]
        res = compute.run(context, "merge", merge_adapter, adapter, temps, s.calibration, out_dir=m.out_dir)
        m.commit()
        cal = _read_json(m.out_dir / "calibration.json")
        return MaterializeResult(metadata=m.metadata(
            res, temperature=float(cal.get("temperature", 1.0)), fold_temperatures=MetadataValue.json(temps),
            model_size_mb=dir_size_mb(res.path("model"))))

    @asset(key=QUANTIZED_MODEL, deps=[MERGED_MODEL, TRAIN_TABLE], code_version=cv_q, group_name="final",
           pool=GPU_POOL, automation_condition=cron, kinds={"pytorch"},
           description="Step 7: 8-bit quantization, GPTQ first, bitsandbytes int8 as the recorded fallback.")
    def quantized_model(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.gpu.quantize import quant_python, quantize

        s = settings.get()
        m = Materialization.begin(s, QUANTIZED_MODEL, None, cv_q)
        model = m.read(MERGED_MODEL) / "model"
        calib = m.read(TRAIN_TABLE) / "table.parquet"
        py = _other_python(quant_python(s.quant)) if "gptq" in s.quant.methods else None
        res = compute.run(context, "quantize", quantize, model, s.quant, s.fmt, calib, out_dir=m.out_dir, python=py)
        m.commit()
        q = _read_json(m.out_dir / "quantization.json")
        return MaterializeResult(metadata=m.metadata(
            res, method=str(q.get("method")), fallback_reason=str(q.get("fallback_reason") or ""),
            quant_python=py or "this interpreter",
            quantized_path=MetadataValue.path(str(res.path("model"))),
            model_size_mb=dir_size_mb(res.path("model"))))

    @asset(key=TTA_SUBMISSION, deps=[QUANTIZED_MODEL, MERGED_MODEL, TEST_TABLE, STUDENT_CALIBRATION],
           code_version=cv_tta, group_name="final", pool=GPU_POOL, automation_condition=cron, kinds={"csv"},
           check_specs=[AssetCheckSpec("submission_valid", asset=TTA_SUBMISSION, blocking=True,
                                       description="Columns, ids equal the test ids, rows sum to 1, no NaN.")],
           description="Step 8: test predictions of the quantized model, original + A/B-swapped (TTA).")
    def tta_submission(context: AssetExecutionContext, settings: SettingsResource, compute: ComputeResource) -> MaterializeResult:
        from arena_assets.core import contract
        from arena_assets.gpu.predict import tta_submission as tta
        from arena_assets.gpu.quantize import quant_python

        s = settings.get()
        m = Materialization.begin(s, TTA_SUBMISSION, None, cv_tta)
        qdir = m.read(QUANTIZED_MODEL)
        cal = m.read(MERGED_MODEL) / "calibration.json"
        for k in range(s.folds.n_folds):
            m.read(STUDENT_CALIBRATION, str(k))
        test = m.read(TEST_TABLE) / "table.parquet"
        method = str(_read_json(qdir / "quantization.json").get("method"))
        py = _other_python(quant_python(s.quant)) if method == "gptq" else None
        res = compute.run(context, "tta", tta, qdir / "model", cal, s.fmt, s.infer, test, out_dir=m.out_dir, python=py)
        m.commit()
        sub = m.out_dir / "submission.csv"
        ok, d = chk.submission_valid(sub, contract.read_table(test)["id"].tolist())
        return MaterializeResult(
            metadata=m.metadata(res, quant_method=method, tta=s.infer.tta, submission=MetadataValue.path(str(sub))),
            check_results=[AssetCheckResult(check_name="submission_valid", passed=ok, metadata=d)])

    @asset(key=FINAL_ENSEMBLE, deps=[TTA_SUBMISSION, STUDENT_FOLD_SUBMISSION, TEST_TABLE, TRAIN_TABLE],
           code_version=cv_ens, group_name="final", automation_condition=eager, kinds={"csv"},
           check_specs=[AssetCheckSpec("submission_valid", asset=FINAL_ENSEMBLE, blocking=True,
                                       description="Columns, ids equal the test ids, rows sum to 1, no NaN.")],
           description="Step 9: the submission (folds_mean | folds_cv_weighted | merged | blend).")
    def final_ensemble(context: AssetExecutionContext, settings: SettingsResource) -> MaterializeResult:
        from arena_assets.assets.ensemble import build_ensemble
        from arena_assets.core import contract

        s = settings.get()
        m = Materialization.begin(s, FINAL_ENSEMBLE, None, cv_ens)
        folds = {k: m.read(STUDENT_FOLD_SUBMISSION, str(k)) for k in range(s.folds.n_folds)}
        tta_dir = m.read(TTA_SUBMISSION)
        test = m.read(TEST_TABLE) / "table.parquet"
        train = m.read(TRAIN_TABLE) / "table.parquet"
        info = build_ensemble(s.ensemble, folds, tta_dir, train, m.out_dir)
        m.commit({"sources": info["sources"], "weights": info["weights"]})
        sub = m.out_dir / "submission.csv"
        ok, d = chk.submission_valid(sub, contract.read_table(test)["id"].tolist())
        rows = [(k, info["fold_logloss_raw"].get(k, float("nan")), info["fold_logloss"].get(k, float("nan")),
                 info["fold_accuracy"].get(k, float("nan"))) for k in sorted(info["fold_logloss"])]
        table = md_table(["fold", "cv_logloss_raw", "cv_logloss", "accuracy"], rows)
        src = md_table(["source", "weight"], [(a, float(w)) for a, w in zip(info["sources"], info["weights"])])
        md = m.metadata(
            mode=s.ensemble.mode, submission=MetadataValue.path(str(sub)),
            per_fold=MetadataValue.md(f"### Per-fold CV log-loss\n\n{table}\n\n### Sources\n\n{src}"),
            sources=MetadataValue.json(info["sources"]), weights=MetadataValue.json(info["weights"]),
            mean_cv_logloss=float(info["mean_cv_logloss"]),
        )
        if info.get("oof_logloss") is not None:
            md["oof_logloss"] = float(info["oof_logloss"])
        # --- plots (assets/plots.py): per-fold CV log-loss chart and inline text bars
        from arena_assets.assets.plots import cv_logloss_metadata

        md.update(cv_logloss_metadata(info["fold_logloss"], info.get("fold_logloss_raw")))
        # --- end plots
        return MaterializeResult(metadata=md, check_results=[
            AssetCheckResult(check_name="submission_valid", passed=ok, metadata=d)])

    out += [averaged_lora, merged_model, quantized_model, tta_submission, final_ensemble]
    return out


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def _other_python(py: str | None) -> str | None:
    """The GPTQ interpreter when it differs from this one (then the step runs in a child process)."""
    import os
    import sys

    if not py:
        return None
    try:
        if os.path.abspath(py) == os.path.abspath(sys.executable):
            return None
    except OSError:
        pass
    return py
