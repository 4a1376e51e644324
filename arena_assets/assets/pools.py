"""Concurrency pools of the GPU-heavy steps, named per compute backend when definitions load.

Every GPU-heavy asset declares ``pool=gpu_pool(settings)``. The pool NAME depends on where the
step runs, so that one limit never throttles another backend:

=========  ==========  ===========================================================================
backend    pool        limit (what ``arena-assets pools --apply`` writes into the instance)
=========  ==========  ===========================================================================
local      ``gpu``     one GPU step per visible GPU (``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi
                       -L``), 1 without CUDA: the steps share this machine
slurm      ``slurm``   ``compute.max_parallel_jobs`` (default 8, >= the 5 folds): Slurm queues and
                       places the jobs; the pool only bounds how many jobs Dagster keeps in flight
k8s        ``k8s``     ``compute.max_parallel_jobs``
=========  ==========  ===========================================================================

Why limits are applied, not configured: Dagster 1.13's ``dagster.yaml`` accepts only
``concurrency.pools.default_limit`` (one limit for every pool without its own), ``granularity``
and ``op_granularity_run_buffer``; a per-pool limit lives in the instance's storage (what
``dagster instance concurrency set POOL N`` and the UI's concurrency page write). So
:func:`apply_pool_limits` writes the limit of the current settings' pool through the instance's
public event log storage API, and ``dagster.yaml`` keeps ``default_limit: 1`` as the safe value
for a pool nobody applied. A Slurm/k8s step logs a warning when its pool's limit in the
instance is below ``compute.max_parallel_jobs`` (``resources/compute.py``), so a forgotten
``--apply`` shows in the run log instead of silently serializing a backfill.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from arena_assets.core.settings import Settings

POOL_BY_BACKEND = {"local": "gpu", "slurm": "slurm", "k8s": "k8s"}
"""The pool name of each compute backend."""


def pool_for_backend(backend: str) -> str:
    try:
        return POOL_BY_BACKEND[backend]
    except KeyError:
        raise ValueError(f"unknown compute backend {backend!r} ({', '.join(POOL_BY_BACKEND)})") from None


def gpu_pool(settings: Settings) -> str:
    """The pool every GPU-heavy asset declares (chosen by ``compute.backend``)."""
    return pool_for_backend(settings.compute.backend)


def visible_gpus() -> int:
    """GPUs a local step may use, without importing torch: ``CUDA_VISIBLE_DEVICES`` when set
    (empty or ``-1`` hides every GPU), else the lines of ``nvidia-smi -L``, else 0."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        ids = []
        for part in cvd.split(","):
            part = part.strip()
            if not part or part.startswith("-"):
                break  # CUDA stops at the first invalid id
            ids.append(part)
        return len(ids)
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (subprocess.SubprocessError, OSError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def pool_limit(settings: Settings) -> int:
    """The limit the current settings' pool should have."""
    if settings.compute.backend == "local":
        return max(1, visible_gpus())
    return max(1, settings.compute.max_parallel_jobs)


def pool_limits(settings: Settings) -> dict[str, int]:
    """``{pool: limit}`` for the current settings (one pool: the backend's)."""
    return {gpu_pool(settings): pool_limit(settings)}


def current_limits(instance: Any, pools: list[str]) -> dict[str, int | None]:
    """The limit each pool has in ``instance`` now (None: not set; the default limit applies)."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return {p: None for p in pools}
    keys = storage.get_concurrency_keys()
    out: dict[str, int | None] = {}
    for p in pools:
        out[p] = storage.get_concurrency_info(p).slot_count if p in keys else None
    return out


def apply_pool_limits(instance: Any, settings: Settings) -> dict[str, dict[str, int | None]]:
    """Set the current settings' pool limit in ``instance`` (what ``dagster instance concurrency
    set`` does). Returns ``{pool: {"before": old or None, "after": new}}``. Raises when the
    instance's storage has no pool support (in-memory/ephemeral instances)."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        raise ValueError("this Dagster instance's storage does not support concurrency pools")
    wanted = pool_limits(settings)
    before = current_limits(instance, list(wanted))
    for pool, limit in wanted.items():
        if before[pool] != limit:
            storage.set_concurrency_slots(pool, limit)
    return {p: {"before": before[p], "after": wanted[p]} for p in wanted}


def format_limits(settings: Settings, instance: Any | None = None) -> str:
    lines = [f"backend {settings.compute.backend}"]
    limits = pool_limits(settings)
    now = current_limits(instance, list(limits)) if instance is not None else {}
    for pool, limit in limits.items():
        extra = ""
        if instance is not None:
            extra = f" (instance now: {now.get(pool) if now.get(pool) is not None else 'unset, default_limit applies'})"
        lines.append(f"pool {pool}: limit {limit}{extra}")
    return "\n".join(lines)
