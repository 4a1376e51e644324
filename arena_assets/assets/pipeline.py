"""Materialize the whole recipe into a Dagster instance, stage by stage (demo, tests, benchmark).

Why stages: per-fold assets and all-fold assets alternate (folds → teachers → the OOF table of
every fold → students → averaging of every fold), and one Dagster run has at most one partition
key. So the graph is cut into waves: an unpartitioned wave runs as one run, a partitioned wave as
one run per fold, each wave containing every asset whose upstreams are done — the same order an
asset backfill launched from the UI follows. Every run is a real run in the instance, so
``dagster dev`` afterwards shows the history, metadata and check results.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from dagster import AssetKey, AssetsDefinition, DagsterInstance, Definitions, materialize

log = logging.getLogger(__name__)


@dataclass
class Wave:
    keys: list[AssetKey]
    partitioned: bool


@dataclass
class PipelineRun:
    """What :func:`materialize_pipeline` did: the waves, the run ids, the wall time per wave."""

    waves: list[Wave] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)
    wave_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def plan_waves(defs: Definitions, exclude: Iterable[AssetKey] = ()) -> list[Wave]:
    """Cut the materializable assets into alternating unpartitioned / partitioned waves."""
    graph = defs.resolve_asset_graph()
    excl = set(exclude)
    # --- quality report (issue 8): assets tagged arena/on_demand (assets/quality.py) are
    # materialized only when asked for by name, never in the default waves (demo, tests).
    excl |= {k for k in graph.materializable_asset_keys if graph.get(k).tags.get("arena/on_demand") == "true"}
    # --- end quality report
    todo = {k for k in graph.materializable_asset_keys if k not in excl}
    done: set[AssetKey] = set()
    waves: list[Wave] = []
    partitioned_turn = False
    while todo:
        wave: set[AssetKey] = set()
        grew = True
        while grew:
            grew = False
            for k in sorted(todo - wave, key=lambda k: k.to_user_string()):
                node = graph.get(k)
                if node.is_partitioned != partitioned_turn:
                    continue
                parents = {p for p in node.parent_keys if p in graph.materializable_asset_keys and p not in excl}
                if parents <= done | wave:
                    wave.add(k)
                    grew = True
        if wave:
            waves.append(Wave(keys=sorted(wave, key=lambda k: k.to_user_string()), partitioned=partitioned_turn))
            done |= wave
            todo -= wave
        elif not any(graph.get(k).is_partitioned != partitioned_turn for k in todo):
            raise RuntimeError(f"cannot order {sorted(k.to_user_string() for k in todo)}")
        partitioned_turn = not partitioned_turn
    return waves


def _assets(defs: Definitions) -> list[Any]:
    """The definitions' own asset objects (unbound: ``materialize`` binds the resources)."""
    return list(defs.assets or [])


def observe_sources(defs: Definitions, instance: DagsterInstance) -> str:
    """Observe the raw input files (their hashes become the sources' data versions)."""
    graph = defs.resolve_asset_graph()
    observable = {n.key for n in graph.asset_nodes if n.is_observable and not n.is_materializable}
    # materialize() of an observable source's key observes it (public API; dagster's observe()
    # is not exported at the top level in 1.13)
    res = materialize(_assets(defs), selection=sorted(observable, key=lambda k: k.to_user_string()),
                      instance=instance, resources=defs.resources, tags={"arena/stage": "observe"})
    return res.run_id


def materialize_pipeline(
    defs: Definitions,
    instance: DagsterInstance,
    partitions: Iterable[str] | None = None,
    exclude: Iterable[AssetKey] = (),
    echo: Callable[[str], None] | None = None,
    tags: dict[str, str] | None = None,
) -> PipelineRun:
    """Observe the inputs, then materialize every recipe asset wave by wave, every fold.

    Raises (``raise_on_error``) at the first failed run: later waves would only fail on missing
    inputs, and the artifacts already committed stay valid.
    """
    say = echo or log.info
    t0 = time.time()
    out = PipelineRun(waves=plan_waves(defs, exclude))
    graph = defs.resolve_asset_graph()
    assets: list[AssetsDefinition] = _assets(defs)
    out.run_ids.append(observe_sources(defs, instance))
    for i, wave in enumerate(out.waves):
        tw = time.time()
        names = ", ".join(k.to_user_string() for k in wave.keys)
        if wave.partitioned:
            pdef = graph.get(wave.keys[0]).partitions_def
            keys = list(partitions) if partitions is not None else pdef.get_partition_keys()
            for pk in keys:
                say(f"wave {i + 1}/{len(out.waves)} fold {pk}: {names}")
                res = materialize(assets, selection=wave.keys, partition_key=pk, instance=instance,
                                  resources=defs.resources, tags={"arena/wave": str(i + 1), **(tags or {})})
                out.run_ids.append(res.run_id)
        else:
            say(f"wave {i + 1}/{len(out.waves)}: {names}")
            res = materialize(assets, selection=wave.keys, instance=instance, resources=defs.resources,
                              tags={"arena/wave": str(i + 1), **(tags or {})})
            out.run_ids.append(res.run_id)
        out.wave_s.append(round(time.time() - tw, 2))
    out.wall_s = round(time.time() - t0, 2)
    return out
