"""When Dagster re-materializes by itself: declarative automation built from the settings.

Why not ``build_schedule_from_partitioned_job``: it requests EVERY partition on every tick
(python-stack.md), i.e. retrains what is current. Declarative automation evaluates each partition.
What fires when (``conditions``; one automation sensor evaluates everything, ~every 30 s):

- raw input files (observable sources): observed (hashed; the hash is the data version) on each
  ``automation.observe_cron`` tick. Nothing else.
- every asset partition is requested when one of these holds:

  * **an upstream's data version changed** (any evaluation, not only on the cron tick): a
    dependency partition got a new *data version* since the previous evaluation and the run that
    produced it did not also plan this partition. The trigger is latched until the partition is
    requested or materialized, so a blocked partition fires once it is unblocked. Re-running an
    upstream that produces the same data version (same code version and inputs, or the same
    explicit ``data_version=``) triggers nothing; a changed input file triggers exactly the
    assets that read it, and their own dependents follow hop by hop as each new data version lands.
  * **on each ``automation.cron`` tick**: the partition is **missing**, or **stale by code
    version** -- its latest materialization's ``dagster/code_version`` tag differs from the
    asset's current code version (the settings hash). That is what the UI shows as STALE after a
    settings change; it is read from the instance, not from the sensor's tick history, so a sensor
    that was never on, was stopped for weeks or lost its cursor requests exactly the stale
    partitions, and a partition rebuilt by hand since the change is current and not requested.
    A partition that is stale at a tick but blocked (below) fires once unblocked; one that turns
    stale between ticks waits for the next tick.

  and never while: the partition is in progress, a dependency is in progress, a dependency is
  missing (and not requested in the same run), a blocking check of a dependency's latest
  materialization has not passed, or anything upstream is about to change -- an ancestor
  partition, any number of hops up along the partition mappings, that is in progress, stale by
  code version, or requested this tick in a run this partition does not join
  (``UpstreamWillChange``). Dagster's ``eager()`` gates on direct dependencies only; here, after a
  new train table, ``teacher_oof`` (reading ``train_table`` and, via folds and teachers,
  ``fold_assignments``) waits for the new teacher probabilities instead of being rebuilt from the
  old ones first and again later.

Dependents of a partition rebuilt for a settings change are NOT requested in the same tick: they
are current (by Dagster's meaning) until the rebuilt partition's new data version lands, then the
data-version branch requests them on the next evaluation. So no tick requests a current
partition, and a chain is rebuilt hop by hop, each partition once.

Blind spot (Dagster's ``data_version_changed`` compares against the previous evaluation's event
log position): a data-version change that happened before the sensor's very first evaluation (or
before a cursor reset) is not seen; a stopped-then-restarted sensor keeps its cursor and sees it.

The sensor is off by default (``automation.running``) so that opening the UI after the demo never
starts training behind the user's back. It runs in the code server (``use_user_code_server``),
which Dagster requires for conditions written in Python (``CodeVersionStale``).
"""

from __future__ import annotations

import warnings
from typing import Any

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    AutomationContext,
    AutomationResult,
    DefaultSensorStatus,
)

from arena_assets.core.settings import Settings

CODE_VERSION_TAG = "dagster/code_version"


def _stale_subset(context: AutomationContext, subset: Any) -> Any:
    """The part of ``subset`` (an EntitySubset of one asset) whose latest materialization was tagged
    with a code version other than the asset's current one. Read from the instance, not from the
    sensor's history; missing partitions are not in it."""
    key = subset.key
    empty = context.asset_graph_view.get_empty_subset(key=key)
    if subset.is_empty or not isinstance(key, AssetKey):
        return empty
    node = context.asset_graph.get(key)
    current = node.code_version
    if current is None or not node.is_materializable:
        return empty
    instance = context.asset_graph_view.instance
    if not subset.is_partitioned:
        latest = instance.get_latest_materialization_code_versions([key]).get(key)
        return subset if latest is not None and latest != current else empty
    last_id = context.max_storage_id  # this evaluation's view of the event log
    stale = set()
    for pk in subset.expensively_compute_partition_keys():
        flt = AssetRecordsFilter(asset_key=key, asset_partitions=[pk],
                                 before_storage_id=last_id + 1 if last_id is not None else None)
        recs = instance.fetch_materializations(flt, limit=1).records
        mat = recs[0].asset_materialization if recs else None
        if mat is not None and (mat.tags or {}).get(CODE_VERSION_TAG) != current:
            stale.add(pk)
    return subset.compute_intersection_with_partition_keys(stale)


class CodeVersionStale(AutomationCondition):
    """True for the partitions whose latest materialization was tagged with a code version other
    than the asset's current one: what the UI shows as STALE after a settings change. Missing
    partitions are not stale (``missing()`` covers them). Stateless: no cursor, no tick history,
    so a sensor that never ran, was stopped or lost its cursor sees the same thing."""

    @property
    def name(self) -> str:
        return "code_version_stale"

    @property
    def description(self) -> str:
        return "Latest materialization's code version differs from the current code version"

    @property
    def requires_cursor(self) -> bool:
        return False

    def evaluate(self, context: AutomationContext) -> AutomationResult:
        return AutomationResult(context=context, true_subset=_stale_subset(context, context.candidate_subset))


