"""Automation (issue 14, "Automation retrains what is current"): what the automation sensor
requests, evaluated with ``dagster.evaluate_automation_conditions`` over a real instance holding
real materializations of the tiny pipeline.

Each test works on its own copy of the session's materialized pipeline (``pipeline`` fixture:
instance, settings file, inputs and artifacts copied into ``tmp_path``), so it may re-materialize,
change input files and evaluate as many ticks as it likes. A tick is one evaluation at a given
``evaluation_time`` with the previous tick's cursor; the cron (``0 3 * * *``) is crossed by moving
the clock a day. Settings changes go through ``build_definitions(path, overrides)``: the code
versions follow whatever ``Settings.for_step`` hashes.

The last test needs no pipeline: it pins the data-version semantics on a two-asset graph with
explicit and derived data versions.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dagster import (
    AssetKey,
    AssetSelection,
    DagsterInstance,
    DataVersion,
    MaterializeResult,
    asset,
    evaluate_automation_conditions,
    materialize,
)

from arena_assets.assets.automation import conditions
from arena_assets.assets.pipeline import observe_sources
from arena_assets.definitions import build_definitions

FOLDS = {"0", "1", "2", "3", "4"}
NEW_ALPHA = {"student": {"kd": {"alpha": 0.9}}}
MINUTE = dt.timedelta(minutes=1)
DAY = dt.timedelta(days=1)
Requested = dict[str, "set[str] | None"]


# ----------------------------------------------------------------------------------- harness
@dataclass
class Sandbox:
    """A private copy of the session's materialized pipeline and a clock for the sensor's ticks."""

    root: Path
    instance: DagsterInstance
    clock: dt.datetime
    log: list[Requested] = field(default_factory=list)

    @property
    def settings_path(self) -> str:
        return str(self.root / "arena.yaml")

    def defs(self, overrides: dict[str, Any] | None = None) -> Any:
        return build_definitions(self.settings_path, overrides)

    def tick(self, defs: Any, cursor: Any = None, advance: dt.timedelta = MINUTE) -> tuple[Requested, Any]:
        """One sensor evaluation ``advance`` after the previous one: (requested, cursor)."""
        self.clock += advance
        res = evaluate_automation_conditions(defs=defs, instance=self.instance, evaluation_time=self.clock,
                                             cursor=cursor)
        got = requested(defs, res)
        self.log.append(got)
        return got, res.cursor

    def materialize(self, defs: Any, keys: list[str], partition: str | None = None, ok: bool = True) -> Any:
        res = materialize(list(defs.assets), selection=[AssetKey.from_user_string(k) for k in keys],
                          partition_key=partition, instance=self.instance, resources=defs.resources,
                          raise_on_error=ok)
        assert res.success == ok, (keys, partition)
        return res

    def run_requested(self, defs: Any, got: Requested) -> None:
        """What the sensor's runs would do: materialize every requested partition (one run per
        partition key, as Dagster groups them; the selection runs in dependency order)."""
        by_partition: dict[str | None, list[str]] = {}
        for key, parts in got.items():
            for p in sorted(parts) if parts is not None else [None]:
                by_partition.setdefault(p, []).append(key)
        for p, keys in sorted(by_partition.items(), key=lambda kv: (kv[0] is not None, kv[0] or "")):
            self.materialize(defs, keys, p)


def requested(defs: Any, res: Any) -> Requested:
    """The materializable asset partitions an evaluation requests (observations left out)."""
    g = defs.resolve_asset_graph()
    out: Requested = {}
    for r in res.results:
        key = r.key
        if not isinstance(key, AssetKey) or r.true_subset.is_empty or not g.get(key).is_materializable:
            continue
        out[key.to_user_string()] = (set(r.true_subset.expensively_compute_partition_keys())
                                     if r.true_subset.is_partitioned else None)
    return out


def observed(defs: Any, res_results: Any) -> set[str]:
    g = defs.resolve_asset_graph()
    return {r.key.to_user_string() for r in res_results
            if isinstance(r.key, AssetKey) and not r.true_subset.is_empty and not g.get(r.key).is_materializable}


def dagster_stale(instance: DagsterInstance, defs: Any) -> Requested:
    """What the UI shows STALE (Dagster's own, private, stale-status resolver; tests only)."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._time import get_current_datetime

    g = defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
                          instance=instance, asset_graph=g)
    resolver = CachingStaleStatusResolver(instance, g, loading_context=view)
    out: Requested = {}
    for key in g.materializable_asset_keys:
        node = g.get(key)
        if node.tags.get("arena/on_demand") == "true":  # the quality report: materialized on demand only
            continue
        for p in sorted(FOLDS) if node.is_partitioned else [None]:
            if resolver.get_status(key, p) == StaleStatus.STALE:
                k = key.to_user_string()
                if p is None:
                    out[k] = None
                else:
                    out.setdefault(k, set()).add(p)  # type: ignore[union-attr]
    return out


