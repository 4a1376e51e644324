"""The settings resource: the one settings file, loaded into the plain typed objects of core/.

Why a resource and not Dagster ``Config`` classes: the steps receive the same pydantic objects
(core/settings.py) in-process, in a Slurm job, in a pod or in the GPTQ environment, none of which
has Dagster. The resource only says *which* file to read (and optional overrides for a one-off
run from the launchpad); the definitions read the same file when they load, so asset code
versions (staleness) and the values a run uses agree unless a run overrides them on purpose.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dagster import ConfigurableResource
from pydantic import PrivateAttr

from arena_assets.core.settings import SETTINGS_ENV, Settings, load_settings


def settings_path_from_env() -> str | None:
    """The settings file the code location reads: ``$ARENA_SETTINGS``, else ``./arena.yaml``."""
    env = os.environ.get(SETTINGS_ENV)
    if env:
        return env
    return "arena.yaml" if os.path.exists("arena.yaml") else None


class SettingsResource(ConfigurableResource):
    """Loads the settings file (YAML/TOML) into :class:`arena_assets.core.settings.Settings`.

    ``overrides_json`` is a JSON object merged over the file (nested keys), for a one-off run:
    e.g. ``{"student": {"kd": {"alpha": 0.7}}}``. Scheduled and automated runs use the file.
    """

    path: str | None = None
    overrides_json: str = ""

    _cache: Settings | None = PrivateAttr(default=None)

    def get(self) -> Settings:
        """The validated settings (loaded once per resource instance)."""
        if self._cache is None:
            overrides: dict[str, Any] | None = json.loads(self.overrides_json) if self.overrides_json else None
            self._cache = load_settings(self.path, overrides)
        return self._cache
