"""The recipe's asset keys and its one fold partitions definition (no asset bodies here).

Every stage module (inputs, folds, teachers, students, final) and the jobs, the quality report and
the tests name assets through these constants, so a key is spelled once.
"""

from dagster import AssetKey, BackfillPolicy, StaticPartitionsDefinition

from arena_assets.core.settings import Settings

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



FOLD_BACKFILL = BackfillPolicy.multi_run(max_partitions_per_run=1)
"""How a backfill of per-fold assets runs: one run per fold, all launched at once (the pools and
run limits decide how many proceed; on Slurm every fold's job is submitted together). Not a
single run over a range: that loses per-fold check results and fails every fold when one fails."""