class UpstreamWillChange(AutomationCondition):
    """True for the partitions that have an upstream partition about to change: an ancestor
    partition (mapped along each edge's partition mapping, any number of hops up) that is in
    progress, stale by code version, or requested by this evaluation -- except a direct
    dependency requested in a run this partition joins (``will_be_requested``), which runs first.

    Why: Dagster's ``eager()`` gates on direct dependencies only, so after ``train_table``
    changes, ``teacher_oof`` (a dependent of ``train_table`` AND, through the folds and teachers,
    of ``fold_assignments``) would be rebuilt right away from the old teacher probabilities and
    again when the new ones land. This waits until nothing upstream is going to change, then the
    latched data-version trigger fires once."""

    @property
    def name(self) -> str:
        return "upstream_will_change"

    @property
    def description(self) -> str:
        return "An upstream partition is in progress, stale by code version, or requested this tick in another run"

    @property
    def requires_cursor(self) -> bool:
        return False

    async def evaluate(self, context: AutomationContext) -> AutomationResult:
        cand = context.candidate_subset
        if cand.is_empty or not isinstance(cand.key, AssetKey):
            return AutomationResult(context=context, true_subset=context.get_empty_subset())
        graph, view = context.asset_graph, context.asset_graph_view
        memo: dict[AssetKey, Any] = {}

        async def will_change(key: AssetKey) -> Any:
            """Partitions of ``key`` that are about to change, themselves or through an ancestor."""
            if key in memo:
                return memo[key]
            node = graph.get(key)
            out = view.get_empty_subset(key=key)
            if node.is_materializable:  # an observation changes nothing by itself (the data branch sees it)
                full = view.get_full_subset(key=key)
                busy = await context.for_child_condition(
                    AutomationCondition.in_progress(), child_indices=[None], candidate_subset=full).evaluate_async()
                requested = context.request_subsets_by_key.get(key)
                out = out.compute_union(busy.true_subset).compute_union(_stale_subset(context, full))
                if requested is not None:
                    out = out.compute_union(requested)
            for parent in sorted(node.parent_keys):
                if graph.has(parent):
                    up = await will_change(parent)
                    if not up.is_empty:
                        out = out.compute_union(up.compute_child_subset(key))
            memo[key] = out
            return out

        blocked = context.get_empty_subset()
        for dep in sorted(graph.get(cand.key).parent_keys):
            if not graph.has(dep):
                continue
            changing = await will_change(dep)
            if changing.is_empty:
                continue
            same_run = await context.for_child_condition(
                AutomationCondition.will_be_requested(), child_indices=[None],
                candidate_subset=view.get_full_subset(key=dep)).evaluate_async()
            changing = changing.compute_difference(same_run.true_subset)
            if not changing.is_empty:
                blocked = blocked.compute_union(changing.compute_child_subset(cand.key))
        return AutomationResult(context=context, true_subset=cand.compute_intersection(blocked))


def model_condition(cron: str) -> AutomationCondition:
    """The condition of every materializable asset (see the module docstring)."""
    AC = AutomationCondition
    stale = CodeVersionStale()
    missing_or_stale = (AC.missing() | stale).with_label("missing or stale by code version")
    on_cron = (
        (AC.cron_tick_passed(cron) & missing_or_stale).since_last_handled().with_label(
            f"missing or stale by code version at a tick of {cron}")
        & missing_or_stale
    ).with_label(f"on cron {cron}: missing or stale by code version")
    on_data = AC.any_deps_match(
        (AC.data_version_changed() & ~AC.executed_with_root_target()).with_label(
            "data version changed (by another run)")
    ).with_label("upstream data version changed").since_last_handled().with_label(
        "upstream data version changed since last handled")
    return (
        (on_data | on_cron)
        & ~AC.in_progress()
        & ~AC.any_deps_in_progress()
        & ~AC.any_deps_missing()
        & AC.all_deps_blocking_checks_passed()
        & ~UpstreamWillChange()
    ).with_label(f"eager on input changes (an upstream's data version changed) | "
                 f"on cron {cron}: missing or stale by code version")


def conditions(settings: Settings) -> dict[str, Any]:
    """The automation conditions the asset factories attach. Keys: ``observe`` (observable
    sources), ``eager`` and ``cron`` (both: every materializable asset; kept as two keys for the
    factories, they map to the same condition)."""
    a = settings.automation
    asset_condition = model_condition(a.cron)
    return {
        "observe": AutomationCondition.cron_tick_passed(a.observe_cron).with_label(f"observe on {a.observe_cron}"),
        "eager": asset_condition,
        "cron": asset_condition,
    }


def automation_sensor(settings: Settings) -> AutomationConditionSensorDefinition:
    """The one sensor that evaluates every asset's condition (visible under Automation in the UI)."""
    warnings.filterwarnings("ignore", message=".*include_sources.*")
    warnings.filterwarnings("ignore", message=".*use_user_code_server.*")
    a = settings.automation
    return AutomationConditionSensorDefinition(
        "arena_automation",
        target=AssetSelection.all(include_sources=True),
        default_status=DefaultSensorStatus.RUNNING if a.running else DefaultSensorStatus.STOPPED,
        use_user_code_server=True,
        description=(
            f"Observes the raw input files on '{a.observe_cron}'. Requests an asset partition when an upstream's "
            f"data version changed (at any evaluation; an upstream re-run with the same data version triggers "
            f"nothing), or, at each '{a.cron}' tick, when it is missing or stale by code version (its last "
            "materialization's code version differs from the current settings hash; read from the instance, "
            "so a partition already rebuilt is never requested). Never while it is in progress, a dependency is "
            "missing or its blocking check has not passed, or anything upstream is about to change (in progress, "
            "stale by code version, or requested in another run)."
        ),
    )
