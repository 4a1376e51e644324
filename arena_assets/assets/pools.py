"""Concurrency pools of the GPU-heavy steps, named per compute backend when definitions load.

(Stub: the pool design is being filled in; stage modules call :func:`gpu_pool` only.)
"""

from __future__ import annotations

from arena_assets.core.settings import Settings


def gpu_pool(settings: Settings) -> str:
    """The pool every GPU-heavy asset declares."""
    return "gpu"