def data_versions(instance: DagsterInstance, key: str, n: int = 2) -> list[str | None]:
    recs = instance.fetch_materializations(AssetKey.from_user_string(key), limit=n).records
    return [(r.asset_materialization.tags or {}).get("dagster/data_version") for r in recs]


def shrink_train_csv(root: Path, drop: int = 20) -> None:
    """A new train.csv (its last ``drop`` rows removed): a new file hash, still a valid table."""
    p = root / "inputs" / "train.csv"
    import pandas as pd

    df = pd.read_csv(p, dtype=str, keep_default_na=False)
    df.iloc[: len(df) - drop].to_csv(p, index=False)


@pytest.fixture
def sandbox(pipeline, tmp_path: Path) -> Iterator[Sandbox]:  # type: ignore[no-untyped-def]
    root = tmp_path / "session"
    shutil.copytree(pipeline.root, root, symlinks=True)
    instance = DagsterInstance.from_config(str(root / "dagster_home"))
    # noon tomorrow: minute steps never cross the 03:00 cron tick, a day's step always does
    noon = (dt.datetime.now(dt.UTC) + DAY).replace(hour=12, minute=1, second=0, microsecond=0)
    try:
        yield Sandbox(root=root, instance=instance, clock=noon)
    finally:
        instance.dispose()


# ----------------------------------------------------------------------------------- tests
@pytest.mark.slow
def test_unchanged_upstream_rerun_requests_nothing(sandbox: Sandbox) -> None:
    """Re-running the cheap ``teacher_oof`` (same code version, same inputs) gives the same data
    version, so no student fold is requested: not at once, not at the cron tick."""
    defs = sandbox.defs()
    got, cur = sandbox.tick(defs)  # the sensor's first evaluation
    assert got == {}
    got, cur = sandbox.tick(defs, cur)
    assert got == {}, "everything is current"
    sandbox.materialize(defs, ["teacher_oof"])
    new, old = data_versions(sandbox.instance, "teacher_oof")
    assert new == old, "Dagster derives the same data version (code version + input data versions)"
    got, cur = sandbox.tick(defs, cur)
    assert got == {}
    got, cur = sandbox.tick(defs, cur, advance=DAY)
    assert got == {}, "nothing is missing or stale at the cron tick either"


@pytest.mark.slow
def test_changed_input_file_requests_exactly_its_dependents(sandbox: Sandbox) -> None:
    """An observation with the same hash requests nothing; a new train.csv hash requests
    ``train_table`` (its one dependent) at the next evaluation, not waiting for the cron; once the
    new table lands, exactly the dependents whose other upstreams are settled follow --
    ``fold_data``, ``teacher_oof``, ``quantized_model`` and ``final_ensemble`` also read
    ``train_table`` but wait: ``fold_assignments``, upstream of them too, is about to change."""
    defs = sandbox.defs()
    _, cur = sandbox.tick(defs)
    observe_sources(defs, sandbox.instance)  # same files: same hashes
    got, cur = sandbox.tick(defs, cur)
    assert got == {}
    shrink_train_csv(sandbox.root)
    observe_sources(defs, sandbox.instance)
    got, cur = sandbox.tick(defs, cur)
    assert got == {"train_table": None}
    sandbox.run_requested(defs, got)
    got, cur = sandbox.tick(defs, cur)
    assert got == {"fold_assignments": None, "gemma/post_pretrained_base": None, "llama/post_pretrained_base": None}


