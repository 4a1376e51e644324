"""When Dagster re-materializes by itself: declarative automation built from the settings.

Why not ``build_schedule_from_partitioned_job``: it requests EVERY partition on every tick
(python-stack.md), i.e. retrains what is current. Declarative automation evaluates each partition:

- ``observe``: the raw input files are observed (hashed) on ``automation.observe_cron``;
- every asset: ``eager`` — re-materialize when an upstream's data version changes (a changed
  input file, or an upstream re-materialized in the same tick), or when newly missing;
- OR on each ``automation.cron`` tick, re-materialize the partitions that are missing or whose
  code version (settings hash) changed since they were last handled; never one that is current.
  Their dependents follow in the same tick (``eager`` sees the upstream being requested).

All conditions are evaluated by one automation sensor, off by default (``automation.running``)
so that opening the UI after the demo never starts training behind the user's back.
"""

from __future__ import annotations

import warnings
from typing import Any

from dagster import AssetSelection, AutomationCondition, AutomationConditionSensorDefinition, DefaultSensorStatus

from arena_assets.core.settings import Settings


def conditions(settings: Settings) -> dict[str, Any]:
    """The automation conditions the asset factories attach (keys: observe, eager, cron)."""
    a = settings.automation
    not_busy = ~AutomationCondition.in_progress() & ~AutomationCondition.any_deps_in_progress()
    changed = (
        AutomationCondition.missing()
        | AutomationCondition.code_version_changed().since_last_handled()
        | AutomationCondition.any_deps_updated().since_last_handled()
    )
    cron = (
        AutomationCondition.cron_tick_passed(a.cron).since_last_handled()
        & changed
        & ~AutomationCondition.any_deps_missing()
        & not_busy
    ).with_label(f"on cron {a.cron}: missing or stale partitions only")
    asset_condition = (AutomationCondition.eager() | cron).with_label(
        f"eager on input changes | on cron {a.cron}: missing or stale only")
    return {
        "observe": AutomationCondition.cron_tick_passed(a.observe_cron).with_label(f"observe on {a.observe_cron}"),
        "eager": asset_condition,
        "cron": asset_condition,
    }


def automation_sensor(settings: Settings) -> AutomationConditionSensorDefinition:
    """The one sensor that evaluates every asset's condition (visible under Automation in the UI)."""
    warnings.filterwarnings("ignore", message=".*include_sources.*")
    return AutomationConditionSensorDefinition(
        "arena_automation",
        target=AssetSelection.all(include_sources=True),
        default_status=DefaultSensorStatus.RUNNING if settings.automation.running else DefaultSensorStatus.STOPPED,
        description=f"Observe inputs on '{settings.automation.observe_cron}'; re-materialize changed inputs' "
        f"dependents; on '{settings.automation.cron}' re-materialize missing or stale partitions only.",
    )
