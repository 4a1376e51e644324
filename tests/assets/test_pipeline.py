"""The whole recipe materialized once (tests/pipeline_fixture.py): every asset and partition is in
the instance with meaningful metadata and passing checks; staleness and automation follow exactly
the settings a step uses; a failing step leaves the previous version current."""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import pandas as pd
import pytest
from dagster import AssetCheckKey, AssetKey, AssetSelection, DagsterInstance, materialize

from arena_assets.core import artifacts
from arena_assets.definitions import build_definitions

pytestmark = pytest.mark.slow

FOLDS = ["0", "1", "2", "3", "4"]


def _mat(instance: DagsterInstance, key: str, partition: str | None = None):  # type: ignore[no-untyped-def]
    """The latest materialization (event) of an asset partition."""
    recs = instance.fetch_materializations(AssetKey.from_user_string(key), limit=1000).records
    recs = [r for r in recs if r.partition_key == partition]
    assert recs, f"{key}[{partition}] was never materialized"
    return max(recs, key=lambda r: r.storage_id).event_log_entry.asset_materialization


def _md(m) -> dict:  # type: ignore[no-untyped-def]
    return {k: getattr(v, "value", v) for k, v in m.metadata.items()}


def test_every_asset_and_partition_materialized(pipeline) -> None:  # type: ignore[no-untyped-def]
    g = pipeline.defs.resolve_asset_graph()
    for key in g.materializable_asset_keys:
        if g.get(key).tags.get("arena/on_demand") == "true":  # quality report (issue 8): not in the waves
            continue
        node = g.get(key)
        parts = FOLDS if node.is_partitioned else [None]
        for p in parts:
            m = _mat(pipeline.instance, key.to_user_string(), p)
            md = _md(m)
            assert Path(md["version_dir"]).is_dir(), key
            assert md["settings_hash"] == node.code_version == m.tags.get("dagster/code_version")
            assert artifacts.latest(pipeline.artifacts, key.to_user_string(), p) == Path(md["version_dir"])
            prov = json.loads((Path(md["version_dir"]) / "provenance.json").read_text())
            assert prov["code_version"] == node.code_version and prov["partition"] == p


def test_fold_metadata_values(pipeline) -> None:  # type: ignore[no-untyped-def]
    for k in FOLDS:
        sub = _md(_mat(pipeline.instance, "student_fold_submission", k))
        for m in ("cv_logloss_raw", "cv_logloss", "cv_accuracy", "class_prior_logloss"):
            assert isinstance(sub[m], float) and math.isfinite(sub[m]), m
        assert 0.3 < sub["cv_logloss"] < 3.0 and 0.0 <= sub["cv_accuracy"] <= 1.0
        assert Path(sub["submission"]).is_file() and sub["backend"] == "local/inprocess"
        cal = _md(_mat(pipeline.instance, "student_calibration", k))
        assert cal["temperature"] > 0 and cal["nll_after"] <= cal["nll_before"] + 1e-9
        # the fold's predictions use the temperature its calibration fitted
        assert sub["temperature"] == pytest.approx(cal["temperature"])
        fd = _md(_mat(pipeline.instance, "fold_data", k))
        assert fd["train_rows"] + fd["valid_rows"] == 300 and fd["valid_rows"] == 60
        st = _md(_mat(pipeline.instance, "student_model", k))
        assert st["adapter_size_mb"] > 0 and st["kd_alpha"] == 0.5
    folds = _md(_mat(pipeline.instance, "fold_assignments"))
    assert Path(folds["path"]).name == "folds_5_seed42.json" and folds["rows"] == 300
    assert sorted(folds["fold_sizes"].values()) == [60] * 5
    table = _md(_mat(pipeline.instance, "train_table"))
    assert table["rows"] == 300 and len(table["source_sha256"]) == 64
    assert sum(v for k, v in table.items() if k.startswith("label_mean_")) == pytest.approx(1.0)
    toof = _md(_mat(pipeline.instance, "teacher_oof"))
    assert toof["rows"] == 300 and toof["oof_coverage"] == 1.0 and math.isfinite(toof["oof_logloss_llama"])