@pytest.mark.slow
def test_failed_blocking_check_upstream_requests_nothing_downstream(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """``fold_assignments`` re-materialized from a new train table (new data version) with its
    blocking check failed: ``fold_data`` and everything below it are not requested. The same
    materialization with the check passing requests every fold of ``fold_data``."""
    from arena_assets.assets import checks as chk

    defs = sandbox.defs()
    below = {k.to_user_string() for k in AssetSelection.assets("fold_assignments").downstream(include_self=False)
             .resolve(defs.resolve_asset_graph())}
    _, cur = sandbox.tick(defs)
    shrink_train_csv(sandbox.root)
    observe_sources(defs, sandbox.instance)
    _, cur = sandbox.tick(defs, cur)
    sandbox.materialize(defs, ["train_table"])  # what that tick requested
    real = chk.folds_stratified
    monkeypatch.setattr(chk, "folds_stratified", lambda *a, **k: (False, {"forced": "by the test"}))
    sandbox.materialize(defs, ["fold_assignments"], ok=False)  # recorded, then the blocking check fails
    got, cur = sandbox.tick(defs, cur)
    assert "fold_data" not in got and not set(got) & below, got
    got, cur = sandbox.tick(defs, cur, advance=DAY)
    assert "fold_data" not in got, "not at the cron tick either"
    monkeypatch.setattr(chk, "folds_stratified", real)
    sandbox.materialize(defs, ["fold_assignments"])
    got, cur = sandbox.tick(defs, cur)
    assert got.get("fold_data") == FOLDS, got


@pytest.mark.slow
def test_settings_change_never_run_sensor_requests_exactly_stale_at_cron_tick(sandbox: Sandbox) -> None:
    """A changed ``student.kd.alpha`` and a sensor that never ran: its first evaluations request
    nothing (not a cron tick), the next cron tick requests exactly what Dagster shows STALE (every
    fold of ``student_model``), never a current partition -- the student chain below follows once
    the new models' data versions land, not in the same tick."""
    new = sandbox.defs(NEW_ALPHA)
    stale = dagster_stale(sandbox.instance, new)
    assert stale == {"student_model": FOLDS}
    got, cur = sandbox.tick(new)  # the sensor's very first evaluation, after the change
    assert got == {}
    got, cur = sandbox.tick(new, cur, advance=dt.timedelta(hours=2))
    assert got == {}, "a stale partition waits for the cron tick"
    got, cur = sandbox.tick(new, cur, advance=DAY)
    assert got == stale
    got, cur = sandbox.tick(new, cur)
    assert got == {}, "requested once (the runs are under way), not again"


@pytest.mark.slow
def test_restarted_sensor_requests_only_what_is_still_stale(sandbox: Sandbox) -> None:
    """The sensor ran with the old settings, was stopped, the settings changed, fold 0 of the
    student was rebuilt by hand; restarted days later with its old cursor it requests the folds
    still stale (1-4) and fold 0's dependents (stale: their upstream's data version changed) --
    not fold 0, and not ``averaged_lora`` while folds 1-4 are about to change. Then the student
    chain follows hop by hop, every partition requested exactly once, nothing outside it."""
    old = sandbox.defs()
    _, cur = sandbox.tick(old)
    got, cur = sandbox.tick(old, cur)
    assert got == {}
    new = sandbox.defs(NEW_ALPHA)
    sandbox.materialize(new, ["student_model"], partition="0")
    stale = dagster_stale(sandbox.instance, new)
    assert stale == {"student_model": FOLDS - {"0"}, "student_calibration": {"0"}, "student_fold_submission": {"0"},
                     "averaged_lora": None}
    got, cur = sandbox.tick(new, cur, advance=3 * DAY)
    assert got == {"student_model": FOLDS - {"0"}, "student_calibration": {"0"}, "student_fold_submission": {"0"}}
    # every request is stale by Dagster's meaning (averaged_lora, stale too, waits for folds 1-4)
    assert all(k in stale and (stale[k] is None or parts <= stale[k]) for k, parts in got.items())

    counts: dict[tuple[str, str | None], int] = {}
    for _ in range(12):  # the sensor keeps ticking while the requested runs land
        for k, parts in got.items():
            for p in parts if parts is not None else [None]:
                counts[(k, p)] = counts.get((k, p), 0) + 1
        if not got:
            break
        sandbox.run_requested(new, got)
        got, cur = sandbox.tick(new, cur)
    assert got == {}
    chain = {"student_model", "student_calibration", "student_fold_submission"}
    want = {(k, p) for k in chain for p in FOLDS} - {("student_model", "0")}
    want |= {(k, None) for k in ("averaged_lora", "merged_model", "quantized_model", "tta_submission", "final_ensemble")}
    assert set(counts) == want, sorted(set(counts) ^ want)
    assert set(counts.values()) == {1}, {k: v for k, v in counts.items() if v > 1}
    assert dagster_stale(sandbox.instance, new) == {}
    got, cur = sandbox.tick(new, cur, advance=DAY)
    assert got == {}, "all current: nothing at the next cron tick"


@pytest.mark.slow
def test_sources_are_observed_on_observe_cron_only(sandbox: Sandbox) -> None:
    defs = sandbox.defs()
    g = defs.resolve_asset_graph()
    sources = {n.key.to_user_string() for n in g.asset_nodes if n.is_observable and not n.is_materializable}
    t0 = sandbox.clock.replace(minute=1)
    r0 = evaluate_automation_conditions(defs=defs, instance=sandbox.instance, evaluation_time=t0)
    r1 = evaluate_automation_conditions(defs=defs, instance=sandbox.instance, evaluation_time=t0 + MINUTE,
                                        cursor=r0.cursor)
    assert observed(defs, r1.results) == set()
    r2 = evaluate_automation_conditions(defs=defs, instance=sandbox.instance, evaluation_time=t0 + 5 * MINUTE,
                                        cursor=r1.cursor)  # crosses :05 of */5
    assert observed(defs, r2.results) == sources and requested(defs, r2) == {}


@pytest.mark.slow
def test_sensor_ticks_in_process_with_a_string_cursor(sandbox: Sandbox) -> None:
    """The path the code server runs (``use_user_code_server``): the sensor's own evaluation
    function, two ticks, the cursor and the evaluations (with the Python conditions' nodes)
    serialized. A settings change requests no model partition outside a cron tick."""
    from dagster import build_sensor_context
    from dagster_shared.serdes import serialize_value

    defs = sandbox.defs(NEW_ALPHA)
    repo = defs.get_repository_def()
    sensor = repo.get_sensor_def("arena_automation")
    sources = {AssetKey(k) for k in ("raw_train_csv", "raw_test_csv", "raw_external")}
    cursor = None
    for _ in range(2):
        data = sensor.evaluate_tick(build_sensor_context(instance=sandbox.instance, repository_def=repo, cursor=cursor))
        assert isinstance(data.cursor, str) and data.cursor
        for rr in data.run_requests or []:  # an observation, if the clock crossed */5 meanwhile
            assert set(rr.asset_selection or []) <= sources, rr
        for ev in data.automation_condition_evaluations or []:
            serialize_value(ev)
        cursor = data.cursor


def test_sensor_runs_in_code_server_and_says_what_fires() -> None:
    """Dagster evaluates conditions written in Python only in the code server."""
    repo = Path(__file__).resolve().parents[2]
    defs = build_definitions(str(repo / "arena.yaml"))
    (sensor,) = defs.sensors
    assert sensor.sensor_type.value == "AUTOMATION"  # evaluated in the code server, not the asset daemon
    for words in ("data version", "missing or stale by code version", "0 3 * * *", "*/5 * * * *",
                  "blocking check"):
        assert words in sensor.description, words
    cond = defs.resolve_asset_graph().get(AssetKey("student_model")).automation_condition
    assert "on cron 0 3 * * *" in cond.get_label() and "eager on input changes" in cond.get_label()


# ------------------------------------------------------------------ data versions, explicit or derived
def _two_assets(version_of_a: dict[str, str | None], code_version: str | None = "1") -> list[Any]:
    """``a`` -> ``b``, both with the recipe's asset condition; ``a`` returns
    ``version_of_a["v"]`` as its explicit data version (None: Dagster derives one)."""
    cond = _asset_conditions()["cron"]

    @asset(code_version=code_version, automation_condition=cond)
    def a() -> MaterializeResult:
        v = version_of_a["v"]
        return MaterializeResult(data_version=DataVersion(v) if v is not None else None)

    @asset(deps=[a], code_version="1", automation_condition=cond)
    def b() -> MaterializeResult:
        return MaterializeResult()

    return [a, b]


@pytest.mark.parametrize(
    ("first", "rerun", "code_version", "fires"),
    [
        ("x", "x", "1", False),   # explicit data version, unchanged: nothing
        ("x", "y", "1", True),    # explicit data version, changed: b
        (None, None, "1", False),  # derived (code version + inputs), unchanged: nothing
        (None, None, None, True),  # no code version: Dagster takes the run id, every re-run is new
    ],
)
def test_upstream_rerun_fires_only_on_a_new_data_version(first: str | None, rerun: str | None,
                                                         code_version: str | None, fires: bool) -> None:
    version = {"v": first}
    assets = _two_assets(version, code_version)
    t = dt.datetime(2030, 1, 1, 12, 1, tzinfo=dt.UTC)
    with DagsterInstance.ephemeral() as instance:
        materialize(assets, instance=instance)
        r = evaluate_automation_conditions(defs=assets, instance=instance, evaluation_time=t)
        r = evaluate_automation_conditions(defs=assets, instance=instance, evaluation_time=t + MINUTE, cursor=r.cursor)
        assert r.total_requested == 0
        version["v"] = rerun
        materialize(assets, selection=["a"], instance=instance)
        r = evaluate_automation_conditions(defs=assets, instance=instance, evaluation_time=t + 2 * MINUTE, cursor=r.cursor)
        got = {x.key.to_user_string() for x in r.results if not x.true_subset.is_empty}
        assert got == ({"b"} if fires else set())


def _asset_conditions() -> dict[str, Any]:
    from arena_assets.core.settings import load_settings

    return conditions(load_settings(str(Path(__file__).resolve().parents[2] / "arena.yaml")))


def test_conditions_keys() -> None:
    """The factories' roles: observe (sources), eager and cron (the same asset condition)."""
    c = _asset_conditions()
    assert set(c) == {"observe", "eager", "cron"} and c["eager"] is c["cron"]
