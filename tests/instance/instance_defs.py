"""A code location for the instance tests: the project's fold partitions, backfill policy,
automation condition and automation sensor, on two assets whose bodies cost nothing.

- ``table`` (unpartitioned) -> ``fold_model`` (one partition per fold): the shape of
  ``train_table`` -> ``fold_data``/``teacher_model``;
- each asset's code version is ``$ARENA_TEST_CODE_VERSION`` (default ``v2``): materializing with
  another value (``build_defs("v1")``) leaves a partition STALE by code version, exactly what a
  settings change does to the real assets;
- the automation condition is ``assets/automation.py``'s ``model_condition`` and the sensor is the
  project's ``arena_automation``, with the settings' ``automation.cron`` = ``$ARENA_TEST_CRON``
  (default ``* * * * *``) and ``automation.running`` from ``$ARENA_TEST_AUTOMATION`` (``1``: on, so a
  real ``dagster-daemon`` ticks it; default off, so a backfill test sees only its own runs).
- ``fold_job``: the asset job a fold backfill runs (``dagster job backfill``).
"""


import os
import time

import dagster as dg

from arena_assets.assets.automation import automation_sensor, model_condition
from arena_assets.assets.keys import FOLD_BACKFILL, fold_partitions
from arena_assets.core.settings import load_settings

CRON = os.environ.get("ARENA_TEST_CRON", "* * * * *")
RUNNING = os.environ.get("ARENA_TEST_AUTOMATION", "0") == "1"
SETTINGS = load_settings(None, {"automation": {"cron": CRON, "running": RUNNING}})
FOLDS = fold_partitions(SETTINGS)


def build_defs(code_version: "str | None" = None) -> dg.Definitions:
    cv = code_version or os.environ.get("ARENA_TEST_CODE_VERSION", "v2")
    cond = model_condition(CRON)

    @dg.asset(code_version=cv, automation_condition=cond, group_name="instance_test")
    def table() -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata={"dagster/row_count": 3})

    @dg.asset(deps=[table], partitions_def=FOLDS, backfill_policy=FOLD_BACKFILL, code_version=cv,
              automation_condition=cond, group_name="instance_test")
    def fold_model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        time.sleep(float(os.environ.get("ARENA_TEST_STEP_S", "0")))
        return dg.MaterializeResult(metadata={"fold": int(context.partition_key), "code": cv})

    fold_job = dg.define_asset_job("fold_job", selection=[fold_model])
    return dg.Definitions(assets=[table, fold_model], jobs=[fold_job], sensors=[automation_sensor(SETTINGS)])


defs = build_defs()
