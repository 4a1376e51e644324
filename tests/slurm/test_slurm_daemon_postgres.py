"""Re-attach bookkeeping on the team's PostgreSQL instance (issue 18): the Slurm stop-vs-cancel
test of test_slurm_daemon.py (SIGTERM to a run worker leaves its job RUNNING; the daemon's run
retry, same root run id, re-attaches to it, no second job) with the instance's runs, events and
run-retry lineage in PostgreSQL instead of SQLite. Same test body; only ``deploy`` differs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_slurm_daemon import _cancel_jobs_under
from test_slurm_daemon import (
    test_sigterm_to_run_worker_leaves_job_and_retry_reattaches as test_sigterm_and_reattach_on_postgres,
)

from tests.harness import DaemonHarness, postgres_storage

pytestmark = [pytest.mark.slurm, pytest.mark.postgres, pytest.mark.timeout(900)]

__all__ = ["test_sigterm_and_reattach_on_postgres"]


@pytest.fixture
def deploy(slurm_settings: Path, tmp_path: Path, pg_database: str) -> Iterator[Callable[..., DaemonHarness]]:
    """test_slurm_daemon.py's ``deploy`` on a fresh PostgreSQL database."""
    started: list[DaemonHarness] = []
    folder = Path(yaml.safe_load(slurm_settings.read_text())["compute"]["slurm"]["folder"])

    def start(sleep_s: float = 40, slurm: dict[str, Any] | None = None) -> DaemonHarness:
        if slurm:
            cfg = yaml.safe_load(slurm_settings.read_text())
            cfg["compute"]["slurm"].update(slurm)
            slurm_settings.write_text(yaml.safe_dump(cfg))
        h = DaemonHarness(
            tmp_path / "deploy", module="slurm_defs", location_name="slurm_defs",
            storage=postgres_storage(pg_database),
            env={"ARENA_SETTINGS": str(slurm_settings), "ARENA_TEST_SLEEP_S": str(sleep_s)},
        )
        started.append(h)
        h.start()
        assert type(h.instance().run_storage).__name__ == "PostgresRunStorage"
        return h

    start.folder = folder  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for h in started:
            h.stop()
        _cancel_jobs_under(folder)
