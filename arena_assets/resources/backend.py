"""The interface every compute backend implements (local, Slurm via submitit, Kubernetes).

``ComputeResource.run`` (resources/compute.py) picks a backend by name and calls ``run`` with the
same plain ``gpu/`` function whatever the backend. The function writes ``result.json`` into
``out_dir`` (core/results.py); the backend returns the StepResult read back from it, with
backend facts added under ``info['compute']`` (backend name, job id, state, node, elapsed,
max RSS, ...). A backend raises ``dagster.Failure`` with the remote traceback and state when the
step fails, and cancels remote work when the Dagster run is terminated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from arena_assets.core.results import StepResult
from arena_assets.core.settings import StepNeeds


class Backend(Protocol):
    name: str

    def run(
        self,
        context: Any,
        step: str,
        fn: Callable[..., StepResult],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        out_dir: Path,
        needs: StepNeeds,
        python: str | None = None,
    ) -> StepResult:
        """Run ``fn(*args, out_dir=out_dir, **kwargs)`` somewhere; return its StepResult."""
        ...
