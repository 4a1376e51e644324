"""Jobs mirroring the seed's helper scripts.

- ``arena_pipeline``: every recipe asset (not the on-demand ``quality_report``). Launch it as an asset backfill (UI "Materialize all",
  all partitions) so Dagster orders the per-fold and all-fold steps; ``arena-assets demo`` does the
  same stage by stage.
- ``student_fold_chain``: one fold's student train -> calibrate -> predict (the seed's
  ``job_distill.sh``), partitioned; it needs ``teacher_oof`` (all folds) to exist.
- ``baseline_student_job``: the CE-only student (the seed's ``job.sh``), partitioned.
- ``teachers_job``: every family's teacher and its OOF probabilities, partitioned.
"""

from __future__ import annotations

from typing import Any

from dagster import AssetSelection, define_asset_job

from arena_assets.assets import recipe as r
from arena_assets.core.settings import Settings


def build_jobs(settings: Settings) -> list[Any]:
    """Partitioned jobs get the fold partitions from their assets (Dagster infers them)."""
    teacher_keys = [k for f in settings.teacher_families for k in (r.teacher_key(f), r.teacher_probs_key(f))]
    return [
        define_asset_job("arena_pipeline",
                         selection=AssetSelection.all() - AssetSelection.tag("arena/on_demand", "true"),
                         description="The whole recipe, the on-demand quality report excepted "
                                     "(launch as a backfill of all partitions)."),
        define_asset_job("student_fold_chain",
                         selection=AssetSelection.assets(r.STUDENT_MODEL, r.STUDENT_CALIBRATION,
                                                         r.STUDENT_FOLD_SUBMISSION),
                         description="One fold's student: train -> calibrate -> predict (job_distill.sh)."),
        define_asset_job("baseline_student_job",
                         selection=AssetSelection.assets(r.BASELINE_STUDENT),
                         description="The CE-only student (the seed's job.sh)."),
        define_asset_job("teachers_job",
                         selection=AssetSelection.assets(*teacher_keys),
                         description="Every teacher family's fold model and OOF probabilities."),
    ]
