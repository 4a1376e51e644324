"""Re-attach bookkeeping on the team's PostgreSQL instance (issue 18): the Slurm stop-vs-cancel
test of test_slurm_daemon.py (SIGTERM to a run worker leaves its job RUNNING; the daemon's run
retry, same root run id, re-attaches to it, no second job) with the instance's runs, events and
run-retry lineage in PostgreSQL instead of SQLite. Same test body; only ``deploy`` differs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_slurm_daemon import deployments
from test_slurm_daemon import (
    test_sigterm_to_run_worker_leaves_job_and_retry_reattaches as test_sigterm_and_reattach_on_postgres,
)

from tests.harness import DaemonHarness, postgres_storage

pytestmark = [pytest.mark.slurm, pytest.mark.postgres, pytest.mark.timeout(900)]

__all__ = ["test_sigterm_and_reattach_on_postgres"]


@pytest.fixture
def deploy(slurm_settings: Path, tmp_path: Path, pg_database: str) -> Iterator[Callable[..., DaemonHarness]]:
    """test_slurm_daemon.py's deployments on a fresh PostgreSQL database."""
    deployed = deployments(slurm_settings, tmp_path / "deploy", storage=postgres_storage(pg_database))
    start = next(deployed)

    def checked(*args: Any, **kwargs: Any) -> DaemonHarness:
        h = start(*args, **kwargs)
        assert type(h.instance().run_storage).__name__ == "PostgresRunStorage"
        return h

    checked.folder = start.folder  # type: ignore[attr-defined]
    try:
        yield checked
    finally:
        deployed.close()  # stops the deployments, cancels their jobs
