"""The recipe as software-defined assets, built from the settings read when definitions load.

One module per recipe stage, in the order a fold travels (a reader finds an asset by its stage):

- ``inputs``   raw files (observed: file hash = data version) -> train/test/external tables
- ``folds``    fold_assignments (folds_<n>_seed<s>.json) -> fold_data[k]
- ``teachers`` <family>/post_pretrained_base -> <family>/teacher_model[k] -> teacher_oof_probs[k]
               -> teacher_oof
- ``students`` student_model[k], baseline_student[k] -> student_calibration[k]
               -> student_fold_submission[k]
- ``final``    averaged_lora -> merged_model -> quantized_model -> tta_submission -> final_ensemble

Model families come from the settings: each teacher family gets ``<family>/teacher_model`` and
``<family>/teacher_oof_probs``, every family its ``<family>/post_pretrained_base``; the student's
assets have no prefix. Per-fold assets share one static partitions definition (``keys.py``).
Each asset body is thin: read upstream versions, call a step through the compute resource (or
core/ for tables, folds and ensembles), commit the version, return metadata. Heavy modules
(torch, transformers, peft, pandas) are imported inside the bodies only, so loading the code
location stays fast.
"""

from typing import Any

from dagster import AssetsDefinition, SourceAsset

from arena_assets.assets import final, folds, inputs, students, teachers
from arena_assets.assets.keys import *  # noqa: F403  (the keys, re-exported for jobs, quality, tests)
from arena_assets.core.settings import Settings

STAGES = (inputs, folds, teachers, students, final)


def build_recipe_assets(settings: Settings, automation: dict[str, Any] | None = None) -> list[AssetsDefinition | SourceAsset]:
    """Every asset of the recipe for these settings (families, folds, code versions)."""
    auto = automation or {}
    return [a for stage in STAGES for a in stage.build(settings, auto)]