def test_final_steps_metadata(pipeline) -> None:  # type: ignore[no-untyped-def]
    q = _md(_mat(pipeline.instance, "quantized_model"))
    assert q["method"] in {"gptq", "bnb8", "none"} and Path(q["quantized_path"]).is_dir()
    if q["method"] != "gptq":
        assert q["fallback_reason"], "a fallback must say why"
    merged = _md(_mat(pipeline.instance, "merged_model"))
    temps = [_md(_mat(pipeline.instance, "student_calibration", k))["temperature"] for k in FOLDS]
    assert merged["temperature"] == pytest.approx(sum(temps) / len(temps), rel=1e-6)  # mean rule
    ens = _md(_mat(pipeline.instance, "final_ensemble"))
    assert ens["mode"] == "blend"
    assert ens["sources"][0] == "tta_submission" and len(ens["sources"]) == 6
    assert sum(ens["weights"]) == pytest.approx(1.0) and ens["weights"][0] == pytest.approx(0.5)
    fold_ll = [_md(_mat(pipeline.instance, "student_fold_submission", k))["cv_logloss"] for k in FOLDS]
    assert ens["mean_cv_logloss"] == pytest.approx(sum(fold_ll) / 5)
    assert ens["per_fold"].count("\n| ") >= 5 + 1  # five fold rows (+ sources table)
    sub = pd.read_csv(ens["submission"], dtype={"id": str})
    tta = pd.read_csv(_md(_mat(pipeline.instance, "tta_submission"))["submission"], dtype={"id": str})
    assert list(sub["id"]) == list(tta["id"]) and len(sub) == 60


def test_checks_passed_per_partition(pipeline) -> None:  # type: ignore[no-untyped-def]
    inst = pipeline.instance

    def evals(key: str, name: str) -> list:
        ck = AssetCheckKey(AssetKey.from_user_string(key), name)
        recs = inst.event_log_storage.get_asset_check_execution_history(ck, limit=100)
        return [r.event.dagster_event.event_specific_data for r in recs if r.event and r.event.dagster_event]

    for key, name in [("fold_assignments", "folds_disjoint_and_cover"), ("fold_assignments", "folds_stratified"),
                      ("teacher_oof", "oof_covers_train_once_per_family"), ("tta_submission", "submission_valid"),
                      ("final_ensemble", "submission_valid")]:
        ev = evals(key, name)
        assert ev and all(e.passed for e in ev), (key, name)
    ev = evals("student_fold_submission", "submission_valid")
    assert sorted(e.partition for e in ev) == FOLDS and all(e.passed for e in ev)
    warn = evals("student_fold_submission", "beats_class_prior")
    assert sorted(e.partition for e in warn) == FOLDS
    assert all(not e.blocking and e.severity.value == "WARN" for e in warn)


def test_seed_layout_links_point_at_latest(pipeline) -> None:  # type: ignore[no-untyped-def]
    seed = pipeline.artifacts / "seed_layout"
    folds = seed / "data/processed_data/folds_5_seed42.json"
    assert folds.resolve() == (artifacts.latest(pipeline.artifacts, "fold_assignments") / "folds_5_seed42.json")
    for k in FOLDS:
        link = seed / f"model_save/distilled_student_fold_{k}"
        assert link.resolve() == artifacts.latest(pipeline.artifacts, "student_model", k) / "model"
        assert (link / "adapter_config.json").exists()
    assert (seed / "sub/submission.csv").resolve() == artifacts.latest(pipeline.artifacts, "final_ensemble") / "submission.csv"
    assert (seed / "model_save/final_quantized_model").is_dir()


STUDENT_CHAIN = {"student_model", "student_calibration", "student_fold_submission", "averaged_lora",
                 "merged_model", "quantized_model", "tta_submission", "final_ensemble",
                 "quality_report"}  # on demand, but it reads the student chain's outputs


