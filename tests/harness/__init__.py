"""A real Dagster deployment for tests: a temporary DAGSTER_HOME, ``dagster-daemon run`` as a
subprocess, and a code location loaded from a workspace.yaml (see :mod:`tests.harness.daemon`);
a fresh PostgreSQL database per instance for the team setup's storage (:mod:`tests.harness.postgres`)."""

from tests.harness.daemon import DaemonHarness, RunInfo, postgres_storage, project_instance_config
from tests.harness.postgres import PG_URL_ENV, fresh_database, pg_url_or_skip

__all__ = ["PG_URL_ENV", "DaemonHarness", "RunInfo", "fresh_database", "pg_url_or_skip", "postgres_storage",
           "project_instance_config"]
