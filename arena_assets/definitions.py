"""The one Definitions object of the code location (``defs``), built from the settings file.

The settings file (``$ARENA_SETTINGS`` or ``./arena.yaml``; defaults = the demo) is read when the
definitions load: the model families become asset key prefixes, ``folds.n_folds`` the partitions,
and each asset's code version the hash of the settings its step uses. Loading imports neither torch
nor transformers (asset bodies import them), so the code server starts in seconds.

``defs`` is loaded from the ``dg`` project's defs folder (``arena_assets/defs/``; ``[tool.dg]`` in
pyproject.toml), so ``dg check defs``, ``dg dev`` and everything that names this module
(workspace.yaml, ``dagster dev -m``, the Helm values) load the same thing. ``build_definitions``
stays here for callers that pass another settings file or overrides (tests, the demo).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dagster import ComponentTree, Definitions

from arena_assets.assets.automation import automation_sensor, conditions
from arena_assets.assets.jobs import build_jobs
from arena_assets.assets.recipe import build_recipe_assets
from arena_assets.core.settings import Settings, load_settings
from arena_assets.resources.compute import ComputeResource
from arena_assets.resources.settings import SettingsResource, settings_path_from_env


def build_definitions(settings_path: str | None = None, overrides: dict[str, Any] | None = None) -> Definitions:
    """Definitions for one settings file (+ optional nested overrides, as tests use)."""
    path = settings_path if settings_path is not None else settings_path_from_env()
    if path is not None:
        path = os.path.abspath(path)  # run workers may start in another directory
    settings: Settings = load_settings(path, overrides)
    settings_res = SettingsResource(path=path, overrides_json=json.dumps(overrides) if overrides else "")
    assets = build_recipe_assets(settings, conditions(settings))
    # --- quality report (issue 8; assets/quality.py): on demand, not in the demo's waves
    from arena_assets.assets.quality import build_quality_assets

    assets += build_quality_assets(settings)
    # --- end quality report
    return Definitions(
        assets=assets,
        jobs=build_jobs(settings),
        sensors=[automation_sensor(settings)],
        resources={"settings": settings_res, "compute": ComputeResource(settings=settings_res)},
    )


def load_defs_folder() -> Definitions:
    """Every definition under ``arena_assets/defs/`` (what ``dg.load_from_defs_folder`` returns;
    the project root is given rather than searched for, so an installed wheel loads too)."""
    import arena_assets.defs as defs_module

    root = Path(__file__).resolve().parents[1]
    return ComponentTree.from_module(defs_module=defs_module, project_root=root).build_defs()


defs = load_defs_folder()
