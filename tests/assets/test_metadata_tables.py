"""Per-fold tables as ``MetadataValue.table`` (typed, sortable in the UI) and ``dagster/row_count``
where an asset holds rows (issue 18): fold_assignments' per-fold sizes, fold_data's rows, and the
final ensemble's per-fold CV table. The first two are materialized here for real on the tiny
sample (no model step); the ensemble's table is read from the session's pipeline when a test in
this session already built it, and its builder is checked directly."""

from __future__ import annotations

import math
from pathlib import Path

import dagster as dg

from arena_assets.assets.folds import fold_table
from arena_assets.definitions import build_definitions
from tests.pipeline_fixture import write_session_files


def _metadata(instance: dg.DagsterInstance, key: str, partition: str | None = None) -> dict:
    flt = dg.AssetRecordsFilter(asset_key=dg.AssetKey.from_user_string(key),
                                asset_partitions=[partition] if partition is not None else None)
    recs = instance.fetch_materializations(flt, limit=1).records
    assert recs, (key, partition)
    return dict(recs[0].asset_materialization.metadata)


def test_fold_tables_and_row_counts(tmp_path: Path) -> None:
    settings = write_session_files(tmp_path)
    defs = build_definitions(str(settings))
    with dg.DagsterInstance.ephemeral() as instance:
        keys = ["raw_train_csv", "train_table", "fold_assignments"]
        res = dg.materialize(list(defs.assets), selection=keys, instance=instance, resources=defs.resources)
        assert res.success
        res = dg.materialize(list(defs.assets), selection=["fold_data"], partition_key="2", instance=instance,
                             resources=defs.resources)
        assert res.success
        fa = _metadata(instance, "fold_assignments")
        table = fa["fold_table"]
        assert isinstance(table, dg.TableMetadataValue)
        assert [c.name for c in table.schema.columns] == ["fold", "rows"]
        assert [c.type for c in table.schema.columns] == ["int", "int"]
        rows = {r.data["fold"]: r.data["rows"] for r in table.records}
        assert sorted(rows) == [0, 1, 2, 3, 4]
        assert sum(rows.values()) == fa["dagster/row_count"].value == fa["rows"].value > 0
        fd = _metadata(instance, "fold_data", "2")
        assert fd["dagster/row_count"].value == fd["train_rows"].value + fd["valid_rows"].value
        assert fd["valid_rows"].value == rows[2]  # the fold's held-out rows are its share of the split


def test_fold_table_types_and_nan() -> None:
    t = fold_table([("cv_logloss", "float"), ("accuracy", "float")], {1: (0.91, math.nan), 0: (0.8, 0.6)})
    assert [r.data for r in t.records] == [{"fold": 0, "cv_logloss": 0.8, "accuracy": 0.6},
                                          {"fold": 1, "cv_logloss": 0.91, "accuracy": None}]
    assert dg.MetadataValue.table(records=t.records, schema=t.schema) == t  # a plain, serializable table
