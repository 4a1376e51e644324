"""The automation sensor driven by a real ``dagster-daemon`` on a PostgreSQL instance (the team
setup): no test clock, a ``* * * * *`` cron, and the project's ``arena_automation`` sensor and
automation condition (tests/instance/instance_defs.py).

Before the daemon starts, the instance holds: ``table`` current; ``fold_model`` folds 0-2
current, fold 3 materialized by an older code version (STALE, what a settings change leaves),
fold 4 never materialized (MISSING). The sensor, evaluated by the daemon about every 30 s, must
at the first real minute tick after its first evaluation request exactly folds 3 and 4 (nothing
current: not ``table``, not folds 0-2), the daemon's queue must launch those runs, and they must
materialize with the current code version. Wall time: one or two real minutes.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from tests.harness import DaemonHarness, postgres_storage
from tests.instance import instance_defs

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(600)]


def latest_code_versions(instance: dg.DagsterInstance) -> dict[str, str | None]:
    out = {}
    for k in ["0", "1", "2", "3", "4"]:
        recs = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("fold_model"), asset_partitions=[k]), limit=1).records
        out[k] = (recs[0].asset_materialization.tags or {}).get("dagster/code_version") if recs else None
    return out


def test_daemon_tick_launches_exactly_the_missing_and_stale_folds(tmp_path: Path, pg_database: str,
                                                                  ci_evidence: Any) -> None:
    h = DaemonHarness(tmp_path / "deploy", module="tests.instance.instance_defs", location_name="instance_defs",
                      storage=postgres_storage(pg_database), env={"ARENA_TEST_CRON": "* * * * *", "ARENA_TEST_AUTOMATION": "1"})
    h.write_files()
    instance = h.instance()
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    current, old = instance_defs.build_defs("v2"), instance_defs.build_defs("v1")
    for defs, keys, part in [(current, ["table"], None), (current, ["fold_model"], "0"),
                             (current, ["fold_model"], "1"), (current, ["fold_model"], "2"),
                             (old, ["fold_model"], "3")]:
        assert dg.materialize(list(defs.assets), selection=keys, partition_key=part, instance=instance).success
    assert latest_code_versions(instance) == {"0": "v2", "1": "v2", "2": "v2", "3": "v1", "4": None}
    before = {r.run_id for r in h.runs()}
    table_mats = len(instance.fetch_materializations(dg.AssetKey("table"), limit=10).records)

    t0 = time.time()
    h.start()
    try:
        def sensor_runs_done() -> list[dg.DagsterRun] | None:
            new = [r for r in h.runs() if r.run_id not in before]
            done = latest_code_versions(instance) == {k: "v2" for k in ["0", "1", "2", "3", "4"]}
            return new if new and done and all(r.is_finished for r in new) else None

        try:
            runs = h.wait_for(sensor_runs_done, timeout=300, interval=2, what="the sensor's runs to finish")
        except AssertionError as e:
            raise AssertionError(f"{e}\nruns: {[(r.run_id, r.status, r.tags) for r in h.runs()]}\n"
                                 f"{h.log_tail()}") from None
        waited = time.time() - t0
        # launched by the automation sensor's tick, through the queue: what they materialized is
        # exactly folds 3 and 4 of fold_model
        built = set()
        for r in runs:
            assert r.tags.get("dagster/sensor_name") == "arena_automation", r.tags
            assert r.status == dg.DagsterRunStatus.SUCCESS, h.describe(r.run_id)
            types = [e.dagster_event.event_type_value for e in h.events(r.run_id) if e.dagster_event]
            assert types.index("PIPELINE_ENQUEUED") < types.index("PIPELINE_STARTING"), types
            for e in h.events(r.run_id):
                m = e.asset_materialization
                if m is not None:
                    built.add((m.asset_key.to_user_string(), m.partition))
        assert built == {("fold_model", "3"), ("fold_model", "4")}, (built, [r.tags for r in runs])
        # they materialized with the current code version; nothing current was rebuilt
        assert latest_code_versions(instance) == {k: "v2" for k in ["0", "1", "2", "3", "4"]}
        assert len(instance.fetch_materializations(dg.AssetKey("table"), limit=10).records) == table_mats
        # the sensor keeps ticking: one more evaluation (~30 s later) requests nothing more
        ticks_seen = time.time()
        time.sleep(40)
        assert {r.run_id for r in h.runs()} - before == {r.run_id for r in runs}
        ci_evidence(f"PostgresRunStorage, real dagster-daemon, cron '* * * * *': arena_automation's tick launched "
                    f"{len(runs)} run(s) {[r.run_id[:8] for r in runs]} that materialized exactly fold_model folds 3 (stale) "
                    f"and 4 (missing), SUCCESS; "
                    f"finished {waited:.0f} s after the daemon started; nothing else requested in the next "
                    f"{time.time() - ticks_seen:.0f} s")
        print(f"daemon tick: runs for folds 3 and 4 finished {waited:.0f} s after the daemon started; "
              f"no further request in the {time.time() - ticks_seen:.0f} s after")
    finally:
        h.stop()