def _stale(instance: DagsterInstance, defs) -> set[str]:  # type: ignore[no-untyped-def]
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._time import get_current_datetime

    g = defs.resolve_asset_graph()
    # what the UI computes (the webserver's request context is the loading context)
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=g)
    resolver = CachingStaleStatusResolver(instance, g, loading_context=view)
    out = set()
    for key in g.materializable_asset_keys:
        if g.get(key).tags.get("arena/on_demand") == "true":  # quality report (issue 8): not in the waves
            continue
        parts = FOLDS if g.get(key).is_partitioned else [None]
        for p in parts:
            status = resolver.get_status(key, p)
            assert status != StaleStatus.MISSING, key
            if status == StaleStatus.STALE:
                out.add(key.to_user_string())
    return out


def test_staleness_follows_exactly_the_changed_setting(pipeline) -> None:  # type: ignore[no-untyped-def]
    """Dagster 1.13 marks STALE the assets whose code version changed (its dependents turn stale
    once it is re-materialized with a new data version: no upstream-stale propagation). So a
    changed alpha marks the student model (every fold) stale and nothing else, and the assets
    downstream of it are exactly the student chain."""
    path = str(pipeline.settings_path)
    assert _stale(pipeline.instance, build_definitions(path)) == set()
    changed = build_definitions(path, {"student": {"kd": {"alpha": 0.9}}})
    stale = _stale(pipeline.instance, changed)
    assert stale == {"student_model"}
    g = changed.resolve_asset_graph()
    downstream = {k.to_user_string() for k in AssetSelection.assets("student_model").downstream().resolve(g)}
    assert downstream == STUDENT_CHAIN
    assert _stale(pipeline.instance, build_definitions(path, {"ensemble": {"mode": "merged"}})) == {"final_ensemble"}
    assert _stale(pipeline.instance, build_definitions(path, {"teacher": {"lora": {"r": 2}}})) == {"llama/teacher_model"}


def test_automation_requests_only_stale_partitions(pipeline) -> None:  # type: ignore[no-untyped-def]
    """Across a cron tick: nothing current is retrained; a changed alpha requests the stale
    student of every fold (calibration and submission follow once its new data version lands:
    tests/assets/test_automation.py walks the whole chain)."""
    from dagster import evaluate_automation_conditions

    path = str(pipeline.settings_path)
    t0 = dt.datetime.now(dt.timezone.utc)
    first = evaluate_automation_conditions(defs=build_definitions(path), instance=pipeline.instance, evaluation_time=t0)
    assert first.total_requested == 0

    def requested(defs) -> dict[str, int]:  # type: ignore[no-untyped-def]
        r = evaluate_automation_conditions(defs=defs, instance=pipeline.instance,
                                           evaluation_time=t0 + dt.timedelta(days=1), cursor=first.cursor)
        return {x.key.to_user_string(): x.true_subset.size for x in r.results
                if x.true_subset.size and not x.key.to_user_string().startswith("raw_")}

    assert requested(build_definitions(path)) == {}
    got = requested(build_definitions(path, {"student": {"kd": {"alpha": 0.9}}}))
    assert got == {"student_model": 5}


def test_failed_step_leaves_previous_version(pipeline, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from arena_assets.gpu import calibrate as cal_mod
    from tests.assets import steps_for_tests as steps

    def crash(*args, out_dir, **kwargs):  # type: ignore[no-untyped-def]
        return steps.crash_halfway(out_dir=out_dir)

    monkeypatch.setattr(cal_mod, "calibrate", crash)
    before = artifacts.latest(pipeline.artifacts, "student_calibration", "0")
    content = (before / "calibration.json").read_bytes()
    siblings = sorted(p.name for p in before.parent.iterdir())
    defs = build_definitions(str(pipeline.settings_path))
    # a separate, throw-away instance: the shared one keeps a clean history for the UI tests
    res = materialize(list(defs.assets), selection=[AssetKey("student_calibration")], partition_key="0",
                      instance=DagsterInstance.ephemeral(), resources=defs.resources, raise_on_error=False)
    assert not res.success
    after = artifacts.latest(pipeline.artifacts, "student_calibration", "0")
    assert after == before and (after / "calibration.json").read_bytes() == content
    assert sorted(p.name for p in before.parent.iterdir()) == siblings, "no partial version or staging dir"
    link = pipeline.artifacts / "seed_layout"
    assert not any("partial.bin" in str(p) for p in link.rglob("*"))
