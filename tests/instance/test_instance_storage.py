"""The instance's bookkeeping on SQLite (single user) and PostgreSQL (the team setup,
deploy/team/dagster.yaml): a 5-fold backfill through ``dagster-daemon`` and the automation
sensor's decisions, each run once per storage.

The code location is tests/instance/instance_defs.py (the project's fold partitions, backfill
policy, automation condition and sensor on two assets that cost nothing), so what is measured is
the instance, not the recipe.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from tests.harness import DaemonHarness
from tests.instance import instance_defs

pytestmark = pytest.mark.timeout(900)

FOLDS = ["0", "1", "2", "3", "4"]
STORAGE_CLASSES = {"sqlite": "SqliteRunStorage", "postgres": "PostgresRunStorage"}


def harness(root: Path, storage: tuple[str, dict[str, Any] | None], **env: str) -> DaemonHarness:
    return DaemonHarness(root, module="tests.instance.instance_defs", location_name="instance_defs",
                         storage=storage[1], env=env)


def assert_storage(h: DaemonHarness, storage: tuple[str, dict[str, Any] | None]) -> None:
    """The instance really is on the storage asked for (not a silent SQLite fallback)."""
    assert type(h.instance().run_storage).__name__ == STORAGE_CLASSES[storage[0]]
    assert type(h.instance().event_log_storage).__name__.startswith(storage[0].capitalize())


def pg_count(url: str, sql: str) -> int:
    import psycopg2

    from tests.harness.postgres import libpq_url

    with psycopg2.connect(libpq_url(url)) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return int(cur.fetchone()[0])


def fold_records(instance: dg.DagsterInstance, fold: str) -> list[Any]:
    return list(instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("fold_model"), asset_partitions=[fold]), limit=10).records)


# ------------------------------------------------------------------------------ a fold backfill
def test_five_fold_backfill_through_the_daemon(storage: tuple[str, dict[str, Any] | None], tmp_path: Path,
                                               ci_evidence: Any) -> None:
    h = harness(tmp_path / "deploy", storage)
    h.start()
    import time

    t0 = time.time()
    try:
        assert_storage(h, storage)
        bf = h.backfill("fold_job", FOLDS)
        runs = h.wait_runs_finished(h.backfill_runs(bf, n=5), timeout=600)
        # one run per fold (BackfillPolicy.multi_run(1)), each succeeded and materialized its fold once
        assert sorted(r.tags["dagster/partition"] for r in runs) == FOLDS
        assert all(r.status == dg.DagsterRunStatus.SUCCESS for r in runs), [h.describe(r.run_id) for r in runs]
        by_fold = {r.tags["dagster/partition"]: r.run_id for r in runs}
        for k in FOLDS:
            recs = fold_records(h.instance(), k)
            assert [r.run_id for r in recs] == [by_fold[k]], (k, recs)
            assert recs[0].asset_materialization.metadata["fold"].value == int(k)
        # the queue launched them: every run went QUEUED -> launched by the daemon's coordinator
        for r in runs:
            types = [e.dagster_event.event_type_value for e in h.events(r.run_id) if e.dagster_event]
            assert "PIPELINE_ENQUEUED" in types and "PIPELINE_SUCCESS" in types, types
            assert types.index("PIPELINE_ENQUEUED") < types.index("PIPELINE_STARTING"), types
        ci_evidence(f"{type(h.instance().run_storage).__name__}: 5-fold backfill through dagster-daemon's queue, "
                    f"{len(runs)} runs SUCCESS, folds {sorted(by_fold)} materialized once each "
                    f"({time.time() - t0:.0f} s)")
        if storage[0] == "postgres":  # the rows are in the database, not in files under the home
            url = storage[1]["postgres"]["postgres_url"]  # type: ignore[index]
            assert pg_count(url, "SELECT count(*) FROM runs") == 5
            assert pg_count(url, "SELECT count(*) FROM event_logs WHERE dagster_event_type = "
                                 "'ASSET_MATERIALIZATION'") == 5
            assert not (h.home / "history").exists()
        else:
            assert (h.home / "storage").exists()
    finally:
        h.stop()


# ------------------------------------------------------------------------------ the automation sensor
def _requested(defs: dg.Definitions, res: Any) -> dict[str, set[str] | None]:
    g = defs.resolve_asset_graph()
    out: dict[str, set[str] | None] = {}
    for r in res.results:
        if r.true_subset.is_empty or not g.get(r.key).is_materializable:
            continue
        out[r.key.to_user_string()] = (set(r.true_subset.expensively_compute_partition_keys())
                                       if r.true_subset.is_partitioned else None)
    return out


def test_automation_sensor_requests_missing_and_stale_folds(storage: tuple[str, dict[str, Any] | None],
                                                             tmp_path: Path, ci_evidence: Any) -> None:
    """The sensor's decisions read the instance (code-version tags of the latest materialization):
    on both storages, a cron tick requests exactly the missing fold and the stale one."""
    h = harness(tmp_path / "deploy", storage)
    h.write_files()
    instance = h.instance()
    try:
        assert_storage(h, storage)
        current, old = instance_defs.build_defs("v2"), instance_defs.build_defs("v1")

        def mat(defs: dg.Definitions, keys: list[str], partition: str | None = None) -> None:
            res = dg.materialize(list(defs.assets), selection=keys, partition_key=partition, instance=instance)
            assert res.success

        mat(current, ["table"])
        for k in ["0", "1", "2"]:
            mat(current, ["fold_model"], k)
        mat(old, ["fold_model"], "3")  # stale: materialized by another code version; fold 4 missing

        t = dt.datetime.now(dt.UTC).replace(second=20, microsecond=0) + dt.timedelta(minutes=1)
        first = dg.evaluate_automation_conditions(defs=current, instance=instance, evaluation_time=t)
        # no cron tick has passed since a previous evaluation (there was none): nothing yet
        assert _requested(current, first) == {}
        second = dg.evaluate_automation_conditions(defs=current, instance=instance, cursor=first.cursor,
                                                   evaluation_time=t + dt.timedelta(minutes=1))
        assert _requested(current, second) == {"fold_model": {"3", "4"}}
        for k in ["3", "4"]:
            mat(current, ["fold_model"], k)
        third = dg.evaluate_automation_conditions(defs=current, instance=instance, cursor=second.cursor,
                                                  evaluation_time=t + dt.timedelta(minutes=2))
        assert _requested(current, third) == {}  # everything current: the next tick retrains nothing
        ci_evidence(f"{type(instance.run_storage).__name__}: automation tick requested fold_model {{3 (stale), "
                    "4 (missing)}, nothing current; the next tick nothing")
    finally:
        h.stop()
