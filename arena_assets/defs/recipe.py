"""The recipe: every asset, check, job and the automation sensor, built from the settings file.

Why a function and not a component: ``arena.yaml`` (or ``$ARENA_SETTINGS``) is the one settings
source. The graph's shape (model families, folds) and every code version come from it; a
component's ``defs.yaml`` would be a second place to put settings. The only thing a component
could hold is the settings path, and the environment variable already does that on every
process Dagster starts (webserver, daemon, code server, run workers, Slurm/k8s steps).
"""

from __future__ import annotations

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    from arena_assets.definitions import build_definitions

    return build_definitions()
